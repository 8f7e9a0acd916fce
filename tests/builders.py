"""Small DICOM instances built in tests, written to bytes with pydicom, read back for real."""

from __future__ import annotations

import io

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from schemas.convert import Flattened, flatten_instance
from transforms.header import read_header

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def instance(study: str | None = None, series: str | None = None, sop: str | None = None) -> Dataset:
    """A minimal instance: the three UIDs and a SOP class."""
    ds = Dataset()
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = sop or generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    return ds


def sequence(*items: Dataset) -> Sequence:
    return Sequence(list(items))


def item(**keywords) -> Dataset:
    ds = Dataset()
    for keyword, value in keywords.items():
        setattr(ds, keyword, value)
    return ds


def enhanced_multiframe(frames: int, study: str | None = None, series: str | None = None,
                        sop: str | None = None) -> Dataset:
    """An enhanced MR header of ``frames`` frames, no pixel data: a header made mostly of
    sequence items. Shared Functional Groups hold Pixel Measures; each frame is an item of
    the Per-frame Functional Groups Sequence holding five one-item sequences (frame content,
    plane position and orientation, pixel measures, VOI LUT)."""
    ds = instance(study, series, sop)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR Image Storage
    ds.Modality, ds.NumberOfFrames = "MR", frames
    ds.SharedFunctionalGroupsSequence = sequence(item(PixelMeasuresSequence=sequence(
        item(PixelSpacing=[0.5, 0.5], SliceThickness=1.0))))
    ds.PerFrameFunctionalGroupsSequence = sequence(*(
        item(FrameContentSequence=sequence(item(DimensionIndexValues=[1, frame], StackID="1",
                                                InStackPositionNumber=frame,
                                                FrameAcquisitionDateTime="20200101120000.000000")),
             PlanePositionSequence=sequence(item(ImagePositionPatient=[0.0, 0.0, frame / 2])),
             PlaneOrientationSequence=sequence(item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])),
             PixelMeasuresSequence=sequence(item(PixelSpacing=[0.5, 0.5], SliceThickness=1.0)),
             FrameVOILUTSequence=sequence(item(WindowCenter=40, WindowWidth=400)))
        for frame in range(1, frames + 1)))
    return ds


def undefined_lengths(dataset: Dataset) -> Dataset:
    """``dataset`` with every sequence and sequence item, at every level, written with
    undefined length (delimited) rather than defined length."""
    for element in dataset:
        if element.VR == "SQ":
            element.is_undefined_length = True
            for entry in element.value:
                entry.is_undefined_length_sequence_item = True
                undefined_lengths(entry)
    return dataset


def to_bytes(
    ds: Dataset,
    transfer_syntax: str = ExplicitVRLittleEndian,
    *,
    file_meta: bool = True,
) -> bytes:
    """Encode ``ds`` as a DICOM file (preamble, DICM, meta) or, without meta, a bare dataset."""
    buffer = io.BytesIO()
    implicit = transfer_syntax == ImplicitVRLittleEndian
    little = transfer_syntax != ExplicitVRBigEndian
    if file_meta:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.preamble = b"\0" * 128
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    else:
        pydicom.dcmwrite(buffer, ds, implicit_vr=implicit, little_endian=little)
    return buffer.getvalue()


def flatten_bytes(data: bytes) -> Flattened:
    """Read ``data`` as a file would be read, and flatten it."""
    header = read_header(io.BytesIO(data))
    return flatten_instance(
        header.dataset, pixel_data_tag=header.pixel_data_tag, read_deferred=header.read_deferred
    )


def flatten(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> Flattened:
    return flatten_bytes(to_bytes(ds, transfer_syntax))


def schema_fields(flattened: Flattened) -> dict:
    """``{"A.B.C": (type, mode)}`` for every field of the instance's schema."""
    from schemas.merge import to_bigquery_schema

    return field_map(to_bigquery_schema(flattened.fragment))


def field_map(fields: list[dict], prefix: str = "") -> dict:
    out = {}
    for field in fields:
        path = prefix + field["name"]
        out[path] = (field["type"], field.get("mode", "NULLABLE"))
        if field.get("fields"):
            out.update(field_map(field["fields"], path + "."))
    return out


__all__ = [
    "DeflatedExplicitVRLittleEndian",
    "ExplicitVRBigEndian",
    "ExplicitVRLittleEndian",
    "ImplicitVRLittleEndian",
    "enhanced_multiframe",
    "field_map",
    "flatten",
    "flatten_bytes",
    "instance",
    "item",
    "schema_fields",
    "sequence",
    "to_bytes",
    "undefined_lengths",
]
