"""Byte access to inputs: the reference to one input, local files, ranged Cloud Storage
reads, and a raw reader that counts what was really transferred.

Reading goes through a :data:`READ_BUFFER_BYTES` buffer over a raw reader that fetches
only what is asked for. On Cloud Storage that raw reader issues ranged GETs through the
storage client Beam itself configures, so a header of a few KB costs one small request,
not the whole object, and ``bytes_read`` counts what was transferred.

This module sits at the bottom of the imports: listing, sources and the flatten step
all use it, and it uses none of them.
"""

from __future__ import annotations

import io
from typing import NamedTuple

from transforms.limits import open_regular_file

#: Read-ahead of the buffer in front of every file: one request covers most headers.
READ_BUFFER_BYTES = 64 * 1024


class InputFile(NamedTuple):
    """One input to read. ``error`` = ``(error_type, message)`` is set by listing for an
    input that must become a dead letter (stage ``list``) without being opened.
    ``version`` identifies this content of the path, from the listing itself (the object
    generation on Cloud Storage, ``MTIME_NS:SIZE`` locally; None where unknown): the
    files table and ``--incremental`` compare it (see :mod:`pipeline.ledger`)."""

    path: str
    size: int
    error: tuple[str, str] | None = None
    version: str | None = None


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
    """A Cloud Storage object read by ranged GETs, exactly the ranges asked for."""

    def __init__(self, blob, size: int):
        self._blob = blob
        self._size = size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self._size - self._position)
        if count <= 0:
            return 0
        data = self._blob.download_as_bytes(
            start=self._position, end=self._position + count - 1, raw_download=True, checksum=None
        )
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self._position = offset
        elif whence == io.SEEK_CUR:
            self._position += offset
        else:
            self._position = self._size + offset
        return self._position

    def tell(self) -> int:
        return self._position


class Opener:
    """Opens input files for header reads; one per DoFn instance (holds the GCS client,
    created on first use and kept as long as the worker)."""

    def __init__(self, pipeline_options=None):
        self._options = pipeline_options
        self._storage = None

    def open(self, input_file: InputFile):
        """``(file object, counter)``; ``counter.bytes_read`` is what came from storage."""
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
