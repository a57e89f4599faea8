"""Fuzzing the server's protocol surface: 10^5 generated frames (garbage, random msgpack,
well-formed requests with random arguments, fragments) thrown at live connections of every
role over a real store.  Nothing may escape a handler, and the store must stay consistent."""
from __future__ import annotations

import os
import random
import string
import struct

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from dsage import errors
from dsage.protocol import FRAGMENT, REQUEST, decode, encode
from dsage.server.connections import HANDLERS, ServerProtocol
from dsage.server.hub import Hub
from dsage.server.model import INLINE_IDS
from tests.support.store import FakeTime, memory_store

FRAMES = 100_000
# A fixed seed keeps CI deterministic; DSAGE_FUZZ_SEED=random (or a number) explores further.
SEED = os.environ.get("DSAGE_FUZZ_SEED", "978808283")
KEYS = ["jobs", "job_id", "n", "name", "role", "status", "limit", "all", "attempt", "outcome", "result",
        "output", "error", "held", "session", "step", "state", "processed", "done", "days", "token",
        "function_id", "force", "cpu_time", "wall_time", "version", "result", "reports", "lease"]
VERBS = sorted(HANDLERS) + ["hello", "nope", ""]


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(10 if depth < 3 else 7)
    if kind == 0:
        return rng.choice([0, 1, -1, 2, 3, 2**31, 2**63 - 1, -2**63, rng.randrange(-1000, 1000)])
    if kind == 1:
        return "".join(rng.choice(string.printable) for _ in range(rng.randrange(12)))
    if kind == 2:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(16)))
    if kind == 3:
        return rng.choice([None, True, False, 0.5, float("nan"), float("inf"), -0.0])
    if kind == 4:
        return rng.choice(["new", "processing", "completed", "failed", "killed", "client", "admin", "worker",
                           "code", "callable", "alice", "root", "w1", "f"])
    if kind == 5:
        return rng.randrange(1, 40)
    if kind == 6:
        return {"kind": rng.choice(["code", "callable", "file", "x"]), "payload": rng.choice([b"1", "1", None]),
                "name": random_value(rng, 3), "timeout": rng.choice([1.0, -1, "x", 600]),
                "priority": rng.choice([0, 5, "x", 2**40]), "max_failures": rng.choice([1, 3, 0, None]),
                "files": rng.choice([{}, {"a": b"x"}, {"../a": b""}, []])}
    if kind == 7:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 8:
        return {rng.choice(KEYS): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [[rng.randrange(1, 40), rng.randrange(1, 4)] for _ in range(rng.randrange(3))]


def random_frame(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
    if kind == 1:
        return msgpack.packb(random_value(rng), use_bin_type=True)
    if kind == 2:
        return encode([FRAGMENT, rng.random() < 0.3, bytes(rng.randrange(256) for _ in range(rng.randrange(20)))])
    args = {rng.choice(KEYS): random_value(rng) for _ in range(rng.randrange(6))}
    if rng.random() < 0.2:
        args = random_value(rng)
    return encode([REQUEST, rng.randrange(1, 2**31), rng.choice(VERBS), args]) if isinstance(args, dict) \
        else msgpack.packb([REQUEST, rng.randrange(100), rng.choice(VERBS), args], use_bin_type=True)


class AnonymousTransport(StringTransport):
    """A TLS transport whose peer presented no certificate (what a hello must refuse)."""

    def getPeerCertificate(self):
        return None


def check_store(store) -> None:
    """The indexes, counters and queue agree with the jobs themselves."""
    root = store.root
    store._tm.begin()
    try:
        statuses = {*root.by_status.keys(), *(key for index, key in root.inline or () if index == "status")}
        listed = {s: list(root.status_ids(s)) for s in statuses}
        assert all(ids == sorted(set(ids)) for ids in listed.values()), "ascending, once each"
        by_status = {s: set(ids) for s, ids in listed.items()}
        by_status = {s: ids for s, ids in by_status.items() if ids}
        for status, ids in by_status.items():
            assert root.counts.get(status, 0) == len(ids), status
            assert all(root.jobs[i].status == status for i in ids)
        assert sum(len(v) for v in by_status.values()) == len(root.jobs)
        queued = list(root.pending.values()) + list(root.delayed.values() if root.delayed else ())
        assert len(queued) == len(set(queued)) and set(queued) == by_status.get("new", set())
        for owner in set(j.owner for j in root.jobs.values()):
            assert root.queued.get(owner, 0) == sum(1 for i in by_status.get("new", ()) if root.jobs[i].owner == owner)
            assert list(root.ids("owner", owner)) == [i for i, j in root.jobs.items() if j.owner == owner]
        assert sum(map(len, (root.inline or {}).values())) <= INLINE_IDS
    finally:
        store._tm.abort()


def test_fuzz_the_protocol_surface(tmp_path):
    """10^5 generated frames at every role: zero crashes, zero inconsistencies."""
    seed = random.randrange(1 << 30) if SEED == "random" else int(SEED)
    rng = random.Random(seed)
    clock = Clock()
    store = memory_store(tmp_path, FakeTime(0.0))
    hub = Hub(store, clock, lease_seconds=10.0, heartbeat_seconds=1.0)
    bugs = []

    def observe(event):
        if event.get("log_failure") is not None and event.get("log_namespace", "").startswith("dsage"):
            bugs.append(event["log_failure"].getTraceback())
    globalLogPublisher.addObserver(observe)

    def connection(identity, role):
        proto = ServerProtocol(hub)
        proto.makeConnection(AnonymousTransport())
        if role is not None:
            proto.identity, proto.role, proto.info = identity, role, {"name": identity, "slots": 2}
            hub.attach(proto)
        return proto

    roles = [("alice", "client"), ("root", "admin"), ("w1", "worker"), (None, None)]
    conns = [connection(*r) for r in roles]
    crashes = 0
    try:
        for i in range(FRAMES):
            k = rng.randrange(len(conns))
            frame = random_frame(rng)
            try:
                conns[k].dataReceived(struct.pack("!I", len(frame)) + frame)
            except Exception:
                crashes += 1
            if conns[k].transport.disconnecting:
                conns[k].connectionLost(None)
                conns[k] = connection(*roles[k])
            if i % 20_000 == 0:
                check_store(store)
        check_store(store)
    finally:
        globalLogPublisher.removeObserver(observe)
        for c in conns:
            if not c.closed:
                c.connectionLost(None)
        store.stop()
    assert crashes == 0, f"seed {seed}"
    assert not bugs, f"seed {seed}: {bugs[0]}"


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=200))
def test_decode_refuses_anything_malformed_cleanly(data):
    """Arbitrary bytes either decode to a well-formed message or raise ProtocolError."""
    try:
        message = decode(data)
    except errors.ProtocolError:
        return
    assert isinstance(message, list) and message[0] in (0, 1, 2, 3)
