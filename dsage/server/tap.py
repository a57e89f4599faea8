"""`twist dsage-server`: the server as a twistd plugin (same options as dsage_server)."""
from __future__ import annotations

import dataclasses

from twisted.python import usage

from dsage.config import check_server_config, home, load_server_config


class Options(usage.Options):
    """Command-line options of the dsage-server plugin."""

    optParameters = [
        ["config", "c", None, "server.conf to read (default $DSAGE_HOME/server.conf)"],
        ["port", "p", None, "TLS port for workers and clients", int],
        ["web-port", None, None, "HTTP port of the dashboard", int],
        ["db", None, None, "storage URI (zodburi)"],
    ]

    def postOptions(self) -> None:
        """Read and check the configuration: `twist` shows a UsageError in one line."""
        try:
            config = load_server_config(self["config"], home())
            overrides = {k: v for k, v in (("port", self["port"]), ("web_port", self["web-port"]),
                                           ("db", self["db"])) if v is not None}
            self["server_config"] = dataclasses.replace(config, **overrides)
            check_server_config(self["server_config"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options):
    """Build the server's service tree from the options."""
    from twisted.internet import reactor

    from dsage.clock import steady
    from dsage.server.service import ServerService, open_db

    config = options["server_config"]
    try:
        db = open_db(config.db_uri)
    except ValueError as e:
        raise usage.UsageError(str(e)) from None
    steady(reactor)
    return ServerService(config, reactor, db)
