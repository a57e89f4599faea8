"""DistributedFunction: checkpoints on the server, kill -9 of the client, restore."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import tracemalloc

import pytest

import dsage
from tests.e2e.conftest import start_cluster
from tests.support.functions import SumOfSquares

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "support", "df_client.py")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = start_cluster(tmp_path_factory, workers=1, slots=2)
    yield c
    c.stop()


def client(cluster, name, mode, n, chunk, delay):
    return subprocess.Popen([sys.executable, SCRIPT, cluster.address, str(cluster.home / "client.pem"), name,
                             mode, str(n), str(chunk), str(delay)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)


def expected(n):
    return sum(k * k for k in range(1, n + 1))


def test_checkpointed_function_runs_to_the_right_answer(cluster):
    """A function runs, checkpoints, and knows its jobs; restore after done gives the result."""
    D = cluster.connect()
    try:
        f = SumOfSquares(D, 200, 10, "plain")
        assert f.start().wait(timeout=120) == expected(200)
        assert sorted(f.seen) == sorted(set(f.seen)) and len(f.seen) == 20
        f.note = "checked"          # a finished function can still be checkpointed
        f.save()
        again = dsage.DistributedFunction.restore(D, "plain")
        assert again.done and again.result == expected(200) and again.outstanding_jobs == []
        assert again.note == "checked" and again.wait(timeout=10) == expected(200)
        again.save()
        with pytest.raises(dsage.RemoteError, match="no distributed function"):
            dsage.DistributedFunction.restore(D, "never-made")
    finally:
        D.close()


class NotAJob(dsage.DistributedFunction):
    def next_job(self):
        return "2 + 2"

    def process_result(self, job):
        pass


def test_next_job_returning_something_else_than_a_job_is_a_clear_error(cluster):
    """What next_job() returns must be a dsage.Job (or None): wait() says so."""
    D = cluster.connect()
    try:
        with pytest.raises(TypeError, match=r"next_job\(\) must return a dsage.Job or None, not str"):
            NotAJob(D, name="not-a-job").start().wait(timeout=30)
    finally:
        D.close()


class FirstAnswerWins(dsage.DistributedFunction):
    """Two jobs at once, a quick one and a slow one: the first result ends the function."""

    def __init__(self, D, name):
        super().__init__(D, name=name)
        self.sleeps = [0.2, 60]

    def next_job(self):
        return dsage.Job(code=f"import time\ntime.sleep({self.sleeps.pop(0)})\n'answer'") if self.sleeps else None

    def process_result(self, job):
        self.result, self.done = job.result, True


def test_a_result_is_processed_as_it_comes_while_other_jobs_run(cluster):
    """A job's result goes to process_result when it finishes, not once every job sent with
    it has (the driver waited for each new job in turn); done then kills the slow one."""
    D = cluster.connect()
    try:
        started = time.monotonic()
        f = FirstAnswerWins(D, name="first-answer-wins").start()
        assert f.wait(timeout=50) == "answer" and time.monotonic() - started < 30
        slow = D.job(f.processed_jobs[0].job_id + 1)
        assert slow.status == "killed" and f.outstanding_jobs == []
    finally:
        D.close()


def test_restore_on_the_class_runs_the_code_of_today(cluster):
    """A class defined in a script is checkpointed by value, old code and all:
    `TheClass.restore(D, name)` puts the state back into the class as defined now, so a
    bug fixed in process_result does not come back; the results it failed on are seen
    again (they were not processed as of the checkpoint)."""
    def step(self):
        if self.i >= 4:
            return None
        self.i += 1
        return dsage.Job(code=str(self.i))

    class Steps(dsage.DistributedFunction):
        def __init__(self, D, name):
            super().__init__(D, name=name)
            self.i, self.seen = 0, []
        next_job = step

        def process_result(self, job):
            if job.result == 3:
                raise ValueError("a bug at 3")
            self.seen.append(job.result)

    D = cluster.connect()
    try:
        with pytest.raises(ValueError, match="a bug at 3"):
            Steps(D, "todays-code").start().wait(timeout=60)

        class Steps(dsage.DistributedFunction):     # noqa: F811 (the same class, fixed)
            next_job = step

            def process_result(self, job):
                self.seen.append(job.result)
                if len(self.seen) == 4:
                    self.done, self.result = True, sorted(self.seen)

        class Other(dsage.DistributedFunction):
            pass
        with pytest.raises(dsage.DsageError, match="is a .*Steps, not a .*Other"):
            Other.restore(D, "todays-code")
        fixed = Steps.restore(D, "todays-code")
        assert type(fixed) is Steps and fixed.start().wait(timeout=60) == [1, 2, 3, 4]
    finally:
        D.close()


def test_restore_in_the_program_that_checkpointed_keeps_a_fix_patched_into_the_class(cluster):
    """The same class object, fixed by patching it (a notebook): restoring does not give it
    back its checkpointed attributes (cloudpickle writes them into the live class)."""
    class Patched(dsage.DistributedFunction):
        broken = True

        def __init__(self, D, name):
            super().__init__(D, name=name)
            self.i, self.seen = 0, []

        def next_job(self):
            if self.i >= 4:
                return None
            self.i += 1
            return dsage.Job(code=str(self.i))

        def process_result(self, job):
            if job.result == 3 and self.broken:
                raise ValueError("a bug at 3")
            self.seen.append(job.result)
            if len(self.seen) == 4:
                self.done, self.result = True, sorted(self.seen)

    D = cluster.connect()
    try:
        with pytest.raises(ValueError, match="a bug at 3"):
            Patched(D, "patched").start().wait(timeout=60)
        Patched.broken = False
        original_next_job = Patched.next_job
        fixed = dsage.DistributedFunction.restore(D, "patched")
        assert Patched.broken is False and Patched.next_job is original_next_job
        assert type(fixed) is Patched and fixed.start().wait(timeout=60) == [1, 2, 3, 4]
    finally:
        D.close()


def test_a_long_function_does_not_keep_the_results_it_processed(cluster, monkeypatch):
    """Each result's bytes are dropped from the client once processed (a function of a
    million jobs would hold them all); `processed_jobs[i].result` fetches one again."""
    from dsage.client import connection
    monkeypatch.setattr(connection, "FINISHED_BYTES", 1 << 20, raising=False)

    class Sizes(dsage.DistributedFunction):
        def __init__(self, D, name):
            super().__init__(D, name=name)
            self.i, self.sizes = 0, []

        def next_job(self):
            if self.i >= 40:
                return None
            self.i += 1
            return dsage.Job(func=bytes, args=(250_000,))

        def process_result(self, job):
            self.sizes.append(len(job.result))
            if len(self.sizes) == 40:
                self.done, self.result = True, sum(self.sizes)

    D = cluster.connect()
    tracemalloc.start()
    try:
        f = Sizes(D, "sizes").start()
        assert f.wait(timeout=120) == 40 * 250_000
        kept = tracemalloc.get_traced_memory()[0]
        assert kept < 4_000_000, f"{kept:,} bytes still traced after 10 MB of results"
        assert len(f.processed_jobs) == 40 and f.processed_jobs[0].result == bytes(250_000)
    finally:
        tracemalloc.stop()
        D.close()


def stopped_midway(D, name: str) -> SumOfSquares:
    """A SumOfSquares of 300 started, then stopped once it has processed a result."""
    # 0.1 s per result: 30 results take 3 s, so the function cannot end before stop()
    f = SumOfSquares(D, 300, 10, name, delay=0.1).start()
    wait_until = time.monotonic() + 30
    while not f.processed_jobs and time.monotonic() < wait_until:
        time.sleep(0.05)
    f.stop()
    assert not f.done
    return f


def test_stop_then_start_again_goes_on_and_a_done_function_has_nothing_to_start(cluster):
    """stop() ends this client's driver; start() on the same object goes on from there, and
    once done, start() again does nothing."""
    D = cluster.connect()
    try:
        f = stopped_midway(D, "stop-start")
        assert f.start().wait(timeout=120) == expected(300)
        assert f.start() is f and f.wait(timeout=1) == expected(300)
    finally:
        D.close()


def test_wait_on_a_restored_function_resumes_it(cluster):
    """`restore(D, name).wait()` goes on from the checkpoint without a `start()` first, as a
    new function's `wait()` starts it."""
    D = cluster.connect()
    try:
        stopped_midway(D, "wait-resumes")
        again = dsage.DistributedFunction.restore(D, "wait-resumes")
        assert not again.done and again.wait(timeout=120) == expected(300)
        assert SumOfSquares(D, 50, 10, "wait-starts").wait(timeout=60) == expected(50)
    finally:
        D.close()


def test_restore_of_another_users_function_is_refused(cluster):
    """A function belongs to its owner."""
    path = cluster.home / "dave.pem"
    cluster.run("user", "add", "dave", "--out", str(path))
    D = cluster.connect()
    dave = cluster.connect(str(path))
    try:
        SumOfSquares(D, 10, 5, "owned").start().wait(timeout=60)
        with pytest.raises(dsage.AuthError):
            dsage.DistributedFunction.restore(dave, "owned")
    finally:
        D.close()
        dave.close()


def test_kill9_of_the_client_then_restore_processes_every_result_once(cluster):
    """The client is killed with -9 at random moments; each restore resumes from the last
    checkpoint; the final answer is right and no result was processed twice."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    n, chunk, name = 3000, 10, f"chaos-{seed}"
    kills, mode = 0, "start"
    for _ in range(3):
        proc = client(cluster, name, mode, n, chunk, 0.02)
        assert proc.stdout.readline().strip() == "running", f"seed {seed}"
        time.sleep(rng.uniform(0.2, 1.2))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        mode = "restore"
    proc = client(cluster, name, "restore", n, chunk, 0.0)
    out, _ = proc.communicate(timeout=300)
    again = dsage.DistributedFunction.restore(cluster.connect(), name)
    assert again.done and again.start().wait(timeout=10) == expected(n), "restoring a finished function"
    lines = out.strip().splitlines()
    assert lines[0] == "running" and proc.returncode == 0, f"seed {seed}: {out}"
    final = json.loads(lines[-1])
    assert final["result"] == expected(n), f"seed {seed}"
    assert len(final["seen"]) == len(set(final["seen"])) == n // chunk, f"seed {seed}: duplicates or gaps"
    assert kills >= 1, f"seed {seed}: the client was never killed"


def test_server_kill9_during_a_function_run(cluster):
    """The server dies (kill -9) twice while a function runs; it carries on by itself, to the
    right answer, with every result processed once."""
    D = cluster.connect()
    try:
        f = SumOfSquares(D, 400, 5, "through-crashes", delay=0.01)
        f.start()
        for _ in range(2):
            time.sleep(0.8)
            cluster.stop_server(signal.SIGKILL)
            time.sleep(0.5)
            cluster.start_server()
        assert f.wait(timeout=180) == expected(400)
        assert len(f.seen) == len(set(f.seen)) == 80
    finally:
        D.close()


def test_a_second_client_takes_the_function_over(cluster):
    """Restoring elsewhere fences the first client: it stops with a clear error."""
    D1, D2 = cluster.connect(), cluster.connect()
    try:
        first = SumOfSquares(D1, 600, 5, "taken-over", delay=0.05).start()
        time.sleep(0.5)
        second = dsage.DistributedFunction.restore(D2, "taken-over")
        with pytest.raises(dsage.RemoteError, match="restored by another client"):
            first.wait(timeout=60)
        second.delay = 0.0
        assert second.start().wait(timeout=120) == expected(600)
        assert len(second.seen) == len(set(second.seen)) == 120
    finally:
        D1.close()
        D2.close()


class Lengths(dsage.DistributedFunction):
    """Sums the lengths of `n` payloads of `size` bytes, one job each."""

    window = 6

    def __init__(self, D, name, n, size):
        super().__init__(D, name=name)
        self.left, self.size, self.result = n, size, 0
        self.sent = 0

    def next_job(self):
        if self.sent == self.left:
            return None
        self.sent += 1
        return dsage.Job(func=len, args=(bytes(self.size),))

    def process_result(self, job):
        self.result += job.result
        self.left -= 1
        self.sent -= 1
        if self.left == 0:
            self.done = True


def test_large_jobs_of_a_function_go_in_several_steps_and_a_huge_state_is_refused(cluster, monkeypatch):
    """A step (one message) takes new jobs until they carry STEP_BYTES; a checkpoint larger
    than MAX_JOB_BYTES is refused with its size instead of being sent."""
    from dsage.client import distributed

    monkeypatch.setattr(distributed, "STEP_BYTES", 1000)
    D = cluster.connect()
    try:
        f = Lengths(D, "lengths", 6, 600)
        steps = []
        step = f._step
        f._step = lambda processed, wires: steps.append(len(wires)) or step(processed, wires)
        assert f.start().wait(timeout=120) == 6 * 600
        assert max(steps) == 2 and sum(steps) == 6
        monkeypatch.setattr(distributed, "MAX_JOB_BYTES", 1 << 20)
        big = Lengths(D, "big-state", 1, 10)
        big.ballast = bytes(2 << 20)
        with pytest.raises(dsage.DsageError, match=r"state is 2\.0 MiB pickled, more than the 1 MiB"):
            big.start()
    finally:
        D.close()
