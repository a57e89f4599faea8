"""Large values staged outside the store's thread: written together, each from a block
boundary, to one file per request and made durable before their transaction (`Staged`),
and their bytes kept warm for a while after (`WarmBytes`)."""
from __future__ import annotations

import errno
import fcntl
import itertools
import mmap
import os
import tempfile
import threading
from collections import OrderedDict

from ZODB.blob import Blob

#: the size of the aligned buffer through which staged files are written.
_CHUNK = 1 << 20
_ALIGN = 4096
_buffers = threading.local()
_links = itertools.count()


def write_durably(fd: int, values: list[bytes]) -> list[int]:
    """Write `values` to the new, empty file `fd`, each from a block boundary, fsync it and
    return their offsets.  Whole blocks bypass the page cache (O_DIRECT) where the file
    system allows: on this kind of VM, filling fresh page-cache pages cost the server more
    than all the rest of a large payload's path."""
    try:
        return _write_blocks(fd, values, direct=True)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    # A file system without direct I/O (tmpfs, some network ones): through the page cache.
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    return _write_blocks(fd, values, direct=False)


def _write_blocks(fd: int, values: list[bytes], direct: bool) -> list[int]:
    """Copy `values` (each padded to a block boundary but the last) through an aligned
    buffer of this thread's, in whole blocks; the last partial block through the page cache."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if direct:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = mmap.mmap(-1, _CHUNK)
    offsets, written, fill = [], 0, 0
    with memoryview(buf) as out:
        for i, value in enumerate(values):
            offsets.append(written + fill)
            with memoryview(value) as view:
                start = 0
                while start < len(view):
                    n = min(_CHUNK - fill, len(view) - start)
                    out[fill:fill + n] = view[start:start + n]
                    fill, start = fill + n, start + n
                    if fill == _CHUNK:
                        _write_all(fd, out)
                        written, fill = written + _CHUNK, 0
            if i < len(values) - 1 and fill % _ALIGN:
                pad = _ALIGN - fill % _ALIGN
                out[fill:fill + pad] = bytes(pad)
                fill += pad
                if fill == _CHUNK:
                    _write_all(fd, out)
                    written, fill = written + _CHUNK, 0
        whole = fill - fill % _ALIGN
        if whole:
            _write_all(fd, out[:whole])
        if direct:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        _write_all(fd, out[whole:fill])
    os.fsync(fd)
    return offsets


def _write_all(fd: int, view: memoryview) -> None:
    """os.write until all of `view` is written."""
    while view:
        view = view[os.write(fd, view):]


class Staged:
    """The large values of one request, written together and made durable in one file of
    the blob storage's temporary folder, outside the store's thread: one file (one inode,
    one fsync) per request, not per value.  The store keeps each value (a `StagedValue`)
    as a slice of one Blob of that file."""

    __slots__ = ("path", "offsets", "_blob", "_txn")

    def __init__(self, values: list[bytes], folder: str) -> None:
        self._blob: Blob | None = None
        self._txn: object = None
        fd, self.path = tempfile.mkstemp(dir=folder, prefix="staged-")
        try:
            self.offsets = write_durably(fd, values)
        except OSError:
            self.discard()
            raise
        finally:
            os.close(fd)

    def values(self, values: list[bytes]) -> list[StagedValue]:
        """The `StagedValue` of each of the `values` this file was written with (kept
        apart: a Staged that held them would make a cycle that only the GC frees)."""
        return [StagedValue(self, offset, value) for offset, value in zip(self.offsets, values)]

    def blob(self, txn: object) -> Blob:
        """The Blob of this file in transaction `txn`: a new one, of a hard link of the file
        (no copy, no new inode), in each transaction, since ZODB removes an aborted one's
        file and the store may run the request again."""
        if self._txn is not txn:
            link = f"{self.path}.{next(_links)}"
            os.link(self.path, link)
            blob = Blob()
            blob.consumeFile(link)
            self._blob, self._txn = blob, txn
        return self._blob

    def discard(self) -> None:
        """Remove the file (a Blob that took it has a link of its own)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class StagedValue:
    """One value of a `Staged` file: where it starts, and its bytes (kept warm after)."""

    __slots__ = ("staged", "offset", "data")

    def __init__(self, staged: Staged, offset: int, data: bytes) -> None:
        self.staged, self.offset, self.data = staged, offset, data

    def stored(self, txn: object) -> tuple[Blob, int, int]:
        """What the store keeps: (blob, offset, length)."""
        return self.staged.blob(txn), self.offset, len(self.data)


class WarmBytes:
    """The bytes of recently staged values, kept in memory up to `cap` bytes (oldest out
    first), so that a payload leased or a result sent soon after it was stored is not read
    back from the disk; each is taken once.  Keyed by the identity of what was stored."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.size = 0
        self._items: OrderedDict[int, tuple[object, bytes]] = OrderedDict()

    def put(self, stored: object, data: bytes) -> None:
        """Remember `data` as the contents of `stored`."""
        if len(data) > self.cap:
            return
        self._items[id(stored)] = (stored, data)
        self.size += len(data)
        while self.size > self.cap:
            _, (_, old) = self._items.popitem(last=False)
            self.size -= len(old)

    def take(self, stored: object) -> bytes | None:
        """The contents of `stored` if still remembered (then forgotten), else None."""
        item = self._items.get(id(stored))
        if item is None or item[0] is not stored:
            return None
        del self._items[id(stored)]
        self.size -= len(item[1])
        return item[1]
