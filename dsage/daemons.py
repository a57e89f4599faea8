"""The daemons' commands: `dsage_server` and `dsage_worker` (also `dsage server`, `dsage worker`),
each running its service tree in the foreground until stopped."""
from __future__ import annotations

import argparse
import os

from dsage.cli import UserError, run
from dsage.config import home
from dsage.logs import start_logging


def server_main(argv: list[str] | None = None) -> int:
    """`dsage_server`: run the server in the foreground."""
    parser = argparse.ArgumentParser(prog="dsage_server", description="Run the dsage server in the foreground.")
    server_args(parser)
    return run(parser, serve, argv)


def server_args(parser: argparse.ArgumentParser) -> None:
    """The server's options (`dsage_server`, `dsage server`)."""
    parser.add_argument("--config", help="server.conf to read (default $DSAGE_HOME/server.conf)")
    parser.add_argument("--port", type=int, help="TLS port for workers and clients (0: any free port)")
    parser.add_argument("--web-port", type=int, help="HTTP port of the dashboard")
    parser.add_argument("--db", help="storage URI: file://, zeo://, postgres://... (zodburi)")
    parser.add_argument("--log-file", help="log to this file instead of stderr (rotated at 10 MiB, reopened on SIGHUP)")


def posix_only(program: str) -> None:
    """Refuse to run `program` where it cannot (it needs POSIX process groups, resource
    limits and fcntl: Linux, where it is tested, or another Unix such as macOS)."""
    if os.name != "posix":
        raise UserError(f"{program} runs on Linux or another Unix (macOS), not on {os.name}; "
                        f"this machine can be a client")


def serve(args) -> int:
    """Run the server of $DSAGE_HOME/server.conf (or --config), with the options over it."""
    posix_only("the dsage server")
    import dataclasses

    from dsage.config import check_server_config, load_server_config

    config = load_server_config(args.config, home())
    overrides = {k: v for k, v in (("port", args.port), ("web_port", args.web_port), ("db", args.db),
                                   ("log_file", args.log_file)) if v is not None}
    config = dataclasses.replace(config, **overrides)
    check_server_config(config)
    from twisted.internet import reactor

    from dsage.clock import steady
    from dsage.server.service import ServerService, open_db

    steady(reactor)
    start_logging(config.log_file or None)
    db = open_db(config.db_uri)
    service = ServerService(config, reactor, db)
    foreground(reactor, service)
    return 1 if service.failed else 0


def foreground(reactor, service) -> None:
    """Run `service` until the reactor stops (a signal, or the end of the program that
    started this one: `stop_with_parent`)."""
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    stop_with_parent(reactor)
    reactor.run()


#: set by `LocalCluster` to its own pid: a server or worker it started stops once that
#: program is gone (killed, or ended without stopping its cluster), instead of running on.
PARENT_ENV = "DSAGE_PARENT_PID"


def stop_with_parent(reactor) -> None:
    """Stop the reactor once the process named by $DSAGE_PARENT_PID has ended."""
    try:
        parent = int(os.environ.get(PARENT_ENV) or 0)
    except ValueError:
        return
    if parent <= 0:
        return
    from twisted.internet import task
    from twisted.logger import Logger

    direct = os.getppid() == parent      # else started through another program (ip netns exec)

    def check() -> None:
        try:
            os.kill(parent, 0)
            gone = direct and os.getppid() != parent
        except ProcessLookupError:
            gone = True
        except PermissionError:
            gone = False
        if gone:
            Logger().info("the program that started this process ({pid}) has ended: stopping", pid=parent)
            loop.stop()
            reactor.stop()
    loop = task.LoopingCall(check)
    loop.clock = reactor
    reactor.callWhenRunning(loop.start, 1.0)


def worker_main(argv: list[str] | None = None) -> int:
    """`dsage_worker`: connect to the server and run jobs."""
    parser = argparse.ArgumentParser(prog="dsage_worker", description="Run a dsage worker in the foreground.")
    worker_args(parser)
    return run(parser, work, argv)


def worker_args(parser: argparse.ArgumentParser) -> None:
    """The worker's options (`dsage_worker`, `dsage worker`)."""
    parser.add_argument("--cert", help="the worker's bundle (default $DSAGE_HOME/worker.pem)")
    parser.add_argument("--server", help="HOST:PORT of the server (default: the one in the bundle)")
    parser.add_argument("--slots", type=int, help="jobs run at once (default: one per core it may use)")
    parser.add_argument("--nice", type=int, default=10, help="nice level of the jobs (default 10)")
    parser.add_argument("--prefetch", type=int, default=None,
                        help="jobs leased ahead, waiting for a free slot (default: automatic, about 50 ms of "
                             "work per slot while jobs are shorter than 0.1 s, given back if they wait 0.5 s)")
    parser.add_argument("--name", help="the worker's name; must match its certificate")
    parser.add_argument("--max-memory", type=float, default=0, metavar="MB",
                        help="address space of each job in MB (default: no limit)")
    parser.add_argument("--max-open-files", type=int, default=1024, help="open files of each job (default 1024)")
    parser.add_argument("--max-file-size", type=float, default=0, metavar="MB",
                        help="largest file a job may write, in MB (default: no limit)")
    parser.add_argument("--recycle-memory", type=float, default=None, metavar="MB",
                        help="replace a job process after a job that took its resident memory to this, so that "
                             "what jobs leave behind does not pile up for later jobs (default 1024; 0: a fresh "
                             "process for every job)")
    parser.add_argument("--max-output", type=float, default=1, metavar="MB",
                        help="stdout and stderr kept per job, in MB (default 1; the middle is cut)")
    parser.add_argument("--log-file", help="log to this file instead of stderr (rotated at 10 MiB, reopened on SIGHUP)")


def work(args) -> int:
    """Run a worker with its bundle until stopped; its exit status."""
    posix_only("a dsage worker")
    from dsage.worker.service import job_settings, worker_bundle

    settings = job_settings(args.max_memory, args.max_open_files, args.max_file_size, args.max_output,
                            args.recycle_memory, args.prefetch)
    bundle = worker_bundle(args.cert or str(home() / "worker.pem"), args.slots, args.nice)
    if args.name and args.name != bundle.name:
        raise UserError(f"--name {args.name} does not match the certificate's name {bundle.name}")
    from twisted.internet import reactor

    from dsage.clock import steady
    from dsage.config import split_address
    from dsage.worker.service import WorkerService

    steady(reactor)
    address = args.server or bundle.server
    try:
        split_address(address)
    except ValueError as e:
        raise UserError(str(e)) from None
    start_logging(args.log_file)
    service = WorkerService(bundle, address, reactor, slots=args.slots, nice=args.nice, **settings)
    foreground(reactor, service)
    return service.exit_code
