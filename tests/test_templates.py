"""Running on Dataflow: the flex template, its metadata, the image's versions, the
Dataflow job description (built offline), worker packaging and sharded listing."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import pathlib
import re
import shlex

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.destinations import WRITE_DISPOSITIONS, Disposition
from pipeline.destinations.base import RunContext
from pipeline.destinations.bigquery import BigQueryTable
from pipeline.graph import ExportPlan, build_pipeline
from pipeline.options import DICOMWEB_MODES, INPUT_LAYOUTS, ExportOptions
from transforms.listing import match_files, shard_listing_units

REPO = pathlib.Path(__file__).resolve().parents[1]
FLEX = REPO / "templates" / "flex"
METADATA = json.loads((FLEX / "metadata.json").read_text())
PARAMETERS = {p["name"]: p for p in METADATA["parameters"]}

#: Options that are not template parameters, and why.
LAUNCHER_ONLY = {
    # The flex-template launcher exits once the job is submitted, before there is a
    # summary to write; Dataflow shows the same figures as the job's metrics.
    "summary_json",
}


def export_option_actions() -> dict[str, argparse.Action]:
    parser = argparse.ArgumentParser()
    ExportOptions._add_argparse_args(parser)
    return {action.dest: action for action in parser._actions if action.dest != "help"}


def test_metadata_declares_every_pipeline_option_and_nothing_else():
    options = export_option_actions()
    assert set(PARAMETERS) == set(options) - LAUNCHER_ONLY
    for name, parameter in PARAMETERS.items():
        assert set(parameter) >= {"name", "label", "helpText", "isOptional", "regexes", "paramType"}, name
        assert "--" + name in options[name].option_strings  # the underscore spelling Dataflow passes


def test_metadata_required_parameters_are_the_required_options():
    required = {name for name, p in PARAMETERS.items() if not p["isOptional"]}
    assert required == {"input", "bq_table"}
    # input is required by the pipeline (UsageError without it); bq_table has a local
    # default (DuckDB) that cannot work on Dataflow, so the template requires it.
    options = export_option_actions()
    assert options["input"].default is None and options["bq_table"].default is None


def test_metadata_enums_are_the_options_values():
    def values(name):
        return [option["value"] for option in PARAMETERS[name]["enumOptions"]]

    assert values("write_disposition") == list(WRITE_DISPOSITIONS)
    assert values("input_layout") == list(INPUT_LAYOUTS)
    assert values("overwrite_table") == ["true", "false"]
    assert values("dicomweb_mode") == list(DICOMWEB_MODES)
    assert values("no_archives") == values("nested_archives") == ["true", "false"]
    for name in ("write_disposition", "input_layout", "overwrite_table", "dicomweb_mode", "no_archives", "nested_archives"):
        assert PARAMETERS[name]["paramType"] == "ENUM"
        assert all(re.fullmatch(PARAMETERS[name]["regexes"][0], v) for v in values(name))
    assert PARAMETERS["filter_config_gcs_uri"]["paramType"] == "GCS_READ_FILE"
    assert PARAMETERS["bq_table"]["paramType"] == "TEXT"  # a BigQuery table or a parquet+gs:// folder
    for table in ("bq://my-project.imaging.dicom_metadata", "my-project:imaging.dicom_metadata",
                  "parquet+gs://my-bucket/exports/dicom_metadata"):
        assert any(re.fullmatch(regex, table) for regex in PARAMETERS["bq_table"]["regexes"]), table


def readme_template_parameters() -> dict[str, str]:
    """The --parameters of the README's ``gcloud dataflow flex-template run`` command."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"gcloud dataflow flex-template run .*?```", readme, re.S).group(0)
    command = shlex.split(block.replace("\\\n", " ").rstrip("`"))
    values = {}
    for index, word in enumerate(command):
        if word == "--parameters":
            name, _, value = command[index + 1].partition("=")
            values[name] = value
    return values


def test_metadata_regexes_accept_the_readme_examples_and_the_options_parse_them():
    examples = readme_template_parameters()
    beam_options = {name: value for name, value in examples.items() if name not in PARAMETERS}
    examples = {name: value for name, value in examples.items() if name in PARAMETERS}
    assert {"input", "bq_table", "write_disposition", "filter_config_gcs_uri"} <= set(examples)
    standard = PipelineOptions([f"--{name}={value}" for name, value in beam_options.items()]).get_all_options()
    assert all(standard.get(name) == value for name, value in beam_options.items())  # Beam's own options
    for name, value in examples.items():
        assert any(re.fullmatch(regex, value) for regex in PARAMETERS[name]["regexes"]), (name, value)
    parsed = PipelineOptions([f"--{name}={value}" for name, value in examples.items()]).view_as(ExportOptions)
    assert parsed.bq_table == examples["bq_table"]
    BigQueryTable.parse(examples["bq_table"])


@pytest.mark.parametrize(
    "name, bad", [("bq_table", "my-project.dataset"), ("bq_table", "parquet://local/folder"),
                  ("bq_table", "parquet+gs://bucket-only"), ("write_disposition", "APPEND"), ("input", "/local/path"),
                  ("max_failures", "-1"), ("cluster_by", "A,B,C,D,E")],
)
def test_metadata_regexes_reject_bad_values(name, bad):
    assert not any(re.fullmatch(regex, bad) for regex in PARAMETERS[name]["regexes"])


def test_the_beam_version_agrees_in_dockerfile_setup_and_requirements():
    dockerfile = (FLEX / "Dockerfile").read_text()
    image_version = re.search(r"^FROM apache/beam_python3\.\d+_sdk:(\S+)$", dockerfile, re.M).group(1)
    setup_version = re.search(r'^BEAM_VERSION = "([^"]+)"', (REPO / "setup.py").read_text(), re.M).group(1)
    requirements = (FLEX / "requirements.txt").read_text()
    pinned = re.search(r"^apache-beam(?:\[[^\]]*\])?==(\S+)$", requirements, re.M).group(1)
    installed = beam.__version__
    assert image_version == setup_version == pinned == installed


def test_the_image_and_the_requirements_use_one_python():
    dockerfile = (FLEX / "Dockerfile").read_text()
    python = re.search(r"beam_python(3\.\d+)_sdk", dockerfile).group(1)
    launcher = re.search(r"python(3\d+)-template-launcher-base", dockerfile).group(1)
    assert python.replace(".", "") == launcher


def test_the_dataflow_job_description_builds_offline(anonymous_gcp):
    """DataflowRunner with --dry_run builds the whole job (graph, environment) without
    credentials or a submission; only Dataflow itself cannot run here."""
    options = PipelineOptions([
        "--runner=DataflowRunner", "--dry_run=True", "--project=my-project", "--region=europe-west4",
        "--temp_location=gs://my-bucket/tmp",
        "--sdk_container_image=europe-west4-docker.pkg.dev/my-project/dicom/dicom-bq-export:0.1.0",
    ])
    pipeline = beam.Pipeline(options=options)
    plan = ExportPlan(listing_units=("gs://my-bucket/dicom/*", "gs://my-bucket/dicom/a/**"),
                      filter_uri="gs://my-bucket/filter.txt", uid_roots=("gs://my-bucket/dicom",))
    outputs = build_pipeline(pipeline, plan, options)
    table = BigQueryTable.parse("bq://my-project.imaging.instances", options)
    table.attach(outputs, RunContext(Disposition.WRITE_TRUNCATE, dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
                                     local=False))
    result = pipeline.run()
    job = result.job
    transforms = {t.unique_name for t in job.proto_pipeline.components.transforms.values()}
    for step in ("ReadFilterFile", "FilterLinesToPaths", "MatchInputs/SpreadUnits", "MatchInputs/List",
                 "MatchInputs/Deduplicate", "ReadInstances", "MergeFragments", "LoadSchema", "StageRows",
                 "StageDeadLetters", "Finalize"):
        assert any(name == step or name.startswith(step + "/") for name in transforms), step
    images = {env.payload for env in job.proto_pipeline.components.environments.values()}
    assert any(b"dicom-bq-export:0.1.0" in payload for payload in images)


def test_listing_is_sharded_by_folder_without_losing_or_doubling_files(tmp_path):
    root = tmp_path / "dicom"
    expected = set()
    for study in range(5):
        for series in range(3):
            folder = root / "studies" / f"1.2.{study}" / "series" / f"1.2.{study}.{series}"
            folder.mkdir(parents=True)
            for instance in range(2):
                path = folder / f"{instance}.dcm"
                path.write_bytes(b"x")
                expected.add(str(path))
    (root / "top-level-file").write_bytes(b"x")
    expected.add(str(root / "top-level-file"))
    units = shard_listing_units([f"{root}/**"])
    assert len(units) > 5  # one listing unit per study at least, listed in parallel
    listed = [f.path for unit in units for f in match_files(unit)]
    assert sorted(listed) == sorted(expected)


def test_listing_on_cloud_storage_is_sharded_the_same_way(gcs_bucket):
    client, bucket = gcs_bucket
    names = [f"dicom/studies/1.{s}/series/1.{s}.{r}/instances/1.{s}.{r}.{i}" for s in range(4) for r in range(2)
             for i in range(2)] + ["dicom/readme"]
    for name in names:
        bucket.blob(name).upload_from_string(b"x")
    units = shard_listing_units([f"gs://{bucket.name}/dicom/**"])
    assert any(unit.endswith("/studies/1.3/**") or "/studies/1.3/" in unit for unit in units)
    listed = [f.path for unit in units for f in match_files(unit)]
    assert sorted(listed) == sorted(f"gs://{bucket.name}/{name}" for name in names)
