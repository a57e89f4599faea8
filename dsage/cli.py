"""The `dsage` command: its admin and user sub-commands (the daemons: `dsage.daemons`).

Every command exits 0 on success, 1 with a one-line ``dsage: error: ...`` on a user error
(bad input, refused request, unreachable server) and 2 on bad usage; never a traceback for
a user error.  Heavy imports happen inside the commands."""
from __future__ import annotations

import argparse
import getpass
import os
import re
import socket
import sys
from pathlib import Path

from dsage import __version__, errors
from dsage.job import STATUSES


class UserError(Exception):
    """A problem the user can fix; printed as one line."""


# -- helpers ---------------------------------------------------------------------------
def _home() -> Path:
    from dsage.config import home

    return home()


def _sync(d):
    """The value of an already-fired Deferred (offline store calls run inline)."""
    out = []
    d.addBoth(out.append)
    value = out[0]
    if hasattr(value, "raiseException"):
        value.raiseException()
    return value


def _offline_store(where: Path | ServerConfig):
    """Open the server's database (of a home's server.conf, or of a config) directly (only
    while the server is not running)."""
    from dsage.config import ServerConfig, load_server_config
    from dsage.server.service import open_db
    from dsage.server.store import JobStore

    config = where if isinstance(where, ServerConfig) else load_server_config(dsage_home=where)
    try:
        return JobStore(open_db(config.db_uri), threaded=False)
    except ValueError as e:
        raise UserError(str(e)) from None


def _login_name() -> str:
    name = re.sub(r"[^A-Za-z0-9_.@-]", "_", getpass.getuser() or "admin")
    return name if name[0].isalnum() else "admin"


# -- dsage init --------------------------------------------------------------------------
def cmd_init(args) -> int:
    from dsage import tls
    from dsage.config import ServerConfig, check_server_config, masked

    home = _home()
    conf = home / "server.conf"
    host = args.host
    local = host in ("localhost", "127.0.0.1", "::1")
    config = ServerConfig(home=home, host=host, interface="127.0.0.1" if local else "0.0.0.0",
                          port=args.port, web_port=args.web_port, db=args.db or "")
    check_server_config(config, keys=False)
    if (home / "ca.key").exists() and not args.force:
        print(f"dsage is already set up in {home} (use --force to make new keys; "
              f"every bundle issued so far would stop working; {conf} is left as it is)")
        if args.db:
            shown = masked(args.db)
            print(f"--db is not used: to move to {shown.split('?')[0]}, set db = {shown} in {conf} "
                  f"(or run dsage_server --db {shown}); on a database with no users yet, the server "
                  f"makes this home's admin its admin (add the other users and workers again)")
        return 0
    if home.exists() and home.stat().st_mode & 0o077:
        raise UserError(f"{home} can be read or entered by other users (mode "
                        f"{home.stat().st_mode & 0o777:o}): `chmod 700 {home}` first; it will hold private keys")
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    store = _offline_store(config)          # a database that cannot be opened: nothing written
    try:
        ca = tls.Authority.create()
        ca.save(home)
        cert, key = ca.issue("dsage-server", server_hosts=[host, socket.gethostname()])
        tls.write_private(home / "server.key", tls.key_pem(key))
        (home / "server.pem").write_bytes(tls.cert_pem(cert))
        config.save(conf)
        admin = _login_name()
        bundle, serial = tls.make_bundle(ca, admin, "admin", f"{host}:{args.port}")
        _sync(store.add_identity(admin, "admin", serial, force=True))
    finally:
        store.stop()
    bundle.save(home / "client.pem")
    print(f"dsage set up in {home}:\n"
          f"  certificate authority  {home / 'ca.pem'}\n"
          f"  server configuration   {conf} (port {args.port})\n"
          f"  database               {masked(config.db_uri).split('?')[0]}\n"
          f"  admin bundle           {home / 'client.pem'} (user {admin})\n"
          f"next: dsage_server, then dsage worker add NAME --out FILE and dsage_worker --cert FILE")
    return 0


# -- identities (through the server when it runs, else directly on the database) ---------
def _admin_call(options, verb: str, **args):
    """Call an admin request on the running server (as the admin of --cert, else of this
    home), or, with this home's bundle, do it offline on the database when it is down."""
    home = _home()
    remote = options.cert is not None or options.server is not None
    try:
        import dsage

        D = dsage.connect(options.server, cert=options.cert, timeout=15)
    except errors.ConnectionLost:
        if remote:
            raise
        D = None
    except ValueError as e:
        raise UserError(str(e)) from None
    if D is not None:
        try:
            return D._call(verb, **args)
        finally:
            D.close()
    return _offline_admin(home, verb, args)


def _offline_admin(home: Path, verb: str, args: dict):
    from dsage import tls
    from dsage.config import load_server_config

    store = _offline_store(home)
    try:
        if verb == "add_identity":
            config = load_server_config(dsage_home=home)
            bundle, serial = tls.make_bundle(tls.Authority.load(home), args["name"], args["role"],
                                             f"{config.host}:{config.port}")
            _sync(store.add_identity(args["name"], args["role"], serial, args.get("force", False)))
            return {"bundle": bundle.dumps()}
        if verb == "revoke":
            return _sync(store.revoke(args["name"]))
        if verb == "pack":
            return _sync(store.pack(args.get("days", 0)))
        return _sync(store.identities())
    finally:
        store.stop()


def _issue(options, name: str, role: str, out: str, force: bool) -> int:
    from dsage import tls

    out_path = Path(out)
    if out_path.exists() and not force:
        raise UserError(f"{out} exists; use --force to overwrite it")
    tls.check_name(name)
    probe = out_path.with_name(out_path.name + ".tmp")     # the name write_private writes first
    try:        # before the identity exists: a bundle that cannot be written must not leave one
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600))
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    reply = _admin_call(options, "add_identity", name=name, role=role, force=force)
    try:
        tls.write_private(out_path, reply["bundle"])
    except OSError as e:
        raise UserError(f"{role} {name} was added, but its bundle could not be written to {out}: "
                        f"{e.strerror or e} (issue it again with --force)") from None
    print(f"{role} {name}: bundle written to {out} (mode 0600; hand it over privately)")
    return 0


def cmd_user_add(args) -> int:
    return _issue(args, args.name, "admin" if args.admin else "client", args.out, args.force)


def cmd_worker_add(args) -> int:
    return _issue(args, args.name, "worker", args.out, args.force)


def cmd_user_list(args) -> int:
    rows = _admin_call(args, "identities")
    for row in sorted(rows, key=lambda r: r["name"]):
        flag = "  (revoked)" if row["revoked"] else ""
        print(f"{row['name']:24} {row['role']:8}{flag}")
    return 0


def cmd_user_revoke(args) -> int:
    out = _admin_call(args, "revoke", name=args.name)
    requeued = f"; its {out['released']} running job(s) queued again" if out.get("released") else ""
    print(f"revoked {out['role']} {out['name']}: its connections are dropped and new logins refused{requeued}")
    return 0


# -- user commands ---------------------------------------------------------------------
#: seconds `dsage submit --wait` waits before saying why a job that has not started waits.
WAIT_NOTE = 5.0


def _connect(args):
    import dsage

    try:
        return dsage.connect(args.server, cert=args.cert)
    except ValueError as e:
        raise UserError(str(e)) from None


def _show(value) -> str:
    text = repr(value)
    return text if len(text) < 10_000 else text[:10_000] + "..."


def cmd_submit(args) -> int:
    if (args.file is None) == (args.code is None):
        raise UserError("give a FILE or -c CODE" + (", not both" if args.file is not None else ""))
    code = args.code
    name = None
    if args.file is not None:
        path = Path(args.file)
        try:
            code = sys.stdin.read() if args.file == "-" else path.read_text()
        except OSError as e:
            raise UserError(f"cannot read {args.file}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise UserError(f"{args.file} is not Python source: it is not UTF-8 text") from None
        name = path.name
    D = _connect(args)
    try:
        job = D.eval(code, name=name, timeout=args.timeout, memory=args.memory)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(job.job_id)
    if args.wait:
        try:
            try:
                value = job.wait(timeout=WAIT_NOTE)
            except TimeoutError:        # say why, once, if it has not even started
                if job.status == "new":
                    print(f"dsage: job {job.job_id} waits: "
                          f"{_why_waiting(D.record(job.job_id), D.status(), D.workers())}",
                          file=sys.stderr)
                value = job.wait()
        finally:
            sys.stdout.write(job.output)
        print(_show(value))
    return 0


def cmd_jobs(args) -> int:
    if args.limit < 1:
        raise UserError(f"--limit must be at least 1, not {args.limit}")
    D = _connect(args)
    recs = D._call("list_jobs", status=args.status, all=args.all, limit=args.limit)
    which = f"{args.status} jobs" if args.status else "jobs"
    if not recs:
        print(f"no {which}" + ("" if args.all else " of yours"))
        return 0
    print(f"{'id':>8}  {'status':10} {'owner':12} {'fails':>5}  name")
    for r in recs:
        print(f"{r['job_id']:>8}  {r['status']:10} {r['owner'][:12]:12} {r['failures']:>5}  {r['name'][:60]}")
    if len(recs) >= args.limit:
        print(f"(the newest {len(recs)} {which} shown: --limit N for more)")
    return 0


def cmd_job(args) -> int:
    D = _connect(args)
    r = D._call("get_job", job_id=args.id, result=False, output=True)
    print(f"job {r['job_id']}: {r['name']}\n  owner     {r['owner']}\n  status    {r['status']}\n"
          f"  kind      {r['kind']}\n  priority  {r['priority']}   timeout {r['timeout']:g} s   "
          f"failures {r['failures']}/{r['max_failures']}"
          + (f"   needs {r['memory']} MiB" if r.get("memory") else "") + f"\n  created   {_stamp(r['created'])}\n"
          f"  started   {_stamp(r['started'])}\n  finished  {_stamp(r['finished'])}")
    if r["cpu_time"] is not None or r["wall_time"] is not None:
        peak = r.get("peak_memory")
        print(f"  cpu time  {r['cpu_time'] or 0:.3f} s   wall time {r['wall_time'] or 0:.3f} s"
              + (f"   peak memory {peak / 2**20:.1f} MiB" if peak is not None else ""))
    for a in r["attempts"]:
        print(f"  attempt {a['attempt']} on {a['worker']}: {a.get('outcome') or 'running'}")
    if r["status"] == "new":
        print(f"  waiting   {_why_waiting(r, D.status(), D.workers())}")
    if r["output"]:
        print("--- output ---\n" + r["output"].rstrip())
    if r["error"]:
        print("--- error ---\n" + r["error"].rstrip())
    return 0


def _stamp(t: float | None) -> str:
    """A time as the commands show it (local, to the second), or "-" for none."""
    import datetime

    return datetime.datetime.fromtimestamp(t).isoformat(" ", "seconds") if t else "-"


def _why_waiting(r: dict, s: dict, workers: list[dict]) -> str:
    """Why a queued job has not started, as far as the server's status tells."""
    import time

    from dsage.server.scheduler import fits

    if (r.get("not_before") or 0) > time.time():
        return f"tried again after its failure, from {_stamp(r['not_before'])}"
    if not s["workers"]:
        return "no worker is connected (start one: dsage_worker --cert BUNDLE)"
    need = r.get("memory")
    if need and not any(fits(need, w.get("job_memory")) for w in workers):
        most = max((w.get("job_memory") or 0 for w in workers), default=0)
        return (f"it needs {need} MiB (it asked for that, or ran out of memory with less) and no connected "
                f"worker gives a job that much (the most: {most} MiB): start one on a larger machine, or "
                f"with a larger --max-memory")
    if s["busy"] >= s["slots"]:
        return (f"all {s['slots']} slots of {s['workers']} workers are busy, {s['queued']} jobs queued "
                f"(lower priority numbers go first, then users take turns, each one's oldest first)")
    return f"for a worker to take it ({s['slots'] - s['busy']} of {s['slots']} slots free)"


def cmd_result(args) -> int:
    from dsage.client.blocking import outcome

    D = _connect(args)
    rec = D._call("get_job", job_id=args.id, result=True)
    if rec["status"] not in ("completed", "failed", "killed"):
        raise UserError(f"job {args.id} is {rec['status']}: no result yet")
    try:
        print(_show(outcome(rec)))
    except (errors.JobFailed, errors.JobKilled) as e:      # as `dsage submit --wait` says it
        raise UserError(str(e).rstrip()) from None
    return 0


def cmd_kill(args) -> int:
    D = _connect(args)
    rec = D._call("kill", job_id=args.id)
    print(f"job {args.id}: {rec['status']}")
    return 0


def cmd_status(args) -> int:
    D = _connect(args)
    s = D.status()
    jobs = ", ".join(f"{k} {v}" for k, v in sorted(s["jobs"].items()) if v) or "none"
    load = s.get("server_load")
    print(f"workers {s['workers']}, slots {s['slots']} ({s['busy']} busy), queued {s['queued']}, "
          f"{s['jobs_per_second']:.1f} jobs/s over the last minute\njobs: {jobs}")
    if load is not None:
        print(f"server: busy {load:.0%} of the last minute" + (" (overloaded: it falls behind)" if load > 0.95 else ""))
    for w in D.workers():
        facts = w.get("facts", {})
        memory = f"  {w['job_memory']} MiB a job" if w.get("job_memory") else ""
        print(f"  {w['name']:20} {w['busy']}/{w['slots']} busy  {facts.get('host', '?')} "
              f"{facts.get('cores', '?')} cores  python {facts.get('python', '?')}{memory}")
    return 0


def cmd_pack(args) -> int:
    out = _admin_call(args, "pack", days=args.days)
    print(f"packed: {out['before'] / 1e6:.1f} MB -> {out['after'] / 1e6:.1f} MB")
    return 0


def cmd_demo(args) -> int:
    from dsage.examples.demo import run_demo

    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, not {args.workers}")
    if args.number is not None and args.number < 2:
        raise UserError(f"--number must be at least 2, not {args.number}")
    return run_demo(workers=args.workers, number=args.number)


# -- parsing ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsage", description="Distributed Sage: run long Python "
                                     "computations on a department's idle machines.")
    parser.add_argument("--version", action="version", version=f"dsage {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("init", help="set up $DSAGE_HOME: CA, server certificate, config, database, admin")
    p.add_argument("--host", default="localhost", help="the name clients use to reach the server")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--web-port", type=int, default=8082)
    p.add_argument("--db", help="storage URI (file://, zeo://, postgres://...; default: a file in $DSAGE_HOME)")
    p.add_argument("--force", action="store_true", help="make new keys even if some exist")
    p.set_defaults(func=cmd_init)

    user = sub.add_parser("user", help="manage users").add_subparsers(dest="action", metavar="ACTION")
    user.required = True
    p = _remote_options(user.add_parser("add", help="issue a user's bundle"))
    p.add_argument("name")
    p.add_argument("--admin", action="store_true", help="the user may manage users and see every job")
    p.add_argument("--out", required=True, help="where to write the bundle")
    p.add_argument("--force", action="store_true", help="re-issue (the old bundle stops working)")
    p.set_defaults(func=cmd_user_add)
    _remote_options(user.add_parser("list", help="list users and workers")).set_defaults(func=cmd_user_list)
    p = _remote_options(user.add_parser("revoke", help="revoke a user or worker"))
    p.add_argument("name")
    p.set_defaults(func=cmd_user_revoke)

    from dsage import daemons

    p = sub.add_parser("worker", help="`dsage worker add NAME --out FILE`, or run a worker (as dsage_worker)")
    daemons.worker_args(p)
    p.set_defaults(func=daemons.work)

    p = sub.add_parser("server", help="run the server (as dsage_server)")
    daemons.server_args(p)
    p.set_defaults(func=daemons.serve)

    def client_parser(name: str, help: str) -> argparse.ArgumentParser:
        return _remote_options(sub.add_parser(name, help=help))

    p = client_parser("submit", "submit a Python file or code string as a job; prints its id")
    p.add_argument("file", nargs="?", help="a Python file (- for standard input)")
    p.add_argument("-c", dest="code", help="code to run")
    p.add_argument("--wait", action="store_true", help="wait and print the output and result")
    p.add_argument("--timeout", type=float, default=600, help="the job's time limit in seconds")
    p.add_argument("--memory", type=float, default=None, metavar="MIB",
                   help="the memory the job needs: it runs only on workers that give a job that much")
    p.set_defaults(func=cmd_submit)
    p = client_parser("jobs", "list your jobs")
    p.add_argument("--status", choices=STATUSES)
    p.add_argument("--all", action="store_true", help="every user's jobs (admins)")
    p.add_argument("--limit", type=int, default=50, help="the newest N jobs (default 50)")
    p.set_defaults(func=cmd_jobs)
    for name, func, text in (("job", cmd_job, "show one job"), ("result", cmd_result, "print a job's result"),
                             ("kill", cmd_kill, "kill a job")):
        p = client_parser(name, text)
        p.add_argument("id", type=int)
        p.set_defaults(func=func)
    client_parser("status", "workers, slots, queue depth, jobs/s").set_defaults(func=cmd_status)

    p = _remote_options(sub.add_parser("pack", help="database maintenance: drop old object revisions (admins)"))
    p.add_argument("--days", type=float, default=0, help="keep this many days of history")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("demo", help="a local cluster factoring a number with DistributedFactor")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--number", type=int, default=None, help="the number to factor")
    p.set_defaults(func=cmd_demo)
    return parser


def _remote_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--server and --cert: whom to ask, as whom."""
    p.add_argument("--server", help="HOST:PORT (default: from the bundle)")
    p.add_argument("--cert", help="your bundle (default $DSAGE_HOME/client.pem)")
    return p


def _worker_add_parser() -> argparse.ArgumentParser:
    p = _remote_options(argparse.ArgumentParser(prog="dsage worker add", description="Issue a worker's bundle."))
    p.add_argument("name")
    p.add_argument("--out", required=True, help="where to write the bundle")
    p.add_argument("--force", action="store_true", help="re-issue (the old bundle stops working)")
    p.set_defaults(func=cmd_worker_add)
    return p


def run(parser: argparse.ArgumentParser, func, argv: list[str] | None) -> int:
    """Parse `argv` with `parser` and run `func` on the result, as every command runs."""
    args = parser.parse_args(argv)
    return guard(lambda: func(args), parser.prog)


def guard(thunk, prog: str) -> int:
    """Run a command's `thunk`: its exit status, or 1 and one line for a user's error."""
    try:
        return thunk() or 0
    except BrokenPipeError:
        # The reader went away (`dsage jobs | head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (UserError, errors.DsageError, ValueError, TimeoutError) as e:
        text = str(e).strip() or e.__class__.__name__
        print(f"{prog}: error: {text}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{prog}: error: {e.strerror or e}{': ' + e.filename if getattr(e, 'filename', None) else ''}",
              file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """`dsage`: the admin and user command."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["worker", "add"]:
        parser = _worker_add_parser()
        args = parser.parse_args(argv[2:])
        return guard(lambda: args.func(args), "dsage")
    parser = build_parser()
    args = parser.parse_args(argv)
    return guard(lambda: args.func(args), "dsage")


if __name__ == "__main__":
    sys.exit(main())
