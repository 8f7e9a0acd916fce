"""``build_pipeline``'s outputs on Beam's in-process runner (TestPipeline + assert_that):
rows, the merged schema, dead letters on their tagged output, the filter lines used."""

from __future__ import annotations

import os
import pathlib
import random
import shutil

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing import test_pipeline as beam_testing
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import graph
from pipeline.graph import ExportPlan, build_pipeline
from schemas.convert import BASE_FRAGMENT
from schemas.merge import add_fragment, merge_fragments, to_bigquery_schema
from schemas.rows import with_empty_lists
from tests.builders import flatten_bytes, instance, item, sequence, to_bytes
from transforms import counters
from transforms.flatten import DEAD_LETTERS, MergeFragments, ReadInstances
from transforms.storage import InputFile

RUN_STARTED = "2026-01-02 03:04:05.000006+00:00"


def in_process_pipeline() -> beam_testing.TestPipeline:
    return beam_testing.TestPipeline(runner="FnApiRunner")


@pytest.fixture
def inputs(tmp_path):
    """Two instances (one with a sequence the other lacks) and a file that is not DICOM."""
    folder = tmp_path / "in"
    folder.mkdir()
    plain = instance(study="1.2.3", series="1.2.3.4", sop="1.2.3.4.5")
    nested = instance(study="1.2.9", series="1.2.9.4", sop="1.2.9.4.5")
    nested.ReferencedImageSequence = sequence(item(ReferencedSOPInstanceUID="1.2.1", ReferencedFrameNumber="3"))
    data = {"plain": to_bytes(plain), "nested": to_bytes(nested)}
    for name, content in data.items():
        (folder / name).write_bytes(content)
    (folder / "notes.txt").write_text("not DICOM")
    return folder, {name: flatten_bytes(content) for name, content in data.items()}


def plan_for(folder: pathlib.Path, **kwargs) -> ExportPlan:
    return ExportPlan(listing_units=(str(folder / "**"),), run_started=RUN_STARTED, **kwargs)


@pytest.mark.parametrize("spooled", [False, True], ids=["side-input", "spooled"])
def test_rows_are_the_flattened_instances_with_empty_lists_for_absent_repeated_fields(inputs, tmp_path, spooled):
    folder, flattened = inputs
    schema = to_bigquery_schema(merge_fragments([BASE_FRAGMENT, *(f.fragment for f in flattened.values())]))
    spool = tmp_path / "spool"
    with in_process_pipeline() as p:
        outputs = build_pipeline(p, plan_for(folder, spool=str(spool) if spooled else None))
        assert_that(outputs.rows, equal_to([with_empty_lists(f.row, schema) for f in flattened.values()]))
        sequences = outputs.rows | beam.Map(lambda row: (row["SOPInstanceUID"], row["ReferencedImageSequence"]))
        assert_that(
            sequences,
            equal_to([("1.2.3.4.5", []), ("1.2.9.4.5", [{"ReferencedSOPInstanceUID": "1.2.1",
                                                         "ReferencedFrameNumber": ["3"]}])]),
            label="SequenceOrEmptyList",
        )
    assert spool.is_dir() is spooled  # the rows went through files there


def test_the_schema_is_the_merge_of_every_instances_fragment(inputs):
    folder, flattened = inputs
    expected = to_bigquery_schema(merge_fragments([BASE_FRAGMENT, *(f.fragment for f in flattened.values())]))
    with in_process_pipeline() as p:
        outputs = build_pipeline(p, plan_for(folder))
        assert_that(outputs.schema, equal_to([expected]))
        names = outputs.schema | beam.Map(lambda fields: "ReferencedImageSequence" in [f["name"] for f in fields])
        assert_that(names, equal_to([True]), label="HasTheSequenceOnlyOneInstanceHas")


def test_an_export_of_nothing_still_has_the_base_schema(tmp_path):
    (tmp_path / "empty").mkdir()
    with in_process_pipeline() as p:
        outputs = build_pipeline(p, plan_for(tmp_path / "empty"))
        assert_that(outputs.rows, equal_to([]))
        assert_that(outputs.schema, equal_to([to_bigquery_schema(BASE_FRAGMENT)]), label="BaseSchema")


def test_a_file_that_is_not_dicom_is_a_dead_letter_on_the_tagged_output(inputs):
    folder, _ = inputs
    with in_process_pipeline() as p:
        outputs = build_pipeline(p, plan_for(folder))
        summary = outputs.dead_letters | beam.Map(
            lambda d: (os.path.basename(d["path"]), d["stage"], d["error_type"], d["run_started"], sorted(d))
        )
        assert_that(summary, equal_to([(
            "notes.txt", "read", "NotDicomError", RUN_STARTED,
            ["error_type", "message", "path", "run_started", "stage"],
        )]))


def test_filter_lines_used_are_the_lines_that_selected_an_instance(inputs, tmp_path):
    folder, _ = inputs
    filter_file = tmp_path / "filter.txt"
    filter_file.write_text("/studies/1.2.3\n/studies/7.7.7\n/studies/1.2.9/series/1.2.9.4\n")
    with in_process_pipeline() as p:
        outputs = build_pipeline(p, plan_for(folder, filter_uri=str(filter_file)))
        assert_that(outputs.filter_lines_used, equal_to([[1, 3]]))
        assert_that(outputs.rows | beam.Map(lambda row: row["SOPInstanceUID"]),
                    equal_to(["1.2.3.4.5", "1.2.9.4.5"]), label="Selected")


def test_an_input_listed_with_an_error_is_a_list_stage_dead_letter_and_is_never_opened(tmp_path):
    missing = str(tmp_path / "does-not-exist")  # opening it would fail with another error
    listed = InputFile(missing, 0, ("SymlinkLoopError", "the path is a symbolic link loop"))
    p = in_process_pipeline()
    results = (
        p
        | beam.Create([listed])
        | beam.ParDo(ReadInstances(run_started=RUN_STARTED)).with_outputs(DEAD_LETTERS, main="instances")
    )
    assert_that(results.instances, equal_to([]), label="NoInstance")
    assert_that(results[DEAD_LETTERS], equal_to([{
        "path": missing, "stage": "list", "error_type": "SymlinkLoopError",
        "message": "the path is a symbolic link loop", "run_started": RUN_STARTED,
    }]))
    result = p.run()
    result.wait_until_finish()
    counts = {
        c.key.metric.name: c.committed
        for c in result.metrics().query(MetricsFilter().with_namespace(counters.NAMESPACE))["counters"]
    }
    assert counts[counters.FAILED] == 1
    assert counts[counters.failed_counter("SymlinkLoopError")] == 1
    assert counts.get(counters.BYTES_READ, 0) == 0


@pytest.mark.parametrize("runner, mode, carried", [
    ("FnApiRunner", "in_memory", False), ("FnApiRunner", "multi_processing", True), ("DirectRunner", "in_memory", True)])
def test_files_listed_by_the_launcher_are_carried_in_the_graph_only_for_workers_elsewhere(inputs, runner, mode, carried):
    """Handed files reach a pipeline whose workers are this process from this process
    (Beam would pickle them into the graph); any other runner gets them in its graph."""
    folder, flattened = inputs
    listed = tuple(InputFile(str(path), path.stat().st_size) for path in sorted(folder.iterdir()))
    options = beam.options.pipeline_options.PipelineOptions([f"--runner={runner}", f"--direct_running_mode={mode}"])
    p = beam.Pipeline(runner=runner, options=options)
    try:
        outputs = build_pipeline(p, plan_for(folder, listed_files=listed), options)
        proto = p.to_runner_api()
        names = {transform.unique_name for transform in proto.components.transforms.values()}
        assert ("HandedFiles" in names) is not carried
        assert bool(graph._HANDED_FILES) is not carried
        if not carried:  # run it: the rows of the instances, the file that is not DICOM a dead letter
            assert_that(outputs.rows | beam.Map(lambda row: row["SOPInstanceUID"]),
                        equal_to([f.row["SOPInstanceUID"] for f in flattened.values()]))
            assert_that(outputs.dead_letters | beam.Map(lambda record: os.path.basename(record["path"])),
                        equal_to(["notes.txt"]), label="DeadLetter")
            p.run().wait_until_finish()
    finally:
        graph.forget_handed_files()
        shutil.rmtree(p.local_tempdir, ignore_errors=True)  # Beam's own, removed by run() only
    assert not graph._HANDED_FILES


def test_failures_are_counted_by_type(inputs):
    folder, _ = inputs
    (folder / "empty").write_bytes(b"")
    (folder / "also-not-dicom").write_text("hello")
    p = in_process_pipeline()
    build_pipeline(p, plan_for(folder))
    result = p.run()
    result.wait_until_finish()
    counts = {
        c.key.metric.name: c.committed
        for c in result.metrics().query(MetricsFilter().with_namespace(counters.NAMESPACE))["counters"]
    }
    assert (counts[counters.SUCCEEDED], counts[counters.FAILED]) == (2, 3)
    assert counts["failed:NotDicomError"] == 2 and counts["failed:EmptyFileError"] == 1


def test_adding_a_fragment_is_merging_the_two(bundled_instances):
    fragments = [f.fragment for f in bundled_instances.values()]
    merged = BASE_FRAGMENT
    for fragment in fragments:
        grown = add_fragment(merged, fragment)
        assert grown == merge_fragments([merged, fragment])
        if fragment <= merged:
            assert grown is merged  # nothing new: no copy
        merged = grown
    assert merged == merge_fragments([BASE_FRAGMENT, *fragments])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), workers=st.integers(1, 6))
def test_the_schema_combine_fn_gives_the_merge_whatever_the_split(bundled_instances, seed, workers):
    """MergeFragments as Beam drives it: inputs added on several workers in any order, the
    accumulators merged in any order — always the tested merge of every fragment."""
    fragments = [f.fragment for f in bundled_instances.values()]
    rng = random.Random(seed)
    combine = MergeFragments()
    accumulators = [combine.create_accumulator() for _ in range(workers)]
    for fragment in rng.sample(fragments, len(fragments)):
        index = rng.randrange(workers)
        accumulators[index] = combine.add_input(accumulators[index], fragment)
    rng.shuffle(accumulators)
    merged = combine.extract_output(combine.merge_accumulators(accumulators))
    assert merged == merge_fragments([BASE_FRAGMENT, *fragments])


@pytest.mark.parametrize("spooled", [False, True], ids=["side-input", "spooled"])
def test_incremental_keeps_one_row_per_instance_the_greatest_path(tmp_path, spooled):
    folder = tmp_path / "in"
    folder.mkdir()
    first = instance(study="1.2.7", series="1.2.7.1", sop="1.2.7.1.1")
    second = instance(study="1.2.7", series="1.2.7.1", sop="1.2.7.1.1")
    second.PatientID = "B"  # the same instance, other content
    other = instance(study="1.2.7", series="1.2.7.1", sop="1.2.7.1.2")
    for name, ds in {"a.dcm": first, "b.dcm": second, "c.dcm": other}.items():
        (folder / name).write_bytes(to_bytes(ds))
    plan = plan_for(folder, incremental=True, spool=str(tmp_path / "spool") if spooled else None)
    with in_process_pipeline() as p:
        outputs = build_pipeline(p, plan)
        assert_that(
            outputs.rows | beam.Map(lambda row: (row["SOPInstanceUID"], row.get("PatientID"))),
            equal_to([("1.2.7.1.1", "B"), ("1.2.7.1.2", None)]),
        )
        assert_that(
            outputs.files | beam.Map(lambda record: (pathlib.Path(record["path"]).name, record["outcome"])),
            equal_to([("a.dcm", "duplicate"), ("b.dcm", "row"), ("c.dcm", "row")]),
            label="Outcomes",
        )


@pytest.mark.parametrize("incremental", [False, True])
def test_every_input_is_flattened_only_for_incremental_which_reads_it(inputs, incremental):
    """Beam's local runner holds a Flatten's output whole even when nothing consumes it
    (one entry per file): a plain run with archive steps builds none of every input."""
    folder, _ = inputs
    p = beam.Pipeline(runner="FnApiRunner")
    try:
        build_pipeline(p, plan_for(folder, expand_archives=True, incremental=incremental))
        names = {transform.unique_name for transform in p.to_runner_api().components.transforms.values()}
    finally:
        shutil.rmtree(p.local_tempdir, ignore_errors=True)
    assert "Archives" in names and ("EveryInput" in names) is incremental
