"""Versioned serving: hot swaps under load, artifact verification, HTTP predictions during swaps."""

from __future__ import annotations

import itertools
import json
import secrets
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from confluent_kafka import Message
from river import datasets

from streamml import artifacts
from streamml.signing import Keys, Signer, Verifier, generate
from tests.e2e.conftest import System, SystemFactory, promote, publish_version, trained_version

PHISHING = list(datasets.Phishing())


def _produce(system: System, n: int, rate: float, prefix: str) -> None:
    """n raw JSON events at a steady rate, ids '<prefix>-<i>'."""
    producer = system.producer()
    topic = system.catalogue.raw("phishing").name
    start = time.monotonic()
    for i, (x, y) in zip(range(n), itertools.cycle(PHISHING), strict=False):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        producer.produce(topic, json.dumps({"event_id": f"{prefix}-{i}", **x, "label": y}).encode())
        producer.poll(0)
    assert producer.flush(30) == 0


def _predictions_for(system: System, prefix: str, n: int) -> list[tuple[Message, dict[str, Any]]]:
    topic = system.catalogue.predictions("phishing").name

    def done(msgs: list[Message]) -> bool:
        return sum(1 for m in msgs if (m.key() or b"").startswith(prefix.encode() + b"-")) >= n

    msgs = [m for m in system.read(topic, done) if (m.key() or b"").startswith(prefix.encode() + b"-")]
    return list(zip(msgs, system.records(msgs, "Prediction"), strict=True))


def test_ten_promotions_while_20k_events_flow(system: System) -> None:
    system.apply("phishing", promotion="manual")
    for version in range(1, 12):
        publish_version(system, trained_version(system, "phishing", version, 50 * version))
    promote(system, "phishing", 1)
    system.stack.start_all(["features", "predictor"])
    # The predictor serves v1 from its bootstrap at once, but follows promotions only once its Faust
    # agents have joined (seconds later on a loaded machine): wait for that, or the promotions below
    # would all be applied at once after the events have been predicted.
    promote(system, "phishing", 2)
    deadline = time.monotonic() + 60
    while _health(system)["live"].get("phishing", {}).get("version") != 2:
        assert time.monotonic() < deadline, "the predictor never followed a promotion"
        time.sleep(0.1)
    n = 20_000
    producer = threading.Thread(target=_produce, args=(system, n, 3000.0, "load"))
    producer.start()
    time.sleep(0.5)
    for version in range(3, 12):  # ~2.7 s of promotions while ~6.7 s of events flow
        promote(system, "phishing", version)
        time.sleep(0.3)
    producer.join()

    got = _predictions_for(system, "load", n)
    ids = [p["event_id"] for _, p in got]
    assert len(ids) == n, "no event lost, none predicted twice"
    assert len(set(ids)) == n
    per_partition: dict[int, list[tuple[int, int]]] = {}
    for msg, p in got:
        per_partition.setdefault(msg.partition() or 0, []).append((msg.offset() or 0, p["model_version"]))
    for partition, seq in per_partition.items():
        versions = [v for _, v in sorted(seq)]
        assert versions == sorted(versions), f"versions went backwards in partition {partition}"
    seen = {p["model_version"] for _, p in got}
    assert 11 in seen and len(seen) >= 6, f"swaps happened while events flowed: {sorted(seen)}"


def test_tampered_unsigned_and_foreign_artifacts_are_rejected(system: System) -> None:
    system.apply("phishing", promotion="manual")
    publish_version(system, trained_version(system, "phishing", 1, 100))
    promote(system, "phishing", 1)
    system.stack.start_all(["features", "predictor"])
    _produce(system, 100, 2000.0, "a")
    assert {p["model_version"] for _, p in _predictions_for(system, "a", 100)} == {1}

    corrupted = trained_version(system, "phishing", 2, 200)
    corrupted["artifact"] = corrupted["artifact"][:-3] + b"XYZ"  # bytes changed, checksum not
    rewritten = trained_version(system, "phishing", 3, 300)
    rewritten["artifact"] = rewritten["artifact"][:-3] + b"XYZ"
    rewritten["sha256"] = artifacts.sha256_hex(rewritten["artifact"])  # checksum forged, signature not
    unsigned = {**trained_version(system, "phishing", 4, 400), "signature": None}
    foreign = trained_version(system, "phishing", 5, 500, key=Keys(Signer(generate()), Verifier()))
    shared_key = trained_version(system, "phishing", 6, 500, key=b"the former shared HMAC key")
    for record in (corrupted, rewritten, unsigned, foreign, shared_key):
        publish_version(system, record)
        promote(system, "phishing", record["version"])

    alerts = system.records(
        system.read(system.catalogue.drift_alerts().name, lambda m: len(m) >= 5), "DriftAlert"
    )
    by_version = {a["model_version"]: a for a in alerts}
    assert {a["kind"] for a in alerts} == {"ARTIFACT"}
    assert "SHA-256 mismatch" in by_version[2]["message"]
    assert "bad Ed25519 signature" in by_version[3]["message"]
    assert "unsigned" in by_version[4]["message"]
    assert "signed by unknown key" in by_version[5]["message"]
    assert "HMAC-signed" in by_version[6]["message"], "the predictor holds no shared key to trust"

    _produce(system, 100, 2000.0, "b")
    assert {p["model_version"] for _, p in _predictions_for(system, "b", 100)} == {1}, "v1 keeps serving"
    text = system.stack.services["predictor"].metrics_text()
    rejected = [line for line in text.splitlines() if line.startswith("streamml_rejected_artifacts_total{")]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in rejected) == 5

    publish_version(system, trained_version(system, "phishing", 7, 600))
    promote(system, "phishing", 7)
    deadline = time.monotonic() + 30
    while _health(system)["live"].get("phishing", {}).get("version") != 7:
        assert time.monotonic() < deadline, "v7 never went live"
        time.sleep(0.2)
    _produce(system, 100, 2000.0, "c")
    assert {p["model_version"] for _, p in _predictions_for(system, "c", 100)} == {7}


def _url(system: System, path: str) -> str:
    return f"http://127.0.0.1:{system.stack.services['predictor'].http_port}{path}"


def _health(system: System) -> dict[str, Any]:
    with urllib.request.urlopen(_url(system, "/healthz"), timeout=5) as resp:
        return dict(json.loads(resp.read()))


def _post(system: System, body: bytes) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(_url(system, "/predict"), data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_http_predict_valid_invalid_and_during_swaps(system: System) -> None:
    system.apply("phishing", promotion="manual")
    system.stack.start_all(["predictor"])
    x, _ = PHISHING[0]
    event = json.dumps({"pipeline": "phishing", "event": {"event_id": "h1", **x}}).encode()
    status, body = _post(system, event)
    assert status == 503 and "no live model" in body["error"]

    for version in range(1, 7):
        publish_version(system, trained_version(system, "phishing", version, 100 * version))
    promote(system, "phishing", 1)
    deadline = time.monotonic() + 30
    while "phishing" not in _health(system)["live"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)

    status, body = _post(system, event)
    assert status == 200, body
    assert body["model_version"] == 1 and body["prediction"] in (True, False)
    assert abs(sum(body["probabilities"].values()) - 1.0) < 1e-9
    features = {k: float(v) for k, v in x.items()}
    status, body2 = _post(system, json.dumps({"pipeline": "phishing", "features": features}).encode())
    assert status == 200 and body2["probabilities"] == body["probabilities"]

    bad_cases = {
        b"{not json": 400,
        b'{"features": {"a": 1}}': 400,  # no pipeline
        b'{"pipeline": "phishing", "features": {"a": 1}, "extra": 1}': 400,
        b'{"pipeline": "phishing"}': 400,  # neither features nor event
        b'{"pipeline": "nope", "features": {"a": 1}}': 404,
        json.dumps(
            {"pipeline": "phishing", "event": {**x, "event_id": "h", "https": "yes please"}}
        ).encode(): 422,
    }
    for payload, expected in bad_cases.items():
        status, body = _post(system, payload)
        assert status == expected, (payload, status, body)
        assert body["error"]

    seen: list[int] = []
    failures: list[Any] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            status, body = _post(system, event)
            if status != 200:
                failures.append((status, body))
            else:
                seen.append(body["model_version"])

    thread = threading.Thread(target=hammer)
    thread.start()
    for version in range(2, 7):
        promote(system, "phishing", version)
        time.sleep(0.4)
    time.sleep(1.0)
    stop.set()
    thread.join()
    assert not failures
    assert seen == sorted(seen), "a request never sees an older version after a newer one"
    assert seen[-1] == 6 and len(set(seen)) >= 3


def test_http_api_requires_the_bearer_token_when_one_is_configured(make_system: SystemFactory) -> None:
    token = secrets.token_urlsafe(24)
    system = make_system(STREAMML_HTTP_TOKEN=token)
    system.apply("phishing", promotion="manual")
    system.stack.start_all(["predictor"])
    x, _ = PHISHING[0]
    body = json.dumps({"pipeline": "phishing", "event": {"event_id": "t1", **x}}).encode()

    def call(path: str, auth: str | None, data: bytes | None = None) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": auth} if auth is not None else {}
        req = urllib.request.Request(_url(system, path), data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    for auth in (None, "Bearer wrong", f"Basic {token}", "Bearer", f"Bearer {token}x"):
        assert call("/predict", auth, body)[0] == 401, auth
        assert call("/healthz", auth)[0] == 401, auth
    status, answer = call("/predict", f"Bearer {token}", body)
    assert status == 503 and "no live model" in answer["error"], "past the token: the API answers"
    status, health = call("/healthz", f"bearer {token}")
    assert status == 200 and health["status"] == "ok"
    log_text = system.stack.services["predictor"].log_path.read_text()
    assert token not in log_text, "the token is never logged"
