"""`python -m dsage.worker.child`: runs one job in a fresh interpreter, without Twisted.

Reads the job (msgpack) from stdin, runs it in its own process group at the requested nice
level in the current directory (the job's temporary folder), lets stdout and stderr flow to
the worker, and writes the outcome (msgpack) to file descriptor 3.
"""
from __future__ import annotations

import ast
import os
import resource
import sys
import traceback

import msgpack


def run_code(code: str, filename: str = "<job>") -> object:
    """Execute code; its result is DSAGE_RESULT if set, else the last expression's value."""
    tree = ast.parse(code, filename, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    namespace: dict = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(tree, filename, "exec"), namespace)
    value = eval(compile(last, filename, "eval"), namespace) if last is not None else None
    return namespace.get("DSAGE_RESULT", value)


def run(job: dict) -> object:
    """Run one job description and return its value."""
    for name, data in (msgpack.unpackb(job["files"]) if job.get("files") else {}).items():
        with open(os.path.basename(name), "wb") as fh:
            fh.write(data)
    if job["kind"] == "callable":
        import cloudpickle

        func, args, kwargs = cloudpickle.loads(job["payload"])
        return func(*args, **kwargs)
    return run_code(job["payload"].decode("utf-8"), job.get("name") or "<job>")


LIMITS = {"memory": resource.RLIMIT_AS, "open_files": resource.RLIMIT_NOFILE,
          "file_size": resource.RLIMIT_FSIZE, "cpu": resource.RLIMIT_CPU}


def apply_limits(limits: dict) -> None:
    """Lower this process's resource limits (address space, open files, file size, CPU s)."""
    for name, value in (limits or {}).items():
        if not value or name not in LIMITS:
            continue
        kind = LIMITS[name]
        _, hard = resource.getrlimit(kind)
        value = int(value) if hard == resource.RLIM_INFINITY else min(int(value), hard)
        # For CPU the soft limit sends SIGXCPU and the hard one, 5 s later, SIGKILL.
        top = value + 5 if name == "cpu" and (hard == resource.RLIM_INFINITY or value + 5 <= hard) else value
        resource.setrlimit(kind, (value, top))


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    """Entry point of the child process."""
    try:
        os.setsid()
    except OSError:
        pass
    job = msgpack.unpackb(sys.stdin.buffer.read(), raw=False)
    if job.get("nice"):
        os.nice(int(job["nice"]))
    apply_limits(job.get("limits"))
    sys.stdin = open(os.devnull)
    try:
        value = run(job)
        import cloudpickle

        outcome = {"ok": True, "result": cloudpickle.dumps(value)}
    except BaseException:
        outcome = {"ok": False, "error": traceback.format_exc()}
    sys.stdout.flush()
    sys.stderr.flush()
    outcome["cpu_time"] = _cpu()
    with os.fdopen(3, "wb") as fh:
        fh.write(msgpack.packb(outcome, use_bin_type=True))
    os._exit(0)


if __name__ == "__main__":
    main()
