"""`twist dsage-worker`: the worker as a twistd plugin (same options as dsage_worker)."""
from __future__ import annotations

from twisted.python import usage

from dsage.config import home


class Options(usage.Options):
    """Command-line options of the dsage-worker plugin."""

    optParameters = [
        ["cert", None, None, "the worker's bundle (default $DSAGE_HOME/worker.pem)"],
        ["server", None, None, "HOST:PORT of the server (default: the one in the bundle)"],
        ["slots", None, None, "jobs run at once (default: one per core it may use)", int],
        ["nice", None, 10, "nice level of the jobs", int],
        ["prefetch", None, None, "jobs leased ahead, waiting for a free slot (default: automatic)", int],
        ["max-memory", None, 0, "address space of each job in MB (default: no limit)", float],
        ["max-open-files", None, 1024, "open files of each job", int],
        ["max-file-size", None, 0, "largest file a job may write, in MB (default: no limit)", float],
        ["max-output", None, 1, "stdout and stderr kept per job, in MB", float],
        ["recycle-memory", None, None, "replace a job process after a job that took its resident memory to "
                                       "this many MB (default 1024; 0: a fresh process for every job)", float],
    ]

    def postOptions(self) -> None:
        """Check the options and load the bundle: `twist` shows a UsageError in one line."""
        from dsage.worker.service import job_settings, worker_bundle

        try:
            self["settings"] = job_settings(self["max-memory"], self["max-open-files"], self["max-file-size"],
                                            self["max-output"], self["recycle-memory"], self["prefetch"])
            self["bundle"] = worker_bundle(self["cert"] or str(home() / "worker.pem"), self["slots"], self["nice"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options):
    """Build the worker's service tree from the options."""
    from twisted.internet import reactor

    from dsage.clock import steady
    from dsage.worker.service import WorkerService

    bundle = options["bundle"]
    steady(reactor)
    return WorkerService(bundle, options["server"] or bundle.server, reactor, slots=options["slots"],
                         nice=options["nice"], **options["settings"])
