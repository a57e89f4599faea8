"""`twist dsage-worker`: the worker as a twistd plugin (same options as dsage_worker)."""
from __future__ import annotations

from twisted.python import usage

from dsage.config import home


class Options(usage.Options):
    """Command-line options of the dsage-worker plugin."""

    optParameters = [
        ["cert", None, None, "the worker's bundle (default $DSAGE_HOME/worker.pem)"],
        ["server", None, None, "HOST:PORT of the server (default: the one in the bundle)"],
        ["slots", None, None, "jobs run at once (default: one per core)", int],
        ["nice", None, 10, "nice level of the jobs", int],
    ]

    def postOptions(self) -> None:
        """Check the options and load the bundle: `twist` shows a UsageError in one line."""
        from dsage.worker.service import worker_bundle

        try:
            self["bundle"] = worker_bundle(self["cert"] or str(home() / "worker.pem"), self["slots"], self["nice"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options):
    """Build the worker's service tree from the options."""
    from twisted.internet import reactor

    from dsage.worker.service import WorkerService

    bundle = options["bundle"]
    return WorkerService(bundle, options["server"] or bundle.server, reactor, slots=options["slots"],
                         nice=options["nice"])
