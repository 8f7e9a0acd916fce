"""Staging a run's outputs as files, for destinations loaded after the pipeline (DuckDB)
and for the launcher's summary.

Rows and dead letters are written as newline-delimited JSON shards (what a BigQuery
load job takes), the schema and the filter lines that selected something as one small
JSON file each.
"""

from __future__ import annotations

import glob
import json
import os
from typing import NamedTuple

import apache_beam as beam

from pipeline.graph import ExportOutputs

ROWS = "rows"
DEAD_LETTERS = "dead_letters"
SCHEMA = "schema"
FILTER_LINES = "filter_lines_used"


def stage_outputs(outputs: ExportOutputs, directory: str, rows: bool = True) -> None:
    """Add the writes of ``outputs`` under ``directory`` to the pipeline."""

    def write(pcoll, name, single=False):
        pcoll | f"Stage_{name}" >> beam.io.WriteToText(
            os.path.join(directory, name),
            file_name_suffix=".json",
            num_shards=1 if single else 0,
            shard_name_template="" if single else None,
        )

    if rows:
        write(outputs.rows | "RowsToJson" >> beam.Map(json.dumps), ROWS)
    write(outputs.dead_letters | "DeadLettersToJson" >> beam.Map(json.dumps), DEAD_LETTERS)
    write(outputs.schema | "SchemaToJson" >> beam.Map(json.dumps), SCHEMA, single=True)
    if outputs.filter_lines_used is not None:
        write(outputs.filter_lines_used | "LinesToJson" >> beam.Map(json.dumps), FILTER_LINES, single=True)


class StagedRun(NamedTuple):
    row_files: list[str]
    dead_letter_files: list[str]
    schema: list[dict]
    filter_lines_used: list[int] | None


def read_staged(directory: str) -> StagedRun:
    def files(name):
        return sorted(glob.glob(os.path.join(directory, f"{name}*.json")))

    def single(name):
        paths = files(name)
        if not paths:
            return None
        with open(paths[0], encoding="utf-8") as handle:
            text = handle.read().strip()
        return json.loads(text) if text else None

    return StagedRun(files(ROWS), files(DEAD_LETTERS), single(SCHEMA) or [], single(FILTER_LINES))
