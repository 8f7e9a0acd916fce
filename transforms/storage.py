"""Byte access to inputs: the reference to one input, local files, ranged Cloud Storage
reads, and a raw reader that counts what was really transferred.

Reading goes through a :data:`READ_BUFFER_BYTES` buffer over a raw reader that fetches
only what is asked for. On Cloud Storage that raw reader issues ranged GETs through the
storage client Beam itself configures, so a header of a few KB costs one small request,
not the whole object, and ``bytes_read`` counts what was transferred.

:meth:`Opener.open` is the single dispatch point of byte access, so that whatever
concurrency the read step has applies to every source: a path ``ARCHIVE#member`` opens
the member through :mod:`transforms.sources.archives` (the archive itself through this
opener), a DICOMweb instance URL streams its retrieve through
:mod:`transforms.sources.dicomweb`. Those modules are imported on first use only: this
module sits at the bottom of the imports (listing, sources and the flatten step all use
it).
"""

from __future__ import annotations

import io
from typing import NamedTuple

from transforms.limits import open_regular_file

#: Read-ahead of the buffer in front of every file: one request covers most headers.
READ_BUFFER_BYTES = 64 * 1024


class InputFile(NamedTuple):
    """One input to read. ``error`` = ``(error_type, message)`` is set by listing for an
    input that must become a dead letter (stage ``list``) without being opened."""

    path: str
    size: int
    error: tuple[str, str] | None = None


class CountingRaw(io.RawIOBase):
    """A raw reader that counts the bytes it delivers (what was read from storage)."""

    def __init__(self, raw):
        self._raw = raw
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._raw.readinto(buffer)
        self.bytes_read += count or 0
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def close(self) -> None:
        self._raw.close()
        super().close()


class RangedBlob(io.RawIOBase):
    """A Cloud Storage object read by ranged GETs, exactly the ranges asked for.

    ``size`` None (an archive opened for one of its members, whose listing gave the
    member's size, not the archive's): reads ask for what is wanted and stop at the
    object's end; the size is fetched (one metadata request) only for ``SEEK_END``.
    """

    def __init__(self, blob, size: int | None):
        self._blob = blob
        self._size = size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = len(buffer) if self._size is None else min(len(buffer), self._size - self._position)
        if count <= 0:
            return 0
        try:
            data = self._blob.download_as_bytes(
                start=self._position, end=self._position + count - 1, raw_download=True, checksum=None
            )
        except Exception as error:  # past the end of an object of unknown size: HTTP 416
            if self._size is None and getattr(error, "code", None) == 416:
                return 0
            raise
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self._position = offset
        elif whence == io.SEEK_CUR:
            self._position += offset
        else:
            if self._size is None:
                self._blob.reload()
                self._size = self._blob.size
            self._position = self._size + offset
        return self._position

    def tell(self) -> int:
        return self._position


class _Counters:
    """The counters of the files one input opened (an archive member: the archive)."""

    def __init__(self):
        self.parts: list = []

    @property
    def bytes_read(self) -> int:
        return sum(part.bytes_read for part in self.parts)


class Opener:
    """Opens inputs for header reads; one per DoFn instance (holds the GCS client,
    created on first use and kept as long as the worker).

    ``expand_archives`` False (``--no-archives``): ``ARCHIVE#member`` is a plain path.
    ``nested_archives``: members of archives inside archives are opened too.
    """

    def __init__(self, pipeline_options=None, *, expand_archives: bool = True, nested_archives: bool = False):
        self._options = pipeline_options
        self._storage = None
        self.expand_archives = expand_archives
        self.nested_archives = nested_archives

    def open(self, input_file: InputFile):
        """``(file object, counter)``; ``counter.bytes_read`` is what came from storage
        (for a DICOMweb instance, the bytes received; its ``counts`` are the requests and
        retries it took)."""
        path = input_file.path
        if path.startswith("dicomweb+"):
            from transforms.sources import dicomweb

            return dicomweb.open_counted(path)
        if self.expand_archives and "#" in path:
            from transforms.sources import archives

            if archives.split_member_path(path) is not None:
                counters = _Counters()

                def open_file(archive_path: str):
                    fileobj, counter = self._open_file(InputFile(archive_path, None))
                    counters.parts.append(counter)
                    return fileobj

                fileobj = archives.open_input(path, open_file, nested_archives=self.nested_archives)
                return fileobj, counters
        return self._open_file(input_file)

    def _open_file(self, input_file: InputFile):
        """A whole file (local, gs:// or another filesystem Beam knows), buffered and counted."""
        path = input_file.path
        if path.startswith("gs://"):
            raw = RangedBlob(self._blob(path), input_file.size)
        elif "://" in path:  # other filesystems Beam knows: their own reader, counted
            from apache_beam.io.filesystems import FileSystems

            raw = FileSystems.open(path)
        else:
            raw = open_regular_file(path)  # never a FIFO or device, even if listing missed it
        counting = CountingRaw(raw)
        return io.BufferedReader(counting, buffer_size=READ_BUFFER_BYTES), counting

    def _blob(self, path: str):
        if self._storage is None:
            from apache_beam.io.gcp import gcsio
            from apache_beam.options.pipeline_options import PipelineOptions

            self._storage = gcsio.create_storage_client(self._options or PipelineOptions([]))
        bucket, name = path[len("gs://"):].split("/", 1)
        return self._storage.bucket(bucket).blob(name)
