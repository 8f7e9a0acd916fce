"""Strict usage (SPEC §1, issue 11): unknown options, invalid values and inputs that name
nothing stop the run in one line, before anything is read or written; Beam's and
Dataflow's own options still pass."""

from __future__ import annotations

import pathlib
import re
import shutil

import pytest
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, StandardOptions, WorkerOptions

from pipeline.options import ExportOptions, UsageError, parse_pipeline_options, strict_argv, tool_version
from pipeline.usage import check_inputs_exist

SAMPLES = pathlib.Path(__file__).resolve().parents[1] / "samples" / "dicom"


class TestUnknownOptions:
    @pytest.mark.parametrize(
        "argv, message",
        [
            (["--bq-tabel", "duckdb://x.duckdb#t"], "--bq-tabel: unknown option; did you mean --bq-table?"),
            (["--write-dispositon", "WRITE_APPEND"], "--write-dispositon: unknown option; did you mean --write-disposition?"),
            (["--filter-config-gcs-url=gs://b/f.txt"], "--filter-config-gcs-url: unknown option; did you mean --filter-config-gcs-uri?"),
            (["--bq_tabel=x"], "--bq_tabel: unknown option; did you mean --bq_table?"),
            (["--temp_locaton", "gs://b/tmp"], "--temp_locaton: unknown option; did you mean --temp_location?"),
        ],
    )
    def test_a_misspelled_option_is_an_error_naming_the_closest(self, argv, message):
        with pytest.raises(UsageError) as raised:
            strict_argv(["--input", str(SAMPLES), *argv])
        assert str(raised.value) == message

    def test_an_unknown_option_without_a_close_one_is_an_error(self):
        with pytest.raises(UsageError, match=r"^--frobnicate: unknown option \(see --help\)$"):
            strict_argv(["--input", str(SAMPLES), "--frobnicate"])

    def test_a_stray_argument_is_an_error(self):
        with pytest.raises(UsageError, match="unexpected argument 'samples/': give the files with --input"):
            strict_argv(["samples/"])


class TestInvalidValues:
    @pytest.mark.parametrize(
        "argv, message",
        [
            (["--max-failures", "abc"], "--max-failures: expected a whole number, not 'abc'"),
            (["--max_failures=-3"], "--max-failures: expected a whole number of 0 or more, not '-3'"),
            (["--input-layout", "x"], "--input-layout: invalid choice: 'x'"),
            (["--progress-seconds=soon"], "--progress-seconds: expected a number of seconds, not 'soon'"),
            (["--overwrite-table=maybe"], "--overwrite-table: invalid _boolean value: 'maybe'"),
        ],
    )
    def test_an_invalid_value_is_a_one_line_error(self, argv, message):
        with pytest.raises(UsageError) as raised:
            strict_argv(argv)
        assert str(raised.value).startswith(message)
        assert "\n" not in str(raised.value)


class TestOptionsThatPass:
    def test_ours_in_every_spelling_and_form(self):
        options = parse_pipeline_options([
            "--input", "a", "b", "--input=c", "--bq_table=duckdb://x.duckdb#t", "--write-disposition", "WRITE_APPEND",
            "--max_failures", "3", "--progress-seconds=0", "--overwrite-table=false", "--input-layout=any",
        ]).view_as(ExportOptions)
        assert options.input == ["a", "b", "c"]
        assert (options.bq_table, options.write_disposition, options.max_failures) == ("duckdb://x.duckdb#t", "WRITE_APPEND", 3)
        assert (options.progress_seconds, options.overwrite_table, options.input_layout) == (0, False, "any")

    def test_every_option_beam_registers_passes(self):
        """Each option string of Beam's own PipelineOptions subclasses, given a value its
        parser accepts where it takes one."""
        from pipeline.options import _all_options_parser

        parser = _all_options_parser()
        checked = 0
        for action in parser._actions:
            if action.dest in vars(ExportOptions) or not action.option_strings:
                continue
            for option in action.option_strings:
                value = [] if action.nargs == 0 else [str(list(action.choices)[0])] if action.choices else ["1"]
                try:
                    strict_argv([option, *value])
                except UsageError as error:  # a value this generic one does not fit, never the name
                    assert "unknown option" not in str(error)
                checked += 1
        assert checked > 150

    def test_what_a_flex_template_launch_passes(self):
        """The options Dataflow's flex-template launcher adds for a Python pipeline,
        besides the template's parameters."""
        argv = [
            "--runner=DataflowRunner", "--project=my-project", "--region=europe-west4", "--job_name=dicom-1",
            "--template_location=gs://b/templates/t.json", "--staging_location=gs://b/staging",
            "--temp_location=gs://b/tmp", "--sdk_container_image=europe-west4-docker.pkg.dev/p/r/i:1",
            "--sdk_location=container", "--service_account_email=sa@p.iam.gserviceaccount.com",
            "--experiments=use_runner_v2", "--dataflow_service_options=enable_prime", "--labels=a=b",
            "--num_workers=2", "--max_num_workers=10", "--worker_machine_type=n2-standard-4", "--network=default",
            "--subnetwork=regions/europe-west4/subnetworks/s", "--no_use_public_ips", "--disk_size_gb=50",
            "--setup_file=/template/setup.py", "--save_main_session", "--autoscaling_algorithm=THROUGHPUT_BASED",
            "--input=gs://b/dicom/**", "--bq_table=bq://p.d.t", "--write_disposition=WRITE_TRUNCATE",
        ]
        options = parse_pipeline_options(argv)
        assert options.view_as(StandardOptions).runner == "DataflowRunner"
        assert options.view_as(GoogleCloudOptions).template_location == "gs://b/templates/t.json"
        assert options.view_as(WorkerOptions).max_num_workers == 10
        assert options.view_as(ExportOptions).bq_table == "bq://p.d.t"

    def test_a_dashed_beam_option_is_read_not_ignored(self):
        options = parse_pipeline_options(["--temp-location", "gs://b/tmp", "--direct-num-workers=3"])
        assert options.view_as(GoogleCloudOptions).temp_location == "gs://b/tmp"
        assert options.get_all_options()["direct_num_workers"] == 3


def test_the_version_is_the_package_version():
    setup = (pathlib.Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert f'version="{tool_version()}"' in setup


class TestInputsExist:
    def test_a_local_path_that_does_not_exist_is_an_error(self, tmp_path):
        with pytest.raises(UsageError, match=r"--input .*/typo: no such file or folder"):
            check_inputs_exist([str(SAMPLES), str(tmp_path / "typo")])

    def test_a_glob_that_matches_nothing_is_an_error(self, tmp_path):
        shutil.copytree(SAMPLES, tmp_path / "in")
        check_inputs_exist([str(tmp_path / "in" / "**" / "*")])
        with pytest.raises(UsageError, match=r"\*\*/\*\.DCM: the pattern matches no file \(names are case-sensitive\)"):
            check_inputs_exist([str(tmp_path / "in" / "**" / "*.DCM")])

    def test_a_glob_matching_only_folders_matches_no_file(self, tmp_path):
        (tmp_path / "a" / "b").mkdir(parents=True)
        with pytest.raises(UsageError, match="matches no file"):
            check_inputs_exist([str(tmp_path / "a" / "*")])

    def test_files_folders_and_an_empty_folder_exist(self, tmp_path):
        (tmp_path / "empty").mkdir()
        one = next(p for p in SAMPLES.rglob("*") if p.is_file())
        check_inputs_exist([str(SAMPLES), str(SAMPLES) + "/", str(one), str(tmp_path / "empty")])

    def test_on_cloud_storage_a_prefix_or_pattern_that_matches_nothing_is_an_error(self, gcs_bucket):
        _client, bucket = gcs_bucket
        bucket.blob("dicom/a/one.dcm").upload_from_string(b"x")
        options = PipelineOptions([])
        for present in ("dicom/", "dicom", "dicom/**", "dicom/a/one.dcm", "dicom/*/*.dcm"):
            check_inputs_exist([f"gs://{bucket.name}/{present}"], options)
        for absent in ("dicm/", "dicom/b", "dicom/**/*.DCM"):
            with pytest.raises(UsageError, match=re.escape(f"--input gs://{bucket.name}/{absent}: matches no object")):
                check_inputs_exist([f"gs://{bucket.name}/{absent}"], options)
