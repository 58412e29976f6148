"""`python -m bench.fuzz` (`make fuzz`): the whole stack under hostile input, on a broker of its own.

Starts a local Kafka on free ports in a temporary folder and the six services, applies the agrawal pipeline,
then writes >= 100,000 hostile records (bench/hostile.py) to every topic a service reads, shuffled among
valid raw events, as fast as the client takes them, and sends >= 10,000 hostile and valid bodies to
POST /predict once a model version is live. It waits for the stack to drain, probes every service, reads
every output topic back and prints a table and, as the LAST line, one JSON object:

  records_sent     hostile records written: raw, features, predictions, shadow-predictions, labels and every
                   control topic (pipelines, model-versions, promotions, training-requests, training-results,
                   evaluations, drift-alerts); the valid raw events and the end probes are not counted
  http_sent        POST /predict requests sent (hostile and valid)
  crashes          service processes that exited (or were replaced) during the run
  unaccounted      R + C + T + F:
                   R  raw records (valid or hostile) without exactly one fate, a fate being the FeatureVector
                      whose `source` is that record's (partition, offset) or a DeadLetter written by the
                      features service with that source_topic/partition/offset (none, or two or more);
                   C  control records the generator marks "skip": on pipelines, model-versions, promotions,
                      training-requests, training-results and evaluations, those named by no DriftAlert of
                      kind CONTROL whose window is exactly [topic, partition, offset, offset+1]; on
                      drift-alerts (a bad alert is never answered with an alert), for each service reading
                      that topic, the bad records beyond its streamml_control_records_skipped_total for that
                      topic (the largest shortfall over those services);
                   T  training requests marked "answer" (refused estimators, unknown pipeline, huge grids)
                      with no TrainingResult carrying their request_id;
                   F  hostile feature vectors with no DeadLetter from the predictor (none is a valid vector of
                      the pipeline, so none may be predicted or dropped silently)
                   Records on the labels topic are not read (agrawal's labels are inline) and hostile records
                   on the predictions topics may be scored by the monitor: both are only listed in the table.
  http_5xx         responses with status >= 500 (HTTP starts once a version is live, so 503 counts too)
  restarts_needed  services that stopped processing: after the drain each one gets a probe and must answer
                   within 30 s (features + predictor: a valid raw event is predicted; learner and monitor:
                   their streamml_events_in_total moves; trainer: a request is answered; controller: a bad
                   evaluation is alerted as CONTROL)
  valid_events     valid raw events written;  valid_predicted: distinct ones of them predicted
  dead_lettered    DeadLetter records written by any service (pipeline and global dead-letter topics)
  control_skipped  sum of streamml_control_records_skipped_total over the six services
  duration_s       the whole run, broker start to report

Targets: crashes, unaccounted, http_5xx and restarts_needed all 0, and valid_predicted == valid_events.
Everything it started (broker, services) is stopped by pid at the end, also on an error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import itertools
import json
import logging
import os
import random
import secrets
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from confluent_kafka import Message, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from bench import hostile, report
from bench.hostile import Hostile
from bench.workload import Deployment, cpu_seconds
from streamml import pipelines
from streamml.codec import codec_for
from streamml.kafka import make_consumer
from streamml.localkafka import LocalKafka, free_port_block
from streamml.runtime import read_to_end, watermarks
from streamml.stack import SERVICES, Stack

log = logging.getLogger("bench.fuzz")
REPO = Path(__file__).resolve().parent.parent
PIPELINE = "agrawal"
PROBE_S = 30.0
Where = tuple[str, int, int]  # topic, partition, offset


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=100_000, help="hostile records to write (default 100000)")
    p.add_argument("--valid", type=int, default=10_000, help="valid raw events among them (default 10000)")
    p.add_argument("--http", type=int, default=10_000, help="POST /predict bodies (default 10000)")
    p.add_argument("--http-threads", type=int, default=4, help="concurrent HTTP clients (default 4)")
    p.add_argument(
        "--control-rounds", type=int, default=120, help="rounds of control-topic cases (default 120)"
    )
    p.add_argument(
        "--drain-timeout", type=float, default=180.0, help="seconds to wait for the stack to drain"
    )
    p.add_argument("--seed", type=int, default=20_240_607, help="seed of every generator (default 20240607)")
    p.add_argument("--keep", type=Path, help="work folder to keep (broker data, service logs)")
    return p.parse_args(argv)


def metric(text: str, name: str, **labels: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


# -- POST /predict ----------------------------------------------------------------------------------------
@dataclass
class HttpStats:
    sent: int = 0
    by_status: collections.Counter[int] = field(default_factory=collections.Counter)
    by_kind: dict[str, collections.Counter[int]] = field(default_factory=dict)
    valid_not_200: int = 0
    connection_errors: int = 0  # the server closed the connection (e.g. after refusing a huge body)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, body: hostile.Body, status: int) -> None:
        with self.lock:
            self.sent += 1
            self.by_status[status] += 1
            self.by_kind.setdefault(body.kind, collections.Counter())[status] += 1
            if body.valid and status != 200:
                self.valid_not_200 += 1

    @property
    def five_xx(self) -> int:
        return sum(n for status, n in self.by_status.items() if status >= 500)


def hammer(port: int, bodies: list[hostile.Body], stats: HttpStats) -> None:
    """Send `bodies` one after the other on a keep-alive connection (reopened when the server closes it)."""
    conn: http.client.HTTPConnection | None = None
    for body in bodies:
        for attempt in range(2):
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                conn.request("POST", "/predict", body.data, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                stats.record(body, resp.status)
                if resp.will_close:
                    conn.close()
                    conn = None
                break
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = None
                if attempt == 1:  # twice in a row: count it, do not retry forever
                    with stats.lock:
                        stats.sent += 1
                        stats.connection_errors += 1
    if conn is not None:
        conn.close()


# -- the run ------------------------------------------------------------------------------------------------
class Fuzz:
    def __init__(self, bootstrap: str, workdir: Path, args: argparse.Namespace, started: float) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        prefix = f"fuzz{int(time.time()) % 1_000_000}{os.getpid() % 1000}"
        self.dep = Deployment(bootstrap, prefix, secrets.token_hex(16), workdir / "fuzz", pipeline=PIPELINE)
        self.c = self.dep.catalogue
        self.memory_dir = Path(tempfile.gettempdir()) / f"streamml-fuzz-{uuid.uuid4().hex}"
        self.sender = hostile.Sender(bootstrap)
        self.http = HttpStats()
        self.sent_by_topic: collections.Counter[str] = collections.Counter()
        self.valid_ids: set[str] = set()
        self.probe_ids: set[str] = set()
        self.stack: Stack | None = None
        self.pids: dict[str, int | None] = {}
        self.started = started  # before the broker started: duration_s covers the whole run
        self.timings: dict[str, float] = {}
        self.result: dict[str, Any] = {}
        self.rows: list[list[str]] = []

    def definition(self) -> dict[str, Any]:
        spec = pipelines.load_file(REPO / "pipelines" / f"{PIPELINE}.yaml")
        data = {**spec.model_dump(), "snapshot_every_events": 1000, "snapshot_every_seconds": 3600.0}
        return pipelines.to_definition(
            pipelines.PipelineFile.model_validate(data), self.dep.raw_topic
        ).to_avro()

    def mark(self, name: str, since: float) -> None:
        self.timings[name] = time.monotonic() - since
        log.info("%s done in %.1f s", name, self.timings[name])

    def run(self) -> None:
        dep = self.dep
        dep.create_topics()
        definition = self.definition()
        dep.publish_pipeline(definition)
        t = time.monotonic()
        with dep.services(*SERVICES) as stack:
            self.stack = stack
            self.pids = {name: svc.pid for name, svc in stack.services.items()}
            self.mark("services ready", t)
            t = time.monotonic()
            outbox = self.generate(definition)
            self.mark("generate", t)
            http_thread = threading.Thread(target=self.http_phase, name="http", daemon=True)
            http_thread.start()
            t = time.monotonic()
            for topic, value, key, tag in outbox:
                self.sender.send(topic, value, key, tag)
            self.sender.flush(120)
            self.mark("write records", t)
            del outbox
            t = time.monotonic()
            http_thread.join()
            self.mark("HTTP (from the first live version)", t)
            t = time.monotonic()
            self.drain(stack)
            self.mark("drain", t)
            t = time.monotonic()
            restarts = self.probes(stack)
            self.mark("probes", t)
            crashes = [n for n, svc in stack.services.items() if not svc.alive() or svc.pid != self.pids[n]]
            skipped = {
                n: self.skipped_metrics(svc.metrics_text())
                for n, svc in stack.services.items()
                if svc.alive()
            }
            usage = {n: self.usage(svc.pid) for n, svc in stack.services.items()}
            t = time.monotonic()
            self.account(crashes, restarts, skipped, usage)
            self.mark("read back and account", t)

    # -- generating and sending ---------------------------------------------------------------------------
    def generate(self, definition: dict[str, Any]) -> list[tuple[str, bytes | None, bytes | None, Any]]:
        """Every record to write, shuffled: (topic, value, key, tag) where tag is a Hostile or "valid"."""
        a, rng, c = self.args, self.rng, self.c
        events = hostile.agrawal_events(a.valid + 2000)
        valid, spare = events[: a.valid], events[a.valid :]
        self.valid_ids = {str(e["event_id"]) for e in valid}
        out: list[tuple[str, bytes | None, bytes | None, Any]] = [
            (self.dep.raw_topic, json.dumps(e).encode(), None, "valid") for e in valid
        ]
        hostile_out: list[tuple[str, Hostile]] = []
        for r in range(a.control_rounds):
            for topic, cases in hostile.control_cases(
                c, definition, rng, str(self.memory_dir), f"c{r}"
            ).items():
                hostile_out += [(topic, h) for h in cases]
        for r in range(a.control_rounds * 2):
            template = rng.choice(spare)
            hostile_out += [
                (c.features(PIPELINE).name, h) for h in hostile.feature_cases(definition, template, f"f{r}")
            ]
            hostile_out += [(c.predictions(PIPELINE).name, h) for h in hostile.prediction_cases(f"p{r}")]
            hostile_out += [(c.labels(PIPELINE).name, h) for h in hostile.label_cases(f"l{r}")]
            if r % 2 == 0:
                hostile_out += [
                    (c.shadow_predictions(PIPELINE).name, h) for h in hostile.prediction_cases(f"s{r}")
                ]
        for r in range(3):
            hostile_out += [
                (self.dep.raw_topic, h) for h in hostile.big_raw_cases(rng.choice(spare), f"big{r}")
            ]
        r = 0
        while len(hostile_out) < a.records:
            hostile_out += [
                (self.dep.raw_topic, h) for h in hostile.raw_cases(rng.choice(spare), rng, f"r{r}")
            ]
            r += 1
        for topic, h in hostile_out:
            out.append((topic, h.value, h.key, h))
            self.sent_by_topic[topic] += 1
        rng.shuffle(out)
        log.info("generated %d hostile records and %d valid events", len(hostile_out), len(valid))
        return out

    def http_phase(self) -> None:
        """Once a version is live (503 before that is by design), the bodies from several clients at once."""
        assert self.stack is not None
        predictor = self.stack.services["predictor"]
        deadline = time.monotonic() + self.args.drain_timeout
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", predictor.http_port, timeout=5)
                conn.request("GET", "/healthz")
                live = json.loads(conn.getresponse().read()).get("live", {})
                conn.close()
                if PIPELINE in live:
                    break
            except (OSError, ValueError, http.client.HTTPException):
                pass
            time.sleep(0.5)
        else:
            log.error("no live version after %.0f s: POST /predict not exercised", self.args.drain_timeout)
            return
        events = hostile.agrawal_events(500, seed=99, prefix="http")
        bodies = list(
            itertools.islice(hostile.http_bodies(events, random.Random(self.args.seed + 1)), self.args.http)
        )
        n = max(1, self.args.http_threads)
        threads = [
            threading.Thread(target=hammer, args=(predictor.http_port, bodies[i::n], self.http))
            for i in range(n)
        ]
        started = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        log.info(
            "HTTP: %d requests in %.1f s, statuses %s",
            self.http.sent,
            time.monotonic() - started,
            dict(sorted(self.http.by_status.items())),
        )

    # -- draining and probing -------------------------------------------------------------------------------
    def drain(self, stack: Stack) -> None:
        """Until each data-path service has consumed its input topics to their end and alerts stop coming."""
        c, dep = self.c, self.dep
        raw, feats = dep.raw_topic, dep.features_topic
        preds, shadow = dep.predictions_topic, c.shadow_predictions(PIPELINE).name
        wanted: dict[str, list[str]] = {
            "features": [raw],
            "learner": [feats],
            "predictor": [feats],
            "monitor": [feats, preds, shadow],
        }
        deadline = time.monotonic() + self.args.drain_timeout
        last_alerts, still_since = -1, time.monotonic()
        behind: dict[str, int] = {}
        while time.monotonic() < deadline:
            behind = {}
            for name, topics in wanted.items():
                svc = stack.services[name]
                if not svc.alive():
                    continue
                text = svc.metrics_text(timeout_s=10)
                consumed = sum(
                    metric(text, "streamml_events_in_total", service=name, topic=t) for t in topics
                )
                end = sum(dep.topic_count(t) for t in topics)
                if consumed < end:
                    behind[name] = int(end - consumed)
            alerts = dep.topic_count(c.drift_alerts().name)
            if alerts != last_alerts:
                last_alerts, still_since = alerts, time.monotonic()
            if not behind and time.monotonic() - still_since >= 5.0:
                return
            log.info("draining: behind %s, %d alerts", behind or "nothing", alerts)
            time.sleep(2.0)
        log.error("not drained after %.0f s: behind %s", self.args.drain_timeout, behind)

    def probes(self, stack: Stack) -> list[str]:
        """Services that no longer process: each must react to a probe record within PROBE_S seconds."""
        c, dep = self.c, self.dep
        probe = {**hostile.agrawal_events(1, seed=7, prefix=f"probe-{uuid.uuid4().hex[:8]}")[0]}
        self.probe_ids.add(str(probe["event_id"]))
        request_id = f"probe-{uuid.uuid4().hex}"
        before = {n: self.events_in(stack, n) for n in ("learner", "monitor")}
        consumer = make_consumer(dep.settings, f"{dep.prefix}-fuzz-marks")
        topics = (dep.predictions_topic, c.training_results().name, c.drift_alerts().name)
        marks = {t: (watermarks(consumer, t) or {0: (0, 0)})[0][1] for t in topics}
        consumer.close()
        sender = hostile.Sender(dep.bootstrap)
        sender.send(dep.raw_topic, json.dumps(probe).encode(), tag="probe")
        request = hostile.training_request(request_id, pipeline=hostile.GHOST)
        sender.send(c.training_requests().name, codec_for("TrainingRequest").encode(request), b"ghost")
        sender.send(c.evaluations().name, b"probe: not an evaluation", b"probe", tag="probe")
        sender.flush(30)
        evaluation = next((t, p, o) for _tag, t, p, o in sender.landed if t == c.evaluations().name)
        sender.close()
        waiting = set(SERVICES)
        deadline = time.monotonic() + PROBE_S
        while waiting and time.monotonic() < deadline:
            if waiting & {"features", "predictor"} and any(
                m.key() == str(probe["event_id"]).encode() for m in self.tail(dep.predictions_topic, marks)
            ):
                waiting -= {"features", "predictor"}
            for name in ("learner", "monitor"):
                if name in waiting and self.events_in(stack, name) > before[name]:
                    waiting.discard(name)
            if "trainer" in waiting and any(
                codec_for("TrainingResult").decode(m.value() or b"")["request_id"] == request_id
                for m in self.tail(c.training_results().name, marks)
            ):
                waiting.discard("trainer")
            if "controller" in waiting and any(
                evaluation in control_alerted([a]) and a["detector"] == "control:controller"
                for a in decode_all(self.tail(c.drift_alerts().name, marks), "DriftAlert")
            ):
                waiting.discard("controller")
            time.sleep(1.0)
        if waiting:
            log.error("no reaction to the probes within %.0f s: %s", PROBE_S, sorted(waiting))
        return sorted(waiting)

    def tail(self, topic: str, marks: dict[str, int]) -> list[Message]:
        """The records written to a topic since `marks` (its high watermark before the probes were sent)."""
        consumer = make_consumer(self.dep.settings, f"{self.dep.prefix}-fuzz-tail")
        try:
            marks_now = watermarks(consumer, topic) or {}
            if sum(high for _low, high in marks_now.values()) <= marks[topic]:
                return []
            consumer.assign([TopicPartition(topic, 0, marks[topic])])  # every topic here has 1 partition
            out: list[Message] = []
            end = marks_now[0][1]
            while not out or (out[-1].offset() or 0) < end - 1:
                batch = consumer.consume(1000, 1.0)
                if not batch:
                    break
                out += [m for m in batch if m.error() is None]
            return out
        finally:
            consumer.close()

    @staticmethod
    def events_in(stack: Stack, name: str) -> float:
        svc = stack.services[name]
        return (
            metric(svc.metrics_text(timeout_s=10), "streamml_events_in_total", service=name)
            if svc.alive()
            else 0
        )

    @staticmethod
    def skipped_metrics(text: str) -> dict[str, float]:
        out: dict[str, float] = collections.defaultdict(float)
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "streamml_control_records_skipped_total":
                    out[s.labels["topic"]] += s.value
        return dict(out)

    @staticmethod
    def usage(pid: int | None) -> tuple[float | None, float | None]:
        """(CPU seconds, resident MB) of a process, None when it is gone."""
        if pid is None:
            return None, None
        try:
            rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            return None, None
        return cpu_seconds(pid), rss

    # -- reading back ---------------------------------------------------------------------------------------
    def account(
        self,
        crashes: list[str],
        restarts: list[str],
        skipped: dict[str, dict[str, float]],
        usage: dict[str, tuple[float | None, float | None]],
    ) -> None:
        c, dep = self.c, self.dep
        shadow_topic = c.shadow_predictions(PIPELINE).name
        landed: dict[Where, Any] = {(t, p, o): tag for tag, t, p, o in self.sender.landed}
        ours = set(landed)
        raw_where = {w for w in landed if w[0] == dep.raw_topic}
        # R: raw records and their fates
        fvs = [m for m in read_to_end(dep.settings, dep.features_topic, 300) if where(m) not in ours]
        featured = [
            (s["topic"], s["partition"], s["start_offset"])
            for fv in decode_all(fvs, "FeatureVector")
            if (s := fv["source"]) is not None
        ]
        letters = decode_all(read_to_end(dep.settings, c.dead_letter(PIPELINE).name, 300), "DeadLetter")
        global_letters = decode_all(read_to_end(dep.settings, c.dead_letters().name, 120), "DeadLetter")
        by_features = [
            (d["source_topic"], d["source_partition"], d["source_offset"])
            for d in letters
            if d["service"] == "features" and d["source_topic"] == dep.raw_topic
        ]
        fates = collections.Counter(featured + by_features)
        probe_where = {w for w in fates if w not in raw_where}  # the end probe's raw event
        raw_bad = sum(1 for w in raw_where if fates.get(w, 0) != 1)
        raw_extra = sum(n for w, n in fates.items() if w in probe_where and n != 1)
        malformed_featured = sum(1 for w in featured if w in raw_where and landed[w] != "valid")
        valid_dead = sum(1 for w in by_features if w in raw_where and landed[w] == "valid")
        # C: control records that must be skipped
        alerts = decode_all(
            [m for m in read_to_end(dep.settings, c.drift_alerts().name, 300) if where(m) not in ours],
            "DriftAlert",
        )
        alerted = control_alerted(alerts)
        alerts_topic = c.drift_alerts().name
        must_skip = [w for w, t in landed.items() if isinstance(t, Hostile) and t.expect == "skip"]
        control_missing = sum(1 for w in must_skip if w[0] != alerts_topic and w not in alerted)
        bad_alerts = sum(1 for w in must_skip if w[0] == alerts_topic)
        shortfall = max(
            (
                max(0, bad_alerts - int(skipped.get(n, {}).get(alerts_topic, 0)))
                for n in hostile.CONTROL_READERS["drift-alerts"]
            ),
            default=0,
        )
        # T: training requests that must be answered
        requests = {t.request_id for t in landed.values() if isinstance(t, Hostile) and t.request_id}
        results = [
            m for m in read_to_end(dep.settings, c.training_results().name, 120) if where(m) not in ours
        ]
        answered = {r["request_id"]: r for r in decode_all(results, "TrainingResult")}
        unanswered = len(requests - set(answered))
        trained = sum(1 for r in requests if answered.get(r, {}).get("status") == "SUCCEEDED")
        # F: hostile feature vectors, and the other data topics
        letter_services: dict[Where, set[str]] = collections.defaultdict(set)
        for d in letters + global_letters:
            letter_services[(d["source_topic"], d["source_partition"], d["source_offset"])].add(d["service"])
        fv_where = [w for w in landed if w[0] == dep.features_topic]
        fv_missing = sum(1 for w in fv_where if "predictor" not in letter_services.get(w, set()))
        # predictions
        preds = decode_all(
            [m for m in read_to_end(dep.settings, dep.predictions_topic, 300) if where(m) not in ours],
            "Prediction",
        )
        predicted = collections.Counter(p["event_id"] for p in preds)
        valid_predicted = len(self.valid_ids & set(predicted))
        duplicates = sum(predicted[i] - 1 for i in self.valid_ids if predicted[i] > 1)
        strangers = len(set(predicted) - self.valid_ids - self.probe_ids)
        forged_served = sum(1 for p in preds if p["model_version"] == hostile.FORGED_VERSION)

        unaccounted = raw_bad + raw_extra + control_missing + shortfall + unanswered + fv_missing
        self.result = {
            "records_sent": sum(self.sent_by_topic.values()),
            "http_sent": self.http.sent,
            "crashes": len(crashes),
            "unaccounted": unaccounted,
            "http_5xx": self.http.five_xx,
            "restarts_needed": len(restarts),
            "valid_events": len(self.valid_ids),
            "valid_predicted": valid_predicted,
            "dead_lettered": len(letters) + len(global_letters),
            "control_skipped": int(sum(sum(v.values()) for v in skipped.values())),
            "duration_s": round(time.monotonic() - self.started, 1),
        }
        n = report.num
        by_kind = collections.Counter(
            t.kind for w, t in landed.items() if isinstance(t, Hostile) and w[0] == dep.raw_topic
        )
        self.rows = [
            [
                "hostile records written",
                n(self.result["records_sent"]),
                ", ".join(
                    f"{t.removeprefix(dep.prefix + '.')} {k:,}" for t, k in self.sent_by_topic.most_common()
                ),
            ],
            [
                "  raw: distinct attack kinds",
                n(len(by_kind)),
                f"{n(sum(by_kind.values()))} records, "
                f"incl. {n(sum(by_kind[k] for k in by_kind if k.startswith('900KB')))} of ~900 KB",
            ],
            [
                "valid raw events / predicted (distinct)",
                f"{n(len(self.valid_ids))} / {n(valid_predicted)}",
                f"duplicates {n(duplicates)}, predictions of no valid event {n(strangers)}, "
                f"served by the forged version {n(forged_served)}",
            ],
            [
                "R raw records without exactly one fate",
                n(raw_bad + raw_extra),
                f"{n(len(featured))} vectors + {n(len(by_features))} features dead letters for "
                f"{n(len(raw_where))} "
                f"raw records; malformed turned into vectors {n(malformed_featured)}, valid dead-lettered "
                f"{n(valid_dead)}",
            ],
            [
                "C control records skipped without an alert",
                n(control_missing + shortfall),
                f"{n(len(must_skip))} to skip; drift-alerts: {n(bad_alerts)} bad, skip metric per reader "
                + ", ".join(
                    f"{s} {n(skipped.get(s, {}).get(alerts_topic))}"
                    for s in hostile.CONTROL_READERS["drift-alerts"]
                ),
            ],
            [
                "T training requests not answered",
                n(unanswered),
                f"{n(len(requests))} hostile requests, {n(trained)} trained (must be 0); memory dir created: "
                f"{self.memory_dir.exists()}",
            ],
            [
                "F hostile vectors not dead-lettered by the predictor",
                n(fv_missing),
                f"{n(len(fv_where))} written to the features topic",
            ],
            [
                "  predictions/shadow hostile: dead-lettered by the monitor",
                n(
                    sum(
                        1
                        for w in landed
                        if w[0] in (dep.predictions_topic, shadow_topic)
                        and "monitor" in letter_services.get(w, set())
                    )
                ),
                f"of {n(self.sent_by_topic[dep.predictions_topic] + self.sent_by_topic[shadow_topic])}"
                " (the rest scored by the monitor; not counted as unaccounted)",
            ],
            [
                "CONTROL alerts",
                n(sum(1 for a in alerts if a["kind"] == "CONTROL")),
                f"ARTIFACT alerts {n(sum(1 for a in alerts if a['kind'] == 'ARTIFACT'))}",
            ],
            [
                "control records skipped (metric, all services)",
                n(self.result["control_skipped"]),
                ", ".join(f"{s} {n(sum(v.values()))}" for s, v in skipped.items()),
            ],
            [
                "dead letters (pipeline + global topic)",
                n(self.result["dead_lettered"]),
                ", ".join(
                    f"{s} {k:,}"
                    for s, k in collections.Counter(
                        d["service"] for d in letters + global_letters
                    ).most_common()
                ),
            ],
            [
                "HTTP requests",
                n(self.http.sent),
                ", ".join(f"{s}: {k:,}" for s, k in sorted(self.http.by_status.items()))
                + f"; connection closed {n(self.http.connection_errors)}; "
                f"valid not 200 {n(self.http.valid_not_200)}",
            ],
            [
                "HTTP 5xx",
                n(self.http.five_xx),
                ", ".join(
                    f"{kind} {sum(v for s, v in st.items() if s >= 500)}"
                    for kind, st in self.http.by_kind.items()
                    if any(s >= 500 for s in st)
                )
                or "none",
            ],
            ["crashed services", n(len(crashes)), ", ".join(crashes) or "none"],
            [
                "services needing a restart",
                n(len(restarts)),
                ", ".join(restarts) or "none (all probes answered)",
            ],
            [
                "service CPU s / RSS MB at the end",
                "",
                ", ".join(f"{s} {n(cpu, 0)}/{n(rss, 0)}" for s, (cpu, rss) in usage.items()),
            ],
            ["phases (s)", "", ", ".join(f"{k} {v:.0f}" for k, v in self.timings.items())],
        ]
        if self.memory_dir.exists():
            self.result["unaccounted"] += 1  # a refused capability was used: never let that pass unseen

    def text(self) -> str:
        a = self.args
        title = (
            f"StreamML fuzz: {a.records:,} hostile records + {a.valid:,} valid events on every topic the six "
            f"services read, {a.http:,} POST /predict bodies; seed {a.seed}; "
            f"took {self.result['duration_s']:.0f} s; "
            f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
        )
        table = noted_table(["measure", "value", "notes"], self.rows, title)
        http_rows = [
            [kind, report.num(sum(st.values())), ", ".join(f"{s}: {k:,}" for s, k in sorted(st.items()))]
            for kind, st in sorted(self.http.by_kind.items())
        ]
        table += "\n\n" + noted_table(["body kind", "sent", "statuses"], http_rows, "POST /predict by body")
        targets = [
            [k, report.num(self.result[k]), "MET" if self.result[k] == 0 else "NOT MET"]
            for k in ("crashes", "unaccounted", "http_5xx", "restarts_needed")
        ]
        ok = self.result["valid_predicted"] == self.result["valid_events"]
        targets.append(
            [
                "valid_predicted == valid_events",
                f"{self.result['valid_predicted']:,}",
                "MET" if ok else "NOT MET",
            ]
        )
        return table + "\n\n" + report.table(["target", "measured", "status"], targets, "Targets (all zero)")


def noted_table(headers: Sequence[str], rows: Sequence[Sequence[str]], title: str) -> str:
    """report.table, but the last column (free text) left-aligned and unpadded: long notes stay readable."""
    *head, note = headers
    body = report.table(head, [r[:-1] for r in rows], title).split("\n")
    first = 1 if title else 0
    width = max(len(line) for line in body[first:])
    lines = [*body[:first], body[first].ljust(width) + "  " + note, body[first + 1] + "  " + "-" * len(note)]
    lines += [line.ljust(width) + "  " + r[-1] for line, r in zip(body[first + 2 :], rows, strict=True)]
    return "\n".join(line.rstrip() for line in lines)


def where(msg: Message) -> Where:
    return (msg.topic() or "", msg.partition() or 0, msg.offset() or 0)


def decode_all(msgs: list[Message], schema: str) -> list[dict[str, Any]]:
    codec = codec_for(schema)
    return [codec.decode(m.value() or b"") for m in msgs]


def control_alerted(alerts: list[dict[str, Any]]) -> set[Where]:
    """(topic, partition, offset) of every control record a CONTROL alert names."""
    return {
        (w["topic"], w["partition"], w["start_offset"])
        for a in alerts
        if a["kind"] == "CONTROL"
        for w in a["window"]
        if w["end_offset"] == w["start_offset"] + 1
    }


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every `finally`: services, then broker


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("streamml.kafka.librdkafka").setLevel(logging.ERROR)
    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="streamml-fuzz-") as tmp:
        workdir = args.keep.resolve() if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        kafka = LocalKafka(workdir / "kafka", brokers=1, base_port=free_port_block(2), die_with_parent=True)
        fuzz: Fuzz | None = None
        try:
            bootstrap = kafka.start(timeout_s=120)
            log.info("Kafka at %s (work folder %s)", bootstrap, workdir)
            fuzz = Fuzz(bootstrap, workdir, args, started)
            fuzz.run()
        finally:
            if fuzz is not None:
                fuzz.sender.close()
                fuzz.dep.close()
            kafka.stop()
    assert fuzz is not None
    print(fuzz.text())
    print(json.dumps(fuzz.result))
    failed = any(fuzz.result[k] for k in ("crashes", "unaccounted", "http_5xx", "restarts_needed"))
    return 1 if failed or fuzz.result["valid_predicted"] != fuzz.result["valid_events"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
