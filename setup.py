"""dicom-bq-export: DICOM metadata → BigQuery (or DuckDB), as an Apache Beam pipeline.

This file is also what Dataflow workers install (``--setup_file ./setup.py``).
"""

import setuptools

BEAM_VERSION = "2.77.0"

setuptools.setup(
    name="dicom-bq-export",
    version="0.1.0",
    description=(
        "Export DICOM metadata from Cloud Storage or local files to BigQuery in the "
        "Cloud Healthcare API's export schema, with Apache Beam."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10,<3.14",
    packages=setuptools.find_packages(include=["pipeline", "pipeline.*", "transforms", "transforms.*", "schemas", "schemas.*"]),
    install_requires=[
        f"apache-beam[gcp]=={BEAM_VERSION}",
        "pydicom>=3.0.1,<3.1",
        "duckdb>=1.1,<3",
        "pyarrow>=14,<26",
        "requests>=2.28,<3",  # DICOMweb (also a dependency of Beam's GCP extra)
        # Cloud Storage reads (transforms/storage.py; all three also dependencies of Beam's GCP extra)
        "google-cloud-storage>=2.18,<4",
        "google-auth>=2.20,<3",
        "urllib3>=1.26,<3",
        "orjson>=3.9,<4",  # rows handed over by the read processes as JSON text
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "hypothesis>=6.100,<7",
            "gcp-storage-emulator==2026.7.19",
            "pillow>=10,<13",  # the report page's screenshot, checked in tests/test_report.py
        ],
        "bench": [
            "pandas>=2.2,<4",  # bench/user_script.py: the script a user would write instead
        ],
    },
    entry_points={"console_scripts": ["dicom-bq-export=pipeline.cli:console"]},
)
