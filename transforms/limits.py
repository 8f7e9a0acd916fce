"""What one input file may cost, and the checks that hold it to that (issue 11).

One hostile or broken file must never stop, stall or starve an export: every limit here
turns such a file into a dead letter whose error type and message name the limit, and
the rest of the export goes on. Real headers are far below every limit (the largest
header among pydicom's test files and the samples is under 1 MiB; enhanced multi-frame
headers with thousands of functional groups reach a few MiB).

Pure Python, no Beam: :mod:`transforms.header` applies the reading limits, listing
(:mod:`transforms.listing`) and opening apply the file-type checks. The limit on one
value (what a BigQuery row can hold) is a rule of the row: ``schemas.convert.MAX_VALUE_BYTES``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import sys
import threading
import time
import zlib
from typing import Callable, TypeVar

#: Bytes of one file read to parse its header (values skipped with a seek not counted).
#: 64 MiB: ~30× the largest real headers (multi-frame functional groups, structured
#: reports), yet small enough that a worker holding a few such files stays within memory.
#: Bytes past it are never read: the file is a ``HeaderTooLargeError`` dead letter.
MAX_HEADER_BYTES = 64 * 2**20

#: Bytes at the end of a file read to find the elements after encapsulated Pixel Data
#: (Data Set Trailing Padding, a Digital Signatures Sequence): one ranged read of this
#: size instead of walking the fragments. 4 KiB holds a signature with its X.509
#: certificate (1–2 KiB) and the padding writers add (DCMTK pads to a block size you
#: choose; pydicom's test files carry 126 bytes), and adds at most 1/16 to the 64 KiB a
#: header read of a large file costs. Elements that do not fit in it are not read and
#: are counted (``unread_after_pixel_data``).
AFTER_PIXEL_DATA_WINDOW = 4 * 1024

#: Bytes read to parse what follows a defined-length Pixel Data (values over 64 KiB are
#: skipped by a seek and not counted, as before Pixel Data). Real trailing elements are a
#: few KiB; bytes after Pixel Data that only look like elements (an undefined length that
#: never ends) stop here: nothing after Pixel Data is recorded, the instance is counted
#: (``unread_after_pixel_data``) and its row kept — never a failure for what it only carries.
MAX_BYTES_AFTER_PIXEL_DATA = 2**20

#: Bytes one deflated file (Deflated Explicit VR Little Endian) may inflate to before
#: Pixel Data. Inflated incrementally, as parsing asks for bytes, so memory never holds
#: more than this, whatever the ratio (a 1 MB deflate bomb inflates to 1 GB): past it,
#: an ``InflatedTooLargeError`` dead letter. Same reasoning as MAX_HEADER_BYTES.
MAX_INFLATED_BYTES = 64 * 2**20

#: Seconds one file's header may take to read and parse, checked before every read: a
#: local header is read in milliseconds, and even MAX_HEADER_BYTES by 64 KiB ranged GETs
#: from Cloud Storage takes well under a minute. Past it: a ``ReadTimeLimitError`` dead
#: letter. (A read that blocks forever cannot be interrupted this way: that is why
#: FIFOs and devices are never opened, see :func:`open_regular_file`.)
MAX_SECONDS_PER_FILE = 120.0

#: Levels of nested sequences a file may have. pydicom parses sequences recursively
#: (five Python frames per level), so a file deeper than the default recursion limit
#: allows (about 190 levels) is parsed again on a thread with a large stack. 2,000
#: levels: no real object nests more than ~10 (SR trees); BigQuery keeps only 15, the
#: deeper ones are named in DroppedTags. Deeper than this: ``SequenceTooDeepError``.
MAX_SEQUENCE_DEPTH = 2000

#: pydicom's frames per sequence level (read_sequence, read_sequence_item, read_dataset,
#: its dict comprehension, data_element_generator), and the stack the deep parse gets:
#: measured ~1.5 KiB of C stack per level on CPython 3.11; 256 MiB leaves a wide margin.
_FRAMES_PER_LEVEL = 5
_DEEP_STACK_BYTES = 256 * 2**20


class LimitError(Exception):
    """A file that would cost more than a documented limit. The class name is the dead
    letter's error type; the message names the limit and never quotes a value."""


class HeaderTooLargeError(LimitError):
    pass


class InflatedTooLargeError(LimitError):
    pass


class ReadTimeLimitError(LimitError):
    pass


class SequenceTooDeepError(LimitError):
    pass


class InputTypeError(Exception):
    """An input that is not a regular file (or a link to one): never opened."""


class NotARegularFileError(InputTypeError):
    pass


class DanglingSymlinkError(InputTypeError):
    pass


class SymlinkLoopError(InputTypeError):
    pass


_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


def input_type_error(path: str, st: os.stat_result | None = None) -> InputTypeError | None:
    """Why ``path`` must not be opened (not a regular file once symlinks are followed,
    a dangling link, a link loop), or None for a regular file. Never opens it."""
    try:
        st = st or os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return SymlinkLoopError("a symbolic link loop: its target is never reached")
        if os.path.islink(path):
            return DanglingSymlinkError("a symbolic link whose target does not exist")
        return None  # let opening report it (gone since listing, permissions)
    if stat.S_ISREG(st.st_mode):
        return None
    kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
    return NotARegularFileError(f"{kind}, not a regular file: skipped unopened")


def open_regular_file(path: str) -> io.FileIO:
    """Open a local file for reading, but only a regular file (after symlinks).

    Checked before opening (a FIFO blocks in ``open``; a device may act on being
    opened) and again on the opened descriptor, opened non-blocking, so a file swapped
    for a FIFO in between cannot hang the reader either.
    """
    error = input_type_error(path)
    if error is not None:
        raise error
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        error = input_type_error(path, os.fstat(fd))
        if error is not None:
            raise error
        os.set_blocking(fd, True)
        return io.FileIO(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise


class Budget:
    """What one file has spent: header bytes and time, checked before each read."""

    def __init__(self, max_bytes: int = MAX_HEADER_BYTES, max_seconds: float = MAX_SECONDS_PER_FILE):
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self.deadline = time.monotonic() + max_seconds
        self.bytes_read = 0

    def spend(self, size: int) -> None:
        """Account for reading ``size`` more bytes, or raise the limit it would pass."""
        if time.monotonic() > self.deadline:
            raise ReadTimeLimitError(
                f"reading the header took longer than {self.max_seconds:g} s "
                "(MAX_SECONDS_PER_FILE, the limit per file)"
            )
        if self.bytes_read + size > self.max_bytes:
            raise HeaderTooLargeError(
                f"the header is larger than {_size(self.max_bytes)} "
                "(MAX_HEADER_BYTES, the limit on header bytes read per file)"
            )
        self.bytes_read += size

    @contextlib.contextmanager
    def at_most(self, size: int):
        """Within the block, at most ``size`` more bytes (``HeaderTooLargeError`` past them,
        or past the file's own limit, whichever comes first)."""
        saved = self.max_bytes
        self.max_bytes = min(saved, self.bytes_read + size)
        try:
            yield
        finally:
            self.max_bytes = saved


class InflatingReader(io.RawIOBase):
    """The inflated bytes of a deflated dataset, inflated only as far as they are read.

    pydicom inflates a deflated file whole; here ``zlib.decompressobj`` inflates in
    steps while parsing asks for bytes, so a header costs its own size and a deflate
    bomb at most ``max_bytes`` (then ``InflatedTooLargeError``). Seekable within what
    has been inflated, and forward (inflating up to the target).
    """

    _CHUNK = 64 * 1024

    def __init__(self, read_compressed: Callable[[int], bytes], max_bytes: int = MAX_INFLATED_BYTES,
                 budget: Budget | None = None):
        self._read_compressed = read_compressed
        self.short_read = False
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._data = bytearray()
        self._position = 0
        self._max_bytes = max_bytes
        self._budget = budget
        self._ended = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _inflate_to(self, end: int) -> None:
        while len(self._data) < end and not self._ended:
            room = self._max_bytes + 1 - len(self._data)
            if room <= 0:
                raise InflatedTooLargeError(
                    f"the deflated dataset inflates to more than {_size(self._max_bytes)} "
                    "(MAX_INFLATED_BYTES, the limit on inflated bytes per file)"
                )
            if self._inflater.unconsumed_tail:
                source = self._inflater.unconsumed_tail
            else:
                if self._budget is not None:
                    self._budget.spend(0)  # the deadline
                source = self._read_compressed(self._CHUNK)
                if not source:
                    self._ended = True
                    break
            self._data += self._inflater.decompress(source, min(room, self._CHUNK * 16))
            if self._inflater.eof:
                self._ended = True
        if len(self._data) > self._max_bytes:
            raise InflatedTooLargeError(
                f"the deflated dataset inflates to more than {_size(self._max_bytes)} "
                "(MAX_INFLATED_BYTES, the limit on inflated bytes per file)"
            )

    def readinto(self, buffer) -> int:
        size = len(buffer)
        self._inflate_to(self._position + size)
        chunk = self._data[self._position:self._position + size]
        buffer[: len(chunk)] = chunk
        self.short_read |= 0 < len(chunk) < size
        self._position += len(chunk)
        return len(chunk)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            self._inflate_to(self._max_bytes + 1)
            size = len(self._data) - self._position
        self._inflate_to(self._position + size)
        chunk = bytes(self._data[self._position:self._position + size])
        self.short_read |= 0 < len(chunk) < size
        self._position += len(chunk)
        return chunk

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._position
        elif whence == io.SEEK_END:
            self._inflate_to(self._max_bytes + 1)
            offset += len(self._data)
        self._position = max(offset, 0)
        return self._position

    def tell(self) -> int:
        return self._position


T = TypeVar("T")


def with_deep_stack(function: Callable[[], T]) -> T:
    """``function()``; if it overflows the default recursion limit, once more on a thread
    with a large stack and a recursion limit for MAX_SEQUENCE_DEPTH levels.

    Only the rare deep file pays for the thread. Past the raised limit the file is a
    ``SequenceTooDeepError``.
    """
    try:
        return function()
    except Exception as error:
        if not _from_recursion(error):
            raise
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, function()))
        except Exception as error:  # re-raised in the caller's thread
            if _from_recursion(error):
                error = SequenceTooDeepError(
                    f"sequences nested more than {MAX_SEQUENCE_DEPTH:,} levels deep "
                    "(MAX_SEQUENCE_DEPTH, the limit on nesting per file)")
            outcome.append((False, error))

    with _DEEP_LOCK:
        limit = sys.getrecursionlimit()
        previous_stack = threading.stack_size(_DEEP_STACK_BYTES)
        try:
            sys.setrecursionlimit(max(limit, MAX_SEQUENCE_DEPTH * _FRAMES_PER_LEVEL + 500))
            thread = threading.Thread(target=run, name="deep-sequence-parse")
            thread.start()
            thread.join()
        finally:
            threading.stack_size(previous_stack)
            sys.setrecursionlimit(limit)
    ok, value = outcome[0]
    if ok:
        return value
    raise value.with_traceback(None) if isinstance(value, SequenceTooDeepError) else value


_DEEP_LOCK = threading.Lock()


def _from_recursion(error: BaseException) -> bool:
    """True for a RecursionError, or an error raised while handling one (pydicom turns
    any exception in reading an item's tag, a RecursionError too, into an OSError)."""
    seen = 0
    while error is not None and seen < 20:
        if isinstance(error, RecursionError):
            return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False


def _size(count: int) -> str:
    return f"{count // 2**20:,} MiB" if count >= 2**20 and count % 2**20 == 0 else f"{count:,} bytes"


__all__ = [
    "AFTER_PIXEL_DATA_WINDOW",
    "MAX_BYTES_AFTER_PIXEL_DATA",
    "MAX_HEADER_BYTES",
    "MAX_INFLATED_BYTES",
    "MAX_SECONDS_PER_FILE",
    "MAX_SEQUENCE_DEPTH",
    "Budget",
    "DanglingSymlinkError",
    "HeaderTooLargeError",
    "InflatedTooLargeError",
    "InflatingReader",
    "InputTypeError",
    "LimitError",
    "NotARegularFileError",
    "ReadTimeLimitError",
    "SequenceTooDeepError",
    "SymlinkLoopError",
    "input_type_error",
    "open_regular_file",
    "with_deep_stack",
]
