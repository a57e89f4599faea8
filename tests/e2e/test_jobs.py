"""Jobs through the public API against a real server and worker processes."""
from __future__ import annotations

import concurrent.futures
import gc
import logging
import os
import random
import re
import time
import tracemalloc
from pathlib import Path

import pytest

import dsage
from tests.e2e.conftest import connected, wait_for


def test_eval_returns_last_expression_and_output(D):
    """eval runs code on a worker: the last expression's value, its output, its times."""
    job = D.eval("print('hello from a worker')\n2**64 + 1", name="big")
    assert job.wait(timeout=30) == 2**64 + 1
    assert job.status == "completed" and job.done()
    assert job.output == "hello from a worker\n"
    assert job.name == "big" and job.failures == 0
    assert job.cpu_time is not None and job.wall_time > 0
    assert job.created <= job.started <= job.finished <= time.time()
    assert job.result == 2**64 + 1


def test_the_spec_s_first_example_factors_as_in_sage(D):
    """`D.eval("factor(2**64+1)")`: code jobs have `factor`, as in Sage, giving {prime: exponent}."""
    assert D.eval("factor(2**64+1)").wait(timeout=60) == {274177: 1, 67280421310721: 1}
    assert D.eval("factor(-12), factor(1)").wait(timeout=60) == ({-1: 1, 2: 2, 3: 1}, {})


def test_dsage_result_variable(D):
    """DSAGE_RESULT wins over the last expression."""
    assert D.eval("DSAGE_RESULT = {'a': [1, 2]}\n3").wait(timeout=30) == {"a": [1, 2]}


def test_submit_closures_and_options(D):
    """submit ships closures with cloudpickle; a described Job keeps its options."""
    k = 7
    assert D.submit(lambda x, y=0: x * k + y, 6, y=1).wait(timeout=30) == 43
    job = D.submit(dsage.Job(func=divmod, args=(17, 5), name="dm", priority=1, max_failures=1))
    assert job.wait(timeout=30) == (3, 2) and job.name == "dm"


def test_map_keeps_item_order(D):
    """map returns one handle per item, in item order."""
    jobs = D.map(pow, range(20), [2] * 20)
    assert [j.wait(timeout=60) for j in jobs] == [i * i for i in range(20)]


def test_failure_carries_the_traceback_and_output(D):
    """A raising job fails with the worker's traceback; its output is kept."""
    job = D.eval("print('before the error')\nraise ValueError('bad input 42')", max_failures=1)
    with pytest.raises(dsage.JobFailed) as info:
        job.wait(timeout=30)
    assert info.value.traceback.splitlines()[1:] == [
        f'  File "<job {job.job_id}>", line 2, in <module>', "    raise ValueError('bad input 42')",
        "ValueError: bad input 42"]
    assert job.status == "failed" and "bad input 42" in job.error
    assert job.output == "before the error\n" and job.failures == 1


def test_failures_are_retried_up_to_max_failures(D):
    """A failing job is tried max_failures times, then failed."""
    job = D.eval("import os\nraise RuntimeError(os.environ['DSAGE_JOB_ID'])", max_failures=2)
    with pytest.raises(dsage.JobFailed):
        job.wait(timeout=60)
    assert job.failures == 2 and len(job.attempts) == 2


def test_a_job_s_exception_is_caught_by_its_own_class(D):
    """As with concurrent.futures, Dask or Celery, `except ValueError` catches the failure of a
    job that raised ValueError (a JobFailed all the same), a class defined in the client's
    program included; an exception that does not come back is a plain JobFailed."""
    class OutOfCurves(Exception):
        pass

    def give_up(n):
        raise OutOfCurves(f"no factor of {n}")

    class Awkward(Exception):
        def __init__(self, a, b):           # unpickling calls Awkward(message): it cannot come back
            super().__init__(f"{a} and {b}")

    def awkward():
        raise Awkward(1, 2)

    job = D.submit(dsage.Job(func=give_up, args=(91,), max_failures=1))
    with pytest.raises(OutOfCurves) as info:
        job.wait(timeout=30)
    assert isinstance(info.value, dsage.JobFailed) and info.value.job_id == job.job_id
    assert type(info.value.exception) is OutOfCurves and info.value.exception.args == ("no factor of 91",)
    assert str(info.value).startswith(f"job {job.job_id} failed: ") and "OutOfCurves: no factor of 91" in str(info.value)
    listed = next(h for h in D.jobs(status="failed") if h.job_id == job.job_id)   # a record without it
    with pytest.raises(OutOfCurves):
        listed.wait(timeout=30)
    with D.executor() as ex:
        fut = ex.submit(int, "zz")
        with pytest.raises(ValueError, match="invalid literal"):
            fut.result(timeout=30)
        assert isinstance(fut.exception(), dsage.JobFailed)
    with pytest.raises(dsage.JobFailed, match="Awkward: 1 and 2") as info:
        D.submit(dsage.Job(func=awkward, max_failures=1)).wait(timeout=30)
    assert info.value.exception is None and not isinstance(info.value, Awkward)
    held = D.eval("raise KeyError('x' * 100_000)", max_failures=1)      # too large to come back
    with pytest.raises(dsage.JobFailed) as info:
        held.wait(timeout=30)
    assert info.value.exception is None and not isinstance(info.value, KeyError)


def test_segfault_is_a_clean_failure(D):
    """A job that crashes its interpreter fails with the signal named; the worker goes on."""
    job = D.eval("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", max_failures=1)
    with pytest.raises(dsage.JobFailed):
        job.wait(timeout=30)
    assert "SIGSEGV" in job.error
    assert D.eval("'still alive'").wait(timeout=30) == "still alive"


def test_a_job_killed_by_sigkill_is_said_to_be_maybe_out_of_memory(D):
    """A SIGKILL that dsage did not send is most often the kernel's OOM killer: the error
    says so, and how to get a MemoryError instead."""
    job = D.eval("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", max_failures=1, timeout=None)
    with pytest.raises(dsage.JobFailed, match=r"killed by signal 9 \(SIGKILL\) \(out of memory\? .*--max-memory"):
        job.wait(timeout=30)


def test_peak_memory_is_each_job_s_own(D, cluster):
    """A job's peak resident memory is its own, even in a job process reused from an earlier
    job: one that filled 120 MiB for a moment shows at least that, a small job after it in the
    same process much less; a job stopped by its timeout shows what it held; `dsage job` and
    the JSON API show it."""
    pid = "__import__('os').getpid()"
    big = D.eval(f"x = bytearray(120 << 20)\ndel x\n{pid}")
    process = big.wait(timeout=30)
    assert big.peak_memory >= 120 << 20
    for _ in range(50):              # two slots: the next small job may run in the other process
        small = D.eval(pid)
        if small.wait(timeout=30) == process:
            break
    else:
        pytest.fail("no small job ran in the process the big one used")
    assert 0 < small.peak_memory < 100 << 20
    stopped = D.eval("import time\nx = bytearray(80 << 20)\ntime.sleep(60)", timeout=1, max_failures=1)
    with pytest.raises(dsage.JobFailed, match="timed out"):
        stopped.wait(timeout=30)
    assert stopped.peak_memory >= 80 << 20
    shown = cluster.run("job", str(big.job_id)).stdout
    mib = float(shown.split("peak memory ")[1].split(" MiB")[0])
    assert mib == round(big.peak_memory / 2**20, 1)


def test_a_job_whose_process_dies_is_reported_with_its_memory_as_last_seen(tmp_path_factory):
    """A job process killed by the kernel (the OOM killer's SIGKILL, here the job's own) can
    say nothing: its worker reports the resident memory it saw at its last heartbeat."""
    from tests.e2e.conftest import start_cluster

    c = start_cluster(tmp_path_factory, lease_seconds=4)      # heartbeats every second
    try:
        with connected(c) as session:
            job = session.eval("import os, signal, time\nx = bytearray(150 << 20)\ntime.sleep(2.5)\n"
                               "os.kill(os.getpid(), signal.SIGKILL)", max_failures=1)
            with pytest.raises(dsage.JobFailed, match="killed by signal 9"):
                job.wait(timeout=60)
            seen = int(job.error.split("had reached ")[1].split(" MiB")[0])
            assert seen >= 150 and seen == round(job.peak_memory / 2**20)
            assert abs(job.memory - 2 * job.peak_memory / 2**20) <= 2       # a retry would need twice that
    finally:
        c.stop()


def test_a_job_that_runs_out_of_memory_runs_again_where_there_is_more(tmp_path_factory, caplog):
    """A MemoryError under a worker's --max-memory makes the job need twice that limit: it
    waits (saying why) until a worker that gives that much comes, and completes there.  A
    job that asks for memory itself goes only to such a worker."""
    from tests.e2e.conftest import start_cluster

    c = start_cluster(tmp_path_factory, workers=0)
    try:
        c.add_worker(slots=1, name="small", args=("--max-memory", "400"))
        with connected(c) as session, caplog.at_level(logging.WARNING, logger="dsage"):
            job = session.eval("x = bytearray(600 << 20)\nlen(x) >> 20")
            wait_for(lambda: job.failures == 1 and job.status == "new", what="the first attempt to run out")
            said = (f"job {job.job_id} ran out of memory and needs 800 MiB; no connected worker gives a job that "
                    f"much (the most: 400 MiB): it waits for one")
            wait_for(lambda: said in caplog.text, what="the client to be told")      # a wait is not silent
            assert said in (c.home / "server.log").read_text()
            assert job.memory == 800 and "MemoryError" in job.error
            time.sleep(1.0)
            assert job.status == "new" and len(job.attempts) == 1        # the small worker takes it no more
            shown = c.run("job", str(job.job_id)).stdout
            assert "needs 800 MiB" in shown and "no connected worker gives a job that much (the most: 400 MiB)" in shown
            assert re.search(r"^  small .* 400 MiB a job$", c.run("status").stdout, re.M)
            asked = session.eval("'mine'", memory=500)
            c.add_worker(slots=1, name="big")
            assert job.wait(timeout=60) == 600 and asked.wait(timeout=60) == "mine"
            assert [a["worker"] for a in job.attempts] == ["small", "big"] and asked.attempts[0]["worker"] == "big"
            assert session.eval("'anywhere'").wait(timeout=60) == "anywhere"
    finally:
        c.stop()


def test_timeout_stops_the_job(D):
    """A job past its timeout is stopped and fails with a clear reason."""
    job = D.eval("import time\ntime.sleep(60)", timeout=1, max_failures=1)
    with pytest.raises(dsage.JobFailed):
        job.wait(timeout=30)
    assert "timed out after 1 s" in job.error


def test_kill_a_running_job_within_seconds(D, cluster):
    """Killing a running job stops its child process quickly and marks it killed."""
    marker = cluster.home / "pid-of-killed-job"
    job = D.eval(f"import os, time\nopen({str(marker)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)")
    pid = int(wait_for(lambda: marker.exists() and marker.read_text(), what="the job to start"))
    start = time.monotonic()
    assert job.kill() == "killed"
    assert D.status()["busy"] == 0, "a killed job's slot is free at once"
    with pytest.raises(dsage.JobKilled):
        job.wait(timeout=10)

    def gone():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    wait_for(gone, timeout=10, what="the job's process to end")
    assert time.monotonic() - start < 2.0, "a kill reaches a running job within 2 seconds"
    assert job.status == "killed"


def test_kill_a_queued_job(D):
    """A queued job can be killed before it runs, and then never runs."""
    blockers = [D.eval("import time\ntime.sleep(3)") for _ in range(4)]
    job = D.eval("open('ran', 'w')\n'ran'", priority=100)
    # The worker may lease it ahead of its busy slots for a moment: it gives it back after 0.5 s.
    wait_for(lambda: job.status == "new", timeout=10, what="the job back in the queue")
    job.kill()
    for b in blockers:
        b.wait(timeout=30)
    assert job.status == "killed"
    assert all(a["outcome"] == "undelivered" for a in job.attempts), "it never ran"


def test_rerun(D):
    """rerun runs a finished job again."""
    job = D.eval("import random\nrandom.random()")
    first = job.wait(timeout=30)
    job.rerun()
    second = job.wait(timeout=30)
    assert first != second and len(job.attempts) == 2


def test_large_payload_and_result_travel_in_chunks(D, cluster):
    """Tens of MB go to a worker and come back intact, stored in blobs beside the database."""
    data = os.urandom(1 << 20) * 20
    job = D.submit(lambda b: b[::-1], data)
    assert job.wait(timeout=120) == data[::-1]
    assert job.status == "completed"
    assert (cluster.home / "db" / "dsage.fs").stat().st_size < 4 << 20, "payloads must not bloat the FileStorage"


def test_files_are_placed_in_the_working_directory(D):
    """Job files are written beside the job, which runs in its own temporary folder."""
    job = D.submit(dsage.Job(code="open('input.txt').read().upper()", files={"input.txt": b"abc"}))
    assert job.wait(timeout=30) == "ABC"
    nested = D.eval("open('data/in/x.txt').read()", files={"data/in/x.txt": "deep"})   # folders are made
    assert nested.wait(timeout=30) == "deep"


def test_files_from_local_paths(D, tmp_path):
    """A list of local paths: each file is read at submission and placed under its name."""
    (tmp_path / "data.txt").write_text("from a path")
    job = D.eval("open('data.txt').read()", files=[str(tmp_path / "data.txt")])
    assert job.wait(timeout=30) == "from a path"


def test_listing_and_lookup(D):
    """jobs(), job(id), workers() and status() describe what is there."""
    job = D.eval("'listed'")
    job.wait(timeout=30)
    assert job.job_id in [j.job_id for j in D.jobs()]
    assert D.job(job.job_id).result == "listed"
    assert job.job_id in [j.job_id for j in D.jobs(status="completed")]
    assert job in D.jobs(status="completed") and D.job(job.job_id) == job and len({job, D.job(job.job_id)}) == 1
    with pytest.raises(dsage.DsageError, match="unknown status 'done': one of new, processing"):
        D.jobs(status="done")
    workers = D.workers()
    assert workers[0]["slots"] == 2 and workers[0]["facts"]["cores"] >= 1
    status = D.status()
    assert status["workers"] == 1 and status["slots"] == 2 and status["jobs"]["completed"] >= 1
    assert 0.0 < status["server_load"] <= 1.0      # it has run jobs


def test_executor_and_as_completed(D):
    """The Executor maps like concurrent.futures; as_completed yields every job once."""
    with D.executor() as ex:
        assert list(ex.map(abs, [-3, -2, 1])) == [3, 2, 1]
        fut = ex.submit(divmod, 7, 0)
        with pytest.raises(dsage.JobFailed):
            fut.result(timeout=60)
        slow = ex.submit(time.sleep, 60)          # returns at once
        assert not slow.done()
        wait_for(slow.running, what="the job to start")
        with pytest.raises(TimeoutError):
            list(ex.map(time.sleep, [2], timeout=0.5))
        slow.job.kill()
        with pytest.raises(dsage.JobKilled):
            slow.result(timeout=60)
    jobs = [D.eval(f"import time\ntime.sleep({d})\n{d}") for d in (0.6, 0.0, 0.3)]
    done = [j.result for j in dsage.as_completed(jobs, timeout=60)]
    assert sorted(done) == [0.0, 0.3, 0.6]


def test_executor_map_gives_results_in_order_and_failures_at_their_place(D):
    """Executor.map (its calls submitted in batches): the results in item order, a failure
    raised at its place, as concurrent.futures does."""
    with D.executor() as ex:
        assert list(ex.map(pow, range(300), [2] * 300)) == [i * i for i in range(300)]
        results = ex.map(lambda x: 1 // x, [1, 0, 1])
        assert next(results) == 1
        with pytest.raises(dsage.JobFailed, match="ZeroDivisionError"):
            next(results)
        assert list(results) == []          # ended by the failure, as in concurrent.futures


def test_executor_cancels_only_queued_jobs(tmp_path_factory):
    """Future.cancel() kills a job still in the queue (True) and leaves a running one alone
    (False); shutdown(cancel_futures=True) cancels the queued ones, as concurrent.futures.
    (This worker leases nothing ahead, `--prefetch 0`, so that the queued jobs stay in the
    queue; test_prefetch cancels a job leased ahead.)"""
    from tests.e2e.conftest import start_cluster

    cluster = start_cluster(tmp_path_factory, workers=1, slots=2, worker_args=("--prefetch", "0"))
    try:
        with connected(cluster) as D:
            ex = D.executor()
            running = [ex.submit(time.sleep, 60) for _ in range(2)]     # the cluster's 2 slots
            for f in running:
                wait_for(f.running, what="the jobs to start")
            queued = [ex.submit(os.getpid) for _ in range(3)]
            assert [f.job.status for f in queued] == ["new"] * 3
            assert queued[0].cancel() and queued[0].cancelled() and queued[0].done()
            assert queued[0].job.status == "killed"
            with pytest.raises(concurrent.futures.CancelledError):
                queued[0].result(timeout=1)
            assert not running[0].cancel() and not running[0].cancelled()
            ex.shutdown(wait=False, cancel_futures=True)
            assert [f.cancelled() for f in queued] == [True, True, True]
            assert [f.job.status for f in queued] == ["killed"] * 3
            assert all(f.job.attempts == [] for f in queued)        # never run
            assert [f.running() for f in running] == [True, True]
            # A map given up (its timeout) cancels the rest of its jobs, together.
            with pytest.raises(TimeoutError):
                list(D.executor().map(abs, range(300), timeout=0.2))
            assert D.status()["jobs"]["new"] == 0
            assert [f.running() for f in running] == [True, True]
            for f in running:
                f.job.kill()
            for f in running:
                with pytest.raises(dsage.JobKilled):
                    f.result(timeout=30)
    finally:
        cluster.stop()


def test_results_are_freed_with_their_handles(D, monkeypatch):
    """A session keeps a result while a handle of its job is held, and a bounded cache of
    recent ones: sweep after sweep in one notebook does not grow without end."""
    from dsage.client import connection
    monkeypatch.setattr(connection, "FINISHED_BYTES", 1 << 20, raising=False)
    tracemalloc.start()
    try:
        jobs = D.map(bytes, [200_000] * 50)                 # 10 MB of results
        assert [len(j.wait(timeout=60)) for j in jobs] == [200_000] * 50
        assert len(jobs[0].result) == 200_000               # held with the handle
        held = tracemalloc.get_traced_memory()[0]
        del jobs
        gc.collect()
        freed = held - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert freed > 8_000_000, f"only {freed:,} bytes freed"
    again = D.jobs(limit=1)[0]                              # the server still has them all
    assert again.wait(timeout=60) == bytes(200_000)


def test_wait_timeout(D):
    """wait(timeout) raises TimeoutError when the job is not done in time; the job goes on."""
    job = D.eval("import time\ntime.sleep(2)\n'late'")
    with pytest.raises(TimeoutError, match=f"^job {job.job_id} not finished within 0.2 s$"):
        job.wait(timeout=0.2)
    assert job.wait(timeout=30) == "late"


def test_jobs_run_niced_in_a_private_folder_with_a_clean_environment(D):
    """The child runs at the worker's nice level, in a private temporary folder that is
    empty when a job starts (what earlier jobs wrote there is gone), without the worker's
    DSAGE_* settings."""
    writes = "import os\nos.makedirs('sub')\nopen('sub/f', 'w').write('x')\nopen('g', 'w').write('y')\nos.getcwd()"
    written = [D.eval(writes) for _ in range(4)]
    cwds = [j.wait(timeout=30) for j in written]
    assert all("dsage-job" in cwd for cwd in cwds)
    nice, env, cwd, files = D.eval("import os\n(os.nice(0), sorted(k for k in os.environ if k.startswith('DSAGE_') "
                                   "and k != 'DSAGE_JOB_ID'), os.getcwd(), os.listdir())").wait(timeout=30)
    assert nice == 10 and env == [] and files == []
    for folder in cwds:
        assert not os.path.exists(folder) or os.listdir(folder) == []


def test_async_api(cluster, D):
    """connect_async gives the same calls as Deferreds."""
    from dsage.client import connect_async
    from dsage.client import reactor as rt

    client = rt.call(connect_async, cluster.address, str(cluster.home / "client.pem"), timeout=30)
    try:
        job_id = rt.call(client.eval, "6 * 7", timeout=30)
        assert rt.call(client.result, job_id, timeout=30) == 42
        ids = rt.call(client.map, abs, [-1, -2], timeout=30)
        assert [rt.call(client.result, i, timeout=30) for i in ids] == [1, 2]
        bad = rt.call(client.submit, divmod, 1, 0, timeout=30)
        with pytest.raises(dsage.JobFailed):
            rt.call(client.result, bad, timeout=60)
        assert rt.call(client.status, timeout=30)["workers"] == 1
    finally:
        rt.call(client.stop, timeout=10)


def test_scatter_gather_with_args_and_kwargs(D):
    """starmap takes args tuples or lists, or (args, kwargs) pairs; results come back in item order,
    and new work can be added while earlier results are inspected without blocking."""
    def f(a, b=0, *, scale=1):
        return (a + b) * scale

    jobs = D.starmap(f, [(1,), [2, 3], ((4,), {"scale": 10}), ((5, 1), {"scale": 2})])
    more = []
    while not all(j.done() for j in jobs):
        ready = [j for j in jobs if j.done()]
        if ready and not more:
            more = D.map(f, [100, 200])
    assert [j.wait(timeout=30) for j in jobs] == [1, 5, 40, 12]
    assert [j.wait(timeout=30) for j in (more or D.map(f, [100, 200]))] == [100, 200]


def test_scatter_example(D):
    """The shipped scatter/gather example gathers one mean per drift."""
    from dsage.examples.scatter import sweep

    out = sweep(D, drifts=(0.0, 0.5), seeds=3)
    assert set(out) >= {0.0, 0.5} and out[0.5] > out[0.0]


def test_a_stopped_worker_leaves_no_job_folders(tmp_path_factory):
    """dsage_worker stopped (SIGTERM) with one job running and one slot idle removes both
    slots' folders."""
    from tests.e2e.conftest import start_cluster

    cluster = start_cluster(tmp_path_factory, workers=1, slots=2)
    try:
        with connected(cluster) as D:
            idle = D.eval("import os\nos.getcwd()").wait(timeout=30)
            marker = cluster.home / "busy-folder"
            D.eval(f"import os, time\nopen({str(marker)!r}, 'w').write(os.getcwd())\ntime.sleep(60)")
            wait_for(lambda: marker.exists() and marker.read_text(), timeout=30, what="the long job's folder")
            folders = {idle, marker.read_text()}
            assert all(os.path.isdir(f) for f in folders)
            for proc in cluster.workers:
                proc.terminate()
                proc.wait(30)
            assert not any(os.path.exists(f) for f in folders), folders
    finally:
        cluster.stop()


def test_a_worker_without_slots_takes_one_per_core_it_may_use(tmp_path_factory):
    """dsage_worker without --slots, started under `taskset -c 0` (as an administrator or a
    container leaves it one core of the machine's), runs one job at a time, not one per core
    of the machine."""
    import subprocess

    from dsage.client.local import command
    from tests.e2e.conftest import start_cluster

    cluster = start_cluster(tmp_path_factory, workers=0)
    cluster.run("worker", "add", "pinned", "--out", str(cluster.home / "pinned.pem"))
    with open(cluster.home / "pinned.log", "ab") as log:
        proc = subprocess.Popen(["taskset", "-c", "0"] + command("dsage_worker") +
                                ["--cert", str(cluster.home / "pinned.pem"), "--server", cluster.address],
                                env=cluster.env, stdout=log, stderr=log, start_new_session=True)
    cluster.workers.append(proc)
    try:
        with connected(cluster) as D:
            (worker,) = D.workers()
            assert worker["slots"] == 1 and worker["facts"]["cores"] == os.cpu_count()
    finally:
        cluster.stop()


def test_output_of_a_running_job_is_shown_while_it_runs(tmp_path_factory):
    """What a running job has printed is job.output (and in `dsage job`) as soon as it is
    read: the server asks the job's worker (its heartbeats, every 600 s here, would show
    nothing in this test); once the job ends, the whole output."""
    import subprocess

    from dsage.client.local import LocalCluster, command

    cluster = LocalCluster(tmp_path_factory.mktemp("home"))
    cluster.init()
    cluster.configure(heartbeat_seconds=600, lease_seconds=2400)
    cluster.start_server()
    cluster.add_worker(slots=2)
    gate = tmp_path_factory.mktemp("gate")
    try:
        with connected(cluster) as D:
            job = D.eval("import sys, time\nprint('step 1', flush=True)\nsys.stderr.write('warned\\n')\n"
                         "while True: time.sleep(0.05)\n", max_failures=1)
            # stdout and stderr come through two pipes: their order is the worker's reads'.
            shown = lambda: subprocess.run(command("dsage") + ["job", str(job.job_id)], capture_output=True,
                                           text=True, env=dict(os.environ, DSAGE_HOME=str(cluster.home)),
                                           timeout=60).stdout
            wait_for(lambda: "step 1" in shown(), timeout=30, what="the output so far in `dsage job`")
            assert sorted(job.output.splitlines()) == ["step 1", "warned"]
            assert job.status == "processing"
            assert job.kill() == "killed"
            # Each step waits for the test to have seen the one before.
            done = D.eval(f"import os, time\nfor i in range(3):\n    print(i, flush=True)\n"
                          f"    while not os.path.exists(os.path.join({str(gate)!r}, str(i))): time.sleep(0.02)\n"
                          f"'ok'")
            for i in range(3):
                wait_for(lambda: done.output == "".join(f"{k}\n" for k in range(i + 1)), timeout=30,
                         what=f"output up to {i}")
                assert done.status == "processing"
                (gate / str(i)).touch()
            assert done.wait(timeout=30) == "ok" and done.output == "0\n1\n2\n"
    finally:
        cluster.stop()


def test_a_closed_session_refuses_at_once_and_releases_its_waiters(cluster):
    """close() fails a wait in another thread at once, and every call after it says the
    session is closed (they used to retry until their timeouts)."""
    import threading

    session = cluster.connect()
    job = session.eval("import time; time.sleep(60)")
    errors_seen = []

    def waiter():
        try:
            job.wait(timeout=120)
        except dsage.DsageError as e:
            errors_seen.append(str(e))
    thread = threading.Thread(target=waiter)
    thread.start()
    wait_for(lambda: job.status == "processing", what="the job running")
    session.close()
    thread.join(timeout=30)
    assert errors_seen == ["this dsage session is closed: connect again"]
    for call in (lambda: session.submit(abs, 1), lambda: session.job(job.job_id), lambda: job.wait(timeout=60),
                 session.status):
        with pytest.raises(dsage.DsageError, match="session is closed"):
            call()
    with connected(cluster) as again:
        assert again.job(job.job_id).kill() == "killed"


def test_a_refused_submission_does_not_stall_the_idle_workers(D):
    """A job description the server refuses (sent past the client's own checks) fails
    alone: the idle slots it was offered take the next job at once (they used to wait for
    ever)."""
    from dsage.client import reactor as rt

    wait_for(lambda: D.status()["busy"] == 0, what="idle slots")
    bad = dict(dsage.Job(code="1").to_wire(), timeout=float("nan"))
    with pytest.raises(dsage.RemoteError, match="timeout must be"):
        rt.call(D.client.submit_many, [bad], timeout=30)
    assert D.submit(abs, -7).wait(timeout=30) == 7


@pytest.mark.parametrize("code, value", [
    ("import os\nnull = os.open(os.devnull, os.O_WRONLY)\nos.dup2(null, 1)\nos.dup2(null, 2)\n7", 7),
    ("import os\nos.close(1)\nos.close(2)\n5", 5),
    ("import sys\nsys.stdout.close()\nsys.stdout = None\n6", 6),
    ("import os, sys\n(sys.stdin.read(), os.read(0, 100))", ("", b"")),
    ("import subprocess\nsubprocess.run(['cat'], capture_output=True, timeout=10).stdout", b""),
])
def test_what_a_job_does_to_its_streams_does_not_stall_its_slot(D, code, value):
    """A job that closes or redirects stdout and stderr, or reads stdin (itself or in a
    subprocess), ends as soon as it returns, and the jobs after it in the same job process
    run and print as usual (stdout was the worker's only sign that a job had ended: such a
    job held its slot until its timeout)."""
    jobs = [D.eval(code, max_failures=1, timeout=30)] + [D.eval(f"print('after', {i})\n{i}") for i in range(4)]
    assert jobs[0].wait(timeout=60) == value
    assert [j.wait(timeout=60) for j in jobs[1:]] == [0, 1, 2, 3]
    assert [j.output for j in jobs[1:]] == [f"after {i}\n" for i in range(4)]


def processes_marked(mark: str) -> list[int]:
    """The pids of the processes whose command line has `mark` in it."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if mark in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except (OSError, ValueError):
            pass
    return found


def test_a_process_a_job_left_behind_does_not_hold_its_slot(D):
    """A job that starts a process outside its process group (which keeps the job's stdout
    open) and then times out: the failure comes once the job's own process is gone, not when
    the other one exits a minute later, and the slot takes the next job; the process is
    ended with the job."""
    mark = f"{random.randrange(10**6, 10**7)}.25"
    job = D.eval(f"import subprocess, time\nsubprocess.Popen(['sleep', '{mark}'], start_new_session=True)\n"
                 "time.sleep(60)", timeout=2, max_failures=1)
    try:
        with pytest.raises(dsage.JobFailed, match="timed out after 2 s"):
            job.wait(timeout=25)
        assert [D.eval(str(i)).wait(timeout=25) for i in range(3)] == [0, 1, 2]
        wait_for(lambda: not processes_marked(mark), timeout=10, what="the job's process to be ended")
    finally:
        for pid in processes_marked(mark):
            os.kill(pid, 9)


def test_what_a_job_leaves_running_ends_with_it(D):
    """Processes a job started and did not wait for (in its process group, in a session of
    their own, orphaned by a shell) are killed when the job ends; the lab machine is left as
    it was, and the next jobs run as usual."""
    mark = f"{random.randrange(10**6, 10**7)}.75"
    code = ("import subprocess\nquiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            f"subprocess.Popen(['sleep', '{mark}'], **quiet)\n"
            f"subprocess.Popen(['sleep', '{mark}'], start_new_session=True, **quiet)\n"
            f"subprocess.run(['sh', '-c', 'sleep {mark} & exit 0'], **quiet)\n"
            "'started'")
    try:
        assert D.eval(code, max_failures=1).wait(timeout=60) == "started"
        assert processes_marked(mark) == []
        assert [D.eval(str(i)).wait(timeout=25) for i in range(3)] == [0, 1, 2]
    finally:
        for pid in processes_marked(mark):
            os.kill(pid, 9)


def test_a_job_process_that_grew_past_recycle_memory_is_replaced(tmp_path_factory):
    """A job process is reused for the next job while its memory stays small, and replaced
    after a job that took it past the worker's --recycle-memory (what that job left behind
    does not stay for the next ones); 0 gives every job a fresh process."""
    from tests.e2e.conftest import start_cluster

    c = start_cluster(tmp_path_factory, workers=0)
    try:
        c.add_worker(slots=1, args=("--recycle-memory", "100"))
        with connected(c) as session:
            c.wait_for_workers(session)
            pid = "__import__('os').getpid()"
            first = session.eval(pid).wait(timeout=30)
            grown = session.eval(f"kept = bytearray(150 << 20)\n{pid}").wait(timeout=30)
            after = session.eval(pid).wait(timeout=30)
            assert first == grown, "a small job's process is reused"
            assert after != grown, "the process that grew to 150 MiB was replaced"
            assert session.eval(pid).wait(timeout=30) == after
        c.add_worker(slots=1, args=("--recycle-memory", "0"), name="fresh")
        with connected(c) as session:
            c.wait_for_workers(session, n=2)
            for w in c.workers[:1]:
                w.terminate()
                w.wait(10)
            wait_for(lambda: len(session.workers()) == 1, what="one worker left")
            pids = [session.eval(pid).wait(timeout=30) for _ in range(3)]
            assert len(set(pids)) == 3, "a fresh process for every job"
    finally:
        c.stop()
