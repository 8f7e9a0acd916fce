"""Recreate samples/dicom from pydicom's bundled test files (MIT licence, see README.md).

    python samples/make_samples.py

Each file is copied unchanged to studies/STUDY/series/SERIES/instances/SOP.dcm, the
DICOMweb-style layout the exporter can expand filter lines into.
"""

from __future__ import annotations

import os
import shutil
import sys

from pydicom.data import get_charset_files, get_testdata_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from transforms.header import read_header  # noqa: E402

FILES = [
    "CT_small.dcm",  # CT, explicit VR little endian, GE private tags
    "MR_small.dcm",  # MR
    "JPEG2000.dcm",  # NM, JPEG 2000 compressed pixel data (never decoded)
    "liver_1frame.dcm",  # enhanced CT multi-frame functional groups (deep sequences)
    "examples_overlay.dcm",  # overlay repeating group 60xx
    "rtplan.dcm",  # RT plan, implicit VR
    "rtdose.dcm",  # RT dose, same study as the plan
    "rtstruct.dcm",  # RT structure set, no preamble nor file meta
    "test-SR.dcm",  # structured report: nested content sequences
    "chrH31.dcm",  # Japanese names, ISO 2022 IR 87
]


def source(name: str) -> str:
    for path in get_charset_files():
        if path.endswith("/" + name):
            return path
    return get_testdata_file(name)


def main() -> None:
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dicom")
    shutil.rmtree(root, ignore_errors=True)
    for name in FILES:
        path = source(name)
        with open(path, "rb") as fileobj:
            study, series, instance = read_header(fileobj).uids
        target = os.path.join(root, "studies", study, "series", series, "instances", instance + ".dcm")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(path, target)
        print(f"{name:22s} -> {os.path.relpath(target)}")


if __name__ == "__main__":
    main()
