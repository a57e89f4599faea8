"""The job process's side (`python -m dsage.worker.child`): running a job's code or call,
its outcome, its memory, and what it leaves running."""
from __future__ import annotations

import os
import pickle
import sys

import pytest

from dsage.worker.child import run_code


def test_code_result_is_last_expression_or_dsage_result():
    """The value of the last expression, unless DSAGE_RESULT is set."""
    assert run_code("x = 2\nx ** 10") == 1024
    assert run_code("DSAGE_RESULT = 'set'\n1 + 1") == "set"
    assert run_code("y = 1") is None
    assert run_code("def f(n):\n    return n + 1\nf(4)") == 5


def test_code_that_exits_with_status_0_succeeds_and_another_status_fails():
    """sys.exit() and sys.exit(0) end a script successfully, as in a shell; sys.exit(3) fails."""
    assert run_code("import sys\nDSAGE_RESULT = 'partial'\nsys.exit()\n'not reached'") == "partial"
    assert run_code("import sys\nsys.exit(0)\n'not reached'") is None
    assert run_code("import sys\nsys.exit(0) if True else None") is None
    with pytest.raises(SystemExit) as exited:
        run_code("import sys\nDSAGE_RESULT = 1\nsys.exit(3)")
    assert exited.value.code == 3


def test_a_result_too_large_for_one_message_fails_the_job_with_its_size(tmp_path, monkeypatch):
    """The job process turns a result larger than MAX_JOB_BYTES into a failure that says so,
    instead of an outcome that no message could carry to the server."""
    from dsage.worker import child

    monkeypatch.setattr(child, "MAX_JOB_BYTES", 1 << 20)
    job = {"kind": "code", "payload": b"b'x' * (2 << 20)", "workdir": str(tmp_path), "name": "big"}
    outcome = child.run_one(job)
    assert not outcome["ok"] and "result is 2.0 MiB pickled; a result may be at most 1 MiB" in outcome["error"]
    assert child.run_one(dict(job, payload=b"b'x' * 1000"))["ok"]


def test_a_job_s_peak_memory_is_its_own(tmp_path):
    """A job's outcome carries its own peak resident memory: what it filled for a moment
    counts, and a small job after it in the same process is not charged with it."""
    from dsage.worker import child

    job = {"kind": "code", "payload": b"x = bytearray(64 << 20)\ndel x", "workdir": str(tmp_path), "name": "big"}
    big = child.run_one(job)["peak_memory"]
    assert big >= 64 << 20
    assert child.run_one(dict(job, payload=b"1"))["peak_memory"] < big - (48 << 20)


def test_a_job_error_shows_the_job_s_own_frames_and_lines_only(tmp_path):
    """A code job's traceback starts in the job's code and shows its lines; a syntax error
    is the error alone; neither shows dsage's frames."""
    from dsage.worker import child

    job = {"kind": "code", "payload": b"x = 1\ny = 0\nx / y", "workdir": str(tmp_path), "job_id": 7}
    error = child.run_one(job)["error"]
    assert error.splitlines() == ["Traceback (most recent call last):", '  File "<job 7>", line 3, in <module>',
                                  "    x / y", "     ~~^~~", "ZeroDivisionError: division by zero"]
    error = child.run_one(dict(job, payload=b"1 +"))["error"]
    assert error.splitlines()[0] == '  File "<job 7>", line 1' and error.strip().endswith("SyntaxError: invalid syntax")
    assert "<job 7>" not in child.linecache.cache


def test_a_job_s_exception_comes_back_pickled_when_it_can(tmp_path):
    """A job's Exception travels back pickled beside its traceback; one that does not
    unpickle, a large one, an exit and dsage's own refusals do not."""
    import cloudpickle

    from dsage.worker import child

    job = {"kind": "code", "payload": b"raise KeyError('k')", "workdir": str(tmp_path), "job_id": 2}
    out = child.run_one(job)
    assert repr(cloudpickle.loads(out["exception"])) == "KeyError('k')" and "KeyError: 'k'" in out["error"]
    awkward = b"class E(Exception):\n    def __init__(self, a, b):\n        super().__init__(a)\nraise E(1, 2)"
    for payload in (awkward, b"raise ValueError('x' * 100_000)", b"raise SystemExit(3)"):
        out = child.run_one(dict(job, payload=payload))
        assert not out["ok"] and out["exception"] is None
    out = child.run_one(dict(job, kind="callable", payload=b"not a pickle"))
    assert out["error"].startswith("dsage: the job's function") and out["exception"] is None


def test_a_call_the_worker_cannot_unpickle_or_a_result_it_cannot_pickle_says_so(tmp_path):
    """A function from a module the worker lacks, and a result that does not pickle, fail
    with one line that names the cause (no traceback through pickle's internals)."""
    import cloudpickle

    from dsage.worker import child

    module = type(sys)("module_only_the_client_has")
    exec("def twice(x):\n    return 2 * x", module.__dict__)
    sys.modules[module.__name__] = module
    try:
        payload = cloudpickle.dumps((module.twice, (2,), {}))
    finally:
        del sys.modules[module.__name__]
    job = {"kind": "callable", "payload": payload, "workdir": str(tmp_path), "job_id": 1}
    assert child.run_one(job)["error"] == (
        "dsage: the job's function and arguments could not be unpickled on this worker: ModuleNotFoundError: "
        "No module named 'module_only_the_client_has' (install that module where the workers run, or define "
        "the function in your script or notebook: those travel with the job)")
    error = child.run_one(dict(job, kind="code", payload=b"import threading\nthreading.Lock()"))["error"]
    assert error.startswith("dsage: the job's result could not be pickled to send back: TypeError: cannot "
                            "pickle '_thread.lock' object") and "Traceback" not in error


def test_a_job_s_environment_changes_do_not_reach_the_next_job(tmp_path, monkeypatch):
    """What a job sets, changes or deletes in os.environ is undone before the next job in
    the same process; DSAGE_JOB_ID and TMPDIR are the job's own while it runs."""
    from dsage.worker import child

    monkeypatch.setenv("KEPT", "as before")
    monkeypatch.delenv("ADDED", raising=False)
    before = dict(os.environ)
    code = b"import os\nos.environ['ADDED'] = 'x'\nos.environ['KEPT'] = 'changed'\ndel os.environ['HOME']\n" \
           b"(os.environ['DSAGE_JOB_ID'], os.environ['TMPDIR'])"
    outcome = child.run_one({"kind": "code", "payload": code, "workdir": str(tmp_path), "job_id": 5})
    assert outcome["ok"] and pickle.loads(outcome["result"]) == ("5", str(tmp_path))
    assert dict(os.environ) == before


def test_a_job_process_reuses_the_memory_of_earlier_payloads():
    """After keep_freed_memory, a process that takes and frees 1 MiB messages one after
    another (a job process's payloads) reuses its heap instead of faulting in fresh pages
    from the kernel each time (glibc's default: a fault for every 4 KiB page of every block)."""
    import subprocess
    from pathlib import Path

    from dsage.worker import child

    probe = ("import os, resource, sys\nfrom dsage.worker import child\n"
             "if sys.argv[1] == 'keep': child.keep_freed_memory()\n"
             "def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
             "def one(): copy = bytearray(data); copy2 = bytes(copy)\n"
             "data = os.urandom(1 << 20)\n"
             "for _ in range(5): one()\n"
             "before = faults()\n"
             "for _ in range(100): one()\n"
             "print(faults() - before)")
    root = str(Path(child.__file__).parents[2])
    counts = {mode: int(subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True,
                                       check=True, cwd=root).stdout)
              for mode in ("default", "keep")}
    assert counts["keep"] < 1_000 < 10_000 < counts["default"], counts


def test_a_job_process_ends_what_a_job_left_running():
    """What a job started and left running (a child, one in a session of its own, one whose
    parent exited, one whose parent still runs) is killed when the job ends, in a job
    process (it adopts orphans); the children it had already waited for are untouched."""
    import random
    import subprocess
    from pathlib import Path

    from dsage.worker import child

    mark = f"{random.randrange(10**6, 10**7)}.5"
    probe = ("import subprocess, sys, time\nfrom dsage.worker import child\n"
             "child.adopt_orphans()\n"
             "quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
             f"subprocess.Popen(['sleep', '{mark}'], **quiet)\n"
             f"subprocess.Popen(['sleep', '{mark}'], start_new_session=True, **quiet)\n"
             f"subprocess.run(['sh', '-c', 'sleep {mark} & exit 0'], **quiet)\n"
             f"subprocess.Popen(['sh', '-c', 'sleep {mark} & sleep {mark}'], **quiet)\n"
             "subprocess.run(['true'])\n"
             "time.sleep(0.5)\n"
             "print(child.end_leftovers(), child._has_children())\n")
    root = str(Path(child.__file__).parents[2])

    def marked() -> list[str]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if mark in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(entry.name)
            except OSError:
                pass
        return found

    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=root, timeout=60)
        assert out.stdout.split() == ["True", "False"], out.stderr
        assert marked() == []
    finally:
        for pid in marked():
            os.kill(int(pid), 9)


def test_a_leftover_the_job_process_cannot_kill_makes_it_retire_instead_of_waiting():
    """A process left running that cannot be killed (another user's, say: a setuid
    program) is not waited for: the sweep says it failed (the job process is then
    replaced), and succeeds once the process is gone."""
    import subprocess
    from pathlib import Path

    from dsage.worker import child

    probe = ("import os, subprocess, sys\nfrom dsage.worker import child\n"
             "child.adopt_orphans()\n"
             "p = subprocess.Popen(['sleep', '60'])\n"
             "kill = os.kill\n"
             "def refuse(pid, sig):\n"
             "    if pid == p.pid: raise PermissionError(1, 'Operation not permitted')\n"
             "    kill(pid, sig)\n"
             "child.os.kill = refuse\n"
             "print(child.end_leftovers())\n"
             "child.os.kill = kill\n"
             "print(child.end_leftovers(), child._has_children())\n")
    root = str(Path(child.__file__).parents[2])
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=root, timeout=60)
    assert out.stdout.split() == ["False", "True", "False"], out.stderr
