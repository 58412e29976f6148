"""The metrics endpoint also answers /healthz (Kubernetes probes), and /metrics is unchanged."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from streamml import metrics


@pytest.fixture
def server() -> Iterator[tuple[str, int]]:
    registry = CollectorRegistry()
    Counter(
        "streamml_test_events_total", "A counter only this test's registry holds.", registry=registry
    ).inc(3)
    httpd = metrics.start("127.0.0.1", 0, registry)
    try:
        yield "127.0.0.1", httpd.server_port
    finally:
        httpd.shutdown()
        httpd.server_close()


def _request(where: tuple[str, int], method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(*where, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_healthz_answers_ok_as_json(server: tuple[str, int]) -> None:
    status, headers, body = _request(server, "GET", "/healthz")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"status": "ok"}


def test_healthz_head_has_no_body_and_other_methods_are_refused(server: tuple[str, int]) -> None:
    status, headers, body = _request(server, "HEAD", "/healthz")
    assert (status, body) == (200, b"")
    assert headers["content-length"] == str(len(metrics.HEALTHZ_BODY))
    status, headers, _ = _request(server, "POST", "/healthz")
    assert status == 405
    assert headers["allow"] == "GET, HEAD"


def test_metrics_still_served_by_prometheus_client(server: tuple[str, int]) -> None:
    status, headers, body = _request(server, "GET", "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    assert b"streamml_test_events_total 3.0" in body
    assert b'{"status"' not in body


def test_port_zero_turns_the_endpoint_off() -> None:
    assert metrics.serve("127.0.0.1", 0) is None


def test_a_composed_service_freezes_its_start_up_objects_and_collects_young_ones_less_often() -> None:
    import gc

    from streamml import service

    before = gc.get_threshold()
    try:
        service.settle_garbage_collector()
        assert gc.get_threshold() == (service.GC_GEN0_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
