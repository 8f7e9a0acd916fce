"""The result of a run (SPEC §6): Beam's counters, checked and printed.

Like the Healthcare API operation's counters: instances succeeded and failed, plus
dropped tags, values moved to OtherElements, bytes read and duration. The figures are
the pipeline's Beam metrics, so a Dataflow job shows the same ones in its console.

Failures are broken down by type (the ``failed:<ErrorType>`` counters), and dropped
tags into those dropped by rule (by design: binary VRs, Pixel Data, …: ``dropped_by_rule``)
and those dropped because their value could not be kept (``dropped_not_fit``).
"""

from __future__ import annotations

import json

from apache_beam.metrics.metric import MetricsFilter

from transforms.counters import COUNTERS as _ALL_COUNTERS
from transforms.counters import FAILED_PREFIX, NAMESPACE

#: Figures of the sources, in the summary only when not zero (a run of files has none).
_SOURCE_FIGURES = {
    "archives_expanded": "archives expanded",
    "archives_streamed": ".tar.gz streamed",
    "dicomweb_requests": "DICOMweb requests",
    "dicomweb_retries": "DICOMweb retries",
}

#: The summary prints this many failure types; the JSON has them all.
TOP_FAILURE_TYPES = 5


class CountMismatch(RuntimeError):
    """succeeded + failed != inputs: an input was lost, which must never happen."""


def counters(result) -> dict[str, int]:
    """The run's counters from a finished pipeline result (committed values)."""
    values = dict.fromkeys(_ALL_COUNTERS, 0)
    metrics = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    for counter in metrics["counters"]:
        name = counter.key.metric.name
        value = counter.committed if counter.committed is not None else counter.attempted
        values[name] = values.get(name, 0) + (value or 0)
    return values


def failures_by_type(counts: dict[str, int]) -> dict[str, int]:
    """``{error type: count}`` from the ``failed:<ErrorType>`` counters, most frequent
    first (then by name), zero counts left out."""
    kinds = {name[len(FAILED_PREFIX):]: value for name, value in counts.items()
             if name.startswith(FAILED_PREFIX) and value}
    return dict(sorted(kinds.items(), key=lambda item: (-item[1], item[0])))


def build(counts, *, duration, destination, errors_table, disposition, filter_file, lines_used, listing) -> dict:
    inputs = counts["files_matched"] - counts["not_selected"] - counts.get("unchanged_files", 0)
    if counts["succeeded"] + counts["failed"] != inputs:
        raise CountMismatch(
            f"{counts['succeeded']:,} succeeded + {counts['failed']:,} failed != {inputs:,} inputs"
        )
    summary = {
        "destination": destination,
        "errors_table": errors_table,
        "write_disposition": disposition.value,
        "listing": listing,
        "files_matched": counts["files_matched"],
        "not_selected_by_filter": counts["not_selected"],
        "inputs": inputs,
        "succeeded": counts["succeeded"],
        "failed": counts["failed"],
        "failures_by_type": failures_by_type(counts),
        "dropped_tags": counts["dropped_tags"],
        "dropped_by_rule": counts.get("dropped_by_rule", 0),
        "dropped_not_fit": counts.get("dropped_not_fit", 0),
        "moved_to_other_elements": counts["moved_to_other_elements"],
        "charset_fallbacks": counts["charset_fallbacks"],
        "undecodable_values": counts["undecodable_values"],
        "too_deep": counts["too_deep"],
        "bytes_read": counts["bytes_read"],
        **{name: counts[name] for name in _SOURCE_FIGURES if counts.get(name)},
        "bytes_read_per_instance": round(counts["bytes_read"] / inputs) if inputs else 0,
        "duration_seconds": round(duration, 3),
        "instances_per_second": round(inputs / duration, 1) if duration else 0.0,
    }
    # -- the files table and --incremental (pipeline/ledger.py) --
    for name in ("unchanged_files", "duplicate_instances", "rows_added", "rows_replaced", "rows_pruned",
                 "instances_already_in_table"):
        if counts.get(name) or (name.startswith("rows_") and name in counts):
            summary[name] = counts[name]
    # --
    if filter_file is not None:
        used = set(lines_used or ())
        summary["filter_lines"] = len(filter_file)
        summary["filter_lines_selecting_nothing"] = [line.number for line in filter_file.lines if line.number not in used]
    return summary


def render(summary: dict) -> str:
    lines = [
        f"dicom-bq-export: exported to {summary['destination']} ({summary['write_disposition']}) "
        f"in {summary['duration_seconds']:.1f} s",
        f"  files matched            {summary['files_matched']:>12,}",
    ]
    if "filter_lines" in summary:
        lines.append(f"  not selected by filter   {summary['not_selected_by_filter']:>12,}")
    lines += [
        f"  instances succeeded      {summary['succeeded']:>12,}",
        f"  instances failed         {summary['failed']:>12,}" + (
            f"   (one row each in {summary['errors_table']})" if summary["failed"] else ""),
    ]
    kinds = list(summary.get("failures_by_type", {}).items())
    for kind, count in kinds[:TOP_FAILURE_TYPES]:
        lines.append(f"    {kind:<23}{count:>12,}")
    if len(kinds) > TOP_FAILURE_TYPES:
        rest = kinds[TOP_FAILURE_TYPES:]
        lines.append(f"    {f'{len(rest)} other types':<23}{sum(c for _k, c in rest):>12,}")
    lines += [
        f"  tags dropped by rule     {summary.get('dropped_by_rule', 0):>12,}   (binary VRs, Pixel Data: by design)",
        f"  tags dropped, not fit    {summary.get('dropped_not_fit', 0):>12,}"
        + ("   (value could not be kept; named in DroppedTags)" if summary.get("dropped_not_fit") else ""),
        f"  moved to OtherElements   {summary['moved_to_other_elements']:>12,}",
        f"  charset fallbacks        {summary['charset_fallbacks']:>12,}",
        f"  bytes read               {summary['bytes_read']:>12,}   "
        f"({summary['bytes_read_per_instance']:,} per instance)",
        f"  instances per second     {summary['instances_per_second']:>12,.1f}",
    ]
    lines += [f"  {label:<24} {summary[name]:>12,}" for name, label in _SOURCE_FIGURES.items() if name in summary]
    # -- the files table and --incremental (pipeline/ledger.py) --
    for name, label in (("unchanged_files", "unchanged files skipped"), ("rows_added", "rows added"),
                        ("rows_replaced", "rows replaced"), ("rows_pruned", "rows pruned"),
                        ("duplicate_instances", "duplicate SOPInstanceUIDs"),
                        ("instances_already_in_table", "already in the table")):
        if name in summary:
            lines.append(f"  {label:<25}{summary[name]:>12,}" + (
                "   (appended again: WRITE_APPEND keeps both rows; --incremental keeps one)"
                if name == "instances_already_in_table" else ""))
    # --
    if "filter_lines" in summary:
        nothing = summary["filter_lines_selecting_nothing"]
        shown = ", ".join(str(n) for n in nothing[:20]) + (" ..." if len(nothing) > 20 else "")
        lines.append(
            f"  filter lines             {summary['filter_lines']:>12,}"
            + (f"   ({len(nothing)} selected nothing: line {shown})" if nothing else "")
        )
    return "\n".join(lines)


def write_json(summary: dict, path: str) -> None:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(path) as handle:
        handle.write((json.dumps(summary, indent=2) + "\n").encode("utf-8"))
