"""Archives as inputs: ``.zip``, ``.tar``, ``.tar.gz`` / ``.tgz`` of DICOM files, header-only.

Each member of an archive is an input in its own right, named ``ARCHIVE#member/path`` (the
member's full path inside the archive), exported or dead-lettered like a file. Nothing is
ever extracted to disk and member names are never used as local paths.

How much is read, per kind (through any seekable reader, e.g. the ranged Cloud Storage one):

- **ZIP**: the central directory at the end (:func:`list_members`), then per member its local
  header and its DICOM header (:func:`open_member`). A stored member is a window over the
  archive's bytes; a deflated one is inflated only as far as the header reader asks.
- **tar**: the 512-byte member headers, seeking past member data; a member is a window.
- **tar.gz**: cannot be random-accessed, so it is streamed once by one worker
  (:func:`iter_streamed_members`), each member's header parsed as it passes from a buffer
  holding at most that member's header; the rest of the member is skipped by the stream.

Guards (each a dead letter whose error type and message name the limit): members per
archive, compression ratio (judged while inflating, on what is inflated), encrypted
members, compression methods other than stored/deflated, nested archives (not expanded
unless asked for), member names with ``..`` or an absolute path, links and special tar
members. Folders are skipped; a member that is not DICOM is failed by the header reader,
like any file.

Versions (the files table, ``--incremental``): an archive is the unit of change. A member's
version is the archive's own version (from its listing: the object generation, or
``MTIME_NS:SIZE``) followed by what the archive says of the member — ZIP: its CRC-32 and
size from the central directory; tar and ``.tar.gz``: its data offset, size and
modification time (:func:`member_version`). An archive read whole is recorded too (the
``expanded`` outputs). So an archive recorded as read whole in its current version, whose
members were all exported, is skipped without being opened (``pipeline.ledger``), and a
changed archive is read again whole (a ``.tar.gz`` cannot be read in part anyway).

Seams for the pipeline: :class:`ExpandArchives` (listing: an archive → its members, or one
element on the ``streamed`` output for a ``.tar.gz``), :func:`open_input` (reading: a path,
member or not, → a seekable file object) and :func:`iter_streamed_members`.
"""

from __future__ import annotations

import collections
import gzip
import io
import re
import struct
import tarfile
import threading
import zipfile
import zlib
from typing import BinaryIO, Callable, Iterator, NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.header import InstanceError, InstanceHeader, describe_error, read_header

from transforms.listing import archive_kind, is_archive
from transforms.storage import READ_BUFFER_BYTES, InputFile

NAMESPACE = "dicom_bq_export"

#: Separates an archive's path from a member's path in an input's name.
MEMBER_SEPARATOR = "#"
_MEMBER_PATH = re.compile(r"^(.*?\.(?:tar\.gz|tgz|tar|zip))#(.+)$", re.IGNORECASE | re.DOTALL)

#: An archive with more members than this is one dead letter, not expanded.
MAX_MEMBERS = 100_000
#: Inflating more than this many bytes per compressed byte is a zip bomb. Judged on what is
#: actually inflated (a ZIP member's header; a .tar.gz stream so far), never on the sizes an
#: archive declares: a member's pixel data is never inflated, so a blank image or a
#: segmentation mask that deflates 1000:1 is read like any other.
MAX_COMPRESSION_RATIO = 200
#: The ratio is judged once this much has been inflated (small headers compress well).
RATIO_CHECKED_AFTER = 1 << 20
#: The most of one member that is held in memory (its header, inflated or streamed).
MAX_BUFFERED_HEADER = 64 << 20
#: Archives inside archives are expanded at most this deep (with ``nested_archives``).
MAX_NESTING = 3
#: Read-ahead while walking tar headers: one header (with a long-name record) per request.
TAR_HEADER_BUFFER = 2048

_CHUNK = 64 * 1024

#: Separates the archive's version from the member's part in a member's version.
VERSION_SEPARATOR = "|"


def member_version(archive_version: str | None, member: str) -> str | None:
    """A member's version: ``ARCHIVE_VERSION|MEMBER`` (None if the archive's is unknown)."""
    return None if archive_version is None else f"{archive_version}{VERSION_SEPARATOR}{member}"


class ArchiveError(InstanceError):
    """An archive or member that cannot be read as an input; the class name is the error type."""


class CorruptArchiveError(ArchiveError):
    pass


class TooManyMembersError(ArchiveError):
    pass


class CompressionRatioError(ArchiveError):
    pass


class EncryptedMemberError(ArchiveError):
    pass


class UnsupportedCompressionError(ArchiveError):
    pass


class NestedArchiveError(ArchiveError):
    pass


class UnsafeMemberNameError(ArchiveError):
    pass


class UnsupportedMemberTypeError(ArchiveError):
    pass


class DuplicateMemberError(ArchiveError):
    pass


class MemberNotFoundError(ArchiveError):
    pass


class MemberHeaderTooLargeError(ArchiveError):
    pass


# -- names ------------------------------------------------------------------------------------


def member_input_path(archive_path: str, member: str) -> str:
    """The input name of one member: ``ARCHIVE#member/path``."""
    return f"{archive_path}{MEMBER_SEPARATOR}{member}"


def split_member_path(path: str) -> tuple[str, str] | None:
    """``(archive_path, member)`` for ``ARCHIVE#member``, else None.

    The archive is the shortest prefix ending in an archive suffix followed by ``#``, so a
    nested member ``a.zip#inner.tar#x.dcm`` splits into ``a.zip`` and ``inner.tar#x.dcm``.
    """
    match = _MEMBER_PATH.match(path)
    return (match.group(1), match.group(2)) if match else None


def unsafe_name_reason(member: str) -> str | None:
    """Why a member name is refused (absolute, or with a ``..`` component), else None."""
    if member.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", member):
        return "an absolute path"
    if ".." in re.split(r"[/\\]", member):
        return "a '..' component"
    return None


# -- byte windows and bounded inflation -------------------------------------------------------


class _Window(io.RawIOBase):
    """Bytes ``[start, start + size)`` of a seekable raw reader, as a file of its own.

    Reads go to the raw reader clamped to the window, so a member costs what the header
    reader asks for (through the buffer put in front), never the bytes after it; the first
    ``preloaded`` bytes were fetched with the member's local header. Seeking (also to the
    end) reads nothing. Every read seeks first, so windows may share one raw reader.
    """

    def __init__(self, raw: BinaryIO, start: int, size: int, preloaded: bytes = b""):
        self._raw = raw
        self._start = start
        self._size = size
        self._preloaded = preloaded[:size]
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self._size - self._position)
        if count <= 0:
            return 0
        if self._position < len(self._preloaded):
            data = self._preloaded[self._position : self._position + count]
        else:
            data = _read_at(self._raw, self._start + self._position, count)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position


def _read_at(raw: BinaryIO, offset: int, count: int) -> bytes:
    """Up to ``count`` bytes at ``offset`` (fewer only at the end of the file)."""
    raw.seek(offset)
    chunks, left = [], count
    while left > 0:
        chunk = raw.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _raw_of(fileobj: BinaryIO) -> BinaryIO:
    """The unbuffered reader under a buffered one: members bring their own buffer, sized
    to the member, so that a small member does not cost a full read-ahead of the archive."""
    return fileobj.raw if isinstance(fileobj, io.BufferedReader) else fileobj


class _ForwardBuffer(io.RawIOBase):
    """A member read from a forward-only source, seekable within what it has read.

    The source yields the member's bytes in order (an inflater, a tar stream). Everything
    read so far is kept, up to ``MAX_BUFFERED_HEADER`` — in practice the member's header,
    because the header reader stops at Pixel Data. Seeking (to the end too: the size is
    known) reads nothing; reading further pulls from the source. ``fill`` returns the next
    bytes (at most ``wanted``), or ``b""`` at the end.
    """

    def __init__(self, fill: Callable[[int], bytes], size: int, what: str):
        self._fill = fill
        self._size = size
        self._what = what
        self._buffer = bytearray()
        self._position = 0
        self._ended = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.closed:
            raise ValueError("the member has been passed: its bytes are no longer available")
        end = min(self._position + len(buffer), self._size)
        while len(self._buffer) < end and not self._ended:
            if end > MAX_BUFFERED_HEADER:
                raise MemberHeaderTooLargeError(
                    f"{self._what}: reading it needs more than {MAX_BUFFERED_HEADER >> 20} MiB held in memory "
                    f"(the limit for a compressed or streamed member's header)"
                )
            data = self._fill(_CHUNK)  # small steps: the ratio guard sees each
            if not data:
                self._ended = True
            self._buffer += data
        data = self._buffer[self._position : end]
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position


class _Inflater:
    """Raw deflate data → inflated bytes on demand, failing a zip bomb while inflating.

    The ratio of bytes produced to compressed bytes consumed is checked as it grows, so a
    member whose headers understate its size is caught as surely as an honest one.
    """

    def __init__(self, compressed: BinaryIO, what: str, max_ratio: float):
        self._compressed = compressed
        self._what = what
        self._max_ratio = max_ratio
        self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        self._pending = b""
        self._consumed = 0
        self._produced = 0

    def __call__(self, wanted: int) -> bytes:
        while True:
            if not self._pending:
                if self._inflate.eof:
                    return b""
                self._pending = self._compressed.read(_CHUNK)
                if not self._pending:
                    return self._inflate.flush()
            fed = len(self._pending)
            try:
                data = self._inflate.decompress(self._pending, wanted)
            except zlib.error as error:
                raise CorruptArchiveError(f"{self._what}: its deflated data is corrupt ({error})") from None
            self._pending = self._inflate.unconsumed_tail
            self._consumed += fed - len(self._pending) - len(self._inflate.unused_data)
            self._produced += len(data)
            if self._inflate.eof:
                self._pending = b""
            check_ratio(self._produced, self._consumed, self._what, self._max_ratio)
            if data or self._inflate.eof:
                return data


def check_ratio(produced: int, consumed: int, what: str, max_ratio: float = MAX_COMPRESSION_RATIO) -> None:
    """Raise :class:`CompressionRatioError` if ``produced`` bytes from ``consumed`` is a bomb."""
    if produced > RATIO_CHECKED_AFTER and produced > max_ratio * max(consumed, 1):
        raise CompressionRatioError(
            f"{what}: inflates more than {max_ratio:g} times its compressed size "
            f"(the compression ratio limit: a zip bomb?)"
        )


# -- listing ----------------------------------------------------------------------------------


class _Member(NamedTuple):
    """Where one member's bytes are, as found by listing (no name: the rest of a damaged
    archive, dead-lettered under the archive's own path)."""

    name: str | None
    size: int
    error: ArchiveError | None
    offset: int = 0  # ZIP: the local header; tar: the data
    compressed_size: int = 0
    method: int = zipfile.ZIP_STORED
    identity: str = ""  # what the archive says of the member's content (its version part)


def _member_error(name: str, nested_archives: bool, depth: int) -> ArchiveError | None:
    reason = unsafe_name_reason(name)
    if reason:
        return UnsafeMemberNameError(f"the member name is {reason}: not read (never used as a path)")
    if is_archive(name) and (not nested_archives or depth + 1 >= MAX_NESTING):
        if nested_archives:
            return NestedArchiveError(f"an archive nested more than {MAX_NESTING} deep is not expanded")
        return NestedArchiveError("the member is itself an archive: not expanded (--nested-archives expands it)")
    return None


def _duplicate() -> DuplicateMemberError:
    return DuplicateMemberError("the archive holds an earlier member of the same name: only that one is read")


def _zip_members(fileobj: BinaryIO, max_members: int, nested_archives: bool, depth: int) -> list[_Member]:
    try:
        infos = zipfile.ZipFile(fileobj).infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, struct.error) as error:
        raise CorruptArchiveError(f"not a readable ZIP archive ({error})") from None
    if len(infos) > max_members:
        raise TooManyMembersError(
            f"the archive has {len(infos):,} members, more than the limit of {max_members:,} per archive"
        )
    members, seen = [], set()
    for info in infos:
        if info.is_dir():
            continue
        name, error = info.filename, _member_error(info.filename, nested_archives, depth)
        if error is None and name in seen:
            error = _duplicate()
        elif error is None and info.flag_bits & 0x1:
            error = EncryptedMemberError("the member is encrypted: encrypted members are not read")
        elif error is None and info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            error = UnsupportedCompressionError(
                f"the member is compressed with method {info.compress_type}: only stored (0) and deflated (8) are read"
            )
        seen.add(name)
        members.append(_Member(name, info.file_size, error, info.header_offset, info.compress_size, info.compress_type,
                               f"zip:{info.CRC:08x}:{info.file_size}"))
    return members


def _tar_error(info: tarfile.TarInfo) -> ArchiveError | None:
    if info.issym() or info.islnk():
        return UnsupportedMemberTypeError("the member is a link: links are not followed")
    if info.issparse():
        return UnsupportedMemberTypeError("the member is a sparse file: not read")
    if not info.isfile():
        return UnsupportedMemberTypeError("the member is a device, FIFO or other special file: not read")
    return None


class _Borrowed(io.RawIOBase):
    """Another reader's raw stream, used for a while and left open."""

    def __init__(self, raw):
        self._raw = raw

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._raw.readinto(buffer)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


def _tar_identity(info: tarfile.TarInfo) -> str:
    """A tar member's version part: its data offset, size and modification time (tar
    keeps no checksum of the content)."""
    return f"tar:{info.offset_data}:{info.size}:{int(info.mtime)}"


def _tar_members(fileobj: BinaryIO, max_members: int, nested_archives: bool, depth: int) -> list[_Member]:
    if isinstance(fileobj, io.BufferedReader):  # one small read per header, not a full buffer
        raw = fileobj.raw
        position = raw.tell()
        try:
            small = io.BufferedReader(_Borrowed(raw), buffer_size=TAR_HEADER_BUFFER)
            return _walk_tar(small, max_members, nested_archives, depth)
        finally:
            raw.seek(position)  # where the caller's buffered reader believes it is
    return _walk_tar(fileobj, max_members, nested_archives, depth)


def _walk_tar(fileobj: BinaryIO, max_members: int, nested_archives: bool, depth: int) -> list[_Member]:
    members, seen = [], set()
    try:
        archive = tarfile.open(fileobj=fileobj, mode="r:")
        for info in archive:
            if info.isdir():
                continue
            if len(members) >= max_members:
                raise TooManyMembersError(f"the archive has more than the limit of {max_members:,} members per archive")
            error = _member_error(info.name, nested_archives, depth) or _tar_error(info)
            if error is None and info.name in seen:
                error = _duplicate()
            seen.add(info.name)
            members.append(_Member(info.name, info.size, error, info.offset_data, identity=_tar_identity(info)))
        fileobj.seek(archive.offset)  # tarfile ends quietly at a damaged header: say so
        if fileobj.read(tarfile.BLOCKSIZE).strip(b"\0"):
            members.append(_Member(None, 0, CorruptArchiveError(
                f"a damaged member header after {len(members):,} members: the rest of the archive is not read"
            )))
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        raise CorruptArchiveError(f"not a readable tar archive ({error})") from None
    return members


def _list(fileobj: BinaryIO, kind: str, max_members: int, nested_archives: bool, depth: int) -> list[_Member]:
    if kind == "zip":
        return _zip_members(fileobj, max_members, nested_archives, depth)
    return _tar_members(fileobj, max_members, nested_archives, depth)


def list_members(
    fileobj: BinaryIO,
    archive_path: str,
    *,
    max_members: int = MAX_MEMBERS,
    nested_archives: bool = False,
    depth: int = 0,
    version: str | None = None,
) -> list[InputFile]:
    """The members of a ZIP or tar archive (seekable), as inputs ``ARCHIVE#member``,
    versioned by the archive's ``version`` (:func:`member_version`).

    Folders are skipped. A member a guard refuses is an :class:`InputFile` with ``error``
    set. An archive that cannot be listed raises :class:`ArchiveError` (its dead letter).
    The listing is cached (see :func:`open_member`), so members opened later on this
    worker cost no second listing. A tar damaged after its first members lists those,
    then the archive itself with ``error`` set: the rest cannot be read.
    """
    kind = archive_kind(archive_path)
    if kind not in ("zip", "tar"):
        raise ValueError(f"not a random-access archive name: {archive_path}")
    members = _list(fileobj, kind, max_members, nested_archives, depth)
    _INDEX.put(archive_path, kind, members)
    return [
        InputFile(
            archive_path if m.name is None else member_input_path(archive_path, m.name),
            m.size,
            None if m.error is None else (type(m.error).__name__, str(m.error)),
            version if m.name is None else member_version(version, m.identity),
        )
        for m in members
    ]


class _IndexCache:
    """Recent archives' member locations on this worker, so that opening each member of
    an archive does not list it again. Bounded by the number of members held."""

    def __init__(self, max_members: int = 4 * MAX_MEMBERS):
        self._max = max_members
        self._held = 0
        self._archives: collections.OrderedDict[str, tuple[str, dict]] = collections.OrderedDict()
        self._lock = threading.Lock()  # bundles run in threads of one worker

    def get(self, archive_path: str):
        with self._lock:
            entry = self._archives.get(archive_path)
            if entry is not None:
                self._archives.move_to_end(archive_path)
            return entry

    def put(self, archive_path: str, kind: str, members: list[_Member]) -> tuple[str, dict]:
        index = {}
        for member in members:
            if member.name is not None:
                index.setdefault(member.name, member)
        with self._lock:
            if archive_path in self._archives:
                self._held -= len(self._archives.pop(archive_path)[1])
            while self._archives and self._held + len(index) > self._max:
                self._held -= len(self._archives.popitem(last=False)[1][1])
            self._archives[archive_path] = (kind, index)
            self._held += len(index)
        return kind, index

    def clear(self) -> None:
        with self._lock:
            self._archives.clear()
            self._held = 0


_INDEX = _IndexCache()

# -- opening one member -----------------------------------------------------------------------


def open_member(
    archive_fileobj: BinaryIO,
    member_name: str,
    archive_path: str,
    *,
    nested_archives: bool = False,
    max_ratio: float = MAX_COMPRESSION_RATIO,
    depth: int = 0,
) -> BinaryIO:
    """A seekable file object over one member of a ZIP or tar archive, for ``read_header``.

    A stored ZIP member or a tar member is a window over the archive's bytes (only the
    ranges read are fetched); a deflated one is inflated as far as it is read, with the
    compression ratio checked while inflating. Seeking to the end reads nothing. Closing
    the member does not close ``archive_fileobj``. The archive is listed on first use on
    this worker and its index kept (``archive_path`` is the key). Raises
    :class:`ArchiveError` for a member that is absent or refused by a guard.
    """
    kind = archive_kind(archive_path)
    cached = _INDEX.get(archive_path)
    if cached is None:
        if kind not in ("zip", "tar"):
            raise ValueError(f"not a random-access archive name: {archive_path}")
        cached = _INDEX.put(
            archive_path, kind, _list(archive_fileobj, kind, MAX_MEMBERS, nested_archives, depth)
        )
    kind, index = cached
    member = index.get(member_name)
    if member is None:
        raise MemberNotFoundError("the archive has no member of that name")
    if member.error is not None:
        raise member.error
    raw = _raw_of(archive_fileobj)
    if kind == "tar":
        return io.BufferedReader(_Window(raw, member.offset, member.size), READ_BUFFER_BYTES)
    stored = member.method == zipfile.ZIP_STORED
    length = member.size if stored else member.compressed_size
    # one read: the local header (its name and extra field are rarely over 1 KiB) and data
    head = _read_at(raw, member.offset, min(READ_BUFFER_BYTES, zipfile.sizeFileHeader + 1024 + length))
    if len(head) < zipfile.sizeFileHeader or head[:4] != zipfile.stringFileHeader:
        raise CorruptArchiveError("the member's local header is missing or damaged")
    fields = struct.unpack(zipfile.structFileHeader, head[: zipfile.sizeFileHeader])
    name_length, extra_length = fields[10], fields[11]  # APPNOTE 4.3.7: the local header's last two
    skip = zipfile.sizeFileHeader + name_length + extra_length
    window = _Window(raw, member.offset + skip, length, head[skip:])
    if stored:
        return io.BufferedReader(window, READ_BUFFER_BYTES)
    return _ForwardBuffer(_Inflater(window, "the member", max_ratio), member.size, "the member")


def open_input(
    path: str,
    open_file: Callable[[str], BinaryIO],
    *,
    expand_archives: bool = True,
    nested_archives: bool = False,
    max_ratio: float = MAX_COMPRESSION_RATIO,
) -> BinaryIO:
    """Open an input by name: a plain file through ``open_file(path)``, or for
    ``ARCHIVE#member`` the archive through ``open_file(ARCHIVE)`` and then the member
    (nested members ``A.zip#B.tar#m`` too). Closing the result closes the archive.

    ``open_file`` returns a seekable binary file object of the whole file (``SEEK_END``
    must work: a ZIP is listed from its end), e.g. the buffered, counted ranged reader.
    """
    parts = split_member_path(path) if expand_archives else None
    if parts is None:
        return open_file(path)
    archive_path, rest = parts
    fileobj = open_file(archive_path)
    try:
        return _open_nested(fileobj, archive_path, rest, nested_archives, max_ratio, 0, fileobj)
    except BaseException:
        fileobj.close()
        raise


def _open_nested(fileobj, archive_path, rest, nested_archives, max_ratio, depth, owner):
    inner = split_member_path(rest) if nested_archives else None
    if inner is None:
        member = open_member(fileobj, rest, archive_path, nested_archives=nested_archives,
                             max_ratio=max_ratio, depth=depth)
        return _Owned(member, owner)
    inner_name, inner_rest = inner
    if depth + 1 >= MAX_NESTING:
        raise NestedArchiveError(f"an archive nested more than {MAX_NESTING} deep is not expanded")
    inner_fileobj = open_member(fileobj, inner_name, archive_path, nested_archives=True,
                                max_ratio=max_ratio, depth=depth)
    return _open_nested(inner_fileobj, member_input_path(archive_path, inner_name), inner_rest,
                        nested_archives, max_ratio, depth + 1, owner)


class _Owned(io.RawIOBase):
    """A member's file object that closes the archive's reader when closed."""

    def __init__(self, member: BinaryIO, owner: BinaryIO):
        self._member = member
        self._owner = owner

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._member.readinto(buffer)

    def read(self, size: int = -1) -> bytes:
        return self._member.read(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._member.seek(offset, whence)

    def tell(self) -> int:
        return self._member.tell()

    def close(self) -> None:
        if not self.closed:
            self._member.close()
            self._owner.close()
        super().close()


# -- streamed .tar.gz -------------------------------------------------------------------------


class _CountingSource(io.RawIOBase):
    """Counts the compressed bytes the gzip reader has consumed (for the ratio guard)."""

    def __init__(self, fileobj: BinaryIO):
        self._fileobj = fileobj
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._fileobj.read(len(buffer))
        buffer[: len(data)] = data
        self.consumed += len(data)
        return len(data)


class _RatioGuarded(io.RawIOBase):
    """An inflated stream that fails as soon as it has produced too much for what it consumed,
    so a gzip bomb is stopped while inflating, even inside a member being skipped."""

    def __init__(self, inflated: BinaryIO, source: _CountingSource, max_ratio: float):
        self._inflated = inflated
        self._source = source
        self._max_ratio = max_ratio
        self.produced = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._inflated.read(len(buffer))
        buffer[: len(data)] = data
        self.produced += len(data)
        check_ratio(self.produced, self._source.consumed, "the archive", self._max_ratio)
        return len(data)


class StreamArchive(NamedTuple):
    """An archive to stream once, whole, by one worker (a ``.tar.gz``)."""

    input_file: InputFile


def iter_streamed_members(
    fileobj: BinaryIO,
    archive_path: str,
    *,
    max_members: int = MAX_MEMBERS,
    max_ratio: float = MAX_COMPRESSION_RATIO,
    version: str | None = None,
) -> Iterator[tuple[InputFile, InstanceHeader | Exception]]:
    """Stream a ``.tar.gz`` once, parsing each member's header as it passes.

    Yields ``(InputFile(ARCHIVE#member, size), header)`` for a member whose header was
    read, or ``(InputFile, error)`` for one that failed (not DICOM, a guard…). The header
    is parsed from a buffer holding only what the reader asked for (at most the member's
    header); its deferred values stay readable (``header.read_deferred`` and so
    ``flatten_instance``) **until the iterator is advanced**, so convert before asking for
    the next member. The rest of each member is skipped by the stream, never held.

    A stream that breaks, exceeds the member limit or inflates past the ratio limit ends
    with ``(InputFile(ARCHIVE, 0), error)``: one dead letter for the rest of the archive.
    Nested archives are not expanded from a stream (a dead letter each).
    """
    source = _CountingSource(fileobj)
    archive_input = InputFile(archive_path, 0, version=version)
    count = 0
    try:
        inflated = _RatioGuarded(gzip.GzipFile(fileobj=source, mode="rb"), source, max_ratio)
        stream = tarfile.open(fileobj=inflated, mode="r|")
        for info in stream:
            if info.isdir():
                continue
            count += 1
            if count > max_members:
                yield archive_input, TooManyMembersError(
                    f"the archive has more than the limit of {max_members:,} members per archive"
                )
                return
            member = InputFile(member_input_path(archive_path, info.name), info.size,
                               version=member_version(version, _tar_identity(info)))
            error = _member_error(info.name, False, 0) or _tar_error(info)
            if error is not None:
                if isinstance(error, NestedArchiveError):
                    error = NestedArchiveError("the member is itself an archive: not expanded from a .tar.gz stream")
                yield member, error
                continue
            data = stream.extractfile(info)
            broken: list[Exception] = []

            def fill(wanted: int, data=data, broken=broken) -> bytes:
                try:
                    return data.read(wanted)
                except Exception as failure:  # the stream itself: ends the archive
                    broken.append(failure)
                    raise

            buffer = _ForwardBuffer(fill, info.size, "the member")
            try:
                outcome: InstanceHeader | Exception = read_header(buffer)
            except Exception as failure:
                if broken:
                    raise broken[0] from None
                outcome = failure
            yield member, outcome
            buffer.close()
    except ArchiveError as error:
        yield archive_input, error
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        yield archive_input, CorruptArchiveError(f"not a readable .tar.gz archive ({error})")


# -- Beam: listing ----------------------------------------------------------------------------

#: Tag of :class:`ExpandArchives`'s output of archives to stream (``.tar.gz``).
STREAMED = "streamed"
#: Tag of the archives read whole (every member listed, or streamed to the end): the files
#: table records them with the outcome ``archive`` (``pipeline.ledger``).
EXPANDED = "expanded"


def expand_archive(
    input_file: InputFile,
    open_file: Callable[[str], BinaryIO],
    *,
    expand_archives: bool = True,
    nested_archives: bool = False,
    max_members: int = MAX_MEMBERS,
    max_ratio: float = MAX_COMPRESSION_RATIO,
) -> Iterator[InputFile | StreamArchive]:
    """What one listed input becomes: itself (not an archive, or expansion off), its
    members (ZIP, tar; nested archives too with ``nested_archives``), a
    :class:`StreamArchive` for a ``.tar.gz`` to stream, or itself with ``error`` set if the archive
    cannot be listed. Pure: ``open_file(path)`` opens a whole file, as in :func:`open_input`.
    """
    kind = archive_kind(input_file.path) if expand_archives else None
    if kind is None or input_file.error is not None:
        yield input_file
        return
    if kind == "tar.gz":
        yield StreamArchive(input_file)
        return
    yield from _expand(input_file, open_file, nested_archives, max_members, max_ratio, 0)


def _expand(input_file, open_file, nested_archives, max_members, max_ratio, depth):
    try:
        fileobj = open_input(input_file.path, open_file, nested_archives=nested_archives, max_ratio=max_ratio)
        with fileobj:
            members = list_members(fileobj, input_file.path, max_members=max_members,
                                   nested_archives=nested_archives, depth=depth, version=input_file.version)
    except Exception as error:
        yield input_file._replace(error=(type(error).__name__, describe_error(error)))
        return
    for member in members:
        kind = archive_kind(member.path) if member.error is None else None
        if kind == "tar.gz":
            yield StreamArchive(member)
        elif kind is not None:
            yield from _expand(member, open_file, nested_archives, max_members, max_ratio, depth + 1)
        else:
            yield member


class ExpandArchives(beam.DoFn):
    """Listed inputs → inputs to read: each ZIP or tar archive becomes its members
    (``ARCHIVE#member``); a ``.tar.gz`` goes to the ``streamed`` output, to be streamed by
    one worker (:func:`iter_streamed_members`); anything else passes through. An archive
    that cannot be listed passes through with ``error`` set (its dead letter).

    ``opener`` has ``open(InputFile) -> (file object, counter)`` (transforms.storage's
    ``Opener``); the bytes its listing reads are added to ``bytes_read``.
    """

    def __init__(self, opener=None, *, expand_archives: bool = True, nested_archives: bool = False,
                 max_members: int = MAX_MEMBERS, max_ratio: float = MAX_COMPRESSION_RATIO):
        self._opener = opener
        self._options = dict(expand_archives=expand_archives, nested_archives=nested_archives,
                             max_members=max_members, max_ratio=max_ratio)
        self.archives = Metrics.counter(NAMESPACE, "archives_expanded")
        self.members = Metrics.counter(NAMESPACE, "archive_members")
        self.bytes_read = Metrics.counter(NAMESPACE, "bytes_read")
        # an archive was counted as one file matched; its members replace it (a streamed
        # .tar.gz's members are counted as they pass)
        self.matched = Metrics.counter(NAMESPACE, "files_matched")

    def setup(self):
        if self._opener is None:
            from transforms.storage import Opener

            self._opener = Opener()

    def _open_file(self, path: str) -> BinaryIO:
        fileobj, counting = self._opener.open(InputFile(path, self._sizes.get(path, 0)))
        self._counters.append(counting)
        return fileobj

    def process(self, input_file: InputFile):
        self._sizes = {input_file.path: input_file.size}
        self._counters = []
        expanded = False
        whole = archive_kind(input_file.path) is not None and self._options["expand_archives"]
        inputs = 0
        for output in expand_archive(input_file, self._open_file, **self._options):
            if isinstance(output, StreamArchive):
                whole = whole and output.input_file.path != input_file.path  # streamed: recorded there
                yield beam.pvalue.TaggedOutput(STREAMED, output.input_file)
            else:
                inputs += 1
                if output.path != input_file.path:
                    expanded = True
                    self.members.inc()
                else:
                    whole = False  # not expanded, or failed (its dead letter)
                yield output
        if whole:
            yield beam.pvalue.TaggedOutput(EXPANDED, input_file)
        if inputs != 1:
            self.matched.inc(inputs - 1)
        if expanded:
            self.archives.inc()
        self.bytes_read.inc(sum(c.bytes_read for c in self._counters))


#: Tag of :class:`ReadStreamedArchives`'s output of the inputs it read (for the files table).
STREAMED_INPUTS = "streamed_inputs"


class ReadStreamedArchives(beam.DoFn):
    """A ``.tar.gz`` (an ``InputFile`` of :class:`ExpandArchives`'s ``streamed`` output) →
    an ``Instance`` per member (main output) or a dead letter (``DEAD_LETTERS``), each
    member's header converted as it passes (:func:`iter_streamed_members`), selected by the
    filter file (a side input) by its header's UIDs, and counted like a file. Every member
    read (or the archive itself, if it fails as a whole) is also an ``InputFile`` on the
    ``streamed_inputs`` output: the files table records it like a file.
    """

    def __init__(self, opener=None, run_started: str | None = None, reporter=None, *,
                 max_members: int = MAX_MEMBERS, max_ratio: float = MAX_COMPRESSION_RATIO):
        from transforms.sources.outcomes import Outcomes

        self._opener = opener
        self._limits = dict(max_members=max_members, max_ratio=max_ratio)
        self.outcomes = Outcomes(run_started, reporter)
        self.streamed = Metrics.counter(NAMESPACE, "archives_streamed")

    def setup(self):
        from transforms.header import silence_pydicom

        silence_pydicom()
        if self._opener is None:
            from transforms.storage import Opener

            self._opener = Opener()

    def process(self, input_file: InputFile, filter_file=None):
        from schemas.convert import flatten_instance
        from transforms.flatten import CONVERT, READ

        outcomes = self.outcomes
        self.streamed.inc()  # the archive was uncounted from files_matched when expanded: its members count
        counting = None
        try:
            fileobj, counting = self._opener.open(input_file)
        except Exception as error:
            outcomes.seen()
            yield beam.pvalue.TaggedOutput(STREAMED_INPUTS, input_file)
            yield outcomes.failed(input_file.path, READ, type(error).__name__, describe_error(error))
            return
        try:
            with fileobj:
                members = iter_streamed_members(fileobj, input_file.path, version=input_file.version, **self._limits)
                whole = True
                for member, outcome in members:
                    outcomes.seen()
                    whole = whole and member.path != input_file.path  # else the stream broke: a dead letter
                    yield beam.pvalue.TaggedOutput(STREAMED_INPUTS, member)
                    if isinstance(outcome, Exception):
                        yield outcomes.failed(member.path, READ, type(outcome).__name__, describe_error(outcome))
                        continue
                    lines = outcomes.selected_lines(outcome.uids, filter_file)
                    if lines is None:
                        continue
                    try:  # before the stream moves on: the header's deferred values are readable until then
                        flattened = flatten_instance(
                            outcome.dataset, pixel_data_tag=outcome.pixel_data_tag, read_deferred=outcome.read_deferred
                        )
                    except Exception as error:
                        yield outcomes.failed(member.path, CONVERT, type(error).__name__, describe_error(error))
                        continue
                    yield outcomes.succeeded(flattened, lines, member.path)
            if whole:
                yield beam.pvalue.TaggedOutput(EXPANDED, input_file)
        finally:
            outcomes.bytes_read(counting.bytes_read)

    def finish_bundle(self):
        self.outcomes.flush()


class ArchiveInputs(NamedTuple):
    """What :class:`ExpandArchiveInputs` gives: the inputs to read (members of ZIP and tar
    archives, and every other input), and from the streamed ``.tar.gz`` archives their
    instances, dead letters and the members read (for the files table)."""

    files: beam.PCollection
    instances: beam.PCollection
    dead_letters: beam.PCollection
    streamed_inputs: beam.PCollection
    expanded: beam.PCollection  # the archives read whole (InputFiles), recorded with the outcome "archive"


class ExpandArchiveInputs(beam.PTransform):
    """Listed inputs → :class:`ArchiveInputs`.

    ZIP and tar archives become their members (read later through the opener, spread over
    the workers with the other inputs); each ``.tar.gz`` is streamed by one worker
    (:class:`ReadStreamedArchives`, with the filter file as ``filter_side_inputs``).
    """

    def __init__(self, opener, *, nested_archives: bool = False, run_started: str | None = None,
                 reporter=None, filter_side_inputs=()):
        super().__init__()
        self._opener = opener
        self._nested = nested_archives
        self._run_started = run_started
        self._reporter = reporter
        self._side_inputs = list(filter_side_inputs)

    def expand(self, files):
        from transforms.flatten import DEAD_LETTERS

        expanded = files | "Expand" >> beam.ParDo(
            ExpandArchives(self._opener, nested_archives=self._nested)
        ).with_outputs(STREAMED, EXPANDED, main="files")
        streamed = (
            expanded[STREAMED]
            | "SpreadArchives" >> beam.Reshuffle()
            | "StreamArchives" >> beam.ParDo(
                ReadStreamedArchives(self._opener, self._run_started, self._reporter), *self._side_inputs
            ).with_outputs(DEAD_LETTERS, STREAMED_INPUTS, EXPANDED, main="instances")
        )
        whole = (expanded[EXPANDED], streamed[EXPANDED]) | "ArchivesReadWhole" >> beam.Flatten()
        return ArchiveInputs(expanded.files, streamed.instances, streamed[DEAD_LETTERS], streamed[STREAMED_INPUTS], whole)


__all__ = [
    "ArchiveError",
    "ArchiveInputs",
    "EXPANDED",
    "STREAMED_INPUTS",
    "VERSION_SEPARATOR",
    "member_version",
    "ExpandArchiveInputs",
    "ReadStreamedArchives",
    "CompressionRatioError",
    "CorruptArchiveError",
    "DuplicateMemberError",
    "EncryptedMemberError",
    "ExpandArchives",
    "MAX_COMPRESSION_RATIO",
    "MAX_MEMBERS",
    "MemberHeaderTooLargeError",
    "MemberNotFoundError",
    "NestedArchiveError",
    "STREAMED",
    "StreamArchive",
    "TooManyMembersError",
    "UnsafeMemberNameError",
    "UnsupportedCompressionError",
    "UnsupportedMemberTypeError",
    "archive_kind",
    "expand_archive",
    "is_archive",
    "iter_streamed_members",
    "list_members",
    "member_input_path",
    "open_input",
    "open_member",
    "split_member_path",
    "unsafe_name_reason",
]
