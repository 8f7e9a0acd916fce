"""Shared fixtures: pydicom's bundled test files, converted once per session."""

from __future__ import annotations

import os

import pytest
from pydicom.data import get_charset_files, get_testdata_files

from schemas.convert import flatten_instance
from transforms.header import InstanceError, read_header

os.environ.setdefault("NO_GCE_CHECK", "true")

_NOT_DICOM_SUFFIXES = (".json", ".txt", ".dump", ".icc", ".gz")


def bundled_files() -> list[str]:
    """Every file pydicom ships for its tests (charset files included), DICOM or not."""
    paths = get_testdata_files() + get_charset_files()
    return sorted(p for p in paths if os.path.isfile(p))


@pytest.fixture(scope="session")
def bundled_instances():
    """``{path: Flattened}`` for every bundled file that is an instance."""
    converted = {}
    for path in bundled_files():
        if path.endswith(_NOT_DICOM_SUFFIXES):
            continue
        with open(path, "rb") as fileobj:
            try:
                header = read_header(fileobj)
            except InstanceError:
                continue
            converted[path] = flatten_instance(
                header.dataset, pixel_data_tag=header.pixel_data_tag, read_deferred=header.read_deferred
            )
    assert len(converted) > 150
    return converted
