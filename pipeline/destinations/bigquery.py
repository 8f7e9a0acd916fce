"""The BigQuery destination, ``bq://PROJECT.DATASET.TABLE``, with the Healthcare API's
write semantics (SPEC §4).

Beam's BigQuery sink alone is not enough: it has lost data under WRITE_TRUNCATE
(apache/beam#23306, #24535), checks WRITE_EMPTY only when a load job runs, and writes
nothing for an empty input. So this module owns:

* **preflight** (before any file is read): the URI, the dataset, the table's state
  against the disposition, ``--temp_location`` and ``--cluster-by``;
* **staging**: Beam's ``WriteToBigQuery`` (FILE_LOADS, the merged schema as a side
  input) loads the rows into a staging table ``TABLE__staging_RUN`` in the same dataset,
  never into the table itself. For WRITE_APPEND and WRITE_EMPTY the load schema is the
  table's schema extended with the export's new fields, and a conflicting field fails
  the pipeline before anything is loaded;
* **finalize**, once every load job is done: the table's state is checked again, then
  the staged rows and the staged file records reach the table and ``TABLE_files`` in
  **one multi-statement transaction** (:func:`commit_script`): WRITE_TRUNCATE empties
  and refills both, WRITE_APPEND adds the rows (after widening the table's schema by an
  additive patch) and updates the files table by path; WRITE_EMPTY appends only if the
  table is still empty. A missing table is first created empty (an empty pair is
  consistent). A rebuild whose schema changes one of the old table's columns cannot be
  patched additively: both tables are emptied together, the empty table's schema is
  replaced by a copy job, then the transaction fills both (a kill in between leaves an
  empty, consistent pair). A failed or cancelled run never reaches finalize: the table is
  untouched. The dead letters are copied into ``TABLE_errors`` by a copy job.

With ``--incremental`` on an existing table, finalize runs one multi-statement
transaction (:func:`incremental_script`): delete the rows of the SOPInstanceUIDs read,
insert the staged rows, update the files table by path and, with ``--prune-missing``,
delete the gone files' records and the rows no exported file records — so the table and
its files table change together or not at all. The files table is read once, with
``tabledata.list`` (no query), as the pipeline's ledger (:meth:`BigQueryTable.recorded_files`).

Cost: DML is billed where copy jobs are free. The INSERT of a commit bills the staged
rows' bytes; a DELETE (incremental replace or prune) bills the whole table.

Google's clients are used as they come: nothing here knows about emulators.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from typing import NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import GoogleCloudOptions
from apache_beam.pvalue import AsList, AsSingleton

from pipeline.destinations import (
    ERRORS_SCHEMA,
    DestinationError,
    Disposition,
    append_schema,
    check_max_failures,
    load_schema,
    check_table_state,
    errors_disposition,
    errors_table_name,
)
from pipeline.destinations.base import Destination, RunContext
from pipeline.ledger import EXPORTED, FILES_SCHEMA, ROW, files_table_name
from transforms import counters
from schemas import columns as dicom_columns
from schemas.merge import extend_schema
from schemas.vr_types import RECORD

SCHEME = "bq://"
_PROJECT = re.compile(r"(?:[a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]")
_DATASET = re.compile(r"[A-Za-z0-9_]{1,1024}")
#: Leaves room in BigQuery's 1,024 bytes for ``_errors__staging_<run id>``.
_MAX_TABLE_BYTES = 960
#: Unicode categories BigQuery allows in table names: letters, marks, numbers,
#: connectors (underscore), dashes and spaces.
_TABLE_CATEGORIES = ("Pc", "Pd", "Zs")
_MAX_CLUSTER_COLUMNS = 4


def is_bigquery_uri(uri: str) -> bool:
    """``bq://…``, or a scheme-less ``PROJECT:DATASET.TABLE`` / ``PROJECT.DATASET.TABLE``."""
    if uri.startswith(SCHEME):
        return True
    return "://" not in uri and "#" not in uri and re.fullmatch(r"[^/]+[.:][^/.]+\.[^/.]+", uri) is not None


def _client(project: str):
    from google.cloud import bigquery

    return bigquery.Client(project=project)


def _valid_table_name(name: str) -> bool:
    if not name or len(name.encode("utf-8")) > _MAX_TABLE_BYTES:
        return False
    return all(unicodedata.category(c)[0] in "LMN" or unicodedata.category(c) in _TABLE_CATEGORIES for c in name)


def parse_cluster_by(text: str | None) -> list[str]:
    """``--cluster-by``: up to four top-level, non-repeated, non-record DICOM keywords."""
    if not text:
        return []
    names = [name.strip() for name in text.split(",") if name.strip()]
    if len(names) > _MAX_CLUSTER_COLUMNS:
        raise DestinationError(f"--cluster-by takes at most {_MAX_CLUSTER_COLUMNS} columns, not {len(names)}")
    from pydicom.datadict import tag_for_keyword

    for name in names:
        tag = tag_for_keyword(name)
        column = dicom_columns.column_for_tag(tag) if tag is not None else None
        if column is None or column.kind != dicom_columns.STANDARD:
            raise DestinationError(f"--cluster-by: {name!r} is not a DICOM keyword")
        if column.bq_type in (None, RECORD) or column.mode != "NULLABLE":
            raise DestinationError(
                f"--cluster-by: {name} is {column.bq_type or 'excluded'} {column.mode}; BigQuery clusters "
                "only by single-valued, non-record columns (e.g. StudyInstanceUID,SeriesInstanceUID)"
            )
    return names


class BigQueryTable(Destination):
    """``bq://PROJECT.DATASET.TABLE``: preflight, the staged write, and finalize."""

    def __init__(self, project: str, dataset: str, table: str, pipeline_options=None):
        self.project, self.dataset, self.table = project, dataset, table
        self._options = pipeline_options
        self.existing_schema: list[dict] | None = None  # as seen at preflight
        self.cluster_by: list[str] = []
        self.incremental = False
        self.has_files_table = False  # as seen at preflight

    @classmethod
    def parse(cls, uri: str, pipeline_options=None) -> "BigQueryTable":
        """``bq://PROJECT.DATASET.TABLE``; also ``PROJECT:DATASET.TABLE`` and
        ``PROJECT.DATASET.TABLE`` (what Dataflow's BIGQUERY_TABLE parameters give)."""
        rest = uri[len(SCHEME):] if uri.startswith(SCHEME) else uri
        head, colon, tail = rest.rpartition(":")
        if colon and tail.count(".") == 1:
            parts = [head, *tail.split(".")]
        else:
            parts = rest.rsplit(".", 2)
        if len(parts) != 3 or "://" in rest:
            raise DestinationError(f"{uri!r}: expected bq://PROJECT.DATASET.TABLE")
        project, dataset, table = parts
        if not _PROJECT.fullmatch(project):
            raise DestinationError(
                f"{uri!r}: the project ID {project!r} must be 6 to 30 lowercase letters, digits or hyphens, "
                "start with a letter and not end with a hyphen"
            )
        if not _DATASET.fullmatch(dataset):
            raise DestinationError(
                f"{uri!r}: the dataset ID {dataset!r} may only hold letters, digits and underscores (at most 1,024)"
            )
        if not _valid_table_name(table):
            raise DestinationError(
                f"{uri!r}: the table name {table!r} may hold letters, marks, digits, underscores, dashes and "
                f"spaces, at most {_MAX_TABLE_BYTES} bytes (no decorators such as $20240101)"
            )
        return cls(project, dataset, table, pipeline_options)

    def __str__(self) -> str:
        return f"{SCHEME}{self.project}.{self.dataset}.{self.table}"

    @property
    def table_id(self) -> str:
        return f"{self.project}.{self.dataset}.{self.table}"

    def errors_uri(self) -> str:
        return f"{SCHEME}{self.project}.{self.dataset}.{errors_table_name(self.table)}"

    def check_options(self, export_options) -> None:
        """``--cluster-by`` (DestinationError if it names unsuitable columns)."""
        self.cluster_by = parse_cluster_by(getattr(export_options, "cluster_by", None))
        self.incremental = bool(getattr(export_options, "incremental", False))

    @property
    def files_table_id(self) -> str:
        return f"{self.project}.{self.dataset}.{files_table_name(self.table)}"

    # -- preflight -------------------------------------------------------------------

    def temp_location(self) -> str:
        options = (self._options or beam.options.pipeline_options.PipelineOptions([])).view_as(GoogleCloudOptions)
        location = options.temp_location or options.staging_location
        if not location or not location.startswith("gs://"):
            raise DestinationError(
                "a bq:// destination needs --temp_location gs://BUCKET/PATH: BigQuery loads the rows from files there"
            )
        return location.rstrip("/")

    def preflight(self, disposition: Disposition) -> None:
        """Before any file is read: temp location, dataset, table state."""
        from google.api_core import exceptions

        self.temp_location()
        client = _client(self.project)
        try:
            client.get_dataset(f"{self.project}.{self.dataset}")
        except exceptions.NotFound:
            raise DestinationError(
                f"the dataset {self.project}.{self.dataset} does not exist; create it first "
                f"(bq mk --dataset {self.project}:{self.dataset})"
            ) from None
        except exceptions.Forbidden as error:
            raise DestinationError(f"no access to the dataset {self.project}.{self.dataset}: {error.message}") from None
        table = _get_table(client, self.table_id)
        check_table_state(str(self), disposition, table is not None, _row_count(table))
        if table is not None and not disposition.replaces:
            self.existing_schema = [field.to_api_repr() for field in table.schema]
        self.has_files_table = _get_table(client, self.files_table_id) is not None
        if self.incremental and table is not None and not disposition.replaces and not self.has_files_table:
            raise DestinationError(
                f"table {self} has no files table {files_table_name(self.table)} (it was written by an older "
                "version), so --incremental cannot tell which files it holds; rebuild it once with "
                "--incremental --write-disposition WRITE_TRUNCATE"
            )

    def recorded_files(self, context: RunContext):
        """The files table's records, read once by one worker (``tabledata.list``: no query)."""
        if context.disposition.replaces or self.existing_schema is None or not self.has_files_table:
            return None
        return beam.Create([self.files_table_id]) | "Records" >> beam.FlatMap(_read_files_table, self.project)

    # -- the write -------------------------------------------------------------------

    def attach(self, outputs, context: RunContext) -> None:
        """Add the staged loads and the finalize step to the pipeline."""
        disposition = context.disposition
        run_id = context.started_at.strftime("%Y%m%d%H%M%S") + "_" + uuid.uuid4().hex[:8]
        temp = f"{self.temp_location()}/dicom-bq-export/{run_id}"
        rows_staging = f"{self.table}__staging_{run_id}"
        errors_table = errors_table_name(self.table)
        errors_staging = f"{errors_table}__staging_{run_id}"
        existing, replaces = self.existing_schema, disposition.replaces

        write_schema = outputs.schema | "LoadSchema" >> beam.Map(load_schema, existing, str(self), replaces)
        additional = {"clustering": {"fields": self.cluster_by}} if self.cluster_by else None
        rows = outputs.rows | "StageRows" >> beam.io.WriteToBigQuery(
            table=f"{self.project}:{self.dataset}.{rows_staging}",
            schema=lambda destination, schema: {"fields": schema},
            schema_side_inputs=(AsSingleton(write_schema),),
            method=beam.io.WriteToBigQuery.Method.FILE_LOADS,
            create_disposition=beam.io.BigQueryDisposition.CREATE_IF_NEEDED,
            write_disposition=beam.io.BigQueryDisposition.WRITE_TRUNCATE,
            custom_gcs_temp_location=f"{temp}/rows",
            additional_bq_parameters=additional,
        )
        errors = outputs.dead_letters | "StageDeadLetters" >> beam.io.WriteToBigQuery(
            table=f"{self.project}:{self.dataset}.{errors_staging}",
            schema={"fields": ERRORS_SCHEMA},
            method=beam.io.WriteToBigQuery.Method.FILE_LOADS,
            create_disposition=beam.io.BigQueryDisposition.CREATE_IF_NEEDED,
            write_disposition=beam.io.BigQueryDisposition.WRITE_TRUNCATE,
            custom_gcs_temp_location=f"{temp}/errors",
        )
        files_table = files_table_name(self.table)
        files_staging = f"{files_table}__staging_{run_id}"
        staged = [rows, errors]
        if outputs.files is not None:
            records = outputs.files
            if isinstance(records, tuple):
                records = records | "AllFileRecords" >> beam.Flatten()
            staged.append(self._stage(records, "StageFileRecords", files_staging, FILES_SCHEMA, f"{temp}/files"))
        gone_staging = None
        if context.prune_missing and outputs.gone is not None:
            gone_staging = f"{files_table}__gone_{run_id}"
            staged.append(self._stage(outputs.gone, "StageGoneFiles", gone_staging, _GONE_SCHEMA, f"{temp}/gone"))
        failures = outputs.dead_letters | "CountFailures" >> beam.combiners.Count.Globally()
        jobs = [
            AsList(result[name])
            for result in staged
            for name in ("destination_load_jobid_pairs", "destination_copy_jobid_pairs")
        ]
        plan = FinalizePlan(
            project=self.project,
            dataset=self.dataset,
            moves=(
                Move(rows_staging, self.table, disposition.value, tuple(self.cluster_by)),
                Move(errors_staging, errors_table, errors_disposition(disposition).value, ()),
            ),
            run_id=run_id,
            temp_location=temp,
            max_failures=context.max_failures,
            destination=str(self),
            files=Move(files_staging, files_table, disposition.value, ()),
            gone_staging=gone_staging,
            incremental=context.incremental,
        )
        write_schema | "Finalize" >> beam.ParDo(Finalize(plan), AsSingleton(failures), *jobs)

    def _stage(self, pcoll, label: str, table: str, schema: list[dict], temp: str):
        return pcoll | label >> beam.io.WriteToBigQuery(
            table=f"{self.project}:{self.dataset}.{table}",
            schema={"fields": schema},
            method=beam.io.WriteToBigQuery.Method.FILE_LOADS,
            create_disposition=beam.io.BigQueryDisposition.CREATE_IF_NEEDED,
            write_disposition=beam.io.BigQueryDisposition.WRITE_TRUNCATE,
            custom_gcs_temp_location=temp,
        )


_GONE_SCHEMA = [{"name": "path", "type": "STRING", "mode": "NULLABLE"}]


def _read_files_table(table_id: str, project: str):
    """The files table's records (path, version, outcome), listed page by page."""
    from google.cloud import bigquery

    fields = [bigquery.SchemaField(name, "STRING") for name in ("path", "version", "outcome")]
    for row in _client(project).list_rows(table_id, selected_fields=fields, page_size=100_000):
        yield {"path": row["path"], "version": row["version"], "outcome": row["outcome"]}


def _row_count(table) -> int | None:
    """Rows in a table, including any still in the streaming buffer."""
    if table is None:
        return None
    buffered = getattr(table.streaming_buffer, "estimated_rows", 0) if table.streaming_buffer else 0
    return (table.num_rows or 0) + (buffered or 0)


def _get_table(client, table_id: str):
    from google.api_core import exceptions

    try:
        return client.get_table(table_id)
    except exceptions.NotFound:
        return None


class Move(NamedTuple):
    """Finalize's work for one table: copy ``staging`` into ``destination``."""

    staging: str
    destination: str
    disposition: str  # a Disposition value
    cluster_by: tuple[str, ...]


class FinalizePlan(NamedTuple):
    project: str
    dataset: str
    moves: tuple[Move, ...]
    run_id: str
    temp_location: str
    max_failures: int | None
    destination: str
    files: Move | None = None  # the files table's records
    gone_staging: str | None = None  # --prune-missing: the recorded paths no longer listed
    incremental: bool = False


class Finalize(beam.DoFn):
    """After every load job: check again, then move each staging table into place.

    Runs once (its input is the single load schema). Copy jobs have deterministic IDs,
    so a retried bundle waits for the job it already started instead of appending twice.
    """

    def __init__(self, plan: FinalizePlan):
        self.plan = plan

    def process(self, load_schema, failures, *job_lists):
        plan = self.plan
        client = _client(plan.project)
        for jobs in job_lists:
            for _destination, reference in jobs:
                _wait_for_job(client, reference)
        try:
            check_max_failures(failures, plan.max_failures, plan.destination)
        except DestinationError:
            self._drop_staging(client)
            raise
        rows, errors = plan.moves
        disposition = Disposition(rows.disposition)
        location = client.get_dataset(f"{plan.project}.{plan.dataset}").location
        existing = _get_table(client, self._id(rows.destination))
        if plan.incremental and existing is not None and not disposition.replaces:
            check_table_state(plan.destination, disposition, True, _row_count(existing))
            self._update_in_place(client, load_schema, existing, location)
        else:
            self._commit_rows_and_files(client, load_schema, existing, disposition, location)
        move_into_place(
            client,
            project=plan.project,
            dataset=plan.dataset,
            staging=errors.staging,
            destination=errors.destination,
            schema=ERRORS_SCHEMA,
            disposition=Disposition(errors.disposition),
            cluster_by=[],
            job_id=f"dicom_bq_export_{plan.run_id}_1",
        )
        self._drop_staging(client)
        _delete_prefix(plan.temp_location)
        yield plan.destination

    def _id(self, table: str) -> str:
        return f"{self.plan.project}.{self.plan.dataset}.{table}"

    def _count(self, name: str, value: int) -> None:
        Metrics.counter(counters.NAMESPACE, name).inc(int(value or 0))

    def _commit_rows_and_files(self, client, load_schema, existing, disposition, location) -> None:
        """Without an in-place update (a first run, a rebuild, a plain append): the rows and
        the file records reach their tables in one multi-statement transaction
        (:func:`commit_script`), so a run killed at any moment leaves the old pair or the new.

        Before it, only steps that keep the pair consistent: a missing table or files table
        is created empty (an empty pair is consistent), and the table's schema is widened by
        an additive patch. A rebuild whose schema changes a column the old table has (its
        type, mode or sub-fields) cannot be reached additively: both tables are first
        emptied in one transaction and the table's schema replaced while empty
        (:meth:`_reshape`), so a kill there leaves an empty, consistent pair. Top-level
        columns only the old table had are dropped after the commit (metadata only).
        """
        from google.cloud import bigquery

        from google.api_core import exceptions

        plan = self.plan
        rows = plan.moves[0]
        table_id = self._id(rows.destination)
        job_id = f"dicom_bq_export_{plan.run_id}_commit"
        try:  # a retried finalize: the commit was submitted before; BigQuery finishes it
            [(added,)] = _run_script(client, None, job_id, location)
        except exceptions.NotFound:
            pass
        else:
            self._count_added(added)
            return
        appended = existing is not None and not disposition.replaces and disposition is not Disposition.DEFAULT
        staged = _ensure_table(client, self._id(rows.staging), load_schema)
        if appended and not plan.incremental and any(f.name == "SOPInstanceUID" for f in existing.schema):
            query = (
                f"SELECT COUNT(DISTINCT SOPInstanceUID) FROM `{table_id}` "
                f"WHERE SOPInstanceUID IN (SELECT SOPInstanceUID FROM `{staged}`)"
            )
            self._count(counters.ALREADY_IN_TABLE, next(iter(client.query(query, location=location).result()))[0])
        files_table = files_staging = None
        if plan.files is not None:
            files_staging = _ensure_table(client, self._id(plan.files.staging), FILES_SCHEMA)
            files_table = _ensure_table(client, self._id(plan.files.destination), FILES_SCHEMA)
        dropped: list[str] = []
        if existing is None:
            table = bigquery.Table(table_id, schema=[bigquery.SchemaField.from_api_repr(f) for f in load_schema])
            table.clustering_fields = list(rows.cluster_by) or None
            client.create_table(table, exists_ok=True)
        else:
            check_table_state(plan.destination, disposition, True, _row_count(existing))
            current = [field.to_api_repr() for field in existing.schema]
            if appended:
                _widen(client, existing, append_schema(load_schema, current, plan.destination))
            elif replaceable_in_place(current, load_schema):
                _widen(client, existing, extend_schema(current, load_schema))
                kept = {field["name"].lower() for field in load_schema}
                dropped = [field["name"] for field in current if field["name"].lower() not in kept]
            else:
                self._reshape(client, load_schema, files_table, location)
        script = commit_script(
            table=table_id,
            rows_staging=staged,
            columns=[field["name"] for field in load_schema],
            files_table=files_table,
            files_staging=files_staging,
            append=appended,
        )
        [(added,)] = _run_script(client, script, job_id, location)
        if dropped:  # the new rows hold NULL there: dropping them is a schema change only
            drops = ", ".join(f"DROP COLUMN `{name}`" for name in dropped)
            try:
                client.query(f"ALTER TABLE `{table_id}` {drops}", location=location).result()
            except exceptions.GoogleAPICallError:  # e.g. an old clustering column: it stays, NULL in every row
                pass
        if rows.cluster_by and not appended:
            table = client.get_table(table_id)
            if list(table.clustering_fields or []) != list(rows.cluster_by):
                table.clustering_fields = list(rows.cluster_by)
                client.update_table(table, ["clustering_fields"])
        self._count_added(added)

    def _count_added(self, added) -> None:
        if self.plan.incremental:
            self._count(counters.ROWS_ADDED, added)
            self._count(counters.ROWS_REPLACED, 0)

    def _reshape(self, client, load_schema, files_table, location) -> None:
        """A rebuild whose schema is not an additive change of the table's: empty the table
        and its files table together, then replace the empty table's schema (a copy job
        from an empty table of the new schema, so the table never disappears)."""
        from google.api_core import exceptions
        from google.cloud import bigquery

        plan = self.plan
        rows = plan.moves[0]
        table_id = self._id(rows.destination)
        emptied = [f"TRUNCATE TABLE `{table_id}`"] + ([f"TRUNCATE TABLE `{files_table}`"] if files_table else [])
        _run_script(client, _transaction(emptied), f"dicom_bq_export_{plan.run_id}_empty", location)
        shape = self._id(_shape_table(rows.staging))
        table = bigquery.Table(shape, schema=[bigquery.SchemaField.from_api_repr(f) for f in load_schema])
        table.clustering_fields = list(rows.cluster_by) or None
        client.create_table(table, exists_ok=True)
        config = bigquery.CopyJobConfig(write_disposition="WRITE_TRUNCATE", create_disposition="CREATE_NEVER")
        job_id = f"dicom_bq_export_{plan.run_id}_reshape"
        try:
            job = client.copy_table(shape, table_id, job_config=config, job_id=job_id, location=location)
        except exceptions.Conflict:  # a retried finalize
            job = client.get_job(job_id, location=location)
        try:
            job.result()
        except exceptions.GoogleAPICallError as error:
            raise DestinationError(f"replacing the schema of {plan.destination} failed: {error.message}") from None
        client.delete_table(shape, not_found_ok=True)

    def _update_in_place(self, client, load_schema, existing, location) -> None:
        """``--incremental`` on an existing table: one multi-statement transaction."""
        from google.cloud import bigquery

        plan = self.plan
        rows = plan.moves[0]
        staged_rows = _ensure_table(client, self._id(rows.staging), load_schema)
        files_staging = _ensure_table(client, self._id(plan.files.staging), FILES_SCHEMA)
        gone = _ensure_table(client, self._id(plan.gone_staging), _GONE_SCHEMA) if plan.gone_staging else None
        files_table = self._id(plan.files.destination)
        current = [field.to_api_repr() for field in existing.schema]
        extended = append_schema(load_schema, current, plan.destination)
        if extended != current:
            existing.schema = [bigquery.SchemaField.from_api_repr(field) for field in extended]
            client.update_table(existing, ["schema"])
        records = client.get_table(files_staging).num_rows or 0
        gone_paths = client.get_table(gone).num_rows or 0 if gone else 0
        if not records and not gone_paths:  # nothing read, nothing gone: no DML (each DELETE bills the table)
            self._count(counters.ROWS_REPLACED, 0)
            self._count(counters.ROWS_ADDED, 0)
            if gone is not None:
                self._count(counters.ROWS_PRUNED, 0)
            return
        script = incremental_script(
            table=self._id(rows.destination),
            rows_staging=staged_rows,
            columns=[field["name"] for field in load_schema],
            files_table=files_table,
            files_staging=files_staging,
            gone_staging=gone,
            replaces=bool(client.get_table(staged_rows).num_rows),
        )
        [(replaced, added, pruned)] = _run_script(client, script, f"dicom_bq_export_{plan.run_id}_update", location)
        self._count(counters.ROWS_REPLACED, replaced)
        self._count(counters.ROWS_ADDED, added)
        if gone is not None:
            self._count(counters.ROWS_PRUNED, pruned)

    def _drop_staging(self, client):
        plan = self.plan
        staging = [move.staging for move in plan.moves]
        staging += [plan.files.staging] if plan.files else []
        staging += [plan.gone_staging] if plan.gone_staging else []
        staging.append(_shape_table(plan.moves[0].staging))
        for table in staging:
            client.delete_table(self._id(table), not_found_ok=True)


def _ensure_table(client, table_id: str, schema: list[dict]) -> str:
    """``table_id``, created empty with ``schema`` if no rows were loaded into it."""
    from google.cloud import bigquery

    if _get_table(client, table_id) is None:
        fields = [bigquery.SchemaField.from_api_repr(field) for field in schema]
        client.create_table(bigquery.Table(table_id, schema=fields), exists_ok=True)
    return table_id


def _shape_table(rows_staging: str) -> str:
    return f"{rows_staging}_shape"


def _widen(client, table, schema: list[dict]) -> None:
    """Patch ``table``'s schema to ``schema`` (an additive change) if it differs."""
    from google.cloud import bigquery

    if schema != [field.to_api_repr() for field in table.schema]:
        table.schema = [bigquery.SchemaField.from_api_repr(field) for field in schema]
        client.update_table(table, ["schema"])


_TYPE_NAMES = {"INT64": "INTEGER", "FLOAT64": "FLOAT", "BOOL": "BOOLEAN", "STRUCT": "RECORD"}


def _shape(field: dict) -> tuple:
    return (
        field["name"].lower(),
        _TYPE_NAMES.get(field["type"].upper(), field["type"].upper()),
        (field.get("mode") or "NULLABLE").upper(),
        tuple(_shape(sub) for sub in field.get("fields") or ()),
    )


def replaceable_in_place(current: list[dict], new: list[dict]) -> bool:
    """True if a table of schema ``current`` can take rows of schema ``new`` by an additive
    patch and DML: every column both have is the same (type, mode and sub-fields in
    order: an INSERT matches a record's fields by position). Columns only ``current``
    has may go; columns only ``new`` has are added."""
    shapes = {_shape(field)[0]: _shape(field) for field in current}
    return all(shapes.get(_shape(field)[0], _shape(field)) == _shape(field) for field in new)


def _column_list(names) -> str:
    return ", ".join(f"`{name}`" for name in names)


def _upsert_files(files_table: str, files_staging: str) -> list[str]:
    """The statements that update the files table by path from the staged records."""
    columns = _column_list(field["name"] for field in FILES_SCHEMA)
    return [
        f"DELETE FROM `{files_table}` WHERE path IN (SELECT path FROM `{files_staging}`)",
        f"INSERT INTO `{files_table}` ({columns}) SELECT {columns} FROM `{files_staging}`",
    ]


def _transaction(statements: list[str], declarations: list[str] = (), result: str | None = None) -> str:
    script = [*declarations, "BEGIN TRANSACTION", *statements, "COMMIT TRANSACTION"]
    if result:
        script.append(result)
    return ";\n".join(script) + ";"


def commit_script(*, table, rows_staging, columns, files_table=None, files_staging=None, append=False) -> str:
    """The multi-statement transaction that puts a run's rows and file records in place
    when the table is not updated in place; its result is one row ``(rows added)``.

    A rebuild (``append`` False) empties the table and the files table and fills both
    from staging; an append adds the rows and updates the files table by path. Cost on
    a large table: the INSERT bills the staged rows' bytes (a copy job is free) and
    TRUNCATE TABLE no scan; the files-table statements bill the files table.
    """
    statements = [] if append else [f"TRUNCATE TABLE `{table}`"]
    statements += [
        f"INSERT INTO `{table}` ({_column_list(columns)}) SELECT {_column_list(columns)} FROM `{rows_staging}`",
        "SET added = @@row_count",
    ]
    if files_table:
        if append:
            statements += _upsert_files(files_table, files_staging)
        else:
            columns = _column_list(field["name"] for field in FILES_SCHEMA)
            statements += [
                f"TRUNCATE TABLE `{files_table}`",
                f"INSERT INTO `{files_table}` ({columns}) SELECT {columns} FROM `{files_staging}`",
            ]
    return _transaction(statements, ["DECLARE added INT64 DEFAULT 0"], "SELECT added")


def incremental_script(
    *, table, rows_staging, columns, files_table, files_staging, gone_staging=None, replaces=True
) -> str:
    """The multi-statement transaction of an incremental run on an existing table; its
    result is one row ``(rows replaced, rows added, rows pruned)``.

    Cost on a large table: BigQuery bills a DELETE on a non-partitioned table for the
    whole table's bytes, so the DELETE of replaced rows (only when rows were read:
    ``replaces``) and the prune (only with ``gone_staging``) each cost one table's size;
    the INSERT costs only the staged rows, the files-table statements the files table.
    """
    exported = ", ".join(f"'{outcome}'" for outcome in EXPORTED)
    statements = []
    if replaces:
        statements += [
            f"DELETE FROM `{table}` WHERE SOPInstanceUID IN "
            f"(SELECT SOPInstanceUID FROM `{files_staging}` WHERE outcome = '{ROW}')",
            "SET replaced = @@row_count",
            f"INSERT INTO `{table}` ({_column_list(columns)}) SELECT {_column_list(columns)} FROM `{rows_staging}`",
            "SET added = @@row_count - replaced",
        ]
    statements += _upsert_files(files_table, files_staging)
    if gone_staging:
        statements += [
            f"DELETE FROM `{files_table}` WHERE path IN (SELECT path FROM `{gone_staging}`)",
            f"DELETE FROM `{table}` WHERE SOPInstanceUID IS NULL OR SOPInstanceUID NOT IN (SELECT SOPInstanceUID "
            f"FROM `{files_table}` WHERE outcome IN ({exported}) AND SOPInstanceUID IS NOT NULL)",
            "SET pruned = @@row_count",
        ]
    declarations = [f"DECLARE {name} INT64 DEFAULT 0" for name in ("replaced", "added", "pruned")]
    return _transaction(statements, declarations, "SELECT replaced, added, pruned")


def _run_script(client, script: str | None, job_id: str, location):
    """Run a script as one query job with a deterministic ID (a retried finalize waits
    for the job it already started); its result rows. With ``script`` None, only wait
    for that job (NotFound if there is none)."""
    from google.api_core import exceptions

    if script is None:
        job = client.get_job(job_id, location=location)
    else:
        try:
            job = client.query(script, job_id=job_id, location=location, job_retry=None)
        except exceptions.Conflict:
            job = client.get_job(job_id, location=location)
    try:
        return list(job.result())
    except exceptions.GoogleAPICallError as error:
        raise DestinationError(
            f"updating the table failed in BigQuery job {job_id} ({type(error).__name__}); the transaction was "
            "rolled back, nothing was written. Its errors are in BigQuery (bq show -j)."
        ) from None


def _wait_for_job(client, reference) -> None:
    """Wait for one of Beam's load or copy jobs; a failure names the job, not its message
    (a load error can quote the row it could not parse)."""
    from google.api_core import exceptions

    job_id = getattr(reference, "jobId", None) or reference.get("jobId")
    location = getattr(reference, "location", None)
    project = getattr(reference, "projectId", None)
    try:
        client.get_job(job_id, project=project, location=location).result()
    except exceptions.GoogleAPICallError as error:
        raise DestinationError(
            f"BigQuery job {project}:{job_id} failed ({type(error).__name__}); its errors are in BigQuery "
            "(bq show -j), not here, as they may quote row values. Nothing was written to the table."
        ) from None


def move_into_place(client, *, project, dataset, staging, destination, schema, disposition, cluster_by, job_id):
    """One copy job from ``staging`` to ``destination`` with the disposition's semantics."""
    from google.api_core import exceptions
    from google.cloud import bigquery

    staging_id = f"{project}.{dataset}.{staging}"
    destination_id = f"{project}.{dataset}.{destination}"
    location = client.get_dataset(f"{project}.{dataset}").location
    try:  # a retried finalize: the move was started before; wait for it, do nothing twice
        client.get_job(job_id, location=location).result()
        return
    except exceptions.NotFound:
        pass
    fields = [bigquery.SchemaField.from_api_repr(field) for field in schema]
    staged = _get_table(client, staging_id)
    if staged is None:  # no rows were loaded: an empty table still creates or truncates
        table = bigquery.Table(staging_id, schema=fields)
        if cluster_by:
            table.clustering_fields = cluster_by
        staged = client.create_table(table, exists_ok=True)

    existing = _get_table(client, destination_id)
    check_table_state(f"bq://{destination_id}", disposition, existing is not None, _row_count(existing))
    replace = existing is None or disposition.replaces or disposition is Disposition.DEFAULT
    config = bigquery.CopyJobConfig()
    if replace:
        config.write_disposition = "WRITE_TRUNCATE"
        config.create_disposition = "CREATE_IF_NEEDED"
    else:
        current = [field.to_api_repr() for field in existing.schema]
        staged_schema = [field.to_api_repr() for field in staged.schema]
        extended = append_schema(staged_schema, current, f"bq://{destination_id}")
        if extended != current:
            existing.schema = [bigquery.SchemaField.from_api_repr(field) for field in extended]
            client.update_table(existing, ["schema"])
        config.write_disposition = "WRITE_EMPTY" if disposition is Disposition.WRITE_EMPTY else "WRITE_APPEND"
        config.create_disposition = "CREATE_NEVER"
    try:
        job = client.copy_table(staging_id, destination_id, job_config=config, job_id=job_id, location=location)
    except exceptions.Conflict:  # started meanwhile by a retry
        job = client.get_job(job_id, location=location)
    try:
        job.result()
    except exceptions.GoogleAPICallError as error:
        raise DestinationError(f"copying the export into bq://{destination_id} failed: {error.message}") from None
    if cluster_by and replace:
        table = client.get_table(destination_id)
        if list(table.clustering_fields or []) != cluster_by:
            table.clustering_fields = cluster_by
            client.update_table(table, ["clustering_fields"])


def _delete_prefix(prefix: str) -> None:
    """Remove the load files Beam left under the run's temporary folder."""
    from apache_beam.io.filesystems import FileSystems

    try:
        matched = FileSystems.match([prefix + "/**"])[0].metadata_list
        if matched:
            FileSystems.delete([metadata.path for metadata in matched])
    except Exception:  # cleaning up is best effort; the export itself succeeded
        pass
