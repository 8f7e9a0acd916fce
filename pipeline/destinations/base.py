"""The one interface every destination implements, and the registry of URI schemes.

A run uses a destination in this order, and never asks which one it has::

    destination = parse_destination(uri, pipeline_options)
    destination.check_runner(local)          # e.g. DuckDB needs a local runner
    destination.check_options(export)        # e.g. --cluster-by is for BigQuery only
    destination.preflight(disposition)       # before any file is read
    destination.attach(outputs, context)     # its writing, added to the graph
    ... the pipeline runs ...
    destination.finish(context)              # after a local run: the launcher's write, if any

A destination that writes inside the graph (BigQuery, Parquet) does all its work in
``attach`` and so also runs on Dataflow; one that is written by the launcher (DuckDB)
stages its rows in ``context.staging`` during ``attach`` and writes them in ``finish``.
Whichever way, a failed run leaves the table as it was.
"""

from __future__ import annotations

import abc
import dataclasses
import datetime as dt
import importlib
import importlib.util
import os
import tempfile
import uuid

from pipeline.destinations import Disposition


@dataclasses.dataclass
class RunContext:
    """What a destination needs to know about the run it writes.

    ``staging`` is a folder of this run on the launcher's machine (local runners only;
    see :mod:`pipeline.staging`); ``counts`` are the run's counters, known once a local
    pipeline has finished.
    """

    disposition: Disposition
    started_at: dt.datetime
    max_failures: int | None = None
    local: bool = True
    staging: str | None = None
    counts: dict = dataclasses.field(default_factory=dict)
    incremental: bool = False  # one row per SOPInstanceUID, updated in place (pipeline/ledger.py)
    prune_missing: bool = False
    token: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def run_started(self) -> str:
        """The start as a UTC timestamp, as stamped on the dead letters."""
        return self.started_at.isoformat(sep=" ", timespec="microseconds")

    @property
    def run_id(self) -> str:
        """A name for this run's staging objects, unique to the run: its start time, a
        random token (two runs of one process may start within a second; a destination
        takes a run with its own id for a retried step of itself) and its process."""
        return f"{self.started_at:%Y%m%dT%H%M%S}-{self.token}-{os.getpid()}"


class Destination(abc.ABC):
    """Where an export's rows and dead letters go (``--bq-table URI``)."""

    #: True for a destination that takes the rows as read and fills in their absent
    #: REPEATED fields itself as it loads them (``pipeline.graph.ExportPlan.rows_as_read``):
    #: the pipeline then neither spools nor completes them.
    takes_rows_as_read = False

    @classmethod
    @abc.abstractmethod
    def parse(cls, uri: str, pipeline_options=None) -> "Destination":
        """The destination a URI of this kind names; DestinationError if malformed."""

    def check_runner(self, local: bool) -> None:
        """Raise ValueError (a usage error) if this destination cannot be written by
        the chosen runner (``local``: the pipeline runs beside the launcher)."""

    def check_options(self, export_options) -> None:
        """Raise ValueError (a usage error) for export options this destination does
        not take. By default ``--cluster-by``, which only BigQuery tables have."""
        if getattr(export_options, "cluster_by", None):
            raise ValueError("--cluster-by applies to BigQuery tables (bq://) only")

    @abc.abstractmethod
    def preflight(self, disposition: Disposition) -> None:
        """Before any file is read: everything about the destination that can be known
        (it is reachable and writable, the table's state against ``disposition``).
        Raises DestinationError with a message that says what to fix."""

    @abc.abstractmethod
    def attach(self, outputs, context: RunContext) -> None:
        """Add this destination's writing of ``outputs`` (:class:`pipeline.graph.ExportOutputs`)
        to their pipeline."""

    def recorded_files(self, context: RunContext):
        """With ``--incremental``: a root PTransform that reads the files table's records
        (dicts with ``path``, ``version``, ``outcome``) once, in the pipeline; None when
        every listed file is to be read (no table yet, or a rebuild). Destinations that
        do not support ``--incremental`` reject it in :meth:`check_options`."""
        return None

    def read_recorded_files(self, context: RunContext):
        """The same records as :meth:`recorded_files`, read here in the launcher (an
        iterable), for a local run to compare its listing before starting the pipeline
        (``pipeline.main._compare_before_pipeline``); None where that is not offered or
        there is no files table to compare with."""
        return None

    def finish(self, context: RunContext) -> None:
        """After a local pipeline finished successfully: complete the write (one
        transaction). Nothing to do for destinations written inside the graph."""

    def staging_prefix(self) -> str:
        """Where a local run's staging folder goes (see :mod:`pipeline.staging`): beside
        the destination for one that stages rows. By default the system's temporary
        folder (the run's rows pass through it, in a folder only this user can read,
        removed when the run ends: :mod:`pipeline.spool`)."""
        return os.path.join(tempfile.gettempdir(), "dicom-bq-export")

    @abc.abstractmethod
    def errors_uri(self) -> str:
        """The dead-letter table ``TABLE_errors`` (or its equivalent), as a URI."""

    @abc.abstractmethod
    def __str__(self) -> str:
        """The destination's URI, as the user would write it."""


#: Without ``--bq-table``: a local DuckDB file, so the export docs' example queries run locally.
DEFAULT_URI = "duckdb://dicom_metadata.duckdb#dicom_metadata"

#: URI scheme → (module, class). Modules are imported when their scheme is used, so a
#: destination's client libraries are loaded only by the runs that need them.
SCHEMES = {
    "bq://": ("pipeline.destinations.bigquery", "BigQueryTable"),
    "duckdb://": ("pipeline.destinations.duckdb", "DuckDBTable"),
    "parquet://": ("pipeline.destinations.parquet", "ParquetTable"),
    "parquet+gs://": ("pipeline.destinations.parquet", "ParquetTable"),
}


def parse_destination(uri: str, pipeline_options=None) -> Destination:
    """The destination ``--bq-table`` names. A scheme-less ``PROJECT.DATASET.TABLE`` or
    ``PROJECT:DATASET.TABLE`` is a BigQuery table (what Dataflow's parameters give).

    Raises ValueError for a URI of no known kind, DestinationError for a malformed one.
    """
    from pipeline.destinations.bigquery import is_bigquery_uri

    scheme = "bq://" if is_bigquery_uri(uri) else next((s for s in SCHEMES if uri.startswith(s)), None)
    if scheme is None:
        raise ValueError(
            "--bq-table must be bq://PROJECT.DATASET.TABLE, duckdb://PATH#TABLE, parquet://DIR or "
            f"parquet+gs://BUCKET/PREFIX, not {uri!r}"
        )
    module_name, class_name = SCHEMES[scheme]
    if importlib.util.find_spec(module_name) is None:
        raise ValueError(f"{scheme} destinations are not available in this version of dicom-bq-export")
    destination_class = getattr(importlib.import_module(module_name), class_name)
    return destination_class.parse(uri, pipeline_options)
