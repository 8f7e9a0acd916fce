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
  one copy job moves the staging table into place — WRITE_TRUNCATE replaces rows *and*
  schema atomically, WRITE_APPEND first adds the new fields to the table's schema, then
  appends; WRITE_EMPTY appends only if the table is still empty. An export without rows
  copies an empty staging table, so the table is still created or truncated. A failed or
  cancelled run never reaches the copy: the table is untouched.

The dead letters follow the same path into ``TABLE_errors``. Google's clients are used as
they come: nothing here knows about emulators.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from typing import NamedTuple

import apache_beam as beam
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
from schemas import columns as dicom_columns
from schemas.rows import with_empty_lists
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
        complete = outputs.rows | "CompleteRows" >> beam.Map(with_empty_lists, AsSingleton(write_schema))
        rows = complete | "StageRows" >> beam.io.WriteToBigQuery(
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
        failures = outputs.dead_letters | "CountFailures" >> beam.combiners.Count.Globally()
        jobs = [
            AsList(result[name])
            for result in (rows, errors)
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
        )
        write_schema | "Finalize" >> beam.ParDo(Finalize(plan), AsSingleton(failures), *jobs)


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
        schemas = {plan.moves[0][0]: load_schema, plan.moves[1][0]: ERRORS_SCHEMA}
        for index, (staging, destination, disposition, cluster_by) in enumerate(plan.moves):
            move_into_place(
                client,
                project=plan.project,
                dataset=plan.dataset,
                staging=staging,
                destination=destination,
                schema=schemas[staging],
                disposition=Disposition(disposition),
                cluster_by=list(cluster_by),
                job_id=f"dicom_bq_export_{plan.run_id}_{index}",
            )
        self._drop_staging(client)
        _delete_prefix(plan.temp_location)
        yield plan.destination

    def _drop_staging(self, client):
        for staging, *_ in self.plan.moves:
            client.delete_table(f"{self.plan.project}.{self.plan.dataset}.{staging}", not_found_ok=True)


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
