"""One DICOM instance → one BigQuery row and that row's schema fragment (SPEC §2).

Pure Python: a pydicom dataset in, plain data out. The row is ready for a BigQuery JSON
load (DATE, TIME and TIMESTAMP as text, records as dicts, repeated fields as lists). The
fragment is a set of *field paths*: each path is the tuple of fields from a top-level
column down to one leaf, and each field is ``(kind, order, name, type, mode)``, where
``kind`` and ``order`` place it among its siblings (SPEC §3). A set of paths merges by
union, which is what makes the table's schema independent of the order of instances
(see :mod:`schemas.merge`).

Values are converted from the raw bytes pydicom leaves unparsed wherever the VR is
known, which is both faster than pydicom's own value classes and keeps DS/IS text as
written; pydicom does the rest (ambiguous VRs, private dictionaries, charsets, sequences).
A public element stored as UN is converted by its dictionary VR (``_resolve_vr``).
"""

from __future__ import annotations

import functools
import struct
from collections import Counter
from typing import Callable, NamedTuple

from pydicom import charset as dicom_charset
from pydicom import datadict
from pydicom import values as dicom_values
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import TEXT_VR_DELIMS

from schemas import values as bq_values
from schemas import vr_types
from schemas.columns import (
    DROPPED_TAGS,
    OTHER_ELEMENTS,
    PRIVATE_SEQUENCE,
    REPEATING_GROUP,
    STANDARD,
    Column,
    column_for_tag,
    tag_name,
)
from schemas.vr_types import (
    DATE,
    FLOAT,
    INTEGER,
    NULLABLE,
    RECORD,
    REPEATED,
    STRING,
    TIME,
    TIMESTAMP,
)

#: BigQuery allows at most 15 levels of nested RECORDs.
MAX_RECORD_DEPTH = 15

#: The largest value (in bytes, as stored) exported; a larger one is named in DroppedTags
#: and never read. A BigQuery row must stay under 100 MB (its JSON load limit): 16 MiB
#: keeps a few such values, with the rest of a header (at most 64 MiB read, see
#: transforms.limits.MAX_HEADER_BYTES), within it, while no real text or numeric value
#: comes near (LT is limited to 10,240 characters, UT to 2^32-2 bytes only in theory).
MAX_VALUE_BYTES = 16 * 2**20

#: The values of one row, in estimated bytes of the row's JSON (binary numbers count 4
#: per byte stored: a US of 2 bytes is up to 6 characters, an FD of 8 up to 25), so that
#: a row stays under BigQuery's 100 MB however its values are made. A value that would
#: pass it is named in DroppedTags (not fit), like a value over MAX_VALUE_BYTES.
MAX_ROW_VALUE_BYTES = 48 * 2**20

#: Why an element is in DroppedTags: by the schema's rules (excluded VRs, Pixel Data),
#: or because its value could not be kept (unconvertible, too large, too deep).
BY_RULE = "dropped_by_rule"
NOT_FIT = "dropped_not_fit"

SPECIFIC_CHARACTER_SET = 0x00080005
PIXEL_DATA_KEYWORDS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}

#: The dataset attribute (set by ``transforms.header.read_header``) saying that what
#: follows Pixel Data could not be read unambiguously; counted under the same name.
UNREAD_AFTER_PIXEL_DATA = "unread_after_pixel_data"

Field = tuple  # (kind, order, name, type, mode)
Path = tuple  # (Field, ...), from a top-level column to a leaf

OTHER_ELEMENTS_FIELD: Field = (OTHER_ELEMENTS, 0, "OtherElements", RECORD, REPEATED)
OTHER_ELEMENTS_PATHS = frozenset(
    {
        (OTHER_ELEMENTS_FIELD, (STANDARD, 0, "Tag", STRING, NULLABLE)),
        (OTHER_ELEMENTS_FIELD, (STANDARD, 1, "Data", STRING, REPEATED)),
    }
)
DROPPED_TAGS_PATHS = frozenset(
    {((DROPPED_TAGS, 0, "DroppedTags", RECORD, REPEATED), (STANDARD, 0, "TagName", STRING, NULLABLE))}
)
PERSON_NAME_PATHS = frozenset(
    ((STANDARD, g, group, RECORD, NULLABLE), (STANDARD, c, component, STRING, NULLABLE))
    for g, group in enumerate(bq_values.PN_GROUPS)
    for c, component in enumerate(bq_values.PN_COMPONENTS)
)
_ID_PATH = ((STANDARD, 0, "Id", STRING, NULLABLE),)

#: The fields every table has, even one made by an export that selected no instance:
#: the identifying UIDs (every exported instance has them), OtherElements, DroppedTags.
BASE_FRAGMENT = frozenset(
    {((STANDARD, column.order, column.name, column.bq_type, column.mode),)
     for column in map(column_for_tag, (0x00080016, 0x00080018, 0x0020000D, 0x0020000E))}
    | OTHER_ELEMENTS_PATHS
    | DROPPED_TAGS_PATHS
)

# Binary VRs: struct format character and size in bytes.
_BINARY = {
    "US": ("H", 2), "SS": ("h", 2), "UL": ("I", 4), "SL": ("i", 4), "UV": ("Q", 8),
    "SV": ("q", 8), "FL": ("f", 4), "FD": ("d", 8), "AT": ("I", 4),
}

#: Binary VRs whose values always fit BigQuery's INT64 as they are.
_INT32_VRS = frozenset({"US", "SS", "UL", "SL", "AT"})


class Flattened(NamedTuple):
    """The row, its schema fragment, and counts of what did not go into its own column."""

    row: dict
    fragment: frozenset
    counts: Counter


class _NotFit(Exception):
    """A value that does not fit its column; carries the value's text for OtherElements."""

    def __init__(self, texts: list[str], undecodable: bool = False):
        self.texts = texts
        self.undecodable = undecodable


def flatten_instance(
    dataset: Dataset,
    *,
    pixel_data_tag: int | None = None,
    read_deferred: Callable[[RawDataElement], bytes] | None = None,
) -> Flattened:
    """Flatten an instance: file meta (if any) and dataset → row, fragment, counts.

    ``pixel_data_tag`` names the pixel data element reading stopped before, so that it is
    listed in DroppedTags (in tag order, before the elements that follow it) without its
    bytes ever being read. ``read_deferred`` reads a top-level value that parsing skipped
    (see :mod:`transforms.header`).
    """
    flattener = _Flattener(read_deferred)
    meta = getattr(dataset, "file_meta", None)
    encodings = flattener.encodings(dataset)
    row, paths = flattener.record(dataset, encodings, "", 0, meta, pixel_data_tag)
    if getattr(dataset, UNREAD_AFTER_PIXEL_DATA, False):
        flattener.counts[UNREAD_AFTER_PIXEL_DATA] += 1
    if flattener.dropped:
        row["DroppedTags"] = [{"TagName": name} for name in flattener.dropped]
    for reason in (BY_RULE, NOT_FIT):
        flattener.counts[reason] += sum(1 for why in flattener.dropped.values() if why == reason)
    flattener.counts["dropped_tags"] += len(flattener.dropped)
    paths |= OTHER_ELEMENTS_PATHS | DROPPED_TAGS_PATHS
    return Flattened(row, frozenset(paths), flattener.counts)


class _Flattener:
    def __init__(self, read_deferred: Callable[[RawDataElement], bytes] | None):
        self.read_deferred = read_deferred
        self.counts: Counter = Counter()
        self.dropped: dict[str, str] = {}  # name → BY_RULE or NOT_FIT, in order
        self.row_budget = MAX_ROW_VALUE_BYTES

    def drop(self, name: str, reason: str = BY_RULE) -> None:
        self.dropped.setdefault(name, reason)

    def encodings(self, dataset: Dataset, inherited: list[str] | None = None) -> list[str]:
        """Python encodings from this dataset's Specific Character Set, else ``inherited``.

        A term pydicom does not know is counted (``charset_fallbacks``); pydicom then
        corrects common misspellings or falls back to the default repertoire.
        """
        element = dataset.get_item(SPECIFIC_CHARACTER_SET, keep_deferred=True)
        if element is None:
            return inherited or [dicom_charset.default_encoding]
        if isinstance(element, RawDataElement):
            terms = (element.value or b"").decode("latin-1").split("\\")
        else:
            value = element.value or ""
            terms = [value] if isinstance(value, str) else list(value)
        terms = [term.strip(" \0") for term in terms]
        if any(term and term not in dicom_charset.python_encoding for term in terms):
            self.counts["charset_fallbacks"] += 1
        return dicom_charset.convert_encodings(terms)

    # -- datasets ---------------------------------------------------------------------

    def record(
        self, dataset: Dataset, encodings: list[str], prefix: str, depth: int, meta=None,
        pixel_data_tag: int | None = None,
    ) -> tuple[dict, set]:
        """Flatten one dataset (the instance, or a sequence item) at ``depth`` records deep;
        ``pixel_data_tag``: the instance's unread pixel data, named in DroppedTags in its place."""
        row: dict = {}
        paths: set = set()
        others: list[dict] = []
        for source, tag, element in _elements_of(meta, dataset):
            if pixel_data_tag is not None and tag > pixel_data_tag:
                self.drop(PIXEL_DATA_KEYWORDS.get(pixel_data_tag, tag_name(pixel_data_tag)))
                pixel_data_tag = None
            column, leaf_path = _column_and_leaf_path(tag)
            if not self._affordable(element, column):
                self._drop_too_large(source, tag, element, column, prefix)
                continue
            try:
                if column.kind == OTHER_ELEMENTS:
                    self._other(source, tag, element, column, encodings, prefix, depth, row, paths, others)
                elif leaf_path is not None and type(element) is RawDataElement and (
                    element.VR == column.vr or (element.VR is None and " or " not in column.vr)
                ):
                    # The common case, decided by the tag and the stored VR alone: a
                    # keyword column of a plain type whose value is stored in its own VR.
                    paths.add(leaf_path)
                    value = self._fit(column.vr, element, encodings, column.bq_type, column.mode)
                    if value is not None:
                        row[column.name] = value
                else:
                    self._column(source, tag, element, column, encodings, prefix, depth, row, paths)
            except _NotFit as not_fit:
                if not_fit.undecodable:
                    self.counts["undecodable_values"] += 1
                if depth + 1 > MAX_RECORD_DEPTH:
                    self._too_deep(prefix + column.name)
                else:
                    self.counts["moved_to_other_elements"] += 1
                    others.append({"Tag": tag_name(tag), "Data": not_fit.texts})
        if pixel_data_tag is not None:
            self.drop(PIXEL_DATA_KEYWORDS.get(pixel_data_tag, tag_name(pixel_data_tag)))
        if others:
            row["OtherElements"] = others
            paths |= OTHER_ELEMENTS_PATHS
        return row, paths

    def _too_deep(self, name: str) -> None:
        self.counts["too_deep"] += 1
        self.drop(name, NOT_FIT)

    def _affordable(self, element, column: Column) -> bool:
        """False for a value over MAX_VALUE_BYTES as stored, or one whose estimated JSON
        size does not fit the row's budget (else it is charged to it). Sequences of
        undefined length (their items are checked one by one), excluded VRs and
        sequences (their items are charged) cost nothing."""
        if not isinstance(element, RawDataElement):
            return True
        length = element.length
        if not length or length == 0xFFFFFFFF:
            return True
        if length > MAX_VALUE_BYTES:
            return False
        vr = element.VR
        if vr is None or (vr == "UN" and column.vr):
            vr = column.vr or vr  # _stored_vr
        if vr is None:
            if column.bq_type is None:
                return True
        elif vr == "SQ" or vr_types.is_excluded(vr):
            return True
        cost = length * (4 if vr in _BINARY else 1)
        if cost > self.row_budget:
            return False
        self.row_budget -= cost
        return True

    def _drop_too_large(self, source, tag, element, column: Column, prefix: str) -> None:
        """A value over MAX_VALUE_BYTES, or past the row's MAX_ROW_VALUE_BYTES: named in
        DroppedTags, never read. An excluded VR (explicit, or the dictionary's) is dropped
        by rule as any value of its VR; a public element stored as UN is judged by its
        dictionary VR (too large, not UN)."""
        vr = _stored_vr(element, column)
        if vr is None and column.kind == OTHER_ELEMENTS:
            vr = _private_dictionary_vr(source, tag)
        excluded = column.bq_type is None if column.kind != OTHER_ELEMENTS else False
        self.drop(prefix + column.name, BY_RULE if excluded or (vr and vr_types.is_excluded(vr)) else NOT_FIT)

    def _column(self, source, tag, element, column: Column, encodings, prefix, depth, row, paths):
        """A keyword column: a standard element or one of a repeating group (50xx/60xx)."""
        name = column.name
        if column.bq_type is None:
            self.drop(prefix + name)
            return
        vr, element = self._resolve_vr(source, tag, element, column.vr, encodings)
        if vr == _UNCONVERTIBLE:
            self.drop(prefix + name, NOT_FIT)
            return
        if vr_types.is_excluded(vr):
            self.drop(prefix + name)
            return
        is_group = column.kind == REPEATING_GROUP
        value_depth = depth + 1 if is_group else depth
        if column.bq_type == RECORD and column.vr == "SQ":
            if vr != "SQ":
                self.drop(prefix + name, NOT_FIT)
                return
            items = element.value if isinstance(element, DataElement) else source[tag].value
            value, child_paths = self._sequence(items, encodings, prefix + name + ".", value_depth)
            if not child_paths:
                if items:  # items, none with a field: say so rather than lose it silently
                    self.drop(prefix + name)
                return
            mode = REPEATED
        else:
            if vr == "SQ":
                self.drop(prefix + name, NOT_FIT)
                return
            needed = 2 if column.bq_type == RECORD else 0
            if value_depth + needed > MAX_RECORD_DEPTH:
                self._too_deep(prefix + name)
                return
            value, child_paths, mode = None, None, column.mode
            if column.bq_type == RECORD:
                child_paths = PERSON_NAME_PATHS
        if is_group:
            field = (REPEATING_GROUP, column.order, name, RECORD, REPEATED)
            paths.add((field,) + _ID_PATH)
            _add_paths(paths, (field, (STANDARD, 1, "Value", column.bq_type, mode)), child_paths)
        else:
            _add_paths(paths, ((STANDARD, column.order, name, column.bq_type, mode),), child_paths)
        if column.vr != "SQ":
            # The column is in the schema even if this value does not fit it (_NotFit).
            value = self._fit(vr, element, encodings, column.bq_type, column.mode)
        if is_group:
            entry = {"Id": f"{tag >> 16:04X}"}
            if value is not None:
                entry["Value"] = value
            row.setdefault(name, []).append(entry)
        elif value is not None:
            row[name] = value

    def _other(self, source, tag, element, column, encodings, prefix, depth, row, paths, others):
        """A private or keyword-less element: OtherElements, a Tag_ sequence, or dropped."""
        name = column.name
        vr, element = self._resolve_vr(source, tag, element, None, encodings)
        if vr == _UNCONVERTIBLE:
            self.drop(prefix + name, NOT_FIT)
            return
        items = source[tag].value if vr == "SQ" else _items_in_un(element, encodings) if vr == "UN" else None
        if items is not None:
            value, child_paths = self._sequence(items, encodings, prefix + name + ".", depth)
            if child_paths:
                field = (PRIVATE_SEQUENCE, tag, name, RECORD, REPEATED)
                _add_paths(paths, (field,), child_paths)
                row[name] = value
            elif items:
                self.drop(prefix + name)
            return
        if vr_types.is_excluded(vr):
            self.drop(prefix + name)
            return
        if depth + 1 > MAX_RECORD_DEPTH:
            self._too_deep(prefix + name)
            return
        texts, undecodable = self._texts(vr, element, encodings)
        if undecodable:
            self.counts["undecodable_values"] += 1
        others.append({"Tag": name, "Data": texts})

    def _sequence(self, sequence, encodings, prefix: str, depth: int) -> tuple[list, set]:
        """A sequence's items (Datasets) at ``depth`` as records, and the union of their paths."""
        if depth + 1 > MAX_RECORD_DEPTH:
            self._too_deep(prefix[:-1])
            return [], set()
        items, paths = [], set()
        for item in sequence:
            record, item_paths = self.record(item, self.encodings(item, encodings), prefix, depth + 1)
            items.append(record)
            paths |= item_paths
        return items, paths

    # -- values -----------------------------------------------------------------------

    def _resolve_vr(self, source: Dataset, tag: int, element, dictionary_vr: str | None, encodings):
        """The element's actual VR, converting through pydicom where only it knows.

        A public element stored as UN (relayed by a system that did not know it, or over
        64 KiB in explicit VR: DICOM CP-1066) has its dictionary VR whatever its length;
        its value is implicit VR little endian (PS3.5 §6.2.2), so a sequence's items are
        parsed as such. (pydicom's ``config.replace_un_with_known_vr`` does this only for
        values under 0xFFFF bytes, and in the file's byte order.) pydicom resolves what
        the raw bytes cannot tell: an implicit VR that is ambiguous (``US or SS``), a
        private tag's VR from its private dictionary.
        """
        if not isinstance(element, RawDataElement):
            return element.VR, element
        vr = element.VR
        if vr is None and dictionary_vr and " or " not in dictionary_vr:
            return dictionary_vr, element
        if vr == "UN" and dictionary_vr and " or " not in dictionary_vr:
            return self._from_un(tag, element, dictionary_vr, encodings)
        if vr is not None and vr != "UN":
            return vr, element
        if element.value is None and element.length and dictionary_vr is None:
            # A large private value parsing skipped: only a VR worth exporting is worth
            # reading it for (a vendor blob is dropped unread).
            if vr_types.is_excluded(_private_dictionary_vr(source, tag)):
                return "UN", element
        try:
            converted = source[tag]
        except Exception:  # pydicom cannot convert it (e.g. a length its VR forbids)
            return _UNCONVERTIBLE, element
        return converted.VR, converted

    def _from_un(self, tag: int, element: RawDataElement, dictionary_vr: str, encodings):
        """A public element stored as UN, as its dictionary VR (see ``_resolve_vr``)."""
        as_implicit = element._replace(VR=dictionary_vr, is_implicit_VR=True, is_little_endian=True)
        if dictionary_vr != "SQ":
            return dictionary_vr, as_implicit
        try:
            items = dicom_values.convert_SQ(self._raw_bytes(element), True, True, encodings)
        except Exception:  # not items: the value does not fit its dictionary VR
            return _UNCONVERTIBLE, element
        return "SQ", DataElement(tag, "SQ", items)

    def _raw_bytes(self, element: RawDataElement) -> bytes:
        value = element.value
        if value is None:
            if element.length == 0 or self.read_deferred is None:
                return b""
            value = self.read_deferred(element)
        return value

    def _values(self, vr: str, element, encodings) -> tuple[list, bool]:
        """The element's values: text (split on backslash), numbers, or PN group lists."""
        if isinstance(element, RawDataElement):
            raw = element.value
            if raw is None:
                raw = self._raw_bytes(element)
            binary = _BINARY.get(vr)
            if binary is not None:
                code, size = binary
                if len(raw) % size:
                    raise _NotFit([raw.hex()])
                count = len(raw) // size
                order = "<" if element.is_little_endian else ">"
                if vr == "AT":
                    pairs = struct.unpack(f"{order}{2 * count}H", raw)
                    return [pairs[i] << 16 | pairs[i + 1] for i in range(0, len(pairs), 2)], False
                return list(struct.unpack(f"{order}{count}{code}", raw)), False
            if vr == "PN":
                # Decode first, then split: in ISO 2022 IR 87 (and GBK) the bytes of "\\"
                # and "=" occur inside multi-byte characters.
                text = dicom_charset.decode_bytes(raw.rstrip(b"\0 "), encodings, TEXT_VR_DELIMS)
                names = [token.split("=") for token in text.split("\\")]
                return ([] if names == [[""]] else names), "\ufffd" in text
            if vr in vr_types.CHARSET_VRS:
                text = dicom_charset.decode_bytes(raw, encodings, TEXT_VR_DELIMS)
                undecodable = "\ufffd" in text
            else:
                text = raw.decode("latin-1")
                undecodable = False
            if vr in vr_types.SINGLE_VALUE_TEXT_VRS:  # none of them pads with leading spaces
                tokens = [text.rstrip(" \0")]
            elif vr in vr_types.LEADING_SPACE_PADDED_VRS:
                tokens = [token.strip(" \0") for token in text.split("\\")]
            else:
                tokens = [token.rstrip(" \0") for token in text.split("\\")]
            return ([] if tokens == [""] else tokens), undecodable
        value = element.value
        if value is None or value == "" or value == b"":
            return [], False
        items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
        if vr == "PN":
            names = [str(v).split("=") for v in items]
            return names, any("\ufffd" in str(v) for v in items)
        if vr in _BINARY:
            return [int(v) if vr != "FL" and vr != "FD" else float(v) for v in items], False
        return _clean(vr, [str(v) for v in items]), any("\ufffd" in str(v) for v in items)

    def _texts(self, vr: str, element, encodings) -> tuple[list[str], bool]:
        """The element's values as text, for OtherElements."""
        try:
            values, undecodable = self._values(vr, element, encodings)
        except _NotFit as not_fit:
            return not_fit.texts, not_fit.undecodable
        return [_as_text(vr, v) for v in values], undecodable

    def _fit(self, vr: str, element, encodings, bq_type: str, mode: str):
        """The column value for the element, or ``_NotFit`` with its text."""
        values, undecodable = self._values(vr, element, encodings)
        if undecodable:
            raise _NotFit([_as_text(vr, v) for v in values], undecodable=True)
        if not values or values == [""]:
            return None
        if mode == NULLABLE and len(values) > 1:
            raise _NotFit([_as_text(vr, v) for v in values])
        if (bq_type == STRING and vr not in _BINARY and vr != "PN") or (bq_type == INTEGER and vr in _INT32_VRS):
            converted = values  # text already, or integers BigQuery's INT64 holds
        else:
            convert = _CONVERTERS.get(bq_type)
            try:
                converted = [convert(v) if convert else _as_text(vr, v) for v in values]
            except (ValueError, TypeError, OverflowError):
                raise _NotFit([_as_text(vr, v) for v in values]) from None
        if mode == NULLABLE:
            return converted[0]
        if bq_type == RECORD:  # an empty name keeps its place in a list of names
            converted = [{} if v is None else v for v in converted]
        return converted


_ITEM_TAG_LE = b"\xfe\xff\x00\xe0"

#: The VR _resolve_vr gives an element pydicom cannot convert: dropped, not fit.
_UNCONVERTIBLE = "unconvertible"


@functools.lru_cache(maxsize=None)
def _column_and_leaf_path(tag: int) -> tuple[Column, Path | None]:
    """The tag's column and, for a keyword column of a plain type (neither a record
    nor a repeating group), the one path its values take (cached, as ``column_for_tag``)."""
    column = column_for_tag(tag)
    if column.kind != STANDARD or column.bq_type is None or column.bq_type == RECORD:
        return column, None
    return column, ((STANDARD, column.order, column.name, column.bq_type, column.mode),)


def _items_in_un(element, encodings) -> list | None:
    """The items of a sequence stored as UN (implicit VR private sequences of defined
    length, relayed sequences), or None if the value is not a sequence (PS3.5 §6.2.2:
    a UN value is encoded as implicit VR little endian)."""
    value = element.value
    if not isinstance(value, bytes) or not value.startswith(_ITEM_TAG_LE):
        return None
    try:
        return list(dicom_values.convert_SQ(value, True, True, encodings))
    except Exception:
        return None


def _stored_vr(element: RawDataElement, column: Column) -> str | None:
    """The VR a stored value is converted by: the explicit one, else (implicit VR, or a
    public element stored as UN) the dictionary's."""
    vr = element.VR
    if vr is None or (vr == "UN" and column.vr):
        return column.vr or vr
    return vr


def _private_dictionary_vr(dataset: Dataset, tag: int) -> str | None:
    """A private tag's VR from pydicom's private dictionary (by its block's creator)."""
    creator = dataset.get_item((tag & 0xFFFF0000) | ((tag >> 8) & 0xFF), keep_deferred=True)
    name = getattr(creator, "value", None)
    if isinstance(name, bytes):
        name = name.decode("latin-1")
    if not isinstance(name, str):
        return None
    try:
        return datadict.private_dictionary_VR(tag, name.strip(" \0"))
    except KeyError:
        return None


def _tag_order(item) -> int:
    return item[0].real  # a plain int: BaseTag's comparisons are Python code, slow in a loop


def _elements_of(*datasets: Dataset | None) -> list[tuple[Dataset, int, object]]:
    """``(dataset, tag, element)`` for each element of the datasets given (file meta, then
    the dataset), each in tag order."""
    return [
        (dataset, tag.real, element)
        for dataset in datasets if dataset
        for tag, element in sorted(dataset.items(), key=_tag_order)
    ]


def _add_paths(paths: set, prefix: tuple, child_paths) -> None:
    if child_paths is None:
        paths.add(prefix)
    else:
        paths.update(prefix + child for child in child_paths)


def _clean(vr: str, tokens: list[str]) -> list[str]:
    """Remove padding: trailing spaces and NULs always, leading spaces where insignificant."""
    if vr in vr_types.LEADING_SPACE_PADDED_VRS:
        tokens = [token.strip(" \0") for token in tokens]
    else:
        tokens = [token.rstrip(" \0") for token in tokens]
    return [] if tokens == [""] else tokens


def _as_text(vr: str, value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # PN component groups
        return "=".join(value)
    if vr == "AT":
        return f"{value:08X}"
    return repr(value) if isinstance(value, float) else str(value)


def _to_integer(value) -> int:
    if isinstance(value, str):
        value = int(value.strip())
    elif isinstance(value, float):
        if not value.is_integer():
            raise ValueError("not an integer")
        value = int(value)
    return bq_values.to_integer(value)


def _to_float(value) -> float | str:
    return bq_values.to_float(float(value))


def _text_only(function: Callable[[str], str]) -> Callable:
    def convert(value):
        if not isinstance(value, str):
            raise TypeError("not text")
        return function(value)

    return convert


def _to_person_name(value) -> dict | None:
    groups = value if isinstance(value, list) else str(value).split("=")
    return bq_values.to_person_name(groups)


#: Column type → conversion of one value; STRING columns take the value's text (_as_text).
_CONVERTERS: dict[str, Callable] = {
    INTEGER: _to_integer,
    FLOAT: _to_float,
    DATE: _text_only(bq_values.to_date),
    TIME: _text_only(bq_values.to_time),
    TIMESTAMP: _text_only(bq_values.to_timestamp),
    RECORD: _to_person_name,
}

__all__ = [
    "BASE_FRAGMENT",
    "BY_RULE",
    "Flattened",
    "MAX_RECORD_DEPTH",
    "MAX_ROW_VALUE_BYTES",
    "MAX_VALUE_BYTES",
    "NOT_FIT",
    "flatten_instance",
]
