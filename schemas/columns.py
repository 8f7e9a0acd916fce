"""Which column an element tag becomes, decided from the DICOM dictionary alone.

The answer never depends on the instance: a keyword's type and mode come from the
dictionary VR and VM (SPEC §2), so every instance agrees on them and the union of their
schemas cannot conflict.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from pydicom import datadict

from schemas import vr_types

# How a field sorts among its siblings (SPEC §3): standard elements in tag order, then
# repeating groups, then private sequences, then OtherElements, then DroppedTags.
STANDARD, REPEATING_GROUP, PRIVATE_SEQUENCE, OTHER_ELEMENTS, DROPPED_TAGS = range(5)

#: The repeating groups that become {Id, Value} columns: curves (50xx) and overlays (60xx).
_REPEATING_GROUP_MASKS = {0x5000, 0x6000}


class Column(NamedTuple):
    """How one tag is exported.

    ``kind`` is STANDARD (a keyword column), REPEATING_GROUP (a keyword column of
    {Id, Value} records) or OTHER_ELEMENTS (private and keyword-less elements: the
    instance's VR decides between OtherElements, a ``Tag_`` sequence column or
    DroppedTags). ``bq_type`` is None for excluded VRs.
    """

    kind: int
    name: str
    vr: str
    bq_type: str | None
    mode: str
    order: int


def tag_name(tag: int) -> str:
    """``Tag_GGGGEEEE``: the name of an element that has no usable keyword."""
    return f"Tag_{tag:08X}"


@functools.lru_cache(maxsize=None)
def column_for_tag(tag: int) -> Column:
    """Return the column for ``tag`` (cached: called for every element of every instance)."""
    group = tag >> 16
    if group % 2 == 0:
        entry = datadict.DicomDictionary.get(tag)
        if entry is not None and entry[4]:
            vr, vm, keyword = entry[0], entry[1], entry[4]
            return Column(
                STANDARD, keyword, vr, vr_types.bigquery_type(vr), vr_types.bigquery_mode(vm), tag
            )
        if group & 0xFF00 in _REPEATING_GROUP_MASKS:
            mask = datadict.mask_match(tag)
            if mask is not None:
                vr, vm, _, _, keyword = datadict.RepeatersDictionary[mask]
                return Column(
                    REPEATING_GROUP,
                    keyword,
                    vr,
                    vr_types.bigquery_type(vr),
                    vr_types.bigquery_mode(vm),
                    int(mask.replace("x", "0"), 16),
                )
    # Private elements, public elements without a keyword and the retired repeaters that
    # are not curves or overlays: their name is the tag, their VR the instance's.
    return Column(OTHER_ELEMENTS, tag_name(tag), "", None, vr_types.REPEATED, tag)
