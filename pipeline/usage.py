"""Usage checks on the inputs, before anything is read or written.

An ``--input`` that names nothing is a typo, not an empty export: run on, it would
replace a table with an empty one under WRITE_TRUNCATE. So a local path that does not
exist, or a pattern (local glob, ``gs://`` path or pattern) that matches no file, stops
the run with a UsageError. A filter file that selects nothing is another matter: that
export is legal (the Healthcare API's too) and is not checked here.
"""

from __future__ import annotations

import glob
import os

from pipeline.options import UsageError
from transforms.listing import has_glob


def check_inputs_exist(patterns: list[str], pipeline_options=None) -> None:
    """Raise UsageError for the first pattern that matches no file.

    Local: a path without a glob must exist (an empty folder exists: exporting it is
    legal); a glob must match at least one file. ``gs://`` (and any other filesystem
    Beam knows): Beam's ``FileSystems.match`` with ``limits=[1]``, one small listing per
    pattern; a path without a glob may be an object or a prefix, as in the listing.
    Other sources (``dicomweb+https://``) check themselves when they list.
    """
    for pattern in patterns:
        if pattern.startswith("dicomweb"):
            continue
        if "://" in pattern:
            _check_remote(pattern, pipeline_options)
        else:
            _check_local(pattern)


def _check_local(pattern: str) -> None:
    if not has_glob(pattern):
        if not os.path.lexists(pattern):
            raise UsageError(f"--input {pattern}: no such file or folder")
        return
    if not _any_file(pattern):
        raise UsageError(f"--input {pattern}: the pattern matches no file (names are case-sensitive)")


def _any_file(pattern: str) -> bool:
    """True as soon as the glob yields one entry that is not a folder (lazy)."""
    return any(not os.path.isdir(path) for path in glob.iglob(pattern, recursive=True))


def _check_remote(pattern: str, pipeline_options) -> None:
    from apache_beam.io.filesystem import BeamIOError
    from apache_beam.io.filesystems import FileSystems

    if pipeline_options is not None:
        FileSystems.set_options(pipeline_options)
    if pattern.endswith("/"):
        candidates = [pattern + "**"]
    elif has_glob(pattern):
        candidates = [pattern]
    else:
        candidates = [pattern, pattern + "/**"]
    for candidate in candidates:
        try:
            result = FileSystems.match([candidate], limits=[1])[0]
        except BeamIOError as error:
            causes = getattr(error, "exception_details", None) or {}
            cause = next(iter(causes.values()), error)
            raise UsageError(
                f"--input {pattern}: cannot be listed ({type(cause).__name__}); check the bucket name and "
                "your access to it"
            ) from None
        if result.metadata_list:
            return
    raise UsageError(f"--input {pattern}: matches no object (names are case-sensitive)")
