"""Header-only reading of one DICOM instance from any seekable file object.

Pure Python (pydicom, no Beam): the Beam transforms call :func:`read_header` on the file
objects Beam's filesystems open, and ``dicom-bq-export inspect`` calls it on local files.

What is read: the preamble and file meta, then the dataset up to Pixel Data (or Float /
Double Float Pixel Data), whose bytes are never read: only its presence is recorded.
Large values before it (ICC profiles, encapsulated documents, vendor blobs) are skipped
with a seek, not read, and read later only if their VR is exported. So on Cloud Storage
a ranged reader fetches a few KB of a 40 MB object.

A buffered file's first bytes (its buffer's first fill, at least :data:`HEAD_BYTES`) are
parsed in memory, with no Python code per read (:func:`_read_header_in`); a header that
does not end inside them (no Pixel Data there, a deflated dataset, a value skipped past
them, a file pydicom stumbles over) is parsed again, element by element, through the
file's budget (:class:`_GuardedReader`), from the same buffer.

What follows Pixel Data (Data Set Trailing Padding, Digital Signatures Sequence, private
elements) is read without reading Pixel Data (:func:`_read_after_pixel_data`): after a
defined length, by one seek past its value (nothing when the value ends the file); after
encapsulated Pixel Data, from the file's last ``AFTER_PIXEL_DATA_WINDOW`` bytes (one small
ranged read). What cannot be read unambiguously is left out and flagged on the dataset
(:data:`UNREAD_AFTER_PIXEL_DATA`), so the converter counts it.

Every way a file can fail to be an instance is an :class:`InstanceError` subclass whose
message never contains a tag value (DICOM headers hold patient data). What one file may
cost (header bytes, inflated bytes, time, nesting) is bounded by :mod:`transforms.limits`.
"""

from __future__ import annotations

import io
import logging
import struct
import time
import warnings
from typing import BinaryIO, Callable, NamedTuple

import pydicom.uid
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import (
    _read_command_set_elements,
    _read_file_meta_info,
    data_element_generator,
    read_dataset,
    read_preamble,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
from pydicom.values import converters

from transforms.limits import (
    AFTER_PIXEL_DATA_WINDOW,
    MAX_BYTES_AFTER_PIXEL_DATA,
    MAX_HEADER_BYTES,
    MAX_INFLATED_BYTES,
    MAX_SECONDS_PER_FILE,
    Budget,
    HeaderTooLargeError,
    InflatingReader,
    InputTypeError,
    LimitError,
    _from_recursion,
    with_deep_stack,
)


def silence_pydicom() -> None:
    """Keep pydicom's warnings and log records out of every log.

    pydicom puts tag values (names, UIDs, dates) into its messages. The converter counts
    what those messages would report (bad values, charset fallbacks) itself.
    """
    logging.getLogger("pydicom").disabled = True
    warnings.filterwarnings("ignore", module=r"(pydicom|schemas|transforms)(\.|$)")


silence_pydicom()

#: Top-level values larger than this are skipped while parsing, read only if exported.
DEFER_SIZE = 64 * 1024

#: The least of a file's buffered first bytes worth parsing in memory (unless they are
#: the whole file): ``transforms.storage.READ_BUFFER_BYTES`` buffers this much (one
#: request of a remote file), which holds most headers up to Pixel Data.
HEAD_BYTES = 64 * 1024

#: Reading stops at these (PS3.6: Pixel Data, Float Pixel Data, Double Float Pixel Data).
PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})

STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E
SOP_INSTANCE_UID = 0x00080018
_UID_KEYWORDS = {
    STUDY_INSTANCE_UID: "StudyInstanceUID",
    SERIES_INSTANCE_UID: "SeriesInstanceUID",
    SOP_INSTANCE_UID: "SOPInstanceUID",
}

#: The attribute :func:`read_header` sets to True on a dataset whose elements after Pixel
#: Data could not be read unambiguously (or at all: a deflated dataset's would need its
#: pixel data inflated); :mod:`schemas.convert` counts it as ``unread_after_pixel_data``.
UNREAD_AFTER_PIXEL_DATA = "unread_after_pixel_data"

#: PS3.5 §7.5: the Sequence Delimitation Item (FFFE,E0DD) with its zero length, which ends
#: encapsulated Pixel Data (always little endian: every encapsulated syntax is).
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
#: The same item in a big endian dataset, which can end with a sequence (:func:`_ends_at`).
_SEQUENCE_DELIMITER_BE = b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"
_ITEM_TAG = 0xFFFEE000
_SEQUENCE_DELIMITER_TAG = 0xFFFEE0DD

#: Groups a dataset written without preamble and file meta plausibly starts with.
_FIRST_GROUPS = {0x0000, 0x0002, 0x0008}
#: The two-letter VR codes of PS3.5 (an explicit VR dataset's first element has one).
_VR_CODES = {vr.encode() for vr in converters if len(vr) == 2}
#: The first element of a bare dataset is small (a charset, an image type, a UID…).
_MAX_FIRST_LENGTH = 1 << 16


class InstanceError(Exception):
    """An input that cannot become a row. Its class name is the dead letter's error type;
    its message says what is wrong without quoting any value."""


class EmptyFileError(InstanceError):
    pass


class NotDicomError(InstanceError):
    pass


class TruncatedFileError(InstanceError):
    pass


class MissingInstanceUIDError(InstanceError):
    pass


class InstanceUIDs(NamedTuple):
    study: str
    series: str
    instance: str


class InstanceHeader(NamedTuple):
    """What :func:`read_header` found: the parsed header and how it was read."""

    dataset: FileDataset
    uids: InstanceUIDs
    pixel_data_tag: int | None

    def read_deferred(self, raw: RawDataElement) -> bytes:
        """The value of a top-level element that parsing skipped (see ``DEFER_SIZE``)."""
        source = self.dataset.buffer  # the file object, or the inflated deflate stream
        source.seek(raw.value_tell)
        value = source.read(raw.length)
        if len(value) != raw.length:
            raise TruncatedFileError("the file ends inside an element's value")
        return value


class _GuardedReader(io.RawIOBase):
    """Forwards reads to a file object, holding them to the file's :class:`Budget`
    (header bytes, deadline) and noticing reads that return less than asked.

    pydicom treats a file that ends mid-element as a shorter dataset; a short read is
    how a truncated header is told apart from a clean end of file. A read is charged
    only for the bytes the file still has, so a corrupt length in a small file is a
    truncation, not a header over the limit.
    """

    def __init__(self, fileobj: BinaryIO, budget: Budget):
        self._fileobj = fileobj
        self._budget = budget
        self.short_read = False
        self.inflated: InflatingReader | None = None  # a deflated dataset's inflated bytes
        self._position = fileobj.tell()  # kept here: tell() on a buffered file is a system call
        try:
            self._end = fileobj.seek(0, io.SEEK_END)
            self.size_known = True
        except (OSError, ValueError, NotImplementedError):  # a stream without an end: no capping
            self._end = 1 << 62
            self.size_known = False
        fileobj.seek(self._position)

    def read(self, size: int = -1) -> bytes:
        # Called for every element header and value: kept to plain comparisons.
        wanted = size
        if size is None or size < 0 or size > self._end - self._position:
            wanted = self._end - self._position
            if wanted < 0:
                wanted = 0
        budget = self._budget
        if budget.bytes_read + wanted > budget.max_bytes or time.monotonic() > budget.deadline:
            budget.spend(wanted)  # raises the limit passed
        budget.bytes_read += wanted
        data = self._fileobj.read(wanted)
        self._position += len(data)
        if size is not None and 0 < len(data) < size:
            self.short_read = True
        return data

    @property
    def size(self) -> int:
        """The file's size (taken once, when reading starts)."""
        return self._end

    @property
    def ended_early(self) -> bool:
        """True if a read (of the file, or of its inflated dataset) returned less than asked."""
        return self.short_read or (self.inflated is not None and self.inflated.short_read)

    def read_chunk(self, size: int) -> bytes:
        """Up to ``size`` bytes, charged to the budget; a short chunk is not a truncation."""
        wanted = min(size, max(self._end - self._position, 0))
        self._budget.spend(wanted)
        data = self._fileobj.read(wanted)
        self._position += len(data)
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._position = self._fileobj.seek(offset, whence)
        return self._position

    def tell(self) -> int:
        return self._position


def read_header(
    fileobj: BinaryIO,
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_inflated_bytes: int = MAX_INFLATED_BYTES,
    max_seconds: float = MAX_SECONDS_PER_FILE,
) -> InstanceHeader:
    """Read one instance's header from a seekable binary file object.

    Raises :class:`InstanceError` (empty, not DICOM, truncated, missing a UID), a
    :class:`~transforms.limits.LimitError` for a file that would cost more than a limit
    of :mod:`transforms.limits` (the keyword arguments, for tests), or pydicom's own
    errors for a file it cannot parse.
    """
    budget = Budget(max_header_bytes, max_seconds)
    start = fileobj.tell()

    def parse() -> InstanceHeader:
        fileobj.seek(start)
        budget.bytes_read = 0
        reader = _GuardedReader(fileobj, budget)
        head = _buffered_head(fileobj, reader) if start == 0 else None
        if head is not None and len(head) <= budget.max_bytes:
            budget.bytes_read = len(head)
            header = _read_header_in(head, reader, budget)
            if header is not None:
                return header
            budget.bytes_read = 0  # parsed again through the budget, from the same buffer
        return _read_header(reader, budget, max_inflated_bytes)

    return with_deep_stack(parse)


def _buffered_head(fileobj: BinaryIO, reader: "_GuardedReader") -> bytes | None:
    """The file's first bytes, as its buffer holds them (one read of the underlying
    file, which the first read of a header would make anyway), if they are the whole
    file or at least :data:`HEAD_BYTES`; else None."""
    if not isinstance(fileobj, io.BufferedReader) or not reader.size_known:
        return None
    head = fileobj.peek(1)
    return head if len(head) >= min(HEAD_BYTES, reader.size) else None


class _HeadTooShort(Exception):
    """The header does not end inside the head (see :func:`_read_header_in`)."""


def _read_header_in(head: bytes, reader: "_GuardedReader", budget: Budget) -> InstanceHeader | None:
    """The header, parsed from ``head`` (the file's first bytes) in memory, if Pixel Data
    starts inside it or ``head`` is the whole file and parsing ended at its end; else
    None, and the caller parses the file through ``reader``.

    If parsing stopped at Pixel Data, every read before it was inside ``head``: a read
    past its end returns nothing, which ends the dataset (or raises) before any stop. So
    no value was cut short or skipped unread (:func:`_ends_at` says the same of a whole
    file without Pixel Data). A file pydicom raises on, or a deflated dataset (inflated
    through the reader), is left to the caller's parse, which tells a truncated file
    apart and raises what it should. No deadline is checked here: the parse is bounded
    by ``head``'s size. The dataset's buffer is ``reader``: what follows Pixel Data, and
    any value read later, is read through the budget.
    """
    has_prefix = head[128:132] == b"DICM"
    if not has_prefix and not _starts_like_a_dataset(head[:132]):
        return None
    stopped_at, stop_at_pixel_data = _pixel_data_stop()
    memory = io.BytesIO(head)
    try:
        dataset = _read_partial(memory, stop_at_pixel_data, not has_prefix, budget, 0, owner=reader)
    except Exception as error:
        if _from_recursion(error):
            raise  # with_deep_stack parses again with a deep stack
        return None
    if stopped_at:
        reader.seek(memory.tell())  # the start of Pixel Data
    elif len(head) != reader.size or memory.tell() != len(head) or not _ends_at(dataset, head):
        return None
    return _finish(dataset, reader, budget, stopped_at)


def _ends_at(dataset: FileDataset, data: bytes) -> bool:
    """True if parsing a file held whole in memory (``data``) read it to its end, with no
    read cut short: it must end with the value of the last element read (a defined length,
    read whole), or, after that value, with a Sequence Delimitation Item (an element of
    undefined length: parsing one raises unless its delimiter was read whole; and no 1 to 7
    bytes of a cut element header following one can end with all of its 8 bytes, while
    after a value's own bytes they can: that value must end before them)."""
    last = None
    for element in dataset._dict.values():
        if isinstance(element, RawDataElement) and (last is None or element.value_tell > last.value_tell):
            last = element
    if last is not None:
        if last.length != 0xFFFFFFFF:
            if last.value is not None and len(last.value) == last.length and last.value_tell + last.length == len(data):
                return True
            value_end = last.value_tell + last.length
        elif last.value is not None:  # undefined length: the value up to its delimiter
            value_end = last.value_tell + len(last.value)
        else:
            return False
        if value_end > len(data) - len(_SEQUENCE_DELIMITER):
            return False
    little = dataset.original_encoding[1]
    return data.endswith(_SEQUENCE_DELIMITER if little else _SEQUENCE_DELIMITER_BE)


def _pixel_data_stop() -> tuple[list, Callable[[int, str | None, int], bool]]:
    """pydicom's ``stop_when`` for the top level, and the list it appends the
    ``(tag, VR, length)`` of the Pixel Data element it stops at to; it stops at zero bytes
    too (padding, not an element)."""
    stopped_at: list[tuple[int, str | None, int]] = []

    def stop_at_pixel_data(tag: int, vr: str | None, length: int) -> bool:
        if tag in PIXEL_DATA_TAGS:
            stopped_at.append((int(tag), vr, length))
            return True
        return not length and not tag  # BaseTag's == is slow: truthiness instead

    return stopped_at, stop_at_pixel_data


def _read_header(reader: "_GuardedReader", budget: Budget, max_inflated_bytes: int) -> InstanceHeader:
    start = reader.read(132)
    if not start:
        raise EmptyFileError("the file is empty")
    has_prefix = start[128:132] == b"DICM"
    if not has_prefix and not _starts_like_a_dataset(start):
        raise NotDicomError(
            "no DICM prefix at byte 128 and the content does not start with a DICOM element"
        )
    reader.seek(0)
    reader.short_read = False

    stopped_at, stop_at_pixel_data = _pixel_data_stop()
    try:
        dataset = _read_partial(reader, stop_at_pixel_data, not has_prefix, budget, max_inflated_bytes)
    except (LimitError, InstanceError, RecursionError):
        raise
    except Exception as error:
        if _from_recursion(error):
            raise
        if reader.ended_early:  # whatever pydicom tripped over, the file ended too early
            raise TruncatedFileError("the file ends inside the header") from None
        raise
    if reader.ended_early:
        raise TruncatedFileError("the file ends inside the header")
    return _finish(dataset, reader, budget, stopped_at)


def _finish(dataset: FileDataset, reader: "_GuardedReader", budget: Budget,
            stopped_at: list[tuple[int, str | None, int]]) -> InstanceHeader:
    """The header of a parsed dataset: its UIDs checked, what follows Pixel Data (where
    ``reader`` now is, if parsing stopped there) read."""
    if _has_cut_value(dataset, reader):
        raise TruncatedFileError("the file ends inside the header")
    uids = _instance_uids(dataset)
    if stopped_at:
        tag, vr, length = stopped_at[0]
        after = None  # deflated: what follows would cost inflating the pixel data
        if dataset.buffer is reader:  # where pydicom stopped: the start of Pixel Data
            try:
                with budget.at_most(MAX_BYTES_AFTER_PIXEL_DATA):
                    after = _read_after_pixel_data(reader, dataset, tag, vr, length, reader.tell())
            except HeaderTooLargeError:
                pass
        if after is None:
            setattr(dataset, UNREAD_AFTER_PIXEL_DATA, True)
        else:
            dataset._dict.update(after)
    return InstanceHeader(
        dataset=dataset,
        uids=uids,
        pixel_data_tag=stopped_at[0][0] if stopped_at else None,
    )


def _read_after_pixel_data(
    reader: "_GuardedReader", dataset: FileDataset, pixel_tag: int, vr: str | None, length: int, start: int
) -> dict | None:
    """The elements after the Pixel Data element that starts at ``start``, ``{tag: element}``
    (empty if Pixel Data ends the file), or None if they cannot be read unambiguously.

    Pixel Data's value is never read. A defined length gives the position of what follows:
    one seek there (and no read at all if the value ends the file). Encapsulated Pixel Data
    (undefined length, PS3.5 §A.4) ends with a Sequence Delimitation Item after fragments
    whose sizes are known only by walking them, so the file's last AFTER_PIXEL_DATA_WINDOW
    bytes are read once instead: if they hold the whole value, its items are walked; else
    each delimiter found there is a candidate, and exactly one must be followed by elements
    (ascending tags after Pixel Data's) that end exactly at the end of the file.
    """
    if not reader.size_known:  # a stream (a DICOMweb retrieve): reaching its end means receiving Pixel Data
        return None
    implicit, little = dataset.original_encoding
    value_start = start + (12 if not implicit and vr in EXPLICIT_VR_LENGTH_32 else 8)
    end = reader.size
    encoding = dataset.original_character_set
    if length != 0xFFFFFFFF:
        after = value_start + length
        if after >= end:
            return {}
        return _elements_between(reader, after, end, implicit, little, pixel_tag, encoding)
    if not little:
        return None
    window_start = max(value_start, end - AFTER_PIXEL_DATA_WINDOW)
    reader.seek(window_start)
    tail = reader.read_chunk(end - window_start)
    if len(tail) != end - window_start:
        return None
    if window_start == value_start:
        delimiter_end = _end_of_fragments(tail)
        candidates = [] if delimiter_end is None else [delimiter_end]
    else:
        candidates = []
        found = tail.find(_SEQUENCE_DELIMITER)
        while found >= 0:
            candidates.append(found + len(_SEQUENCE_DELIMITER))
            found = tail.find(_SEQUENCE_DELIMITER, found + 1)
    parsed = []
    for offset in candidates:
        elements = _elements_between(
            _OffsetBytes(tail, window_start), window_start + offset, end, implicit, little, pixel_tag, encoding
        )
        if elements is not None:
            parsed.append(elements)
    return parsed[0] if len(parsed) == 1 else None


def _end_of_fragments(value: bytes) -> int | None:
    """The offset just past the Sequence Delimitation Item of encapsulated Pixel Data whose
    value starts ``value``, walking its items (Basic Offset Table, fragments)."""
    position = 0
    while position + 8 <= len(value):
        group, element, length = struct.unpack_from("<HHL", value, position)
        tag = group << 16 | element
        position += 8
        if tag == _SEQUENCE_DELIMITER_TAG:
            return position
        if tag != _ITEM_TAG or length == 0xFFFFFFFF:
            return None
        position += length
    return None


def _elements_between(fileobj, start: int, end: int, implicit: bool, little: bool, after_tag: int,
                      encoding) -> dict | None:
    """The elements from ``start`` to exactly ``end``, all with tags in ascending order after
    ``after_tag``, or None if the bytes are not such elements. Values over DEFER_SIZE are
    skipped with a seek, as before Pixel Data."""
    fileobj.seek(start)
    elements: dict = {}
    previous = after_tag
    position = start
    try:
        for element in data_element_generator(fileobj, implicit, little, defer_size=DEFER_SIZE, encoding=encoding):
            tag = int(element.tag)
            if tag <= previous or tag >> 16 == 0xFFFE:
                return None
            if isinstance(element, RawDataElement) and element.length != 0xFFFFFFFF:
                if element.value_tell + element.length > end:
                    return None
                if element.value is not None and len(element.value) != element.length:
                    return None
            elements[tag] = element
            previous = tag
            position = fileobj.tell()
    except (LimitError, RecursionError):
        raise
    except Exception as error:
        if _from_recursion(error):
            raise
        return None
    return elements if position == end else None


class _OffsetBytes(io.BytesIO):
    """Bytes read from the file at ``offset``, positioned as in the file (so the elements
    parsed from them have their values' positions in the file)."""

    def __init__(self, data: bytes, offset: int):
        super().__init__(data)
        self._offset = offset

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            position -= self._offset
        return super().seek(position, whence) + self._offset

    def tell(self) -> int:
        return super().tell() + self._offset


def _read_partial(reader, stop_when, force: bool, budget: Budget, max_inflated_bytes: int,
                  owner: "_GuardedReader | None" = None) -> FileDataset:
    """pydicom's ``read_partial``, except that a deflated dataset is inflated as it is
    parsed (:class:`~transforms.limits.InflatingReader`) rather than whole, and zero
    bytes where the dataset should start end it (a file of zeros after ``DICM``).

    With ``owner``, ``reader`` holds the file's first bytes in memory (:func:`_read_header_in`)
    and ``owner`` reads the file: the dataset's buffer, and a deflated dataset is left to it
    (``_HeadTooShort``)."""
    preamble = read_preamble(reader, force)
    file_meta = _read_file_meta_info(reader)
    position = reader.tell()
    peek = reader.read(8)
    reader.seek(position)
    if peek == bytes(len(peek)):  # end of file, or zero padding: no dataset
        dataset = Dataset()
        return FileDataset(owner or reader, dataset, preamble, file_meta, True, True)
    command_set = _read_command_set_elements(reader)
    source = reader
    implicit, little = _encoding(reader, file_meta.get("TransferSyntaxUID"))
    if file_meta.get("TransferSyntaxUID") == pydicom.uid.DeflatedExplicitVRLittleEndian:
        if owner is not None:
            raise _HeadTooShort("a deflated dataset")
        source = reader.inflated = InflatingReader(reader.read_chunk, max_inflated_bytes, budget)
    dataset = read_dataset(
        source, implicit, little, stop_when=stop_when, defer_size=DEFER_SIZE
    )
    if command_set:
        dataset.update(command_set)
    result = FileDataset(owner or source, dataset, preamble, file_meta, implicit, little)
    result.set_original_encoding(implicit, little, dataset._character_set)
    return result


def _encoding(reader, transfer_syntax) -> tuple[bool, bool]:
    """``(implicit VR, little endian)`` of the dataset, as pydicom's ``read_partial`` decides."""
    uid = pydicom.uid
    if transfer_syntax is None:  # guess from the first element, as pydicom does
        position = reader.tell()
        first = reader.read(6)
        reader.seek(position)
        if len(first) < 6:
            return True, True
        group, _, vr = struct.unpack("<HH2s", first)
        if vr.decode("latin-1") in converters:
            return False, group < 1024
        return True, True
    if transfer_syntax == uid.ImplicitVRLittleEndian:
        return True, True
    if transfer_syntax == uid.ExplicitVRBigEndian:
        return False, False
    if transfer_syntax in uid.PrivateTransferSyntaxes:
        syntax = uid.PrivateTransferSyntaxes[uid.PrivateTransferSyntaxes.index(transfer_syntax)]
        return syntax.is_implicit_VR, syntax.is_little_endian
    return False, True  # every other syntax (deflated, compressed) is explicit VR little endian


def _starts_like_a_dataset(start: bytes) -> bool:
    """True if ``start`` begins like a dataset written without preamble and meta: a tag of
    group 0000, 0002 or 0008, then an explicit VR or a plausible implicit length.

    Many formats start with zero bytes (MP4, ICC profiles…); they must not be read whole.
    """
    if len(start) < 8 or start[:8] == bytes(8):  # zeros: no element has tag and length 0
        return False
    for order in "<>":
        group = struct.unpack(order + "H", start[:2])[0]
        if group not in _FIRST_GROUPS:
            continue
        if start[4:6] in _VR_CODES:
            return True
        length = struct.unpack(order + "L", start[4:8])[0]
        if order == "<" and (length <= _MAX_FIRST_LENGTH or length == 0xFFFFFFFF):
            return True  # implicit VR is little endian only
    return False


def _has_cut_value(dataset: Dataset, reader: _GuardedReader) -> bool:
    """True if a top-level value is shorter than its length, or a skipped one runs past the end."""
    for raw in dataset._dict.values():
        if not isinstance(raw, RawDataElement) or raw.length == 0xFFFFFFFF:
            continue
        if raw.value is not None:
            if len(raw.value) < raw.length:
                return True
        elif dataset.buffer is reader and raw.value_tell + raw.length > reader.size:
            return True
    return False


def _instance_uids(dataset: Dataset) -> InstanceUIDs:
    values = {}
    for tag, keyword in _UID_KEYWORDS.items():
        raw = dataset._dict.get(tag)
        value = None
        if raw is not None:
            value = raw.value
            if isinstance(value, bytes):
                value = value.decode("ascii", "replace")
            if isinstance(value, str):
                value = value.strip("\0 ")
        if not value or not isinstance(value, str):
            missing = [k for t, k in _UID_KEYWORDS.items() if not _has_value(dataset, t)]
            raise MissingInstanceUIDError(
                "not an instance: no " + ", ".join(missing)
                + " (a DICOMDIR or other non-instance object?)"
            )
        values[keyword] = value
    return InstanceUIDs(
        values["StudyInstanceUID"], values["SeriesInstanceUID"], values["SOPInstanceUID"]
    )


def _has_value(dataset: Dataset, tag: int) -> bool:
    raw = dataset._dict.get(tag)
    value = getattr(raw, "value", None)
    if isinstance(value, bytes):
        value = value.strip(b"\0 ")
    return bool(value) and isinstance(value, (bytes, str))


#: Exceptions whose messages describe structure, never values: safe for dead letters.
_VALUE_FREE_ERRORS = (
    InstanceError, LimitError, InputTypeError, InvalidDicomError, EOFError, struct.error, OSError
)


def describe_error(error: BaseException) -> str:
    """A dead-letter message for ``error`` that cannot leak a tag value.

    Messages of unknown exception types may quote values (a decoder quoting bytes, a
    parser quoting text), so for those only the place that raised is reported.
    """
    if isinstance(error, _VALUE_FREE_ERRORS):
        return str(error) or type(error).__name__
    frame = None
    traceback = error.__traceback__
    while traceback is not None:
        frame = traceback
        traceback = traceback.tb_next
    where = ""
    if frame is not None:
        code = frame.tb_frame.f_code
        where = f" in {code.co_name} ({code.co_filename.rsplit('/', 1)[-1]}:{frame.tb_lineno})"
    return f"{type(error).__name__}{where}; message withheld as it may quote tag values"


__all__ = [
    "DEFER_SIZE",
    "EmptyFileError",
    "InstanceError",
    "InstanceHeader",
    "InstanceUIDs",
    "MissingInstanceUIDError",
    "NotDicomError",
    "TruncatedFileError",
    "describe_error",
    "read_header",
]
