"""The server's HTTP side: a dashboard, a read-only JSON API (``/api/v1/status``,
``/api/v1/workers``, ``/api/v1/jobs``, ``/api/v1/jobs/ID``, also ``/api/v1/job/ID``) and
Prometheus ``/metrics``.
It changes nothing, and is bound to 127.0.0.1 unless configured otherwise."""
from __future__ import annotations

import html
import json
import time

from twisted.internet import defer
from twisted.web import resource, server, static

from dsage import errors
from dsage.job import STATUSES


class _Async(resource.Resource):
    """A leaf answering GET with the result of `answer` (a Deferred)."""

    isLeaf = True
    content_type = b"application/json"

    def __init__(self, hub) -> None:
        super().__init__()
        self.hub = hub

    def render_GET(self, request):
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"no-store")

        def done(body: bytes) -> None:
            request.write(body)
            request.finish()

        def failed(f) -> None:
            code = 400 if f.check(BadRequest) else 404 if f.check(errors.RemoteError, KeyError) else 500
            request.setResponseCode(code)
            request.write(json.dumps({"error": str(f.value)}).encode())
            request.finish()
        d = defer.maybeDeferred(self.answer, request)
        d.addCallbacks(done, failed)
        return server.NOT_DONE_YET

    def answer(self, request) -> defer.Deferred:
        raise NotImplementedError


def _json(value) -> bytes:
    return json.dumps(value, default=lambda o: None, indent=1).encode()


class Status(_Async):
    def answer(self, request):
        return self.hub.status().addCallback(_json)


class Workers(_Async):
    def answer(self, request):
        return defer.succeed(_json(self.hub.workers()))


class Jobs(_Async):
    """``/api/v1/jobs?status=S&limit=N`` or ``/api/v1/jobs/ID`` (never payloads or results)."""

    def answer(self, request):
        if len([part for part in request.postpath if part]) > 1:
            raise errors.RemoteError(f"no such resource: {request.path.decode('utf-8', 'replace')}")
        if request.postpath and request.postpath[0]:
            job_id = _integer(request.postpath[0], "a job id")
            d = self.hub.store.get("", "admin", job_id, False)
            return d.addCallback(self.hub.fresh_output).addCallback(_json)
        status = (request.args.get(b"status") or [b""])[0].decode("utf-8", "replace") or None
        if status is not None and status not in STATUSES:
            raise BadRequest(f"unknown status {status!r}: one of {', '.join(STATUSES)}")
        limit = _integer((request.args.get(b"limit") or [b"100"])[0], "limit")
        return self.hub.store.list("", "admin", status, True, max(1, min(limit, 10_000))).addCallback(_json)


class Job(Jobs):
    """``/api/v1/job/ID``: one job, as ``/api/v1/jobs/ID``."""

    def answer(self, request):
        if not request.postpath or not request.postpath[0]:
            raise errors.RemoteError("no such resource: /api/v1/job needs a job id (/api/v1/job/ID)")
        return super().answer(request)


class _Api(resource.Resource):
    """A folder of the API: what is not in it is a JSON 404, like the API's own errors."""

    def getChild(self, path: bytes, request):
        request.setResponseCode(404)
        name = request.path.decode("utf-8", "replace")
        page = static.Data(_json({"error": f"no such resource: {name}"}), "application/json")
        page.isLeaf = True          # the same answer for whatever follows in the path
        return page


class BadRequest(ValueError):
    """A request the API cannot answer as asked (HTTP 400)."""


def _integer(raw: bytes, what: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise BadRequest(f"{what} must be an integer, not {raw.decode('utf-8', 'replace')!r}") from None


class Metrics(_Async):
    """Prometheus text format."""

    content_type = b"text/plain; version=0.0.4"

    def answer(self, request):
        def text(s: dict) -> bytes:
            lines = ["# HELP dsage_jobs Jobs in the database by status.", "# TYPE dsage_jobs gauge"]
            for status in ("new", "processing", "completed", "failed", "killed"):
                lines.append(f'dsage_jobs{{status="{status}"}} {s["jobs"].get(status, 0)}')
            for name, key, help_ in (("dsage_workers", "workers", "Connected workers."),
                                     ("dsage_slots", "slots", "Worker slots connected."),
                                     ("dsage_busy_slots", "busy", "Worker slots running a job.")):
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {s[key]}"]
            lines += ["# HELP dsage_jobs_finished_total Jobs that reached a final status since start.",
                      "# TYPE dsage_jobs_finished_total counter", f"dsage_jobs_finished_total {s['finished_total']}"]
            lines += ["# HELP dsage_dispatch_restarts_total Times the watchdog found worker slots waiting beside "
                      "runnable jobs with no dispatch running, and started it (0 unless a wake-up was missed).",
                      "# TYPE dsage_dispatch_restarts_total counter",
                      f"dsage_dispatch_restarts_total {s['dispatch_restarts']}"]
            if s["server_load"] is not None:
                lines += ["# HELP dsage_server_load Share of the last minute the server's reactor thread spent "
                          "working (near 1: it falls behind).", "# TYPE dsage_server_load gauge",
                          f"dsage_server_load {s['server_load']:.4f}"]
            return ("\n".join(lines) + "\n").encode()
        return self.hub.status().addCallback(text)


class Dashboard(_Async):
    """A one-page overview that refreshes itself."""

    content_type = b"text/html; charset=utf-8"

    def answer(self, request):
        async def page() -> bytes:
            s = await self.hub.status()
            jobs = await self.hub.store.list("", "admin", None, True, 50)
            e = html.escape
            workers = "".join(f"<tr><td>{e(w['name'])}</td><td>{w['busy']}/{w['slots']}</td>"
                              f"<td>{e(str(w['facts'].get('host', '')))}</td></tr>" for w in self.hub.workers())
            rows = "".join(f"<tr class='{e(j['status'])}'><td>{j['job_id']}</td><td>{e(j['owner'])}</td>"
                           f"<td>{e(j['status'])}</td><td>{j['failures']}</td><td>{e(j['name'])}</td></tr>"
                           for j in jobs)
            counts = " &middot; ".join(f"{e(k)} {v}" for k, v in sorted(s["jobs"].items()) if v)
            return f"""<!doctype html><html><head><meta charset="utf-8"><title>dsage</title>
<meta http-equiv="refresh" content="5"><style>body{{font-family:sans-serif;margin:2em}}
td,th{{padding:2px 10px;text-align:left}} .failed{{color:#b00}} .completed{{color:#070}}</style></head>
<body><h1>dsage</h1><p>{s['workers']} workers, {s['busy']}/{s['slots']} slots busy, {s['queued']} queued,
{s['jobs_per_second']:.1f} jobs/s &mdash; {counts or 'no jobs yet'}</p>
<h2>Workers</h2><table><tr><th>name</th><th>busy</th><th>host</th></tr>{workers}</table>
<h2>Latest jobs</h2><table><tr><th>id</th><th>owner</th><th>status</th><th>failures</th><th>name</th></tr>{rows}</table>
</body></html>""".encode()
        return defer.Deferred.fromCoroutine(page())


class _WallTime:
    """The reactor as the site sees it: its timers, but wall time for the dates of the
    access log (the reactor's own clock is monotonic: `dsage.clock`)."""

    def __init__(self, reactor) -> None:
        self._reactor = reactor

    def seconds(self) -> float:
        return time.time()

    def callLater(self, delay: float, f, *args, **kw):
        return self._reactor.callLater(delay, f, *args, **kw)


def site(hub) -> server.Site:
    """The web site of a server."""
    root = Dashboard(hub)
    api = _Api()
    v1 = _Api()
    api.putChild(b"v1", v1)
    v1.putChild(b"status", Status(hub))
    v1.putChild(b"workers", Workers(hub))
    v1.putChild(b"jobs", Jobs(hub))
    v1.putChild(b"job", Job(hub))
    top = resource.Resource()
    top.putChild(b"", root)
    top.putChild(b"api", api)
    top.putChild(b"metrics", Metrics(hub))
    return server.Site(top, reactor=_WallTime(hub.clock))

