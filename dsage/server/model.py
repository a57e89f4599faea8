"""Every Persistent class of the server.  Attributes are the schema: add new ones with a
class-level default, never reuse a name with a new meaning."""
from __future__ import annotations

import heapq
import os
from typing import Iterator

import msgpack
from BTrees.LLBTree import LLTreeSet
from BTrees.LOBTree import LOBTree
from BTrees.OOBTree import OOBTree
from persistent import Persistent
from ZODB.blob import Blob

from dsage.server import scheduler
from dsage.server.staging import WarmBytes

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


def store_bytes(data: bytes, blobs: bool) -> Persistent | bytes:
    """Bytes for storage: themselves when small, a Blob when large and the storage has blobs."""
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


def load_bytes(obj: Persistent | bytes | tuple | None, warm: WarmBytes | None = None) -> bytes | None:
    """Read back what `store_bytes` or a `StagedValue` stored."""
    if obj is None or isinstance(obj, bytes):
        return obj
    data = warm.take(obj) if warm is not None else None
    if data is not None:
        return data
    if isinstance(obj, tuple):
        blob, offset, length = obj
        with blob.open("r") as fh:
            fh.seek(offset)
            return fh.read(length)
    if isinstance(obj, Blob):
        with obj.open("r") as fh:
            return fh.read()
    return obj.data


def stored_size(obj: Persistent | bytes | tuple | None) -> int:
    """How many bytes `load_bytes(obj)` gives, without reading them (a Blob: its file's size)."""
    if obj is None:
        return 0
    if isinstance(obj, bytes):
        return len(obj)
    if isinstance(obj, tuple):
        return obj[2]
    if isinstance(obj, Blob):
        with obj.open("r") as fh:
            return os.fstat(fh.fileno()).st_size
    return len(obj.data)


def large_fields(records: list[dict], keys: tuple[str, ...] = ("payload", "files")) -> list[tuple[dict, str]]:
    """The (record, key) pairs whose bytes are too large to keep out of a blob."""
    return [(r, k) for r in records for k in keys
            if isinstance(r.get(k), bytes) and len(r[k]) > INLINE_LIMIT]


class Packed(Persistent):
    """A Persistent whose plain attributes are written as one msgpack string, and the
    attributes named in `_refs` (those that may hold persistent objects) beside it.

    ZODB's pickler calls its Python ``persistent_id`` hook for every object in a state: an
    attribute dict of 30 entries is 60 calls, one string is one (the store's commits spent
    a quarter of their time there).  A state msgpack cannot hold (a string with lone
    surrogates, an integer beyond 64 bits) is written as the plain dict instead; both forms
    load.  Lists among the plain attributes come back as tuples."""

    #: written by position: a subclass may add names at the end, never remove or reorder.
    _refs: tuple[str, ...] = ()

    def __getstate__(self) -> tuple | dict:
        state = Persistent.__getstate__(self)
        refs = tuple(state.pop(name, None) for name in self._refs)
        try:
            return msgpack.packb(state), refs
        except (TypeError, ValueError, OverflowError):
            return Persistent.__getstate__(self)

    def __setstate__(self, state: tuple | dict) -> None:
        if isinstance(state, tuple):
            packed, refs = state
            state = msgpack.unpackb(packed, use_list=False, strict_map_key=False)
            for name, value in zip(self._refs, refs):
                if value is not None:
                    state[name] = value
        Persistent.__setstate__(self, state)


class Identity(Persistent):
    """A user, admin or worker known to the cluster, by certificate common name."""

    revoked = False

    def __init__(self, name: str, role: str, serial: int, created: float) -> None:
        self.name = name
        self.role = role
        self.serial = serial
        self.created = created


class JobRecord(Packed):
    """One job and everything that happened to it."""

    _refs = ("payload", "files", "result")

    function_id = None
    lease_worker = None
    lease_expires = 0.0
    lease = 0                # the current lease's token: reports and renewals must name it
    started = None
    finished = None
    output = ""
    error = None
    cpu_time = None
    wall_time = None
    peak_memory = None       # bytes: the last attempt's peak resident memory
    memory = None            # MiB the job needs (given, or raised after it ran out): its queue
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
        if spec.get("memory"):
            self.memory = spec["memory"]
        self.payload = payload
        self.files = files
        self.status = "new"
        self.failures = 0
        self.attempt = 0
        self.attempts: tuple = ()          # of dicts; a PersistentList in older databases
        self.created = created
        self.seq = 0

    def summary(self, with_result: bool, warm: WarmBytes | None = None) -> dict:
        """The job as plain data for the wire."""
        out = {"job_id": self.job_id, "owner": self.owner, "name": self.name, "kind": self.kind,
               "status": self.status, "priority": self.priority, "timeout": self.timeout,
               "max_failures": self.max_failures, "failures": self.failures,
               "attempts": [dict(a) for a in self.attempts], "output": self.output, "error": self.error,
               "cpu_time": self.cpu_time, "wall_time": self.wall_time,
               "peak_memory": self.peak_memory, "memory": self.memory, "created": self.created,
               "started": self.started, "finished": self.finished, "function_id": self.function_id,
               "not_before": self.not_before}
        if with_result:
            out["result"] = load_bytes(self.result, warm)
        return out


# The trees that grow by one entry per job (job ids only ever increase) are written at their
# last leaf, whole, at every insert; a leaf split also rewrites its parent.  Smaller leaves
# and parents than BTrees' defaults (60 and 500 for LOBTree, 120 and 500 for LLTreeSet, 30
# and 250 for OOBTree) made the server's instructions per job in the latency loop 20% fewer
# at 30,000 jobs stored (see bench/README.md); a database's existing trees keep their class.
class JobTree(LOBTree):
    """Job id -> JobRecord."""

    max_leaf_size = 16
    max_internal_size = 32


class IdSet(LLTreeSet):
    """A set of job ids (an index entry)."""

    max_leaf_size = 32
    max_internal_size = 32


class TokenTree(OOBTree):
    """(owner, token) -> the job ids of a submission (see `Root.remember`; clients send
    tokens that sort by time)."""

    max_leaf_size = 16
    max_internal_size = 32


class FunctionRecord(Persistent):
    """A DistributedFunction's checkpoint: its pickled state, its jobs, the results processed."""

    done = False
    session = None
    last_ids: tuple = ()

    def __init__(self, owner: str, name: str, state: Persistent, created: float) -> None:
        self.owner = owner
        self.name = name
        self.state = state
        self.jobs = IdSet()
        self.processed = IdSet()
        self.created = created
        self.updated = created
        self.steps = 0


#: ids of jobs kept in the root itself, over all its indexes, at most (see `Root.index_add`).
INLINE_IDS = 64


class Ids:
    """The ids of one index, ascending: those in its id set and those still in the root."""

    __slots__ = ("tree", "inline")

    def __init__(self, tree: LLTreeSet | None, inline: tuple) -> None:
        self.tree = tree
        self.inline = inline

    def __iter__(self) -> Iterator[int]:
        if self.tree is None:
            return iter(self.inline)
        if not self.inline:
            return iter(self.tree)
        return heapq.merge(self.tree, self.inline)

    def __contains__(self, job_id: int) -> bool:
        return job_id in self.inline or (self.tree is not None and job_id in self.tree)

    def __bool__(self) -> bool:
        return bool(self.inline) or bool(self.tree)


class Root(Packed):
    """The dsage application root, under ``root()['dsage']``."""

    _refs = ("jobs", "pending", "by_status", "by_owner", "identities", "functions", "tokens", "old_tokens",
             "token_times", "delayed", "pending_big")

    generation = 0
    next_seq = 1
    turn = 0             # the queue's present turn: that of the last job leased (`scheduler.place`)
    turns = None         # owner -> the turn of their last job queued
    queued = None
    tokens = None        # (owner, token) -> first job id, or (first, how many): submissions since tokens_since
    old_tokens = None    # the same, of the generation before; forgotten whole at the next turn
    tokens_since = 0.0
    token_times = None   # older versions' (time, owner, token) index of tokens; gone once upgraded
    delayed = None       # (not before, job id) -> job id: jobs in status new backing off
    pending_big = None   # memory class (`scheduler.memory_class`) >= 1 -> its queue, as `pending` (class 0)
    inline = None        # (index, key) -> ascending ids not in that index's id set (see `index_add`)
    processing: tuple = ()   # the previous version's inline ids of status processing; moved by `upgrade`
    holder = None        # the server holding a ZEO or RelStorage database: host, boot, pid, token, renewed, ttl

    def __init__(self) -> None:
        self.jobs = JobTree()                 # job id -> JobRecord
        self.pending = OOBTree()              # (priority, seq) -> job id: by priority, then turn (`place`)
        self.by_status = OOBTree()            # status -> IdSet of job ids
        self.by_owner = OOBTree()             # owner -> IdSet of job ids
        self.identities = OOBTree()           # name -> Identity
        self.counts: dict = {}                # status -> number of jobs
        self.functions = OOBTree()            # (owner, name) -> FunctionRecord
        self.tokens = TokenTree()
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
        if self.token_times is not None:        # its tokens become the older generation
            self.tokens_since = self.token_times.maxKey()[0] if self.token_times else 0.0
            self.old_tokens, self.tokens, self.token_times, changed = self.tokens, TokenTree(), None, True
        if "processing" in self.__dict__:
            processing = self.__dict__.pop("processing")
            if processing:
                self.inline = {**(self.inline or {}), ("status", "processing"): tuple(sorted(processing))}
            self._p_changed = changed = True
        return changed

    def submission(self, owner: str, token: str) -> tuple[int, ...] | None:
        """The job ids of the owner's submission under `token`, if remembered."""
        key = (owner, token)
        for tokens in (self.tokens, self.old_tokens):
            seen = tokens.get(key) if tokens is not None else None
            if seen is not None:
                return _submitted_ids(seen)
        return None

    def remember(self, owner: str, token: str, now: float, ids: tuple, ttl: float) -> None:
        """Remember a submission's token for at least `ttl` seconds (at most twice that).
        Its ids are consecutive: kept as the first (one job) or (first, how many), not as
        a tuple of them all, since a leaf of tokens is written whole at each insert."""
        self.turn_tokens(now, ttl)
        if ids and ids == tuple(range(ids[0], ids[0] + len(ids))):
            self.tokens[(owner, token)] = ids[0] if len(ids) == 1 else (ids[0], len(ids))
        else:
            self.tokens[(owner, token)] = (now, ids)

    def turn_tokens(self, now: float, ttl: float) -> None:
        """Start a new generation of tokens once the current one is `ttl` old, forgetting the
        one before it (all older than `ttl`): one bucket written per submission, not two,
        and no index by age."""
        age = now - self.tokens_since
        if self.tokens is None or age >= ttl:
            self.old_tokens = self.tokens if self.tokens and age < 2 * ttl else None
            self.tokens, self.tokens_since = TokenTree(), now

    def queue_of(self, job: JobRecord) -> OOBTree:
        """The queue `job` waits in: `pending`, or that of the memory it needs."""
        k = scheduler.memory_class(job.memory)
        if not k:
            return self.pending
        if self.pending_big is None:
            self.pending_big = OOBTree()
        queue = self.pending_big.get(k)
        if queue is None:
            queue = self.pending_big[k] = OOBTree()
        return queue

    def queues_for(self, capacity: int | None) -> list[OOBTree]:
        """The queues a worker slot giving each job `capacity` MiB takes from, non-empty."""
        queues = [self.pending] if self.pending else []
        if self.pending_big:
            top = scheduler.classes_for(capacity)
            queues += [q for k, q in self.pending_big.items(max=top) if q]
        return queues

    def has_pending(self) -> bool:
        """Whether any job waits in a queue."""
        return bool(self.pending) or (self.pending_big is not None and any(self.pending_big.values()))

    def place(self, owner: str) -> int:
        """A new queue place (`seq`) for one of `owner`'s jobs: the turn after the owner's
        last, not before the present turn (`scheduler.place`)."""
        if self.turns is None:
            self.turns = {}
        turn = self.turns[owner] = max(self.turn, self.turns.get(owner, 0)) + 1
        order, self.next_seq = self.next_seq, self.next_seq + 1      # marks the root changed
        return scheduler.place(turn, order)

    def leased(self, seq: int) -> None:
        """A job at queue place `seq` was leased: the present turn is at least its turn."""
        turn = scheduler.turn_of(seq)
        if turn > self.turn:
            self.turn = turn

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

    def status_ids(self, status: str) -> Ids:
        """The ids of the jobs in `status`, ascending."""
        return self.ids("status", status)

    def status_add(self, status: str, job_id: int) -> None:
        """Index a job under its status."""
        self.index_add("status", status, job_id)

    def status_remove(self, status: str, job_id: int) -> None:
        """Take a job out of its status' index."""
        self.index_remove("status", status, job_id)

    def ids(self, index: str, key: str) -> Ids:
        """The ids under `key` of an index ("status" or "owner"), ascending."""
        return Ids(self._index_tree(index).get(key), (self.inline or {}).get((index, key), ()))

    def index_add(self, index: str, key: str, job_id: int) -> None:
        """Index a job under `key` of an index ("status" or "owner").  The id goes into the
        root itself, which every transaction writes anyway, and not into an id set, whose
        last leaf would be written at every job (two of the eight objects a job's
        transactions wrote).  Once the root holds more than INLINE_IDS ids over all the
        indexes, those of the key holding most go to its id set in one write."""
        inline = self.inline
        if inline is None:
            inline = self.inline = {}
        ids = inline.get((index, key))
        if ids is None:
            inline[(index, key)] = (job_id,)
        else:
            inline[(index, key)] = ids + (job_id,) if ids[-1] < job_id else tuple(sorted((*ids, job_id)))
        self._p_changed = True
        if sum(map(len, inline.values())) > INLINE_IDS:
            fullest = max(inline, key=lambda k: len(inline[k]))
            self.index(self._index_tree(fullest[0]), fullest[1]).update(inline.pop(fullest))

    def index_remove(self, index: str, key: str, job_id: int) -> None:
        """Take a job out of `key` of an index (KeyError if it is not there)."""
        inline = self.inline
        ids = inline.get((index, key), ()) if inline else ()
        if job_id not in ids:
            self.index(self._index_tree(index), key).remove(job_id)
            return
        at = ids.index(job_id)
        if len(ids) > 1:
            inline[(index, key)] = ids[:at] + ids[at + 1:]
        else:
            del inline[(index, key)]
        self._p_changed = True

    def _index_tree(self, index: str) -> OOBTree:
        return self.by_status if index == "status" else self.by_owner

    def index(self, tree: OOBTree, key: str) -> LLTreeSet:
        """The id set under `key` of an index tree, created on first use."""
        ids = tree.get(key)
        if ids is None:
            ids = tree[key] = IdSet()
        return ids


def _submitted_ids(seen: int | tuple) -> tuple[int, ...]:
    """The job ids of a remembered submission: its first id, (first id, how many), or, as
    earlier versions kept them, (time, ids)."""
    if isinstance(seen, int):
        return (seen,)
    if isinstance(seen[0], float):
        return tuple(seen[1])
    return tuple(range(seen[0], seen[0] + seen[1]))
