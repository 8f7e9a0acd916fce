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
import uuid
from typing import NamedTuple

import apache_beam as beam

from pipeline.graph import ExportOutputs

ROWS = "rows"
DEAD_LETTERS = "dead_letters"
SCHEMA = "schema"
FILTER_LINES = "filter_lines_used"


class _WriteJsonLines(beam.DoFn):
    """Each bundle's elements → one JSON-lines file in a local staging folder.

    Unlike ``WriteToText`` this adds no stage to the graph (no temporary files to
    finalise): the launcher globs the folder once the pipeline is done. Only for local
    runners, where a failed bundle fails the run, so no bundle is ever written twice.
    """

    def __init__(self, directory: str, name: str):
        self.directory = directory
        self.name = name

    def start_bundle(self):
        self._handle = None

    def process(self, element):
        if self._handle is None:
            path = os.path.join(self.directory, f"{self.name}-{uuid.uuid4().hex}.json.partial")
            self._handle = open(path, "w", encoding="utf-8")
        self._handle.write(json.dumps(element) + "\n")

    def finish_bundle(self):
        if self._handle is not None:
            self._handle.close()
            os.replace(self._handle.name, self._handle.name[: -len(".partial")])
            self._handle = None


def stage_outputs(outputs: ExportOutputs, directory: str, rows: bool = True) -> None:
    """Add the writes of ``outputs`` under the local folder ``directory`` to the pipeline.

    With ``rows=False`` only what the summary needs is staged (the destination writes
    rows and dead letters itself).
    """

    def write(pcoll, name):
        pcoll | f"Stage_{name}" >> beam.ParDo(_WriteJsonLines(directory, name))

    if rows:
        write(outputs.rows, ROWS)
        write(outputs.dead_letters, DEAD_LETTERS)
    write(outputs.schema, SCHEMA)
    if outputs.filter_lines_used is not None:
        write(outputs.filter_lines_used, FILTER_LINES)


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
