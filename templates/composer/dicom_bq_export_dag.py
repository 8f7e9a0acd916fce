"""Cloud Composer (Airflow) DAGs that run dicom-bq-export on a schedule.

``dicom_bq_export``: launches the Dataflow flex template (templates/flex) once a day,
**incrementally** by default: each run reads only the files that ``TABLE_files`` (the
ledger beside the table) does not record as exported with the same object generation —
new, rewritten and previously failed files — replaces the rows of re-sent instances and
keeps one row per SOPInstanceUID. The first run creates the table and its ledger; set
``dicom_bq_export_incremental`` to ``false`` to re-read everything (with
``dicom_bq_export_write_disposition`` WRITE_TRUNCATE) on every run instead.
``dicom_bq_export_small``: for small exports, runs the same pipeline on the Composer
worker itself with Beam's DirectRunner (``python -m pipeline.main``): install the
``dicom-bq-export`` wheel in the Composer environment's PyPI packages first.

Parameters come from Airflow Variables, so one DAG file serves every environment:

| Variable                          | example                                                  |
|-----------------------------------|----------------------------------------------------------|
| dicom_bq_export_project           | my-project                                               |
| dicom_bq_export_region            | europe-west4                                             |
| dicom_bq_export_template          | gs://my-bucket/templates/dicom-bq-export.json            |
| dicom_bq_export_image             | europe-west4-docker.pkg.dev/my-project/dicom/dicom-bq-export:0.1.0 |
| dicom_bq_export_input             | gs://my-bucket/dicom/**                                  |
| dicom_bq_export_table             | bq://my-project.imaging.dicom_metadata                   |
| dicom_bq_export_write_disposition | WRITE_APPEND (default; WRITE_TRUNCATE rebuilds the table) |
| dicom_bq_export_incremental       | true (default) / false                                   |
| dicom_bq_export_prune_missing     | false (default) / true: delete rows of deleted files     |
| dicom_bq_export_temp_location     | gs://my-bucket/tmp                                       |
| dicom_bq_export_filter (optional) | gs://my-bucket/config/filter.txt                         |
| dicom_bq_export_dicomweb_mode (optional) | instance (default) or metadata, for DICOMweb inputs |

``dicom_bq_export_input`` may also be a DICOMweb root (``dicomweb+https://…/dicomWeb``);
the job's service account then needs roles/healthcare.dicomViewer on a Healthcare API store.

The Dataflow job runs as the Compute Engine default service account unless the template
was built with another (``gcloud dataflow flex-template build ... --service-account-email``);
see the README's IAM section.

Variables are read when a task runs (Jinja ``{{ var.value... }}``), not when the
scheduler parses this file.
"""

from __future__ import annotations

import datetime

from airflow import DAG
from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator
from airflow.providers.google.cloud.operators.dataflow import DataflowStartFlexTemplateOperator

PREFIX = "dicom_bq_export_"


def var(name: str, default: str | None = None) -> str:
    """A Jinja reference to Airflow Variable ``dicom_bq_export_<name>``."""
    if default is None:
        return "{{ var.value." + PREFIX + name + " }}"
    return "{{ var.value.get('" + PREFIX + name + "', '" + default + "') }}"


DEFAULT_ARGS = {
    "owner": "imaging-data",
    "retries": 1,
    "retry_delay": datetime.timedelta(minutes=10),
}

with DAG(
    dag_id="dicom_bq_export",
    description="DICOM metadata from Cloud Storage to BigQuery with the dicom-bq-export flex template",
    schedule="@daily",
    start_date=datetime.datetime(2026, 1, 1),
    catchup=False,
    default_args=DEFAULT_ARGS,
    tags=["dicom", "bigquery", "dataflow"],
) as flex_dag:
    DataflowStartFlexTemplateOperator(
        task_id="export_dicom_metadata",
        project_id=var("project"),
        location=var("region"),
        body={
            "launchParameter": {
                "jobName": "dicom-bq-export-{{ ds_nodash }}",
                "containerSpecGcsPath": var("template"),
                "parameters": {
                    "input": var("input"),
                    "bq_table": var("table"),
                    "write_disposition": var("write_disposition", "WRITE_APPEND"),
                    "incremental": var("incremental", "true"),
                    "prune_missing": var("prune_missing", "false"),
                    "filter_config_gcs_uri": var("filter", ""),
                    "dicomweb_mode": var("dicomweb_mode", "instance"),
                    "cluster_by": "StudyInstanceUID,SeriesInstanceUID",
                },
                "environment": {
                    "tempLocation": var("temp_location"),
                    "sdkContainerImage": var("image"),
                },
            }
        },
        wait_until_finished=True,
    )

with DAG(
    dag_id="dicom_bq_export_small",
    description="Small DICOM exports run on the Composer worker with Beam's DirectRunner",
    schedule="@daily",
    start_date=datetime.datetime(2026, 1, 1),
    catchup=False,
    default_args=DEFAULT_ARGS,
    tags=["dicom", "bigquery", "direct-runner"],
) as small_dag:
    BeamRunPythonPipelineOperator(
        task_id="export_dicom_metadata",
        runner="DirectRunner",
        py_file="pipeline.main",
        py_options=["-m"],
        pipeline_options={
            "input": var("input"),
            "bq_table": var("table"),
            "write_disposition": var("write_disposition", "WRITE_APPEND"),
            "incremental": var("incremental", "true"),
            "prune_missing": var("prune_missing", "false"),
            "dicomweb_mode": var("dicomweb_mode", "instance"),
            "temp_location": var("temp_location"),
            "project": var("project"),
            "direct_running_mode": "multi_processing",
            "progress_seconds": "60",
        },
    )
