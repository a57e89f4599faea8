"""Persistent records: large bytes kept apart and warm, packed states, trees and indexes."""
from __future__ import annotations

import os

import pytest

from dsage.server import model
from dsage.server.model import INLINE_LIMIT
from dsage.server.staging import WarmBytes
from tests.support.store import memory_store, reported, spec, value


def test_large_payloads_and_results_come_back_warm_or_from_the_disk(tmp_path):
    """A payload leased right after its submission comes from memory, one leased after it
    was forgotten from its blob file; both intact, as is a large result."""
    store = memory_store(tmp_path)
    try:
        big = [os.urandom(INLINE_LIMIT + n) for n in (1, 4096, 70_000)]
        value(store.submit("a", [spec(name=str(i), payload=p) for i, p in enumerate(big)]))
        assert store.warm.size == sum(map(len, big))
        store.warm = WarmBytes(store.warm.cap)          # the first two: forgotten
        job3 = store.root.jobs[3]
        store.warm.put(job3.payload, big[2])
        got = value(store.claim([("w", 3)], 60.0))[0]
        assert [j["payload"] for j in got] == big and store.warm.size == 0
        result = os.urandom(INLINE_LIMIT * 3)
        out = value(store.report("w", reported(got[0], result=result)))
        assert out["job"]["result"] == result
        assert value(store.get("a", "client", 1))["result"] == result      # from the blob file
    finally:
        store.stop()


def _file_store(path):
    import ZODB
    from ZODB.FileStorage import FileStorage

    from dsage.server.store import JobStore
    return JobStore(ZODB.DB(FileStorage(str(path))), threaded=False)


def _one_job_then(path, edit) -> int:
    """A database at `path` with one job run (its id), its root then changed by `edit`
    (as an earlier version would have left it)."""
    import transaction
    import ZODB
    from ZODB.FileStorage import FileStorage

    s = _file_store(path)
    job_id = _run_one(s)
    s.stop()
    db = ZODB.DB(FileStorage(str(path)))
    with transaction.manager:
        edit(db.open().root()["dsage"])
    db.close()
    return job_id


def _run_one(store, output="hello\n", result=b"42"):
    """Submit, lease and complete one job; its id."""
    [job_id] = value(store.submit("alice", [spec("6 * 7")]))
    [[job]] = value(store.claim([("w1", 1)], 60.0))
    out = value(store.report("w1", reported(job, output=output, result=result, cpu_time=0.5, wall_time=0.7)))
    assert out["applied"]
    return job_id


def test_jobs_and_the_root_survive_a_reopen_in_their_packed_form(tmp_path):
    """A job's record and the root are written as one packed string each (plus their
    persistent parts) and read back the same, counts, attempts and result included."""
    s = _file_store(tmp_path / "d.fs")
    ids = [_run_one(s) for _ in range(3)]
    before = [value(s.get("alice", "client", i)) for i in ids]
    counts = value(s.status())
    state = s.root.jobs[ids[0]].__getstate__()
    assert isinstance(state, tuple) and isinstance(state[0], bytes), "written packed"
    assert isinstance(s.root.__getstate__(), tuple)
    s.stop()
    s = _file_store(tmp_path / "d.fs")
    try:
        assert [value(s.get("alice", "client", i)) for i in ids] == before
        assert before[0]["result"] == b"42" and before[0]["attempts"][0]["outcome"] == "completed"
        assert value(s.status()) == counts and counts["completed"] == 3
        assert _run_one(s) == 4, "the root's next id came back too"
    finally:
        s.stop()


def test_a_job_whose_output_msgpack_cannot_hold_is_written_as_a_plain_dict(tmp_path):
    """Output with a lone surrogate (undecodable bytes a job printed) has no msgpack form:
    that record is written the way ZODB writes any object, and reads back the same."""
    s = _file_store(tmp_path / "d.fs")
    job_id = _run_one(s, output="bad \udc80 byte\n")
    assert isinstance(s.root.jobs[job_id].__getstate__(), dict)
    s.stop()
    s = _file_store(tmp_path / "d.fs")
    try:
        assert value(s.get("alice", "client", job_id))["output"] == "bad \udc80 byte\n"
    finally:
        s.stop()


def test_records_written_as_plain_dicts_by_earlier_versions_load_and_are_rewritten_packed(tmp_path, monkeypatch):
    """Databases of versions before packed states hold attribute dicts: they load, and a
    record changed later is written in the packed form."""
    from persistent import Persistent

    with monkeypatch.context() as m:
        m.setattr(model.Packed, "__getstate__", Persistent.__getstate__)
        s = _file_store(tmp_path / "d.fs")
        job_id = _run_one(s)
        [queued] = value(s.submit("alice", [spec("1")]))
        s.stop()
    s = _file_store(tmp_path / "d.fs")
    try:
        assert value(s.get("alice", "client", job_id))["result"] == b"42"
        assert value(s.status())["new"] == 1
        [[job]] = value(s.claim([("w1", 1)], 60.0))
        assert job["job_id"] == queued
        assert value(s.report("w1", reported(job, result=b"1")))["applied"]
        s.stop()
        s = _file_store(tmp_path / "d.fs")
        assert value(s.get("alice", "client", queued))["result"] == b"1"
        assert value(s.status())["completed"] == 2
    finally:
        s.stop()


def test_trees_of_an_earlier_version_keep_working_beside_new_ones(tmp_path):
    """A database made before the tuned trees holds a plain LOBTree of jobs and LLTreeSet
    index entries: jobs are added, found, listed and counted as before, and an index entry
    made now (a new owner) is an IdSet beside them."""
    from BTrees.LLBTree import LLTreeSet
    from BTrees.LOBTree import LOBTree

    def as_then(root):
        root.jobs = LOBTree(root.jobs)
        for (index, key), ids in root.inline.items():      # that version kept no ids in the root
            tree = root.by_owner if index == "owner" else root.by_status
            tree[key] = LLTreeSet(ids)
        root.inline = None
        for tree in (root.by_owner, root.by_status):
            for key in list(tree.keys()):
                tree[key] = LLTreeSet(tree[key])
    path = tmp_path / "d.fs"
    first = _one_job_then(path, as_then)
    s = _file_store(path)
    try:
        assert type(s.root.jobs) is LOBTree and type(s.root.by_owner["alice"]) is LLTreeSet
        ids = [first] + [_run_one(s) for _ in range(40)]
        bobs = value(s.submit("bob", [spec(str(i)) for i in range(model.INLINE_IDS + 1)]))
        assert [j["job_id"] for j in value(s.list("alice", "client"))] == ids[::-1]
        assert [j["job_id"] for j in value(s.list("bob", "client"))] == bobs[::-1]
        assert value(s.get("bob", "client", bobs[0]))["status"] == "new"
        assert type(s.root.by_owner["alice"]) is LLTreeSet and type(s.root.by_owner["bob"]) is model.IdSet
        assert value(s.status())["completed"] == 41
    finally:
        s.stop()


def test_index_ids_live_in_the_root_until_it_holds_too_many(tmp_path):
    """New index entries go into the root (no id set written) until it holds more than
    INLINE_IDS ids over all its indexes; then the fullest index's go to its id set.  Both
    forms list the same ids, ascending, answer `in`, and survive a reopen; removals find
    an id in either."""
    from ZODB.FileStorage import FileStorage
    import transaction
    import ZODB

    n = model.INLINE_IDS
    db = ZODB.DB(FileStorage(str(tmp_path / "r.fs")))
    with transaction.manager:
        root = db.open().root()["r"] = model.Root()
        for job_id in range(n, 0, -2):                 # out of order: kept ascending
            root.status_add("processing", job_id)
            root.index_add("owner", "alice", job_id - 1)
        assert "processing" not in root.by_status and "alice" not in root.by_owner
        assert list(root.status_ids("processing")) == list(range(2, n + 1, 2))
        assert 4 in root.status_ids("processing") and 3 not in root.status_ids("processing")
    with transaction.manager:
        root.index_add("owner", "alice", 1000)          # one too many: alice's go to her id set
        assert root.inline == {("status", "processing"): tuple(range(2, n + 1, 2))}
        assert list(root.by_owner["alice"]) == [*range(1, n, 2), 1000]
        root.index_add("owner", "alice", 2000)
        root.status_remove("processing", 4)
        root.index_remove("owner", "alice", 3)
        root.status_add("completed", 4)
        with pytest.raises(KeyError):
            root.index_remove("owner", "alice", 4)
    db.close()
    db = ZODB.DB(FileStorage(str(tmp_path / "r.fs")))
    with transaction.manager:
        root = db.open().root()["r"]
        assert list(root.status_ids("processing")) == [i for i in range(2, n + 1, 2) if i != 4]
        alice = [i for i in range(1, n, 2) if i != 3] + [1000, 2000]
        assert list(root.ids("owner", "alice")) == alice and 2000 in root.ids("owner", "alice")
        assert list(root.status_ids("completed")) == [4] and list(root.status_ids("failed")) == []
        assert not root.status_ids("failed") and root.ids("owner", "alice")
    db.close()


def test_a_root_of_the_previous_version_keeps_its_processing_ids(tmp_path):
    """The previous version kept the ids of processing jobs in `Root.processing`: the
    upgrade moves them to the root's inline ids."""
    path = tmp_path / "d.fs"
    job_id = _one_job_then(path, lambda root: setattr(root, "processing", (root.next_job_id + 4, root.next_job_id + 1)))
    s = _file_store(path)
    try:
        assert list(s.root.status_ids("processing")) == [job_id + 2, job_id + 5]
        assert "processing" not in s.root.__dict__
    finally:
        s.stop()
