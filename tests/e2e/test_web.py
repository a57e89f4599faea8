"""The dashboard, JSON API and metrics of a running server."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from tests.e2e.conftest import wait_for


def get(cluster, path):
    base = wait_for(lambda: cluster.web_url, what="the dashboard").rstrip("/")
    assert base.startswith("http://127.0.0.1:"), "bound to the loopback interface by default"
    with urllib.request.urlopen(base + path, timeout=10) as response:
        return response.headers.get("content-type"), response.read().decode()


def test_json_api_and_metrics(cluster, D):
    """status, workers, jobs and metrics describe the cluster; unknown jobs are 404."""
    job = D.eval("'web'")
    job.wait(timeout=30)
    kind, body = get(cluster, "/api/v1/status")
    status = json.loads(body)
    assert kind.startswith("application/json") and status["workers"] == 1 and status["slots"] == 2
    assert json.loads(get(cluster, "/api/v1/workers")[1])[0]["name"] == "worker1"
    jobs = json.loads(get(cluster, "/api/v1/jobs?status=completed")[1])
    assert job.job_id in [j["job_id"] for j in jobs] and all("result" not in j for j in jobs)
    one = json.loads(get(cluster, f"/api/v1/jobs/{job.job_id}")[1])
    assert one["status"] == "completed" and "payload" not in one and "result" not in one
    assert one["peak_memory"] == job.peak_memory > 0
    assert json.loads(get(cluster, f"/api/v1/job/{job.job_id}")[1]) == one, "SPEC's singular 'job' too"
    with pytest.raises(urllib.error.HTTPError) as info:
        get(cluster, "/api/v1/jobs/999999")
    assert info.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as info:
        get(cluster, f"/api/v1/jobs/{job.job_id}/extra")
    assert info.value.code == 404 and "no such resource" in json.loads(info.value.read())["error"]
    for path in ("/api/v1/job", "/api/v1/nothing", "/api/v2/status"):
        with pytest.raises(urllib.error.HTTPError) as info:
            get(cluster, path)
        assert info.value.code == 404, path
        assert info.value.headers["content-type"] == "application/json", path
        assert "no such resource" in json.loads(info.value.read())["error"], path
    metrics = get(cluster, "/metrics")[1]
    assert 'dsage_jobs{status="completed"}' in metrics and "dsage_workers 1" in metrics
    (load,) = [line.split()[1] for line in metrics.splitlines() if line.startswith("dsage_server_load ")]
    assert 0.0 <= float(load) <= 1.0
    page = get(cluster, "/")[1]
    assert "<h1>dsage</h1>" in page and "worker1" in page
    # The access log dates requests in wall time (the reactor's own clock is monotonic).
    today = time.strftime("%d/%b/%Y", time.gmtime())
    wait_for(lambda: f'[{today}:' in (cluster.home / "server.log").read_text(), what="a dated access log line")


@pytest.mark.parametrize("path, message", [
    ("/api/v1/jobs/abc", "a job id must be an integer, not 'abc'"),
    ("/api/v1/jobs?limit=many", "limit must be an integer, not 'many'"),
    ("/api/v1/jobs?status=done", "unknown status 'done': one of new, processing, completed, failed, killed"),
])
def test_bad_api_requests_are_400_with_what_is_wrong(cluster, D, path, message):
    with pytest.raises(urllib.error.HTTPError) as info:
        get(cluster, path)
    assert info.value.code == 400 and json.loads(info.value.read()) == {"error": message}


@pytest.mark.parametrize("method", ["POST", "DELETE", "async"])
def test_the_api_is_read_only(cluster, D, method):
    """Every method but GET and HEAD is refused: 405, or 501 for a method that Twisted
    does not know (before, "async" reached an internal method and answered 500)."""
    base = wait_for(lambda: cluster.web_url, what="the dashboard").rstrip("/")
    for path in ("/api/v1/status", "/api/v1/jobs/1"):
        request = urllib.request.Request(base + path, method=method)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        assert (info.value.code, method) in ((405, "POST"), (501, "DELETE"), (501, "async"))
