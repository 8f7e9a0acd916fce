"""``dicom-bq-export report``: what an exported table holds, for people who would rather look
than write SQL.

    dicom-bq-export report [--bq-table URI] [--html FILE] [--top N] [--project P]

It prints the instances, studies, series and patients of the table; instances by modality,
manufacturer and year of StudyDate; failures by type (from ``TABLE_errors``); the most
frequent dropped tags (``DroppedTags.TagName``, nested names included) and private creators
(private creator elements ``(gggg,0010-00FF)``, odd group, found in ``OtherElements`` at
every nesting level). ``--html FILE`` also writes one self-contained page (inline CSS and
SVG; no script, font or network request) with those figures as bar charts.

Tables: ``duckdb://PATH#TABLE`` (opened read-only), ``bq://PROJECT.DATASET.TABLE``
(standard SQL, billed to ``--project`` or the table's project) and ``parquet://DIR``
(``DIR/**/*.parquet`` read by name, ``_schema.json``, dead letters in ``DIR_errors``).
The same queries run on all three (DuckDB and BigQuery differ only in identifier quoting),
in one query per run, so BigQuery runs one job.

The labels it prints (modalities, manufacturers, private creators) are values from the
table: that is the report's purpose, so it writes them to stdout or the page the user asked
for, never to a log or an error message. Control characters in them are replaced, so a
label cannot drive the terminal, and every value in the page is HTML-escaped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import glob
import html
import json
import os
import sys
import tempfile
import unicodedata
from typing import Callable, Iterable, TextIO

import duckdb

from pipeline.destinations import DestinationError, errors_table_name
from pipeline.destinations.duckdb import DEFAULT_URI, DuckDBTable, duckdb_type
from pipeline.destinations.duckdb import quote as duckdb_quote

#: Bars per chart (except years, all shown); the rest are summed into one line.
DEFAULT_TOP = 10
#: Longest label shown in full; longer ones end with an ellipsis.
MAX_LABEL = 64
NONE_LABEL = "(none)"

_PRIVATE_GROUP_LAST_DIGITS = ("1", "3", "5", "7", "9", "B", "D", "F")
#: Odd groups that PS3.5 7.8.1 does not allow for private data elements.
_NOT_PRIVATE_GROUPS = ("0001", "0003", "0005", "0007", "FFFF")


class ReportUsageError(ValueError):
    """A wrong flag or URI: exit status 2."""


class ReportError(RuntimeError):
    """The table cannot be read (absent, unreadable, a failed query): exit status 1."""


# -- the figures ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Breakdown:
    """One chart: ``(label, count)`` pairs, the most frequent first (years: in order).

    ``rest`` labels are not shown; ``rest_count`` is their total where counts add up
    (instances by modality do; dropped tags, counted per instance, do not).
    """

    key: str
    title: str
    unit: str
    items: tuple[tuple[str, int], ...]
    rest: int = 0
    rest_count: int | None = None
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Overview:
    table: str
    instances: int
    studies: int
    series: int
    patients: int
    failures: int | None  # None: there is no errors table
    errors_table: str
    breakdowns: tuple[Breakdown, ...]

    def breakdown(self, key: str) -> Breakdown:
        return next(b for b in self.breakdowns if b.key == key)


# -- the queries (one set for every engine) -----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Dialect:
    """What differs between DuckDB's and BigQuery's SQL for these queries: quoting."""

    quote: Callable[[str], str]


DUCKDB = Dialect(quote=duckdb_quote)
BIGQUERY = Dialect(quote=lambda name: "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`")


def _field(schema: list[dict], name: str) -> dict | None:
    return next((f for f in schema if f["name"] == name), None)


def _scalar(schema: list[dict], name: str, types: tuple[str, ...] = ("STRING",)) -> bool:
    field = _field(schema, name)
    return field is not None and field["type"] in types and field.get("mode", "NULLABLE") != "REPEATED"


def _other_elements_paths(fields: list[dict], path: tuple = ()) -> Iterable[tuple[tuple[str, bool], ...]]:
    """Paths (``(name, repeated)`` steps) to every ``OtherElements`` field, nested ones too."""
    for field in fields:
        if field["type"] not in ("RECORD", "STRUCT"):
            continue
        step = path + ((field["name"], field.get("mode") == "REPEATED"),)
        if field["name"] == "OtherElements":
            yield step
        else:
            yield from _other_elements_paths(field.get("fields", []), step)


def _unnest_path(path: tuple[tuple[str, bool], ...], q: Callable[[str], str]) -> tuple[list[str], str]:
    """``(UNNEST clauses, alias of the last step)`` walking ``path`` from row alias ``t``."""
    current, joins = "t", []
    for depth, (name, repeated) in enumerate(path):
        expression = f"{current}.{q(name)}"
        if repeated:
            current = f"s{depth}"
            joins.append(f"UNNEST({expression}) AS {current}")
        else:
            current = expression
    return joins, current


def _private_creator_condition(tag: str) -> str:
    """SQL: ``tag`` (``Tag_GGGGEEEE``) is a private creator: odd group, element 0010-00FF."""
    upper = f"UPPER({tag})"
    digits = ", ".join(f"'{d}'" for d in _PRIVATE_GROUP_LAST_DIGITS)
    groups = ", ".join(f"'{g}'" for g in _NOT_PRIVATE_GROUPS)
    return (
        f"LENGTH({tag}) = 12 AND SUBSTR({upper}, 1, 4) = 'TAG_' AND SUBSTR({upper}, 8, 1) IN ({digits}) "
        f"AND SUBSTR({upper}, 5, 4) NOT IN ({groups}) AND SUBSTR({tag}, 9, 2) = '00' "
        f"AND SUBSTR({tag}, 11, 1) <> '0'"
    )


#: The charts of instances by a column's value: (chart, column, the column's type).
_LABEL_COLUMNS = (("modality", "Modality", "STRING"), ("manufacturer", "Manufacturer", "STRING"),
                  ("year", "StudyDate", "DATE"))


def overview_query(schema: list[dict], table: str, errors: str | None, dialect: Dialect) -> str:
    """One query returning ``(section, label, n)`` rows for every figure of the report.

    ``table`` and ``errors`` are quoted table references; ``schema`` is the table's
    BigQuery schema: a column the table lacks (no instance had it) is left out, not
    queried.
    """
    q = dialect.quote
    t = f"{table} AS t"
    parts = [f"SELECT 'total' AS section, 'instances' AS label, COUNT(*) AS n FROM {t}"]
    for label, column in (("studies", "StudyInstanceUID"), ("series", "SeriesInstanceUID")):
        if _scalar(schema, column):
            parts.append(f"SELECT 'total', '{label}', COUNT(DISTINCT t.{q(column)}) FROM {t}")
    if _scalar(schema, "PatientID"):
        key = ", ".join(q(c) for c in ("IssuerOfPatientID", "PatientID") if _scalar(schema, c))
        parts.append(
            f"SELECT 'total', 'patients', COUNT(*) FROM (SELECT DISTINCT {key} FROM {table} "
            f"WHERE {q('PatientID')} IS NOT NULL) AS p"
        )
    for key, column, column_type in _LABEL_COLUMNS:
        if _scalar(schema, column, (column_type,)):
            label = f"t.{q(column)}" if key != "year" else f"CAST(EXTRACT(YEAR FROM t.{q(column)}) AS STRING)"
            parts.append(f"SELECT '{key}', {label}, COUNT(*) FROM {t} GROUP BY 2")
    dropped = _field(schema, "DroppedTags")
    if dropped is not None and dropped.get("mode") == "REPEATED":
        parts.append(f"SELECT 'dropped', d.{q('TagName')}, COUNT(*) FROM {t}, UNNEST(t.{q('DroppedTags')}) AS d GROUP BY 2")
    creators = []
    if _scalar(schema, "SOPInstanceUID"):
        for path in _other_elements_paths(schema):
            joins, other = _unnest_path(path, q)
            tag = f"{other}.{q('Tag')}"
            creators.append(
                f"SELECT t.{q('SOPInstanceUID')} AS id, TRIM(v) AS creator FROM {', '.join([t, *joins])}, "
                f"UNNEST({other}.{q('Data')}) AS v WHERE {_private_creator_condition(tag)}"
            )
    if creators:
        union = " UNION ALL ".join(creators)
        parts.append(
            f"SELECT 'creator', c.creator, COUNT(DISTINCT c.id) FROM ({union}) AS c "
            "WHERE c.creator IS NOT NULL AND c.creator <> '' GROUP BY 2"
        )
    if errors is not None:
        parts.append(f"SELECT 'failure', e.{q('error_type')}, COUNT(*) FROM {errors} AS e GROUP BY 2")
    return "\nUNION ALL ".join(parts)


_SECTIONS = (
    # key, title, unit, counts add up to the whole
    ("modality", "Instances by modality", "instances", True),
    ("manufacturer", "Instances by manufacturer", "instances", True),
    ("year", "Instances by year of StudyDate", "instances", True),
    ("failure", "Failures by type (files)", "files", True),
    ("dropped", "Most frequent dropped tags (instances)", "instances", False),
    ("creator", "Most frequent private creators (instances)", "instances", False),
)
_NOTES = {
    "dropped": "Elements not exported (DroppedTags), nested ones named by their sequence path; "
    "counted once per instance.",
    "creator": "Private creator elements (gggg,0010-00FF) in OtherElements, at any nesting level; "
    "counted once per instance.",
    "failure": "Files that did not become a row, by error type (the errors table).",
}


def build_overview(
    rows: Iterable[tuple], *, table: str, errors_table: str, has_errors: bool, schema: list[dict], top: int
) -> Overview:
    """The report from ``overview_query``'s rows (pure: no I/O)."""
    totals: dict[str, int] = {}
    groups: dict[str, dict[str, int]] = {key: {} for key, *_ in _SECTIONS}
    for section, label, count in rows:
        if section == "total":
            totals[label] = int(count)
        else:
            label = NONE_LABEL if label is None else str(label)
            groups[section][label] = groups[section].get(label, 0) + int(count)
    instances = totals.get("instances", 0)
    for key, column, column_type in _LABEL_COLUMNS:
        if not _scalar(schema, column, (column_type,)) and instances:  # no instance had the column
            groups[key] = {NONE_LABEL: instances}
    breakdowns = []
    for key, title, unit, additive in _SECTIONS:
        counts = groups[key]
        if key == "year":
            ordered = sorted(counts.items(), key=lambda kv: (kv[0] == NONE_LABEL, kv[0]))
            shown, hidden = ordered, []
        else:
            ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0] == NONE_LABEL, kv[0]))
            shown, hidden = ordered[:top], ordered[top:]
        breakdowns.append(
            Breakdown(
                key=key,
                title=title,
                unit=unit,
                items=tuple(shown),
                rest=len(hidden),
                rest_count=sum(c for _, c in hidden) if additive and hidden else None,
                note=_NOTES.get(key, ""),
            )
        )
    return Overview(
        table=table,
        instances=instances,
        studies=totals.get("studies", 0),
        series=totals.get("series", 0),
        patients=totals.get("patients", 0),
        failures=sum(groups["failure"].values()) if has_errors else None,
        errors_table=errors_table,
        breakdowns=tuple(breakdowns),
    )


# -- the tables ---------------------------------------------------------------------------


class _DuckDBSource:
    """A DuckDB connection holding the table (a database file, or views over Parquet)."""

    dialect = DUCKDB

    def __init__(self, con, table: str, errors: str | None, schema: list[dict], name: str, errors_name: str):
        self.con, self.table, self.errors, self.schema = con, table, errors, schema
        self.name, self.errors_name = name, errors_name

    def query(self, sql: str) -> list[tuple]:
        try:
            return self.con.execute(sql).fetchall()
        except duckdb.Error as error:
            raise ReportError(f"DuckDB could not query {self.name} ({type(error).__name__})") from None

    def close(self) -> None:
        self.con.close()


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _open_duckdb(uri: str) -> _DuckDBSource:
    try:
        destination = DuckDBTable.parse(uri)
    except DestinationError as error:
        raise ReportUsageError(str(error)) from None
    if not os.path.exists(destination.path):
        raise ReportError(f"there is no DuckDB file {destination.path}; give the export's --bq-table")
    if not os.path.isfile(destination.path):
        raise ReportError(f"{destination.path} is not a file; expected a DuckDB database")
    try:
        con = duckdb.connect(destination.path, read_only=True)
    except duckdb.Error as error:
        raise ReportError(f"cannot open {destination.path} as a DuckDB database: {_first_line(error)}") from None
    tables = [name for (name,) in con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' ORDER BY 1").fetchall()]
    if destination.table not in tables:
        con.close()
        known = ", ".join(t for t in tables if not t.endswith("_errors")) or "none"
        raise ReportError(f"there is no table {destination.table} in {destination.path} (tables: {known})")
    errors = errors_table_name(destination.table)
    return _DuckDBSource(
        con,
        duckdb_quote(destination.table),
        duckdb_quote(errors) if errors in tables else None,
        destination.schema(),
        str(destination),
        destination.errors_uri(),
    )


PARQUET_SCHEME = "parquet://"


def _parquet_files(folder: str) -> list[str]:
    """``folder/**/*.parquet``, skipping names starting with ``.`` or ``_`` (as pyarrow's
    datasets do: writers stage there)."""
    files = glob.glob(os.path.join(glob.escape(folder), "**", "*.parquet"), recursive=True)
    return sorted(
        f for f in files if not any(part.startswith((".", "_")) for part in os.path.relpath(f, folder).split(os.sep))
    )


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _open_parquet(uri: str) -> _DuckDBSource:
    folder = uri[len(PARQUET_SCHEME):].rstrip("/")
    if not folder:
        raise ReportUsageError(f"{uri!r} names no folder; expected parquet://DIR")
    if not os.path.isdir(folder):
        raise ReportError(f"there is no folder {folder}")
    schema_path = os.path.join(folder, "_schema.json")
    try:
        with open(schema_path, encoding="utf-8") as fileobj:
            schema = json.load(fileobj)
    except (OSError, ValueError):
        raise ReportError(f"{folder} holds no readable _schema.json: not a table written by dicom-bq-export") from None
    con = duckdb.connect()
    try:
        files = _parquet_files(folder)
        if files:
            listed = "[" + ", ".join(_sql_string(f) for f in files) + "]"
            con.execute(f"CREATE VIEW rows AS SELECT * FROM read_parquet({listed}, union_by_name = true)")
            present = set(con.table("rows").columns)
            schema = [field for field in schema if field["name"] in present]
        else:  # an export without rows
            columns = ", ".join(f"{duckdb_quote(f['name'])} {duckdb_type(f)}" for f in schema)
            con.execute(f"CREATE TABLE rows ({columns})")
        errors_folder = folder + "_errors"
        errors = None
        if os.path.isdir(errors_folder):
            error_files = _parquet_files(errors_folder)
            source = f"read_parquet([{', '.join(_sql_string(f) for f in error_files)}], union_by_name = true)"
            con.execute(f"CREATE VIEW errors AS SELECT error_type FROM {source}" if error_files
                        else "CREATE VIEW errors AS SELECT CAST(NULL AS VARCHAR) AS error_type WHERE false")
            errors = "errors"
    except duckdb.Error as error:
        con.close()
        raise ReportError(f"cannot read the Parquet files in {folder}: {_first_line(error)}") from None
    return _DuckDBSource(con, "rows", errors, schema, f"{PARQUET_SCHEME}{folder}",
                         f"{PARQUET_SCHEME}{folder}_errors")


class _BigQuerySource:
    dialect = BIGQUERY

    def __init__(self, uri: str, billing_project: str | None):
        from pipeline.destinations.bigquery import BigQueryTable

        try:
            destination = BigQueryTable.parse(uri)
        except DestinationError as error:
            raise ReportUsageError(str(error)) from None
        self.name = str(destination)
        table_id = f"{destination.project}.{destination.dataset}.{destination.table}"
        errors_id = f"{destination.project}.{destination.dataset}.{errors_table_name(destination.table)}"
        self.errors_name = f"bq://{errors_id}"
        from google.api_core import exceptions
        from google.cloud import bigquery

        with _google_errors():
            self.client = bigquery.Client(project=billing_project or destination.project)
            try:
                table = self.client.get_table(table_id)
            except exceptions.NotFound:
                raise ReportError(f"there is no table {self.name} (or no dataset {destination.dataset})") from None
            except exceptions.GoogleAPICallError as error:  # names the table, not a value
                raise ReportError(f"cannot read {self.name}: {_first_line(error)}") from None
            try:
                self.client.get_table(errors_id)
                self.errors = BIGQUERY.quote(errors_id)
            except exceptions.GoogleAPICallError:  # absent or not readable: failures unknown
                self.errors = None
        self.location = table.location
        self.table = BIGQUERY.quote(table_id)
        self.schema = [field.to_api_repr() for field in table.schema]
        self.bytes_processed: int | None = None

    def query(self, sql: str) -> list[tuple]:
        from google.api_core import exceptions

        job = None
        try:
            with _google_errors():
                job = self.client.query(sql, location=self.location)
                rows = [tuple(row.values()) for row in job.result()]
        except exceptions.GoogleAPICallError as error:
            # Withheld: a query error could quote a value. Its reason code cannot.
            reason = (getattr(error, "errors", None) or [{}])[0].get("reason") or type(error).__name__
            where = f"; bq show -j {job.job_id} has the details" if job is not None and job.job_id else ""
            raise ReportError(f"the BigQuery query on {self.name} failed ({reason}){where}") from None
        self.bytes_processed = job.total_bytes_processed
        return rows

    def close(self) -> None:
        self.client.close()


@contextlib.contextmanager
def _google_errors():
    """Credential and connection failures of Google's clients → ReportError."""
    import google.auth.exceptions
    import requests

    try:
        yield
    except google.auth.exceptions.DefaultCredentialsError:
        raise ReportError("no Google credentials: run `gcloud auth application-default login`") from None
    except google.auth.exceptions.GoogleAuthError as error:
        raise ReportError(f"Google credentials failed ({type(error).__name__}); run "
                          "`gcloud auth application-default login`") from None
    except requests.exceptions.RequestException as error:
        raise ReportError(f"cannot reach BigQuery ({type(error).__name__})") from None


def open_table(uri: str, billing_project: str | None = None):
    """The source for a ``--bq-table`` URI; raises ReportUsageError or ReportError."""
    from pipeline.destinations.bigquery import is_bigquery_uri

    if uri.startswith("duckdb://"):
        return _open_duckdb(uri)
    if uri.startswith(PARQUET_SCHEME):
        return _open_parquet(uri)
    if uri.startswith("parquet+gs://"):
        raise ReportUsageError("report reads parquet:// folders on local disk; copy the folder (gcloud storage cp -r) "
                               "or load it into BigQuery and report on bq://")
    if is_bigquery_uri(uri):
        return _BigQuerySource(uri, billing_project)
    raise ReportUsageError(
        f"--bq-table must be duckdb://PATH#TABLE, bq://PROJECT.DATASET.TABLE or parquet://DIR, not {uri!r}"
    )


def overview(source, top: int = DEFAULT_TOP) -> Overview:
    """Run the report's query on an open source."""
    sql = overview_query(source.schema, source.table, source.errors, source.dialect)
    return build_overview(
        source.query(sql),
        table=source.name,
        errors_table=source.errors_name,
        has_errors=source.errors is not None,
        schema=source.schema,
        top=top,
    )


# -- text ---------------------------------------------------------------------------------


def printable(text: str) -> str:
    """``text`` with control, format (bidi overrides), unassigned and line-separator
    characters replaced by U+FFFD, so that a value can neither drive a terminal nor
    reorder what is shown around it."""
    return "".join("\ufffd" if unicodedata.category(c)[0] == "C" or c in "\u2028\u2029" else c for c in text)


def shown_label(label: str) -> str:
    """A label safe to show (see :func:`printable`); long ones cut with an ellipsis."""
    text = printable(label)
    return text if len(text) <= MAX_LABEL else text[: MAX_LABEL - 1] + "…"


def _rest_line(breakdown: Breakdown) -> str | None:
    if not breakdown.rest:
        return None
    more = f"… and {breakdown.rest:,} more"
    return more + (f" ({breakdown.rest_count:,} {breakdown.unit})" if breakdown.rest_count is not None else "")


def render_text(report: Overview, bar: str = "█", width: int = 30) -> str:
    headline = [
        ("instances", f"{report.instances:,}"),
        ("studies", f"{report.studies:,}"),
        ("series", f"{report.series:,}"),
        ("patients", f"{report.patients:,}"),
        ("failures", f"{report.failures:,}" if report.failures is not None else f"unknown (no {report.errors_table})"),
    ]
    lines = [f"dicom-bq-export report: {report.table}"]
    lines += [f"  {name:<12}{value:>10}" for name, value in headline]
    for breakdown in report.breakdowns:
        lines += ["", breakdown.title]
        if not breakdown.items:
            lines.append("  none")
            continue
        labels = [shown_label(label) for label, _ in breakdown.items]
        label_width = max(len(label) for label in labels)
        count_width = max(len(f"{count:,}") for _, count in breakdown.items)
        largest = max(count for _, count in breakdown.items) or 1
        for label, (_, count) in zip(labels, breakdown.items):
            length = max(1, round(width * count / largest)) if count else 0
            lines.append(f"  {label:<{label_width}}  {count:>{count_width},}  {bar * length}")
        rest = _rest_line(breakdown)
        if rest:
            lines.append(f"  {rest}")
    return "\n".join(lines) + "\n"


# -- HTML ---------------------------------------------------------------------------------

_PALETTE = {
    "modality": "#2563eb",
    "manufacturer": "#0d9488",
    "year": "#7c3aed",
    "failure": "#dc2626",
    "dropped": "#d97706",
    "creator": "#db2777",
}

_CSS = """
:root { color-scheme: light; --ink: #1f2937; --muted: #6b7280; --line: #e5e7eb; --card: #ffffff; }
* { box-sizing: border-box; }
body { margin: 0; background: #f3f4f6; color: var(--ink);
       font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { padding: 28px 40px 8px; }
h1 { margin: 0 0 4px; font-size: 26px; font-weight: 650; letter-spacing: -0.01em; }
.source { margin: 0; color: var(--muted); font-size: 14px; overflow-wrap: anywhere; }
.source code { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; color: var(--ink); }
.headline { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 14px; padding: 18px 40px; }
.figure { background: var(--card); border: 1px solid var(--line); border-radius: 12px; padding: 14px 18px; }
.figure .value { display: block; font-size: 30px; font-weight: 650; font-variant-numeric: tabular-nums; }
.figure .name { color: var(--muted); font-size: 13px; text-transform: uppercase; letter-spacing: 0.06em; }
.figure.bad .value { color: #dc2626; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(440px, 100%), 1fr)); gap: 18px; padding: 4px 40px 40px; }
.chart { background: var(--card); border: 1px solid var(--line); border-radius: 12px; padding: 16px 20px 12px; min-width: 0; }
.chart h2 { margin: 0 0 2px; font-size: 17px; font-weight: 620; }
.chart .note { margin: 0 0 10px; color: var(--muted); font-size: 13px; }
.chart svg { display: block; width: 100%; height: auto; }
.chart svg text { font: 13px system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; fill: var(--ink); }
.chart svg text.count { fill: var(--muted); font-variant-numeric: tabular-nums; }
.chart .rest, .chart .empty { margin: 6px 0 0; color: var(--muted); font-size: 13px; }
footer { padding: 0 40px 32px; color: var(--muted); font-size: 12.5px; }
@media (max-width: 600px) { header, .headline, .charts, footer { padding-left: 14px; padding-right: 14px; } }
"""

_CHART_WIDTH = 560
_NONE_COLOR = "#9ca3af"


def _text_width(text: str) -> float:
    """A generous estimate of the width of 13px sans-serif text (DejaVu Sans is wide)."""
    return sum(9.8 if c.isupper() or c in "_@%&" else 8.4 if c.isdigit() else 7.6 for c in text)

_SIDE_LABEL_MAX = 190  # labels wider than this go above their bar instead of beside it


def _svg_chart(breakdown: Breakdown) -> str:
    """A horizontal bar chart: each bar a ``<g class="bar" data-label data-count>``."""
    color = _PALETTE.get(breakdown.key, "#2563eb")
    labels = [shown_label(label) for label, _ in breakdown.items]
    counts = [count for _, count in breakdown.items]
    label_width = int(max(_text_width(label) for label in labels)) + 12
    count_width = int(_text_width(f"{max(counts):,}")) + 12
    beside = label_width <= _SIDE_LABEL_MAX
    row = 26 if beside else 38
    bar_x = label_width if beside else 0
    bar_y, bar_height = (5, 16) if beside else (20, 13)
    text_y = 18 if beside else 14
    bar_space = _CHART_WIDTH - bar_x - count_width
    largest = max(counts) or 1
    e = html.escape
    out = [
        f'<svg class="bars" viewBox="0 0 {_CHART_WIDTH} {row * len(labels) + 2}" role="img" '
        f'aria-label="{e(breakdown.title)}" xmlns="http://www.w3.org/2000/svg">'
    ]
    for index, (label, (full, count)) in enumerate(zip(labels, breakdown.items)):
        width = max(2.0, bar_space * count / largest) if count else 0.0
        title = printable(full[:200]) + ("…" if len(full) > 200 else "")
        label_svg = (
            f'<text class="label" x="{label_width - 8}" y="{text_y}" text-anchor="end">{e(label)}</text>'
            if beside
            else f'<text class="label" x="0" y="{text_y}">{e(label)}</text>'
        )
        count_y = text_y if beside else bar_y + bar_height - 2
        out.append(
            f'<g class="bar" data-label="{e(printable(full))}" data-count="{count}" transform="translate(0 {index * row + 1})">'
            f"<title>{e(title)}: {count:,} {e(breakdown.unit)}</title>{label_svg}"
            f'<rect x="{bar_x}" y="{bar_y}" width="{width:.1f}" height="{bar_height}" rx="3" '
            f'fill="{_NONE_COLOR if full == NONE_LABEL else color}"/>'
            f'<text class="count" x="{bar_x + width + 6:.1f}" y="{count_y}">{count:,}</text>'
            "</g>"
        )
    out.append("</svg>")
    return "".join(out)


def render_html(report: Overview, generated: dt.datetime | None = None) -> str:
    """One self-contained page: inline CSS and SVG, no script, no external resource.

    A Content-Security-Policy forbids scripts and every network request, a second
    guard behind the escaping of every value.
    """
    e = html.escape
    generated = generated or dt.datetime.now(dt.timezone.utc)
    figures = [
        ("instances", report.instances, False),
        ("studies", report.studies, False),
        ("series", report.series, False),
        ("patients", report.patients, False),
    ]
    cards = [
        f'<div class="figure" id="figure-{name}"><span class="value">{value:,}</span>'
        f'<span class="name">{name}</span></div>'
        for name, value, _ in figures
    ]
    failures = "—" if report.failures is None else f"{report.failures:,}"
    cards.append(
        f'<div class="figure{" bad" if report.failures else ""}" id="figure-failures">'
        f'<span class="value">{failures}</span><span class="name">failures</span></div>'
    )
    sections = []
    for breakdown in report.breakdowns:
        body = _svg_chart(breakdown) if breakdown.items else '<p class="empty">None.</p>'
        rest = _rest_line(breakdown)
        note = breakdown.note
        if breakdown.key == "failure" and report.failures is None:
            note = f"No errors table ({report.errors_table}) was found."
        sections.append(
            f'<section class="chart" id="chart-{breakdown.key}"><h2>{e(breakdown.title)}</h2>'
            + (f'<p class="note">{e(note)}</p>' if note else "")
            + body
            + (f'<p class="rest">{e(rest)}</p>' if rest else "")
            + "</section>"
        )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>DICOM export report: {e(report.table)}</title><style>{_CSS}</style></head>\n<body>"
        f'<header><h1>DICOM export overview</h1><p class="source">Table <code>{e(report.table)}</code> · '
        f"generated {e(generated.strftime('%Y-%m-%d %H:%M UTC'))} by dicom-bq-export report</p></header>\n"
        f'<section class="headline">{"".join(cards)}</section>\n'
        f'<main class="charts">{"".join(sections)}</main>\n'
        "<footer>Patients are distinct PatientID values (with IssuerOfPatientID where the table has it). "
        "This page holds values from the table: share it as you would the table.</footer>"
        "</body></html>\n"
    )


def _check_writable(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ReportError(f"--html {path} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise ReportError(f"--html {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ReportError(f"--html {path}: cannot write in {folder}")


def write_html(page: str, path: str) -> None:
    """Write the page whole or not at all (a temporary file renamed into place)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".report-", suffix=".html", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fileobj:
            fileobj.write(page)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


# -- the command --------------------------------------------------------------------------


def _os_error(error: OSError) -> str:
    if error.filename is not None:
        return f"{error.strerror or type(error).__name__}: {error.filename}"
    return _first_line(error)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ReportUsageError(f"{message} (see dicom-bq-export report --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dicom-bq-export report",
        description="Summarise an exported table: instances, studies, series, patients; instances by "
        "modality, manufacturer and year; failures by type; the most frequent dropped tags and private "
        "creators. Optionally also as one self-contained HTML page of charts.",
    )
    parser.add_argument("--bq-table", "--bq_table", dest="bq_table", default=DEFAULT_URI, metavar="URI",
                        help="duckdb://PATH#TABLE, bq://PROJECT.DATASET.TABLE or parquet://DIR "
                        f"(default {DEFAULT_URI}, the export's default)")
    parser.add_argument("--html", metavar="FILE", help="also write the report as one self-contained HTML page")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP, metavar="N",
                        help=f"bars per chart for manufacturers, modalities, tags, creators (default {DEFAULT_TOP})")
    parser.add_argument("--project", metavar="PROJECT",
                        help="BigQuery: the project that runs (and pays for) the query; default the table's")
    return parser


def run(argv: list[str], out: TextIO | None = None) -> int:
    """``dicom-bq-export report``; returns the exit status (0, 1 for a table that cannot be
    read, 2 for usage, 130 if interrupted). Errors are one line on stderr."""
    out = out or sys.stdout
    try:
        args = _parser().parse_args(argv)
        if args.top < 1:
            raise ReportUsageError("--top must be at least 1")
        if args.html:
            _check_writable(args.html)
        source = open_table(args.bq_table, args.project)
        try:
            report = overview(source, top=args.top)
        finally:
            source.close()
        bar = "█"
        encoding = getattr(out, "encoding", None) or "utf-8"
        try:
            bar.encode(encoding)
        except (UnicodeEncodeError, LookupError):
            bar = "#"
        text = render_text(report, bar=bar)
        out.write(text.encode(encoding, "replace").decode(encoding))
        out.flush()
        if getattr(source, "bytes_processed", None) is not None:
            print(f"dicom-bq-export report: BigQuery processed {source.bytes_processed:,} bytes", file=sys.stderr)
        if args.html:
            write_html(render_html(report), args.html)
            print(f"dicom-bq-export report: wrote {args.html}", file=sys.stderr)
    except ReportUsageError as error:
        print(f"dicom-bq-export report: error: {error}", file=sys.stderr)
        return 2
    except (ReportError, OSError) as error:
        message = str(error) if isinstance(error, ReportError) else _os_error(error)
        print(f"dicom-bq-export report: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dicom-bq-export report: interrupted", file=sys.stderr)
        return 130
    return 0
