"""The name of every counter of a run (Beam metrics in the ``dicom_bq_export`` namespace).

One place for the names, so that the DoFns that count and the summary that reads the
counts cannot drift apart. A Dataflow job shows the same figures in its console.
"""

from __future__ import annotations

NAMESPACE = "dicom_bq_export"

FILES_LISTED = "files_listed"
FILES_MATCHED = "files_matched"
SUCCEEDED = "succeeded"
FAILED = "failed"
NOT_SELECTED = "not_selected"
BYTES_READ = "bytes_read"
BYTES_READ_PER_INSTANCE = "bytes_read_per_instance"  # a distribution
DROPPED_TAGS = "dropped_tags"  # the sum of the next two
DROPPED_BY_RULE = "dropped_by_rule"  # excluded by the schema rules (OB/OW/UN, Pixel Data…): by design
DROPPED_NOT_FIT = "dropped_not_fit"  # a value that could not be kept (too large, too deep…)
MOVED_TO_OTHER_ELEMENTS = "moved_to_other_elements"
CHARSET_FALLBACKS = "charset_fallbacks"
UNDECODABLE_VALUES = "undecodable_values"
TOO_DEEP = "too_deep"
UNREAD_AFTER_PIXEL_DATA = "unread_after_pixel_data"  # elements after Pixel Data not read unambiguously
DICOMWEB_REQUESTS = "dicomweb_requests"  # every HTTP request to a DICOMweb server, retries included
DICOMWEB_RETRIES = "dicomweb_retries"  # requests repeated after a 429/5xx, a reset or a timeout
ARCHIVES_EXPANDED = "archives_expanded"  # ZIP and tar archives listed member by member
ARCHIVES_STREAMED = "archives_streamed"  # .tar.gz archives streamed by one worker
# The files table and --incremental (pipeline/ledger.py); the row counts are set when
# the destination writes.
UNCHANGED_FILES = "unchanged_files"  # listed, recorded as exported with the same version: not read
DUPLICATE_INSTANCES = "duplicate_instances"  # files of this run whose SOPInstanceUID another file's row took
ROWS_ADDED = "rows_added"
ROWS_REPLACED = "rows_replaced"
ROWS_PRUNED = "rows_pruned"
ALREADY_IN_TABLE = "instances_already_in_table"  # WRITE_APPEND without --incremental

#: Counted while listing.
LISTING_COUNTERS = (FILES_LISTED, FILES_MATCHED)

#: Counted by the read-and-flatten step; a ``Flattened.counts`` key of one of these
#: names is added to its counter.
READ_COUNTERS = (
    SUCCEEDED,
    FAILED,
    NOT_SELECTED,
    BYTES_READ,
    DROPPED_TAGS,
    DROPPED_BY_RULE,
    DROPPED_NOT_FIT,
    MOVED_TO_OTHER_ELEMENTS,
    CHARSET_FALLBACKS,
    UNDECODABLE_VALUES,
    TOO_DEEP,
    UNREAD_AFTER_PIXEL_DATA,
    DICOMWEB_REQUESTS,
    DICOMWEB_RETRIES,
)

#: Counted by the sources (listing and reading archives); shown when not zero.
SOURCE_COUNTERS = (ARCHIVES_EXPANDED, ARCHIVES_STREAMED)

#: Counted by the files table's steps (the row counts exist only once a destination set them).
LEDGER_COUNTERS = (UNCHANGED_FILES, DUPLICATE_INSTANCES)

#: Every fixed counter, in the order the summary knows them.
COUNTERS = LISTING_COUNTERS + READ_COUNTERS + SOURCE_COUNTERS + LEDGER_COUNTERS

#: Prefix of the per-failure-type counters, ``failed:NotDicomError``.
FAILED_PREFIX = FAILED + ":"


def failed_counter(error_type: str) -> str:
    """The counter of failures of one type, incremented next to ``failed``."""
    return FAILED_PREFIX + error_type
