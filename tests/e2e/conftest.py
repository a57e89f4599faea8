"""A real cluster for end-to-end tests: dsage init, dsage_server and dsage_worker processes
on 127.0.0.1 with a fresh CA and a real FileStorage in a temporary DSAGE_HOME."""
from __future__ import annotations

import contextlib
import time

import pytest

from dsage.client.local import LocalCluster


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    """Poll `predicate` until true (for conditions with no event to wait on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_cluster(tmp_path_factory, workers: int = 1, slots: int = 2, lease_seconds=None,
                  worker_args: tuple[str, ...] = ()) -> LocalCluster:
    cluster = LocalCluster(tmp_path_factory.mktemp("home"), lease_seconds=lease_seconds)
    cluster.init()
    cluster.start_server()
    for _ in range(workers):
        cluster.add_worker(slots=slots, args=worker_args)
    return cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = start_cluster(tmp_path_factory)
    yield c
    c.stop()


@contextlib.contextmanager
def connected(cluster: LocalCluster):
    """An admin session on `cluster`, once a worker is there."""
    session = cluster.connect()
    try:
        wait_for(lambda: session.workers(), what="a worker")
        yield session
    finally:
        session.close()


@pytest.fixture(scope="module")
def D(cluster):
    with connected(cluster) as session:
        yield session


@pytest.fixture(scope="module")
def users(cluster):
    """Bundles for two plain users, alice and bob."""
    out = {}
    for name in ("alice", "bob"):
        path = cluster.home / f"{name}.pem"
        cluster.run("user", "add", name, "--out", str(path))
        out[name] = str(path)
    return out
