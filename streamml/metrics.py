"""Prometheus metrics shared by every service, declared once (bounded labels: no event ids)."""

from __future__ import annotations

import bisect
import collections
import logging
import socket
import threading
from collections.abc import Iterable, Sequence
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger(__name__)

EVENTS_IN = Counter("streamml_events_in_total", "Records consumed.", ["service", "topic", "pipeline"])
EVENTS_OUT = Counter("streamml_events_out_total", "Records produced.", ["service", "topic", "pipeline"])
DEAD_LETTERED = Counter(
    "streamml_events_dead_lettered_total",
    "Records sent to a dead-letter topic.",
    ["service", "pipeline", "reason"],
)
BATCH_SECONDS = Histogram(
    "streamml_batch_processing_seconds",
    "Time to process one consumed batch.",
    ["service"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """Observe every value of a batch, with the result of `observe` on each (a per-event latency): one
    locked increment per bucket touched instead of a bucket search and two locked increments per value.
    prometheus_client's Histogram keeps one counter per upper bound (the first bound >= the value, as
    `bisect_left` finds it) and a sum; a test holds this to `observe` for the pinned version."""
    if not values:
        return
    bounds = histogram._upper_bounds
    histogram._sum.inc(sum(values))
    buckets = histogram._buckets
    for index, n in collections.Counter(bisect.bisect_left(bounds, v) for v in values).items():
        buckets[index].inc(n)  # (the last bound is +Inf: every number has a bucket; values are never NaN)


E2E_SECONDS = Histogram(
    "streamml_end_to_end_latency_seconds",
    "Event time to prediction time.",
    ["pipeline"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
LIVE_VERSION = Gauge("streamml_live_model_version", "Version serving predictions.", ["pipeline", "model"])
SWAPS = Counter("streamml_model_swaps_total", "Live model changes in the predictor.", ["pipeline", "model"])
LAST_SWAP = Gauge("streamml_last_swap_timestamp_seconds", "When the live model last changed.", ["pipeline"])
REJECTED_ARTIFACTS = Counter(
    "streamml_rejected_artifacts_total", "Model artifacts that failed verification.", ["pipeline", "reason"]
)
VERSIONS_PUBLISHED = Counter(
    "streamml_model_versions_published_total", "Model versions published.", ["pipeline", "model"]
)
LEARNER_METRIC = Gauge(
    "streamml_learner_metric", "Prequential metric of the online learner.", ["pipeline", "metric"]
)
CONSUMER_LAG = Gauge(
    "streamml_consumer_lag_records", "Records behind the end of each input topic.", ["service", "topic"]
)
PROMOTIONS = Counter(
    "streamml_promotions_total", "Promotion decisions seen by the predictor.", ["pipeline", "action", "actor"]
)
ERRORS = Counter("streamml_errors_total", "Unexpected errors.", ["service", "kind"])
SKIPPED = Counter(
    "streamml_records_skipped_total",
    "Data records deliberately not processed (e.g. their pipeline was deleted), by reason.",
    ["service", "reason"],
)
MONITOR_SNAPSHOT_BYTES = Gauge(
    "streamml_monitor_snapshot_bytes", "Size of the monitor's last state snapshot.", ["pipeline"]
)
MONITOR_SNAPSHOT_SECONDS = Histogram(
    "streamml_monitor_snapshot_seconds",
    "Time to serialize one monitor state snapshot.",
    ["pipeline"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
WRITER_SLOTS = Gauge(
    "streamml_writer_slots",
    "Writer slots this instance owns (single-writer services: it alone publishes for their pipelines).",
    ["service"],
)
WRITER_SLOTS_CONFIGURED = Gauge(
    "streamml_writer_slots_configured",
    "Writer slots of the service (STREAMML_WRITER_SLOTS): its instances together should own this many.",
    ["service"],
)
LOOP_STALLS = Counter(
    "streamml_event_loop_stalls_total",
    "Times the service's event loop was blocked for 2 s or more (each logged with where it was stuck).",
    ["service"],
)
LOOP_STALL_SECONDS = Histogram(
    "streamml_event_loop_stall_seconds",
    "How long each reported event-loop stall lasted.",
    ["service"],
    buckets=(2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0, 60.0),
)
CONTROL_SKIPPED = Counter(
    "streamml_control_records_skipped_total",
    "Control-topic records skipped as invalid (each also logged and alerted as kind CONTROL).",
    ["service", "topic", "reason"],
)


HEALTHZ_PATH = "/healthz"
HEALTHZ_BODY = b'{"status":"ok"}'


def wsgi_app(registry: CollectorRegistry = REGISTRY) -> WSGIApplication:
    """/healthz answers 200 while the process serves (what Kubernetes probes ask); every other path is
    prometheus_client's own app, so /metrics (and its content negotiation) is exactly as before."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != HEALTHZ_PATH:
            body: Iterable[bytes] = metrics_app(environ, start_response)
            return body
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Length", "0")])
            return [b""]
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(HEALTHZ_BODY)))]
        start_response("200 OK", headers)
        return [b"" if environ["REQUEST_METHOD"] == "HEAD" else HEALTHZ_BODY]

    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in flight never holds the process at exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Probes and scrapes every few seconds would drown the service's own log lines."""


def start(host: str, port: int, registry: CollectorRegistry = REGISTRY) -> WSGIServer:
    """Serve /metrics and /healthz on host:port (port 0: any free port) from a daemon thread."""
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class MetricsServer(_Server):
        address_family = family  # an IPv6 host needs an AF_INET6 socket

    server = make_server(
        str(sockaddr[0]), port, wsgi_app(registry), MetricsServer, handler_class=_QuietHandler
    )
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


def serve(host: str, port: int) -> WSGIServer | None:
    """Expose /metrics and /healthz; port 0 turns both off.

    Services call this only once composed (broker reached, topics verified, control topics read to their
    end), so /healthz answering also means the service got that far: Kubernetes uses it as its startup,
    readiness and liveness probe.
    """
    if not port:
        return None
    server = start(host, port)
    log.info("metrics on http://%s:%d/metrics, health on /healthz", host, port)
    return server


TRAINING_REQUESTS = Counter(
    "streamml_training_requests_total", "Training requests issued.", ["pipeline", "requested_by"]
)
CONTROLLER_DECISIONS = Counter(
    "streamml_controller_decisions_total",
    "Promotion decisions made by the controller.",
    ["pipeline", "action"],
)

# -- trainer --------------------------------------------------------------------------------------------
TRAINING_RUNS = Counter(
    "streamml_training_runs_total",
    "Training requests answered by the trainer, by outcome (SUCCEEDED, REJECTED, FAILED); "
    "pipeline is empty for unknown pipelines.",
    ["pipeline", "status"],
)
TRAINING_SECONDS = Histogram(
    "streamml_training_duration_seconds",
    "Time to answer one training request: reading its slice, training the grid, publishing.",
    ["pipeline"],
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)

# -- monitor ----------------------------------------------------------------------------------------------
MODEL_METRIC = Gauge(
    "streamml_model_metric",
    "Online metric of what a model version served, on joined labels (window: all = since start, rolling).",
    ["pipeline", "model", "version", "metric", "window"],
)
MONITOR_LABELLED = Counter(
    "streamml_monitor_labelled_events_total", "Served predictions joined with their label.", ["pipeline"]
)
MONITOR_UNLABELLED = Gauge(
    "streamml_monitor_unlabelled_events", "Served predictions waiting for their label now.", ["pipeline"]
)
MONITOR_EXPIRED = Counter(
    "streamml_monitor_expired_events_total",
    "Events dropped from the label join at the TTL (kind unlabelled: the label never came; "
    "unpredicted: the prediction never came).",
    ["pipeline", "kind"],
)
MONITOR_PENDING = Gauge(
    "streamml_monitor_join_pending_events", "Events held in the label join.", ["pipeline"]
)
DRIFT_ALERTS = Counter(
    "streamml_drift_alerts_total", "Drift alerts raised by the monitor.", ["pipeline", "kind", "detector"]
)
DRIFT_SUPPRESSED = Counter(
    "streamml_drift_alerts_suppressed_total",
    "Drift detections silenced by the cool-down.",
    ["pipeline", "kind", "detector"],
)
EVALUATIONS = Counter(
    "streamml_evaluations_total", "Champion/challenger evaluations published.", ["pipeline"]
)
