"""Staged files and warm bytes: the large values of a request on the disk, and in memory after."""
from __future__ import annotations

import errno
import fcntl
import os

import pytest
from ZODB.blob import Blob

from dsage.server import staging
from dsage.server.model import INLINE_LIMIT
from dsage.server.staging import Staged, WarmBytes, write_durably


SIZES = [0, 1, 4095, 4096, 4097, (1 << 20) + 300, 3 << 20]


@pytest.mark.parametrize("size", SIZES)
def test_staged_files_hold_exactly_their_bytes(tmp_path, size):
    """Whole blocks go through direct I/O and the tail through the page cache: the file
    has the bytes, no padding after them."""
    data = os.urandom(size)
    staged = Staged([data], str(tmp_path))
    with open(staged.path, "rb") as fh:
        assert fh.read() == data
    assert os.stat(staged.path).st_mode & 0o777 == 0o600


def test_the_values_of_one_request_share_a_file_each_from_a_block_boundary(tmp_path):
    """Several values: one file, each value where its offset says, on a block boundary."""
    values = [os.urandom(n) for n in (5000, 4096, (1 << 20) + 7, 1, 3 << 20, 10)]
    staged = Staged(values, str(tmp_path))
    staged_values = staged.values(values)
    assert [v.data for v in staged_values] == values
    with open(staged.path, "rb") as fh:
        content = fh.read()
    for v in staged_values:
        assert v.offset % 4096 == 0
        assert content[v.offset:v.offset + len(v.data)] == v.data
    assert len(content) == staged_values[-1].offset + 10


def test_without_direct_io_the_file_is_written_through_the_page_cache(tmp_path, monkeypatch):
    """A file system that refuses O_DIRECT (EINVAL) still gets the whole file."""
    real = fcntl.fcntl

    def refuse_direct(fd, cmd, arg=0):
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, cmd, arg)
    monkeypatch.setattr(staging.fcntl, "fcntl", refuse_direct)
    data = os.urandom((2 << 20) + 5)
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        assert write_durably(fd, [data, data]) == [0, (2 << 20) + 4096]
        assert not real(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)
    assert path.read_bytes() == data + bytes(4091) + data


def test_a_failed_write_leaves_no_staged_file(tmp_path, monkeypatch):
    """A full disk while staging: the error reaches the caller and the file is gone."""
    def full(fd, view):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(staging, "_write_all", full)
    with pytest.raises(OSError):
        Staged([os.urandom(10_000)], str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_a_staged_file_and_its_values_are_freed_without_the_garbage_collector(tmp_path):
    """Values and their file make no reference cycle: the megabytes they hold go as soon
    as the request is done with them, not at the next full collection."""
    import gc

    from dsage.server.staging import StagedValue

    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)          # what only the collector frees stays in gc.garbage
    try:
        data = [os.urandom(100_000) for _ in range(3)]
        staged = Staged(data, str(tmp_path))
        values = staged.values(data)
        del staged, values
        gc.collect()
        assert not [o for o in gc.garbage if isinstance(o, (Staged, StagedValue))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def test_warm_bytes_are_taken_once_and_the_oldest_leave_first():
    """Each blob's bytes come back once; past the cap the oldest are forgotten."""
    warm = WarmBytes(cap=10)
    a, b, c = Blob(), Blob(), Blob()
    warm.put(a, b"aaaa")
    warm.put(b, b"bbbb")
    warm.put(c, b"cccc")                    # 12 bytes: a goes
    assert warm.take(a) is None
    assert warm.take(b) == b"bbbb" and warm.take(b) is None
    assert warm.size == 4
    warm.put(Blob(), b"x" * 11)             # larger than the cap: not kept
    assert warm.size == 4 and warm.take(c) == b"cccc" and warm.size == 0
