"""Every Persistent class of the server.  Attributes are the schema: add new ones with a
class-level default, never reuse a name with a new meaning."""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import tempfile
import threading
from collections import OrderedDict

from BTrees.LLBTree import LLTreeSet
from BTrees.LOBTree import LOBTree
from BTrees.OOBTree import OOBTree
from persistent import Persistent
from ZODB.blob import Blob

#: payloads, files and results up to SMALL bytes live in the record that holds them (no
#: object of their own to write); up to INLINE_LIMIT in a Persistent of their own; larger
#: in a Blob, its file made durable by an fsync of its own before the commit (measured:
#: 1 MiB payloads inline in the FileStorage went slower, its commit copies in 8 KiB steps).
SMALL = 4096
INLINE_LIMIT = 64 << 10


class Data(Persistent):
    """Opaque bytes kept apart from the Job so that status changes do not rewrite them."""

    def __init__(self, data: bytes) -> None:
        self.data = data


#: the size of the aligned buffer through which staged files are written.
_CHUNK = 1 << 20
_ALIGN = 4096
_buffers = threading.local()


def write_durably(fd: int, data: bytes) -> None:
    """Write `data` to the new, empty file `fd` and fsync it, bypassing the page cache
    (O_DIRECT) where the file system allows: on this kind of VM, filling fresh page-cache
    pages cost the server more than all the rest of a large payload's path."""
    view = memoryview(data)
    aligned = len(view) - len(view) % _ALIGN
    if aligned:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
            _write_direct(fd, view[:aligned])
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            aligned = 0         # a file system without direct I/O (tmpfs, some network ones)
            os.lseek(fd, 0, os.SEEK_SET)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    _write_all(fd, view[aligned:])     # the last partial block through the page cache
    os.fsync(fd)


def _write_direct(fd: int, view: memoryview) -> None:
    """Write whole blocks through an aligned buffer of this thread's."""
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = mmap.mmap(-1, _CHUNK)
    with memoryview(buf) as out:
        for start in range(0, len(view), _CHUNK):
            n = min(_CHUNK, len(view) - start)
            out[:n] = view[start:start + n]
            _write_all(fd, out[:n])


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


class Staged:
    """Large bytes already written, and made durable, in a file of the blob storage's
    temporary folder (outside the store's thread); `store_bytes` makes the file a Blob."""

    __slots__ = ("path", "data")

    def __init__(self, data: bytes, folder: str) -> None:
        self.data = data
        fd, self.path = tempfile.mkstemp(dir=folder, prefix="staged-")
        try:
            write_durably(fd, data)
        except OSError:
            self.discard()
            raise
        finally:
            os.close(fd)

    def discard(self) -> None:
        """Remove the file if no Blob took it."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class WarmBytes:
    """The bytes of recently staged blobs, kept in memory up to `cap` bytes (oldest out
    first), so that a payload leased or a result sent soon after it was stored is not read
    back from the disk; each is taken once."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.size = 0
        self._items: OrderedDict[int, tuple[Blob, bytes]] = OrderedDict()

    def put(self, blob: Blob, data: bytes) -> None:
        """Remember `data` as the contents of `blob`."""
        if len(data) > self.cap:
            return
        self._items[id(blob)] = (blob, data)
        self.size += len(data)
        while self.size > self.cap:
            _, (_, old) = self._items.popitem(last=False)
            self.size -= len(old)

    def take(self, blob: Blob) -> bytes | None:
        """The contents of `blob` if still remembered (then forgotten), else None."""
        item = self._items.get(id(blob))
        if item is None or item[0] is not blob:
            return None
        del self._items[id(blob)]
        self.size -= len(item[1])
        return item[1]


def store_bytes(data: bytes | Staged, blobs: bool, warm: WarmBytes | None = None) -> Persistent | bytes:
    """Bytes for storage: themselves when small, a Blob when large and the storage has blobs."""
    if isinstance(data, Staged):
        blob = Blob()
        blob.consumeFile(data.path)
        if warm is not None:
            warm.put(blob, data.data)
        return blob
    if len(data) <= SMALL:
        return bytes(data)
    if blobs and len(data) > INLINE_LIMIT:
        blob = Blob()
        with blob.open("w") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())       # ZODB renames blob files into place without an fsync
        return blob
    return Data(bytes(data))


def load_bytes(obj: Persistent | bytes | None, warm: WarmBytes | None = None) -> bytes | None:
    """Read back what `store_bytes` stored."""
    if obj is None or isinstance(obj, bytes):
        return obj
    if isinstance(obj, Blob):
        data = warm.take(obj) if warm is not None else None
        if data is None:
            with obj.open("r") as fh:
                data = fh.read()
        return data
    return obj.data


class Identity(Persistent):
    """A user, admin or worker known to the cluster, by certificate common name."""

    revoked = False

    def __init__(self, name: str, role: str, serial: int, created: float) -> None:
        self.name = name
        self.role = role
        self.serial = serial
        self.created = created


class JobRecord(Persistent):
    """One job and everything that happened to it."""

    function_id = None
    lease_worker = None
    lease_expires = 0.0
    started = None
    finished = None
    output = ""
    error = None
    cpu_time = None
    wall_time = None
    result = None
    files = None
    not_before = 0.0

    def __init__(self, job_id: int, owner: str, spec: dict, payload: Persistent,
                 files: Persistent | None, created: float) -> None:
        self.job_id = job_id
        self.owner = owner
        self.name = spec["name"]
        self.kind = spec["kind"]
        self.priority = spec["priority"]
        self.timeout = spec["timeout"]
        self.max_failures = spec["max_failures"]
        self.payload = payload
        self.files = files
        self.status = "new"
        self.failures = 0
        self.attempt = 0
        self.attempts: tuple = ()          # of dicts; a PersistentList in older databases
        self.created = created
        self.seq = 0


class FunctionRecord(Persistent):
    """A DistributedFunction's checkpoint: its pickled state, its jobs, the results processed."""

    done = False
    session = None
    last_ids: tuple = ()

    def __init__(self, owner: str, name: str, state: Persistent, created: float) -> None:
        self.owner = owner
        self.name = name
        self.state = state
        self.jobs = LLTreeSet()
        self.processed = LLTreeSet()
        self.created = created
        self.updated = created
        self.steps = 0


class Root(Persistent):
    """The dsage application root, under ``root()['dsage']``."""

    generation = 0
    next_seq = 1
    queued = None
    tokens = None        # (owner, token) -> (time, job ids): submissions already applied
    token_times = None   # (time, owner, token) -> None: the same, by age, for expiry
    delayed = None       # (not before, job id) -> job id: jobs in status new backing off

    def __init__(self) -> None:
        self.jobs = LOBTree()                 # job id -> JobRecord
        self.pending = OOBTree()              # (priority, seq) -> job id; FIFO within a priority
        self.by_status = OOBTree()            # status -> LLTreeSet of job ids
        self.by_owner = OOBTree()             # owner -> LLTreeSet of job ids
        self.identities = OOBTree()           # name -> Identity
        self.counts: dict = {}                # status -> number of jobs
        self.functions = OOBTree()            # (owner, name) -> FunctionRecord
        self.tokens = OOBTree()
        self.token_times = OOBTree()
        self.queued: dict = {}                # owner -> number of their jobs in status new
        self.next_job_id = 1

    def upgrade(self) -> bool:
        """Bring a root written by an older version up to date; True if it changed.  The
        counters are plain dicts in the root (one object written per transaction, not three)."""
        changed = False
        if not isinstance(self.counts, dict):
            self.counts, changed = dict(self.counts), True
        if not isinstance(self.queued, dict):
            self.queued, changed = dict(self.queued.items()) if self.queued is not None else {}, True
        return changed

    def count(self, status: str, delta: int) -> None:
        """Change the number of jobs in a status."""
        self.counts[status] = self.counts.get(status, 0) + delta
        self._p_changed = True

    def count_queued(self, owner: str, delta: int) -> None:
        """Change the number of an owner's jobs in status new."""
        n = self.queued.get(owner, 0) + delta
        if n:
            self.queued[owner] = n
        else:
            self.queued.pop(owner, None)
        self._p_changed = True

    def index(self, tree: OOBTree, key: str) -> LLTreeSet:
        """The id set under `key` of an index tree, created on first use."""
        ids = tree.get(key)
        if ids is None:
            ids = tree[key] = LLTreeSet()
        return ids
