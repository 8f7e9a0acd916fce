"""``dicom-bq-export report``: the overview of an exported table, checked against the files.

The table is made by the real export (FnApiRunner) from the samples plus two built
instances (one with a hostile Manufacturer and private creators, one nested) and two files
that fail. The expected figures come from pydicom reads of those files and from the rows
read back in Python, never from the report's own SQL. The page is checked in a real
headless Chromium (Debian's ``chromium`` package): its DOM and a screenshot.
"""

from __future__ import annotations

import collections
import dataclasses
import html
import html.parser
import io
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import uuid

import duckdb
import hypothesis
import hypothesis.strategies as st
import pydicom
import pytest

from pipeline import report
from pipeline.destinations.duckdb import DuckDBTable
from pipeline.main import main as cli_main
from pipeline.main import run as export_run
from tests.builders import instance, item, sequence, to_bytes

SAMPLES = pathlib.Path(__file__).resolve().parents[1] / "samples" / "dicom"
PROJECT = "test-project"
HOSTILE = "<script>alert(1)</script>"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


# -- the exported table -------------------------------------------------------------------


def _built_instances() -> dict[str, bytes]:
    """An instance whose Manufacturer is markup, with a private creator at the top level and
    one inside a sequence item; and a second one of the same patient and study."""
    first = instance()
    first.Modality = "OT"
    first.Manufacturer = HOSTILE
    first.StudyDate = "19991231"
    first.PatientID = "P-HOSTILE"
    first.private_block(0x0011, "ACME TOP", create=True).add_new(0x01, "LO", "not a creator")
    nested = item(SeriesInstanceUID="1.2.3.4")
    nested.private_block(0x0029, "ACME NESTED", create=True).add_new(0x01, "LO", "inside")
    first.ReferencedSeriesSequence = sequence(nested)
    second = instance(study=first.StudyInstanceUID)
    second.Modality = "OT"
    second.StudyDate = "19991231"
    second.PatientID = "P-HOSTILE"
    return {"hostile.dcm": to_bytes(first), "second.dcm": to_bytes(second)}


@pytest.fixture(scope="module")
def input_folder(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("input")
    shutil.copytree(SAMPLES, folder / "samples")
    for name, data in _built_instances().items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("not DICOM, a note someone left in the folder\n" * 20)
    (folder / "empty.dcm").write_bytes(b"")
    return folder


def dicom_files(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.rglob("*.dcm") if p.stat().st_size)


@pytest.fixture(scope="module")
def exported(input_folder, tmp_path_factory) -> DuckDBTable:
    """The real export of ``input_folder`` into a DuckDB file."""
    path = tmp_path_factory.mktemp("db") / "x.duckdb"
    summary = export_run(["--runner=FnApiRunner", "--progress-seconds=0", "--input", str(input_folder),
                          "--bq-table", f"duckdb://{path}#instances"])
    assert summary["succeeded"] == len(dicom_files(input_folder)) and summary["failed"] == 2
    return DuckDBTable(str(path), "instances")


# -- what the report should say, computed without its SQL -----------------------------------


def _text(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value).strip() or None if value not in (None, "") else None


def _is_private_creator(tag: str) -> bool:
    match = re.fullmatch(r"Tag_([0-9A-Fa-f]{4})([0-9A-Fa-f]{4})", tag)
    if not match:
        return False
    group, element = int(match[1], 16), int(match[2], 16)
    return group % 2 == 1 and group not in (1, 3, 5, 7, 0xFFFF) and 0x10 <= element <= 0xFF


def _other_elements(value) -> list[dict]:
    """Every OtherElements entry in a row, at any depth."""
    found = []
    if isinstance(value, dict):
        for key, child in value.items():
            if key == "OtherElements" and child:
                found.extend(child)
            else:
                found.extend(_other_elements(child))
    elif isinstance(value, list):
        for child in value:
            found.extend(_other_elements(child))
    return found


@pytest.fixture(scope="module")
def expected(input_folder, exported) -> dict:
    datasets = [pydicom.dcmread(p, stop_before_pixels=True, force=True) for p in dicom_files(input_folder)]
    none = report.NONE_LABEL
    years = collections.Counter(
        (ds.StudyDate[:4] if _text(ds, "StudyDate") else none) for ds in datasets
    )
    patients = {(_text(ds, "IssuerOfPatientID"), _text(ds, "PatientID")) for ds in datasets if _text(ds, "PatientID")}
    dropped, creators = collections.Counter(), collections.Counter()
    for row in exported.read_rows():
        dropped.update({entry["TagName"] for entry in row["DroppedTags"] or []})
        creators.update({value.strip() for entry in _other_elements(row) if _is_private_creator(entry["Tag"])
                         for value in entry["Data"] or []})
    failures = collections.Counter(row["error_type"] for row in exported.read_rows("instances_errors"))
    return {
        "instances": len(datasets),
        "studies": len({ds.StudyInstanceUID for ds in datasets}),
        "series": len({ds.SeriesInstanceUID for ds in datasets}),
        "patients": len(patients),
        "failures": sum(failures.values()),
        "modality": collections.Counter(_text(ds, "Modality") or none for ds in datasets),
        "manufacturer": collections.Counter(_text(ds, "Manufacturer") or none for ds in datasets),
        "year": years,
        "failure": failures,
        "dropped": dropped,
        "creator": creators,
    }


def test_the_expected_figures_cover_what_the_report_must_handle(expected):
    assert expected["manufacturer"][HOSTILE] == 1 and expected["manufacturer"][report.NONE_LABEL] >= 1
    assert {"ACME TOP", "ACME NESTED", "GEMS_IDEN_01"} <= set(expected["creator"])
    assert expected["year"]["1999"] == 2 and expected["failures"] == 2
    assert any("." in name for name in expected["dropped"])  # a nested name


# -- the text report -----------------------------------------------------------------------


def parse_text(text: str) -> dict:
    """The printed report → ``{"headline": {name: n}, title: {label: n}}``."""
    blocks = text.strip("\n").split("\n\n")
    head = blocks[0].splitlines()
    parsed = {"table": head[0].split(": ", 1)[1], "headline": {}}
    for line in head[1:]:
        name, value = line.split(None, 1)
        parsed["headline"][name] = int(value.replace(",", "")) if value.replace(",", "").isdigit() else value
    for block in blocks[1:]:
        title, *lines = block.splitlines()
        bars = {}
        for line in lines:
            match = re.fullmatch(r"  (.+?)  +([\d,]+)  (█*)", line)
            if match:
                bars[match[1]] = int(match[2].replace(",", ""))
        parsed[title] = bars
    return parsed


TITLES = {
    "modality": "Instances by modality",
    "manufacturer": "Instances by manufacturer",
    "year": "Instances by year of StudyDate",
    "failure": "Failures by type (files)",
    "dropped": "Most frequent dropped tags (instances)",
    "creator": "Most frequent private creators (instances)",
}


def run_report(capsys, *args: str) -> tuple[int, str, str]:
    status = cli_main(["report", *args])
    out, err = capsys.readouterr()
    return status, out, err


def test_text_report_matches_the_files(exported, expected, capsys):
    status, out, err = run_report(capsys, "--bq-table", str(exported), "--top", "100")
    assert status == 0 and err == ""
    parsed = parse_text(out)
    assert parsed["table"] == str(exported)
    for name in ("instances", "studies", "series", "patients", "failures"):
        assert parsed["headline"][name] == expected[name], name
    for key, title in TITLES.items():
        assert parsed[title] == dict(expected[key]), key


def test_text_report_shows_the_top_bars_and_sums_the_rest(exported, expected, capsys):
    status, out, _ = run_report(capsys, "--bq-table", str(exported), "--top", "2")
    assert status == 0
    modalities = expected["modality"].most_common()
    shown = parse_text(out)[TITLES["modality"]]
    assert len(shown) == 2 and sorted(shown.values(), reverse=True) == [n for _, n in modalities[:2]]
    rest = expected["instances"] - sum(shown.values())
    assert f"… and {len(modalities) - 2} more ({rest} instances)" in out
    assert f"… and {len(expected['dropped']) - 2} more\n" in out  # per-instance counts do not add up


def test_text_report_neutralises_control_characters_in_labels():
    overview = report.Overview(
        table="duckdb://x#t", instances=1, studies=1, series=1, patients=1, failures=0, errors_table="duckdb://x#t_e",
        breakdowns=(report.Breakdown("manufacturer", "Instances by manufacturer", "instances",
                                     (("ACME\x1b[2J\x07" + "x" * 100, 1),)),),
    )
    text = report.render_text(overview)
    assert "\x1b" not in text and "\x07" not in text
    assert "ACME\ufffd[2J\ufffd" in text and "…" in text


def test_private_creators_are_odd_groups_elements_0010_to_00ff():
    """PS3.5 7.8.1: (gggg,0010-00FF) in an odd group other than 0001-0007 and FFFF."""
    con = duckdb.connect()
    con.execute('CREATE TABLE t ("SOPInstanceUID" VARCHAR, "OtherElements" STRUCT("Tag" VARCHAR, "Data" VARCHAR[])[])')
    cases = {
        "Tag_00090010": True, "Tag_0009001a": True, "Tag_7FE100FF": True, "Tag_00290011": True,
        "Tag_00091001": False, "Tag_0009000F": False, "Tag_00090100": False, "Tag_00080010": False,
        "Tag_00070010": False, "Tag_FFFF0010": False, "Tag_00010010": False, "Tag_0009010": False,
    }
    for index, tag in enumerate(cases):
        con.execute("INSERT INTO t VALUES (?, [{'Tag': ?, 'Data': [?, ' ']}])", [str(index), tag, f" creator {tag} "])
    schema = [{"name": "SOPInstanceUID", "type": "STRING", "mode": "NULLABLE"},
              {"name": "OtherElements", "type": "RECORD", "mode": "REPEATED", "fields": [
                  {"name": "Tag", "type": "STRING", "mode": "NULLABLE"},
                  {"name": "Data", "type": "STRING", "mode": "REPEATED"}]}]
    rows = con.execute(report.overview_query(schema, '"t"', None, report.DUCKDB)).fetchall()
    found = {label for section, label, _ in rows if section == "creator"}
    assert found == {f"creator {tag}" for tag, creator in cases.items() if creator}


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(label=st.text(max_size=80))
def test_any_label_stays_text_in_the_page(label):
    """Whatever a value holds, the page's elements are the page's own and the value reads back."""
    figures = report.Overview(
        table="duckdb://x#t", instances=1, studies=1, series=1, patients=1, failures=0, errors_table="x",
        breakdowns=(report.Breakdown("manufacturer", label or "-", "instances", ((label, 3),)),),
    )
    parsed = PageDOM()
    parsed.feed(report.render_html(figures))
    assert set(parsed.tags) == {"html", "head", "meta", "title", "style", "body", "header", "h1", "p", "code",
                                "section", "div", "span", "main", "h2", "svg", "g", "text", "rect", "footer"}
    (bar,) = parsed.charts["manufacturer"]
    assert bar["label"] == report.printable(label) and bar["shown"] == report.shown_label(label)


# -- the page in a real browser ------------------------------------------------------------


def chromium(tmp_path: pathlib.Path, *args: str) -> str:
    """Run Debian's headless Chromium; its stdout. Missing Chromium fails the test."""
    exe = shutil.which("chromium")
    assert exe, "headless Chromium is missing: apt-get install -y chromium"
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    done = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class PageDOM(html.parser.HTMLParser):
    """What a reader sees: headline figures and, per chart, its bars (label shown, count)."""

    def __init__(self):
        super().__init__()
        self.tags = collections.Counter()
        self.figures: dict[str, str] = {}
        self.charts: dict[str, list[dict]] = {}
        self._chart = self._figure = self._bar = None
        self._capture: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags[tag] += 1
        classes = (attrs.get("class") or "").split()
        if tag == "section" and (attrs.get("id") or "").startswith("chart-"):
            self._chart = attrs["id"][len("chart-"):]
            self.charts[self._chart] = []
        elif tag == "div" and (attrs.get("id") or "").startswith("figure-"):
            self._figure = attrs["id"][len("figure-"):]
        elif tag == "span" and "value" in classes and self._figure:
            self._capture = "figure"
        elif tag == "g" and "bar" in classes:
            self._bar = {"label": attrs["data-label"], "count": int(attrs["data-count"]), "shown": "", "text": ""}
            self.charts[self._chart].append(self._bar)
        elif tag == "text" and self._bar is not None:
            self._capture = "shown" if "label" in classes else "text"
        elif tag == "rect" and self._bar is not None:
            self._bar["width"] = float(attrs["width"])

    def handle_endtag(self, tag):
        if tag in ("text", "span"):
            self._capture = None
        if tag == "g":
            self._bar = None
        if tag == "div":
            self._figure = None

    def handle_data(self, data):
        if self._capture == "figure":
            self.figures[self._figure] = data
        elif self._capture in ("shown", "text") and self._bar is not None:
            self._bar[self._capture] += data


@pytest.fixture(scope="module")
def page(exported, tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("page") / "report.html"
    assert report.run(["--bq-table", str(exported), "--html", str(path), "--top", "100"], out=io.StringIO()) == 0
    return path


@pytest.fixture(scope="module")
def dom(page, tmp_path_factory) -> PageDOM:
    parsed = PageDOM()
    parsed.feed(chromium(tmp_path_factory.mktemp("chromium"), "--dump-dom", page.as_uri()))
    return parsed


def test_page_headline_figures_are_the_files_figures(dom, expected):
    for name in ("instances", "studies", "series", "patients", "failures"):
        assert dom.figures[name] == f"{expected[name]:,}", name


@pytest.mark.parametrize("key", list(TITLES))
def test_page_chart_bars_have_the_right_labels_and_counts(dom, expected, key):
    bars = dom.charts[key]
    assert {bar["label"]: bar["count"] for bar in bars} == dict(expected[key])
    for bar in bars:
        assert bar["shown"] == bar["label"] and bar["text"] == f"{bar['count']:,}"
    widths = [bar["width"] for bar in bars]
    counts = [bar["count"] for bar in bars]
    assert all((w1 > w2) == (c1 > c2) for w1, c1 in zip(widths, counts) for w2, c2 in zip(widths, counts))


def test_page_is_self_contained_and_escapes_every_value(page, dom):
    text = page.read_text(encoding="utf-8")
    assert HOSTILE not in text and html.escape(HOSTILE) in text
    assert dom.tags["script"] == 0 and dom.tags["svg"] == len(TITLES)
    assert dom.tags["link"] == 0 and dom.tags["img"] == 0 and dom.tags["iframe"] == 0
    assert not re.search(r"\b(?:src|href)\s*=|url\(|@import", text)
    assert "default-src 'none'" in text  # and the browser would refuse a script or a request anyway
    assert any(bar["shown"] == HOSTILE for bar in dom.charts["manufacturer"])


def test_page_screenshot_shows_the_charts(page, tmp_path):
    from PIL import Image

    png = tmp_path / "report.png"
    chromium(tmp_path, "--window-size=1280,2400", f"--screenshot={png}", page.as_uri())
    assert png.stat().st_size > 20_000
    with Image.open(png) as image:
        rgb = image.convert("RGB")
        assert rgb.size == (1280, 2400)
        colours = collections.Counter(rgb.getdata())
    background, share = colours.most_common(1)[0]
    assert share < 0.9 * 1280 * 2400 and len(colours) > 50  # not blank: text, cards, bars
    for colour in report._PALETTE.values():  # every chart's bars are painted
        assert colours[tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))] > 200, colour


# -- the same report from Parquet and from BigQuery ------------------------------------------


def duckdb_overview(exported: DuckDBTable) -> report.Overview:
    source = report.open_table(str(exported))
    try:
        return report.overview(source, top=100)
    finally:
        source.close()


def same_figures(a: report.Overview, b: report.Overview) -> bool:
    return dataclasses.replace(a, table="", errors_table="") == dataclasses.replace(b, table="", errors_table="")


def test_parquet_folder_gives_the_same_report(exported, tmp_path, capsys):
    folder = tmp_path / "table"
    (folder / "more").mkdir(parents=True)
    (folder / "_staging").mkdir()
    (tmp_path / "table_errors").mkdir()
    (folder / "_schema.json").write_text(json.dumps(exported.schema()))
    con = duckdb.connect(exported.path, read_only=True)
    con.execute(f"COPY (SELECT * FROM instances WHERE Manufacturer IS NOT NULL) TO '{folder}/part-0.parquet' "
                "(FORMAT parquet)")
    # A shard without a column (as after an append that widened the schema): read by name.
    con.execute(f"COPY (SELECT * EXCLUDE (Manufacturer) FROM instances WHERE Manufacturer IS NULL) "
                f"TO '{folder}/more/part-1.parquet' (FORMAT parquet)")
    con.execute(f"COPY (SELECT * FROM instances) TO '{folder}/_staging/leftover.parquet' (FORMAT parquet)")
    con.execute(f"COPY instances_errors TO '{tmp_path}/table_errors/part-0.parquet' (FORMAT parquet)")
    con.close()

    source = report.open_table(f"parquet://{folder}")
    try:
        from_parquet = report.overview(source, top=100)
    finally:
        source.close()
    assert same_figures(from_parquet, duckdb_overview(exported))
    assert from_parquet.failures == 2

    status, out, err = run_report(capsys, "--bq-table", f"parquet://{folder}")
    assert status == 0 and err == "" and out.startswith(f"dicom-bq-export report: parquet://{folder}\n")


def test_parquet_folder_without_rows_or_dead_letters(exported, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "_schema.json").write_text(json.dumps(exported.schema()))
    source = report.open_table(f"parquet://{folder}/")
    try:
        figures = report.overview(source)
    finally:
        source.close()
    assert (figures.instances, figures.studies, figures.failures) == (0, 0, None)
    assert all(not b.items for b in figures.breakdowns)
    assert "failures    unknown" in report.render_text(figures)


@pytest.fixture
def bigquery_dataset(gcp_local):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    client = bigquery.Client(project=PROJECT, credentials=AnonymousCredentials())
    name = f"ds_{uuid.uuid4().hex[:10]}"
    client.create_dataset(f"{PROJECT}.{name}")
    return name


def test_bigquery_table_gives_the_same_report(input_folder, exported, bigquery_dataset, gcs_bucket, capsys):
    """The export into the local BigQuery emulator, then the report's one query on it."""
    _, bucket = gcs_bucket
    uri = f"bq://{PROJECT}.{bigquery_dataset}.instances"
    export_run(["--runner=FnApiRunner", "--progress-seconds=0", f"--project={PROJECT}",
                f"--temp_location=gs://{bucket.name}/tmp", "--input", str(input_folder), "--bq-table", uri])
    source = report.open_table(uri)
    try:
        from_bigquery = report.overview(source, top=100)
    finally:
        source.close()
    assert same_figures(from_bigquery, duckdb_overview(exported))
    assert from_bigquery.breakdown("creator").items  # nested UNNEST paths ran on the emulator

    capsys.readouterr()
    status, out, err = run_report(capsys, "--bq-table", uri)
    assert status == 0 and out.startswith(f"dicom-bq-export report: {uri}\n")
    assert err.startswith("dicom-bq-export report: BigQuery processed ")

    status, out, err = run_report(capsys, "--bq-table", f"bq://{PROJECT}.{bigquery_dataset}.absent")
    assert (status, out) == (1, "") and err.count("\n") == 1 and "there is no table" in err


# -- errors: one line, the right status, never a traceback -----------------------------------


def assert_one_line_error(capsys, args, status, words):
    code, out, err = run_report(capsys, *args)
    assert code == status and out == ""
    assert err.count("\n") == 1 and err.startswith("dicom-bq-export report: error: ") and "Traceback" not in err
    assert words in err


def test_wrong_uris_and_flags_are_usage_errors(capsys, tmp_path):
    assert_one_line_error(capsys, ["--bq-table", "postgres://db/t"], 2, "--bq-table must be")
    assert_one_line_error(capsys, ["--bq-table", f"duckdb://{tmp_path}/x.duckdb#bad-name"], 2, "table name")
    assert_one_line_error(capsys, ["--bq-table", "bq://Not_A_Project.ds.t"], 2, "project ID")
    assert_one_line_error(capsys, ["--bq-table", "parquet+gs://bucket/t"], 2, "local disk")
    assert_one_line_error(capsys, ["--bq-tabel", "duckdb://x.duckdb#t"], 2, "unrecognized arguments")
    assert_one_line_error(capsys, ["--top", "0"], 2, "--top")


def test_a_table_that_cannot_be_read_is_a_one_line_error(exported, capsys, tmp_path):
    text_file = tmp_path / "notes.duckdb"
    text_file.write_text("not a database\n")
    (tmp_path / "no_schema").mkdir()
    assert_one_line_error(capsys, ["--bq-table", f"duckdb://{tmp_path}/absent.duckdb#t"], 1, "no DuckDB file")
    assert_one_line_error(capsys, ["--bq-table", f"duckdb://{text_file}#t"], 1, "cannot open")
    assert_one_line_error(capsys, ["--bq-table", f"duckdb://{tmp_path}#t"], 1, "not a file")
    assert_one_line_error(capsys, ["--bq-table", f"duckdb://{exported.path}#absent"], 1, "(tables: instances")
    assert_one_line_error(capsys, ["--bq-table", f"parquet://{tmp_path}/absent"], 1, "no folder")
    assert_one_line_error(capsys, ["--bq-table", f"parquet://{tmp_path}/no_schema"], 1, "_schema.json")
    assert_one_line_error(capsys, ["--bq-table", str(exported), "--html", f"{tmp_path}/absent/r.html"], 1,
                          "does not exist")


def test_a_database_locked_by_another_process_is_a_one_line_error(exported, capsys, tmp_path):
    locked = tmp_path / "locked.duckdb"
    shutil.copyfile(exported.path, locked)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, sys; c = duckdb.connect({str(locked)!r}); print('ready', flush=True); "
         "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline() == "ready\n"
        assert_one_line_error(capsys, ["--bq-table", f"duckdb://{locked}#instances"], 1, "cannot open")
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
