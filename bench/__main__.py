"""`python -m bench` (`make bench`): StreamML's data path measured on a broker of its own.

Starts a local Kafka on free ports in a temporary folder, runs the measurements, prints the tables and,
as the last line, one JSON object with the headline numbers. The broker and every service it started
are stopped at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from bench import closed_loop, measures, profile, report, stats
from bench.measures import Measured
from bench.workload import (
    ESTIMATOR,
    PIPELINE,
    TIME_FIELD,
    Deployment,
    agrawal_events,
    feature_vectors,
    pipeline_definition,
    signed_versions,
)
from streamml.codec import codec_for
from streamml.localkafka import LocalKafka, free_port_block, ports_per_node

log = logging.getLogger("bench")
T = TypeVar("T")
MEASURES = (
    "passthrough", "predictor", "features", "e2e", "batched", "swap", "learner", "breakdown", "loop",
    "stationary", "monitor", "typed", "capacity", "quix",
)  # fmt: skip
# The data loops' batching for throughput (see README, Configuration), measured beside the defaults.
BATCHED_ENV = {
    "STREAMML_LINGER_MS": "5",
    "STREAMML_FETCH_MIN_BYTES": "65536",
    "STREAMML_FETCH_MAX_WAIT_MS": "20",
}
QUIX_PYTHON = Path(__file__).resolve().parents[1] / ".local" / "quix-venv" / "bin" / "python"
MONITOR_WARMUP = 5000  # events handled untimed before the monitor's throughput is measured


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--events", type=int, default=100_000, help="N pre-produced records (default 100000)")
    p.add_argument("--rate", type=float, default=5000, help="e2e: raw events per second (default 5000)")
    p.add_argument("--duration", type=float, default=20, help="e2e: measured seconds (default 20)")
    p.add_argument("--warmup", type=float, default=10, help="e2e: seconds at full rate before measuring")
    p.add_argument(
        "--capacity-duration", type=float, default=15, help="capacity: measured seconds per rate (default 15)"
    )
    p.add_argument(
        "--capacity-rates",
        default=",".join(str(r) for r in measures.CAPACITY_RATES),
        help="capacity: raw rates tried upwards, comma-separated (default %(default)s)",
    )
    p.add_argument("--swaps", type=int, default=12, help="promotions during the swap measurement (>= 10)")
    p.add_argument("--swap-interval", type=float, default=1.0, help="seconds between promotions")
    p.add_argument("--swap-rate", type=float, default=2000, help="feature vectors per second during swaps")
    p.add_argument("--snapshot-every", type=int, default=10_000, help="learner: events per version")
    p.add_argument("--estimator", default=ESTIMATOR, help=f"online model spec (default {ESTIMATOR})")
    p.add_argument(
        "--stationary-events",
        type=int,
        default=100_000,
        help="stationary: Agrawal events watched for false alarms (default 100000)",
    )
    p.add_argument(
        "--monitor-events",
        type=int,
        default=50_000,
        help="monitor: events timed through the monitor's handler (default 50000)",
    )
    p.add_argument("--only", default=",".join(MEASURES), help=f"comma-separated subset of {MEASURES}")
    p.add_argument(
        "--quix-python",
        type=Path,
        default=QUIX_PYTHON,
        help="quix: the Quix Streams venv's python (make quix-venv)",
    )
    p.add_argument("--profile-dir", type=Path, help="record the predictor and learner with py-spy here")
    p.add_argument("--keep", type=Path, help="work folder to keep (broker data, service logs)")
    p.add_argument(
        "--secure",
        action="store_true",
        help="also measure predictor and e2e on a secured cluster (TLS, SCRAM, ACLs; `make bench SECURE=1`)",
    )
    args = p.parse_args(argv)
    unknown = set(args.only.split(",")) - set(MEASURES)
    if unknown:
        p.error(f"unknown measures {sorted(unknown)}; choose from {MEASURES}")
    return args


class Bench:
    """Runs the measurements in order; a failed one is reported as n/a and the others still run."""

    def __init__(
        self, bootstrap: str, workdir: Path, args: argparse.Namespace, broker_pids: Sequence[int] = ()
    ) -> None:
        self.bootstrap = bootstrap
        self.broker_pids = list(broker_pids)
        self.workdir = workdir
        self.args = args
        self.only = set(args.only.split(","))
        self.run_id = f"{int(time.time()) % 1_000_000}{os.getpid() % 1000}"
        self.key = secrets.token_hex(16)
        self.results: dict[str, Measured] = {}
        self.failures: dict[str, str] = {}
        self.deployments: dict[str, Deployment] = {}
        self.breakdowns: dict[str, dict[str, float]] = {}
        self.secure: LocalKafka | None = None  # set by run_secure: later deployments are on it
        self.inputs: tuple[list[dict[str, Any]], list[Any]] = ([], [])  # events and records, for run_secure

    def deployment(
        self, name: str, pipeline: str = PIPELINE, env: dict[str, str] | None = None
    ) -> Deployment:
        prefix = f"bench{self.run_id}-{name}"
        if self.secure is None:
            dep = Deployment(
                self.bootstrap,
                prefix,
                self.key,
                self.workdir / name,
                pipeline=pipeline,
                settings_env=env or {},
            )
        else:
            dep = self.secure_deployment(self.secure, name, prefix, pipeline)
        self.deployments[name] = dep
        return dep

    def secure_deployment(self, kafka: LocalKafka, name: str, prefix: str, pipeline: str) -> Deployment:
        """A deployment on the secured cluster: the operator applies its principals and ACLs (as
        `streamml acl apply` does), the bench acts as the user, every service as its own principal."""
        from streamml import acl
        from streamml.kafka import make_admin
        from streamml.settings import Settings
        from streamml.topics import Catalogue

        users = self.workdir / "users"
        admin_env = {k.removeprefix("STREAMML_").lower(): v for k, v in kafka.admin_env().items()}
        admin = Settings(**{**admin_env, "topic_prefix": prefix}, _env_file=None)
        acl.apply(make_admin(admin), acl.plan(Catalogue(admin), [(pipeline, None)]), users)
        user = acl.user_name(prefix, acl.CLI)
        return Deployment(
            kafka.bootstrap, prefix, self.key, self.workdir / name, pipeline=pipeline,
            settings_env=kafka.client_env(user, acl.password_file(users, user)), users_dir=users,
        )  # fmt: skip

    def run_secure(self, kafka: LocalKafka, events: list[dict[str, Any]], records: list[Any]) -> None:
        """Issue 10: the predictor and e2e measurements again, on a secured cluster (same inputs)."""
        a = self.args
        self.secure = kafka
        definition = pipeline_definition("bench.raw", estimator=a.estimator)
        warm = feature_vectors(definition, events[:2000])
        one = signed_versions(self.key.encode(), warm, 1, len(warm), a.estimator)[0]

        def predictor() -> Measured:
            dep = self.deployment("predictor_secure")
            definition = pipeline_definition(dep.raw_topic, estimator=a.estimator)
            return measures.predictor_service(dep, definition, records, one, None)

        def e2e() -> Measured:
            dep = self.deployment("e2e_secure")
            definition = pipeline_definition(dep.raw_topic, estimator=a.estimator)
            return measures.e2e_latency(
                dep,
                definition,
                events,
                one,
                a.rate,
                a.duration,
                a.warmup,
                None,
                list(kafka.node_pids().values()),
            )

        if "predictor" in self.only:
            got = self.attempt("predictor_secure", predictor)
            if got is not None:
                self.results["predictor_secure"] = got
        if "e2e" in self.only:
            got = self.attempt("e2e_secure", e2e)
            if got is not None:
                self.results["e2e_secure"] = got

    def attempt(self, name: str, fn: Callable[[], T]) -> T | None:
        started = time.monotonic()
        log.info("== %s", name)
        try:
            value = fn()
        except Exception as exc:  # one broken measurement must not hide the others
            log.exception("%s failed", name)
            self.failures[name] = f"{type(exc).__name__}: {exc}"[:2000]
            return None
        log.info("== %s done in %.1f s", name, time.monotonic() - started)
        return value

    def measure(self, name: str, fn: Callable[[], Measured]) -> None:
        if name not in self.only:
            return
        got = self.attempt(name, fn)
        if got is not None:
            self.results[name] = got

    def run(self) -> None:
        a = self.args
        log.info("generating %d Agrawal events and their feature vectors", a.events)
        definition = pipeline_definition("bench.raw", estimator=a.estimator)
        events = agrawal_events(a.events)
        vectors = feature_vectors(definition, events)
        encode = codec_for("FeatureVector").encode
        records = [(fv["event_id"].encode(), encode(fv)) for fv in vectors]
        warm = vectors[: min(2000, len(vectors))]
        # The inputs stay alive all run: keep the cyclic GC from rescanning them in every measured loop.
        gc.collect()
        gc.freeze()
        one = signed_versions(self.key.encode(), warm, 1, len(warm), a.estimator)[0]

        def definition_for(dep: Deployment, **kw: Any) -> dict[str, Any]:
            return pipeline_definition(dep.raw_topic, estimator=a.estimator, **kw)

        def passthrough() -> Measured:
            dep = self.deployment("passthrough")
            return measures.passthrough(dep, records, dep.settings.max_batch, dep.settings.commit_interval_s)

        def predictor() -> Measured:
            dep = self.deployment("predictor")
            return measures.predictor_service(dep, definition_for(dep), records, one, a.profile_dir)

        def features() -> Measured:
            dep = self.deployment("features")
            return measures.features_service(dep, definition_for(dep), events[:50_000])

        def e2e() -> Measured:
            dep = self.deployment("e2e")
            return measures.e2e_latency(
                dep, definition_for(dep), events, one, a.rate, a.duration, a.warmup, a.profile_dir,
                self.broker_pids,
            )  # fmt: skip

        def batched() -> Measured:
            dep = self.deployment("batched", env=BATCHED_ENV)
            return measures.e2e_latency(
                dep, definition_for(dep), events, one, a.rate, a.duration, a.warmup, None, self.broker_pids,
            )  # fmt: skip

        def swap() -> Measured:
            dep = self.deployment("swap")
            versions = signed_versions(self.key.encode(), warm, a.swaps + 1, 200, a.estimator)
            return measures.swap_latency(
                dep, definition_for(dep), records, versions, a.swap_rate, a.swap_interval
            )

        def learner() -> Measured:
            dep = self.deployment("learner")
            definition = definition_for(dep, snapshot_every_events=a.snapshot_every)
            return measures.learner_service(dep, definition, records, a.snapshot_every, a.profile_dir)

        def capacity() -> Measured:
            def run_at(rate: float) -> Measured:
                dep = self.deployment(f"capacity{rate:.0f}")
                return measures.e2e_latency(
                    dep, definition_for(dep), events, one, rate, a.capacity_duration, 5.0, None,
                    services=measures.CAPACITY_SERVICES,
                )  # fmt: skip

            return measures.capacity(run_at, [float(r) for r in a.capacity_rates.split(",")])

        self.measure("passthrough", passthrough)
        self.measure("predictor", predictor)
        self.measure("features", features)
        self.measure("e2e", e2e)
        self.measure("batched", batched)
        self.measure("swap", swap)
        self.measure("learner", learner)
        if "learner" in self.only:
            river = self.attempt("river", lambda: measures.river_inprocess(vectors, a.estimator))
            if river is not None:
                self.results["river"] = river
        self.measure("capacity", capacity)
        if "quix" in self.only:
            self.quix(events[:50_000], vectors, one)
        if "breakdown" in self.only:
            self.attempt("breakdown", lambda: self.breakdown(one))
        if "typed" in self.only:
            self.typed(vectors, one, definition_for)
        self.closed_loop()
        self.inputs = (events, records)  # for run_secure

    def typed(
        self,
        vectors: list[dict[str, Any]],
        one: dict[str, Any],
        definition_for: Callable[..., dict[str, Any]],
    ) -> None:
        """Issue 11: predictor and learner on the same vectors written typed (each pipeline's generated
        contract, Confluent-framed) with a real Schema Registry (Apicurio, started here), side by side
        with the generic encoding measured above."""
        from streamml.codec import use_registry
        from streamml.contracts import contracts_of
        from streamml.localregistry import LocalRegistry
        from streamml.registry import FramedEncoder, Registry

        a = self.args
        registry = LocalRegistry(self.workdir / "registry", die_with_parent=True)
        url = self.attempt("registry", registry.start)
        if url is None:
            return
        try:

            def deployment(name: str, **kw: Any) -> tuple[Deployment, dict[str, Any], list[Any]]:
                prefix = f"bench{self.run_id}-{name}"
                env = {"STREAMML_SCHEMA_REGISTRY_URL": url}
                dep = Deployment(self.bootstrap, prefix, self.key, self.workdir / name, settings_env=env)
                self.deployments[name] = dep
                use_registry(Registry(dep.settings))  # the services frame what they write: read it back here
                definition = definition_for(dep, **kw)
                contract = contracts_of(definition).features
                encoder = FramedEncoder(
                    contract, Registry(dep.settings).register(dep.features_topic, contract)
                )
                return dep, definition, [(fv["event_id"].encode(), encoder.encode(fv)) for fv in vectors]

            def predictor() -> Measured:
                dep, definition, records = deployment("predictor_typed")
                return measures.predictor_service(dep, definition, records, one, None)

            def learner() -> Measured:
                dep, definition, records = deployment("learner_typed", snapshot_every_events=a.snapshot_every)
                return measures.learner_service(dep, definition, records, a.snapshot_every, None)

            for name, fn in (("predictor_typed", predictor), ("learner_typed", learner)):
                got = self.attempt(name, fn)
                if got is not None:
                    self.results[name] = got
        finally:
            use_registry(None)
            registry.stop()

    def quix(self, events: list[dict[str, Any]], vectors: list[dict[str, Any]], one: dict[str, Any]) -> None:
        """Issue 11: the features and predictor stages written with Quix Streams, same events and model,
        same broker, in this run (`bench/quix_stages.py`, its own virtual environment)."""
        from streamml.artifacts import load

        a = self.args
        stamp = int(time.time() * 1000)
        raw = [(str(e["zipcode"]).encode(), json.dumps({**e, TIME_FIELD: stamp}).encode()) for e in events]
        as_json = [(fv["event_id"].encode(), json.dumps(fv).encode()) for fv in vectors]
        state = load(one, self.key.encode())
        model = state["model"] if isinstance(state, dict) else state

        ours = {fv["event_id"]: fv["features"] for fv in vectors[: len(events)]}

        def features() -> Measured:
            dep = self.deployment("quix_features")
            return measures.quix_stage(dep, "features", raw, a.quix_python, expected=ours)

        def predictor() -> Measured:
            dep = self.deployment("quix_predictor")
            return measures.quix_stage(dep, "predictor", as_json, a.quix_python, model)

        def predictor_avro() -> Measured:
            dep = self.deployment("quix_predictor_avro")
            codec = codec_for("FeatureVector")
            avro = [(fv["event_id"].encode(), codec.encode(fv)) for fv in vectors]
            schema = codec.schema.raw
            return measures.quix_stage(dep, "predictor", avro, a.quix_python, model, avro_schema=schema)

        stages = (
            ("quix_features", features),
            ("quix_predictor", predictor),
            ("quix_predictor_avro", predictor_avro),
        )
        for name, fn in stages:
            got = self.attempt(name, fn)
            if got is not None:
                self.results[name] = got

    def closed_loop(self) -> None:
        """Issue 4: the loop on the six services, false alarms on a stationary stream, monitor throughput."""
        a = self.args

        def loop() -> Measured:
            dep = self.deployment("loop", closed_loop.PIPELINE)
            return closed_loop.closed_loop(dep, closed_loop.agrawal_definition(dep.raw_topic))

        self.measure("loop", loop)
        if not self.only & {"stationary", "monitor"}:
            return
        dep = self.deployment("monitor", closed_loop.PIPELINE)
        definition = closed_loop.agrawal_definition(dep.raw_topic)
        n = a.monitor_events + MONITOR_WARMUP
        if "stationary" in self.only:
            n = max(n, a.stationary_events)
        log.info("serving %d stationary Agrawal events in-process (features, learner, predictor logic)", n)
        served = self.attempt(
            "serving", lambda: closed_loop.serve_stream(definition, closed_loop.STATIONARY_SOURCE, n, dep.key)
        )
        if served is None:
            return
        self.measure("stationary", lambda: closed_loop.stationary(served, dep.settings.max_batch))
        self.measure("monitor", lambda: closed_loop.monitor_service(
            dep, served, a.monitor_events, MONITOR_WARMUP, dep.settings.max_batch))  # fmt: skip

    def breakdown(self, version: dict[str, Any]) -> None:
        """In-process phase timings, on the topics the service measurements filled (skipped if not run)."""
        a = self.args
        dep = self.deployments.get("predictor")
        if dep is not None:
            definition = pipeline_definition(dep.raw_topic, estimator=a.estimator)
            self.breakdowns["predictor"] = profile.predictor_breakdown(
                dep, definition, version, dep.settings.max_batch
            )
        dep = self.deployments.get("learner")
        if dep is not None:
            definition = pipeline_definition(
                dep.raw_topic, estimator=a.estimator, snapshot_every_events=a.snapshot_every
            )
            self.breakdowns["learner"] = profile.learner_breakdown(dep, definition, dep.settings.max_batch)

    # -- output -----------------------------------------------------------------------------------------
    def value(self, name: str, key: str | None = None) -> float | None:
        m = self.results.get(name)
        if m is None:
            return None
        v = m.value if key is None else m.details.get(key)
        return None if v is None else float(v)

    def e2e_cpu_us(self, name: str, process: str | None = None) -> float | None:
        """CPU µs per raw event of an e2e measure while measuring: one process's, or (None) its services',
        load generator's, probe's and broker's together."""
        m = self.results.get(name)
        cores, sent = (m.details.get("cpu_cores"), m.details.get("sent")) if m else (None, None)
        if not cores or not sent:
            return None
        used = sum(cores.values()) if process is None else cores[process]
        return float(used) * self.args.duration * 1e6 / int(sent)

    def result(self) -> dict[str, float | None]:
        def r(v: float | None, digits: int) -> float | None:
            return None if v is None else round(v, digits)

        def count(v: float | None) -> int | None:
            return None if v is None else round(v)

        passthrough_eps = self.value("passthrough")
        predictor_eps = self.value("predictor")
        learner_eps = self.value("learner")
        return {
            "passthrough_eps": r(passthrough_eps, 1),
            "predictor_eps": r(predictor_eps, 1),
            "predictor_ratio": r(stats.ratio(predictor_eps, passthrough_eps), 3),
            "features_eps": r(self.value("features"), 1),
            "capacity_eps": r(self.value("capacity"), 1),
            "quix_features_eps": r(self.value("quix_features"), 1),
            "quix_predictor_eps": r(self.value("quix_predictor"), 1),
            "features_vs_quix": r(stats.ratio(self.value("features"), self.value("quix_features")), 3),
            "predictor_vs_quix": r(stats.ratio(predictor_eps, self.value("quix_predictor")), 3),
            "quix_predictor_avro_eps": r(self.value("quix_predictor_avro"), 1),
            "e2e_p50_ms": r(self.value("e2e"), 2),
            "e2e_p99_ms": r(self.value("e2e", "p99"), 2),
            "e2e_cpu_us": r(self.e2e_cpu_us("e2e"), 1),
            "batched_p50_ms": r(self.value("batched"), 2),
            "batched_p99_ms": r(self.value("batched", "p99"), 2),
            "batched_cpu_us": r(self.e2e_cpu_us("batched"), 1),
            "batched_cpu_ratio": r(stats.ratio(self.e2e_cpu_us("batched"), self.e2e_cpu_us("e2e")), 3),
            "swap_p50_ms": r(self.value("swap"), 1),
            "swap_p99_ms": r(self.value("swap", "p99"), 1),
            "learner_eps": r(learner_eps, 1),
            "learner_ratio": r(stats.ratio(learner_eps, self.value("river")), 3),
            "drift_delay_events": count(self.value("loop")),
            "false_alarms_stationary": count(self.value("stationary")),
            "recovery_gap_pts": r(self.value("loop", "gap_pts"), 2),
            "recovery_events": count(self.value("loop", "recovery_events")),
            "monitor_eps": r(self.value("monitor"), 1),
            "predictor_typed_eps": r(self.value("predictor_typed"), 1),
            "learner_typed_eps": r(self.value("learner_typed"), 1),
            "learner_typed_ratio": r(stats.ratio(self.value("learner_typed"), self.value("river")), 3),
            **(self.secure_result() if self.args.secure else {}),
        }

    def secure_result(self) -> dict[str, float | None]:
        """Secured (TLS + SCRAM + ACLs) against PLAINTEXT, measured in the same run."""
        plain_eps, secure_eps = self.value("predictor"), self.value("predictor_secure")
        plain_p50, secure_p50 = self.value("e2e"), self.value("e2e_secure")
        ratio = stats.ratio
        return {
            "predictor_eps_secure": None if secure_eps is None else round(secure_eps, 1),
            "predictor_secure_ratio": None if (x := ratio(secure_eps, plain_eps)) is None else round(x, 3),
            "e2e_p50_ms_secure": None if secure_p50 is None else round(secure_p50, 2),
            "e2e_p99_ms_secure": None if (p := self.value("e2e_secure", "p99")) is None else round(p, 2),
            "e2e_secure_ratio": None if (y := ratio(secure_p50, plain_p50)) is None else round(y, 3),
        }

    def text(self, elapsed_s: float) -> str:
        a = self.args
        n = report.num
        res = self.result()
        m = self.results
        d: Callable[[str, str], Any] = lambda name, key: m[name].details.get(key) if name in m else None  # noqa: E731

        def cpu_note(name: str) -> str:
            got = d(name, "cpu_us_per_event")
            if not got:
                return ""
            main, total = got
            return (
                f"CPU/event: main thread {main:.1f} µs (= {1e6 / main:,.0f}/s on a free core), "
                f"process {total:.1f} µs"
            )

        def cpu_ratio(base: str, service: str) -> float | None:
            """Throughput ratio service/base from CPU per event: robust to other load on the machine."""
            a_cpu, b_cpu = d(base, "cpu_us_per_event"), d(service, "cpu_us_per_event")
            return a_cpu[0] / b_cpu[0] if a_cpu and b_cpu else None

        rows = [
            ["pass-through: consume→decode→encode→produce (1 process)", n(res["passthrough_eps"]), "events/s",
             f"{n(d('passthrough', 'wall_eps'))} incl. last batch + final flush; {cpu_note('passthrough')}"],
            ["predictor service (1 worker, prediction_time stamps)", n(res["predictor_eps"]), "events/s",
             f"{n(d('predictor', 'create_time_eps'))} by output CreateTime; {cpu_note('predictor')}"],
            ["predictor / pass-through", n(res["predictor_ratio"], 2), "",
             f"by main-thread CPU per event: {n(cpu_ratio('passthrough', 'predictor'), 2)}"],
            ["e2e raw event → prediction at consumer, p50", n(res["e2e_p50_ms"], 1), "ms",
             f"p90 {n(d('e2e', 'p90'), 1)}, max {n(d('e2e', 'max'), 1)}, "
             f"{n(d('e2e', 'received'))}/{n(d('e2e', 'sent'))} received, "
             f"{n(d('e2e', 'achieved_rate'))} events/s sent"],
            ["e2e p99", n(res["e2e_p99_ms"], 1), "ms",
             f"last half: p50 {n(d('e2e', 'late_p50'), 1)}, p99 {n(d('e2e', 'late_p99'), 1)} ms; "
             f"p50 per 2 s of sending: {d('e2e', 'p50_by_2s')}"],
            ["e2e, data loops batching (linger 5 ms, fetch 64 KiB or 20 ms)", n(res["batched_p50_ms"], 1),
             "ms", f"p99 {n(res['batched_p99_ms'], 1)} ms; CPU per event (services, load, probe, broker): "
             f"{n(res['batched_cpu_us'], 1)} µs against {n(res['e2e_cpu_us'], 1)} µs with the defaults "
             f"(ratio {n(res['batched_cpu_ratio'], 2)})"],
            ["features service (1 worker, feature_time stamps)", n(self.value("features")),
             "events/s", f"raw JSON drain, context for e2e; {cpu_note('features')}"],
            ["swap: promotion produced → first prediction, p50", n(res["swap_p50_ms"], 1), "ms",
             f"{d('swap', 'swapped')}/{d('swap', 'promotions')} promotions, max {n(d('swap', 'max'), 1)} ms"],
            ["swap p99", n(res["swap_p99_ms"], 1), "ms", ""],
            ["learner service (snapshot created_at stamps)", n(res["learner_eps"]), "events/s",
             f"accuracy {n(d('learner', 'accuracy'), 3)}; {cpu_note('learner')}"],
            ["in-process River (same pipeline, no Kafka)", n(self.value("river")), "events/s",
             f"accuracy {n(d('river', 'accuracy'), 3)}; {cpu_note('river')}"],
            ["learner / in-process River", n(res["learner_ratio"], 2), "",
             f"by main-thread CPU per event: {n(cpu_ratio('river', 'learner'), 2)}"],
            ["predictor, typed vectors (registry)", n(res["predictor_typed_eps"]), "events/s",
             "the same vectors in the pipeline's generated contract, Confluent-framed"],
            ["learner, typed vectors (registry)", n(res["learner_typed_eps"]), "events/s",
             f"/ in-process River: {n(res['learner_typed_ratio'], 2)}"],
            ["Quix Streams features stage (same events, group_by + state)", n(res["quix_features_eps"]),
             "events/s", f"ours / Quix: {n(res['features_vs_quix'], 2)}, by main-thread CPU per event: "
             f"{n(cpu_ratio('quix_features', 'features'), 2)}; {cpu_note('quix_features')}; "
             f"outputs differing from ours: {n(d('quix_features', 'mismatches'))}"],
            ["Quix Streams predictor stage (same vectors as JSON, same model)", n(res["quix_predictor_eps"]),
             "events/s", f"ours / Quix: {n(res['predictor_vs_quix'], 2)}, by main-thread CPU per event: "
             f"{n(cpu_ratio('quix_predictor', 'predictor'), 2)}; {cpu_note('quix_predictor')}"],
            ["Quix Streams predictor stage reading our Avro vectors", n(self.value("quix_predictor_avro")),
             "events/s", f"the same bytes our predictor reads (fastavro in a Quix deserializer); "
             f"{cpu_note('quix_predictor_avro')}"],
            ["capacity: highest raw rate the six services keep up with", n(res["capacity_eps"]), "events/s",
             "; ".join(
                 f"{n(st['rate'])}/s: {n(st['received'])}/{n(st['sent'])} predicted, last 2 s p50 "
                 f"{n(st['last_p50_ms'])} ms (last-half p99 {n(st['late_p99_ms'])})"
                 for st in (d("capacity", "steps") or [])
             ) or "n/a"],
        ]  # fmt: skip
        if a.secure:
            rows += [
                ["predictor on the secured cluster (SASL_SSL, ACLs)", n(res["predictor_eps_secure"]),
                 "events/s", f"secured / PLAINTEXT: {n(res['predictor_secure_ratio'], 2)}; "
                 f"{cpu_note('predictor_secure')}"],
                ["e2e p50 on the secured cluster", n(res["e2e_p50_ms_secure"], 1), "ms",
                 f"secured / PLAINTEXT: {n(res['e2e_secure_ratio'], 2)}; "
                 f"p99 {n(res['e2e_p99_ms_secure'], 1)} ms, "
                 f"{n(d('e2e_secure', 'received'))}/{n(d('e2e_secure', 'sent'))} received"],
            ]  # fmt: skip
        load = os.getloadavg()
        title = (
            f"StreamML bench: N={a.events:,} records, 1 partition, model {a.estimator}, e2e at "
            f"{a.rate:,.0f}/s for {a.duration:.0f} s, {a.swaps} swaps; took {elapsed_s:.0f} s; "
            f"load average now {load[0]:.2f} on {os.cpu_count()} cores"
        )
        parts = [report.table(["measure", "value", "unit", "notes"], rows, title)]
        if self.only & {"loop", "stationary", "monitor"}:
            parts.append(self.closed_loop_text(res))
        parts.append(report.targets_table(res))
        stages = d("e2e", "stages")
        if stages:
            parts.append(report.table(
                ["stage (from the services' batch stamps)", "p50 ms", "p99 ms"],
                [[name, n(p50, 0), n(p99, 0)] for name, (p50, p99) in stages.items()],
                "e2e latency by stage",
            ))  # fmt: skip
        cpu = d("e2e", "cpu_cores")
        if cpu:
            cpu_rows = [
                [name, n(100 * cores, 0), n(self.e2e_cpu_us("e2e", name), 1)] for name, cores in cpu.items()
            ]
            cpu_rows.append(["all of the above", n(100 * sum(cpu.values()), 0), n(res["e2e_cpu_us"], 1)])
            cpu_rows.append(["whole machine (other work included), % of all cores",
                             n(100 * d("e2e", "machine_busy"), 0), ""])  # fmt: skip
            parts.append(report.table(
                ["process", "CPU % of one core", "CPU µs per event"], cpu_rows,
                f"e2e at {a.rate:,.0f} events/s: CPU used while measuring ({os.cpu_count()} cores)",
            ))  # fmt: skip
        swaps = d("swap", "latencies_ms")
        if swaps:
            parts.append("swap latencies (ms) by version: " + ", ".join(
                f"v{v}={'never' if ms is None else f'{ms:.0f}'}" for v, ms in swaps.items()))  # fmt: skip
        for name in ("predictor", "learner"):
            parts += self.breakdown_text(name)
        parts += self.e2e_profile_text()
        if self.failures:
            parts.append("FAILED:\n" + "\n".join(f"  {k}: {v}" for k, v in self.failures.items()))
        return "\n\n".join(parts)

    def closed_loop_text(self, res: dict[str, float | None]) -> str:
        n = report.num
        m = self.results
        d: Callable[[str, str], Any] = lambda name, key: m[name].details.get(key) if name in m else None  # noqa: E731

        def pct(v: float | None) -> str:
            return "n/a" if v is None else f"{100 * v:.2f} %"

        def kinds(counts: dict[str, int] | None) -> str:
            return ", ".join(f"{k} {v}" for k, v in counts.items()) if counts else "none"

        promoted = d("loop", "promoted")
        after = d("loop", "promotion_s_after_drift")
        cpu = d("monitor", "cpu_us_per_event")
        rows = [
            ["drift → first concept-drift alert", n(res["drift_delay_events"]), "events",
             f"{d('loop', 'concept_detector')} on the error stream; alerts in the run: "
             f"{kinds(d('loop', 'alerts'))}"],
            ["drift → first event served by the promoted challenger", n(res["recovery_events"]), "events",
             ("no challenger promoted" if promoted is None else f"{promoted[0]} v{promoted[1]} promoted "
              f"{n(after, 1)} s after the drift event was produced")
             + f"; decisions: {kinds(d('loop', 'decisions'))}"],
            ["recovery gap: pre-drift minus challenger accuracy", n(res["recovery_gap_pts"], 2), "pts",
             f"served accuracy {pct(d('loop', 'accuracy_before'))} over events "
             f"{closed_loop.DRIFT_AT - closed_loop.WINDOW}-{closed_loop.DRIFT_AT - 1}, "
             f"{pct(d('loop', 'accuracy_after'))} over the challenger's first "
             f"{n(d('loop', 'after_events'))} served events"],
            ["false alarms: drift alerts on a stationary stream", n(res["false_alarms_stationary"]), "alerts",
             f"{n(d('stationary', 'events'))} events; by kind: {kinds(d('stationary', 'by_kind'))}; "
             f"silenced by cool-down: {kinds(d('stationary', 'silenced'))}; "
             f"served accuracy {pct(d('stationary', 'served_accuracy'))}"],
            ["monitor service handler (in-process, pre-built records)", n(res["monitor_eps"]), "events/s",
             f"MonitorService.handle, {n(d('monitor', 'events'))} events = {n(d('monitor', 'messages'))} "
             f"pre-built Avro msgs (FeatureVector + Prediction), batches of {n(d('monitor', 'batch'))}, "
             "no broker I/O" + (f"; CPU {cpu[0]:.1f} µs/event" if cpu else "")],
        ]  # fmt: skip
        first = d("stationary", "first")
        title = (
            f"Closed loop (issue 4). Loop: the six services on {closed_loop.DRIFT_SOURCE}, "
            f"{closed_loop.LOOP_EVENTS:,} raw JSON events at {closed_loop.LOOP_RATE:,.0f}/s "
            f"(achieved {n(d('loop', 'achieved_rate'))}/s), 1 partition.\nStationary: "
            f"{closed_loop.STATIONARY_SOURCE} served in-process by the learner's snapshots (every "
            f"{closed_loop.OVERRIDES['snapshot_every_events']:,} events, AUTO-promoted), watched by "
            "streams.monitor"
        )
        lines = [report.table(["closed loop", "value", "unit", "notes"], rows, title)]
        if "loop" in m:
            lines.append(
                f"loop: services ready in {n(d('loop', 'services_ready_s'), 1)} s; "
                f"{n(d('loop', 'predictions'))} served predictions, the last "
                f"{n(d('loop', 'caught_up_s'), 1)} s after the last event was due"
            )
        if first:
            lines.append(f"first stationary alerts: {'; '.join(first)}")
        return "\n".join(lines)

    def breakdown_text(self, name: str) -> list[str]:
        """In-process phases and the py-spy profile of the service, in main-thread CPU µs per event."""
        parts = []
        columns: dict[str, dict[str, float]] = {}
        measured = self.results.get(name)
        cpu = measured.details.get("cpu_us_per_event") if measured else None
        total = cpu[0] if cpu else None
        if name in self.breakdowns:
            bd = dict(self.breakdowns[name])
            rest = profile.loop_rest(bd, total)
            if rest is not None:
                bd["rest: event loop, commit, Faust (derived)"] = rest
            columns["in-process"] = bd
        for path in measured.profiles if measured else []:
            sampled = profile.read_speedscope(path)
            if total is not None:
                columns[f"py-spy ({sampled.busy_samples} busy samples)"] = profile.per_event_from_profile(
                    sampled, total
                )
            parts.append(hottest(name, path, sampled))
        if columns:
            title = f"{name}: where the time goes (main-thread CPU µs per event)"
            parts.insert(0, report.breakdown_table(title, columns, total))
        return parts

    def e2e_profile_text(self) -> list[str]:
        measured = self.results.get("e2e")
        if measured is None or not measured.profiles:
            return []
        events = int(measured.details.get("sent") or 0)
        columns: dict[str, dict[str, float]] = {}
        parts = []
        for path in measured.profiles:
            sampled = profile.read_speedscope(path)
            service = path.name.split(".")[0].removeprefix("e2e-")
            col = profile.per_event_absolute(sampled, events)
            busy = sum(col.values()) * events / 1e6
            col["main thread busy, % of one core"] = 100 * busy / max(sampled.seconds, 1e-9)
            columns[service] = col
            parts.append(hottest(f"e2e {service}", path, sampled))
        title = (
            f"e2e at {self.args.rate:,.0f} events/s: main-thread wall µs per event by phase "
            "(py-spy; includes waiting for a CPU)"
        )
        return [report.breakdown_table(title, columns, None), *parts]


def hottest(name: str, path: Path, sampled: profile.Profile, top: int = 12) -> str:
    busy = max(sampled.busy_samples, 1)
    lines = sorted(sampled.by_leaf.items(), key=lambda kv: -kv[1])[:top]
    head = f"{name}: hottest lines in py-spy profile {path} (share of busy samples)"
    return "\n".join([head, *(f"  {100 * c / busy:5.1f}%  {leaf}" for leaf, c in lines)])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("streamml.kafka.librdkafka").setLevel(logging.ERROR)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="streamml-bench-") as tmp:
        workdir = args.keep.resolve() if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        kafka = LocalKafka(workdir / "kafka", brokers=1, base_port=free_port_block(2), die_with_parent=True)
        bench: Bench | None = None
        try:
            bootstrap = kafka.start(timeout_s=120)
            log.info("Kafka at %s (work folder %s)", bootstrap, workdir)
            bench = Bench(bootstrap, workdir, args, list(kafka.node_pids().values()))
            bench.run()
            if args.secure:
                kafka.stop()  # one cluster at a time on a small machine
                kafka = LocalKafka(
                    workdir / "kafka-secure", brokers=1, base_port=free_port_block(ports_per_node(True)),
                    die_with_parent=True, secure=True,
                )  # fmt: skip
                kafka.start(timeout_s=120)
                log.info("secured Kafka at %s", kafka.bootstrap)
                bench.run_secure(kafka, *bench.inputs)
        finally:
            if bench is not None:
                for dep in bench.deployments.values():
                    dep.close()
            kafka.stop()
    print(bench.text(time.monotonic() - started))
    print(json.dumps(bench.result()))
    return 1 if bench.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
