"""The filter file: which instances to export (SPEC §1).

Resource paths separated by ``\\n`` or ``\\r\\n``, each
``/studies/STUDY_UID[/series/SERIES_UID[/instances/INSTANCE_UID]]``; blank lines are
ignored. A malformed line stops the run before any instance is read, naming the line.
An instance is exported iff some line selects it.

Pure Python: parsed in the launcher (to fail fast) and again on a worker, where it
becomes a side input of the read step.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_UID = r"[0-9.]{1,64}"
_LINE = re.compile(rf"/studies/({_UID})(?:/series/({_UID})(?:/instances/({_UID}))?)?")
#: How many lines a FilterFileError quotes by number before summarising.
_MAX_REPORTED = 10


class FilterFileError(ValueError):
    """The filter file is malformed; the message names the lines."""


class FilterLine(NamedTuple):
    number: int  # 1-based line number in the file
    study: str
    series: str | None
    instance: str | None


class FilterFile:
    """The parsed lines and an index answering "which lines select this instance?"."""

    def __init__(self, lines: list[FilterLine]):
        self.lines = lines
        self._studies: dict[str, list[int]] = {}
        self._series: dict[tuple[str, str], list[int]] = {}
        self._instances: dict[tuple[str, str, str], list[int]] = {}
        for line in lines:
            if line.instance is not None:
                self._instances.setdefault((line.study, line.series, line.instance), []).append(line.number)
            elif line.series is not None:
                self._series.setdefault((line.study, line.series), []).append(line.number)
            else:
                self._studies.setdefault(line.study, []).append(line.number)

    def __len__(self) -> int:
        return len(self.lines)

    def selecting_lines(self, study: str, series: str, instance: str) -> list[int]:
        """Numbers of the lines that select this instance; empty if none does."""
        return (
            self._studies.get(study, [])
            + self._series.get((study, series), [])
            + self._instances.get((study, series, instance), [])
        )


def parse_filter_file(text: str) -> FilterFile:
    """Parse the whole file; raise :class:`FilterFileError` naming every malformed line."""
    lines, bad = [], []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r").strip()
        if not line:
            continue
        match = _LINE.fullmatch(line)
        if match is None:
            bad.append(number)
            continue
        lines.append(FilterLine(number, *match.groups()))
    if bad:
        shown = ", ".join(str(n) for n in bad[:_MAX_REPORTED])
        more = f" and {len(bad) - _MAX_REPORTED} more" if len(bad) > _MAX_REPORTED else ""
        raise FilterFileError(
            f"filter file line{'s' if len(bad) > 1 else ''} {shown}{more}: expected "
            "/studies/STUDY_UID, /studies/STUDY_UID/series/SERIES_UID or "
            "/studies/STUDY_UID/series/SERIES_UID/instances/INSTANCE_UID, where a UID is "
            "1 to 64 digits and dots"
        )
    return FilterFile(lines)


def read_filter_file(uri: str) -> FilterFile:
    """Read and parse a filter file from any filesystem Beam knows (``gs://``, local)."""
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(uri) as fileobj:
            data = fileobj.read()
    except Exception as error:
        raise FilterFileError(f"cannot read the filter file {uri}: {type(error).__name__}: {error}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise FilterFileError(f"the filter file {uri} is not UTF-8 text") from None
    return parse_filter_file(text)


def uid_layout_patterns(root: str, line: FilterLine) -> list[str]:
    """File patterns under ``root`` that hold what ``line`` selects, in both UID layouts.

    ``ROOT/STUDY/SERIES/INSTANCE[.dcm]`` (the Healthcare API's Cloud Storage export) and
    ``ROOT/studies/STUDY/series/SERIES/instances/INSTANCE[.dcm]`` (DICOMweb paths).
    """
    root = root.rstrip("/")
    flat = [root, line.study]
    web = [root, "studies", line.study]
    if line.series is not None:
        flat.append(line.series)
        web += ["series", line.series]
    patterns = []
    for parts, instances in ((flat, None), (web, "instances")):
        if line.instance is None:
            patterns.append("/".join(parts) + "/**")
        else:
            base = "/".join(parts + ([instances] if instances else []) + [line.instance])
            patterns += [base, base + ".dcm"]
    return patterns
