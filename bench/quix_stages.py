"""The features and predictor stages written with Quix Streams, for `make bench` to compare ours with.

Runs in its own virtual environment (`make quix-venv`: Quix Streams 3.28.1 pins confluent-kafka < 2.13, older
than ours), so it imports nothing from StreamML: it is what a Python team would write with Quix, given the
same events and the same model.

- features: raw JSON events → `group_by` the key field (Quix's repartition topic, as our hop) → a stateful
  `apply` keeping the last 100 salaries per zipcode in Quix state (RocksDB, with its changelog topic, as our
  windows have theirs) → the benchmark's five feature steps → a JSON feature record.
- predictor: JSON feature records → the same pickled River model → a JSON prediction record. With
  `--avro-schema FILE` it reads our own feature vectors instead (Avro single-object encoding, decoded by
  fastavro in a Quix deserializer, as a team reading our topics would): the same bytes our predictor reads.

Both stamp each output with the wall-clock milliseconds of processing (`feature_time`, `prediction_time`), as
our services do, so the rates are computed the same way. Producer settings, fetch batching and the commit
interval are ours (idempotent, acks=all, lz4, the linger and fetch options the benchmark passes, commits
every 0.2 s); the rest are Quix defaults (JSON via orjson, at-least-once). The process runs until SIGTERM.

    python bench/quix_stages.py features|predictor --bootstrap HOST:PORT --input T --output T --group G
        --linger-ms MS --fetch-min-bytes N --fetch-max-wait-ms MS [--model FILE] [--avro-schema FILE]
        [--state-dir DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import pickle
import time
from pathlib import Path
from typing import Any

import fastavro
from quixstreams import Application, State
from quixstreams.models.serializers import Deserializer

WINDOW = 100
PRODUCER = {"enable.idempotence": True, "acks": "all", "compression.type": "lz4"}  # ours, with --linger-ms
FIELDS = ("salary", "commission", "age", "elevel", "car", "zipcode", "hvalue", "hyears", "loan")


def _ms() -> int:
    return time.time_ns() // 1_000_000


def featurize(event: dict[str, Any], state: State) -> dict[str, Any]:
    """The benchmark pipeline's feature steps for one event (state: this zipcode's last salaries)."""
    features = {name: float(event[name]) for name in FIELDS}
    salary = features["salary"]
    window: list[float] = state.get("salaries", [])
    window.append(salary)
    if len(window) > WINDOW:
        del window[0]
    state.set("salaries", window)
    features["loan_per_salary"] = features["loan"] / salary if salary else 0.0
    features["income"] = salary + features["commission"]
    features["log_hvalue"] = math.log1p(features["hvalue"])
    features["zipcode_mean_salary_100"] = sum(window) / len(window)
    features["zipcode_count_100"] = float(len(window))
    return {
        "event_id": str(event["event_id"]),
        "key": str(event["zipcode"]),
        "features": features,
        "label": event.get("label"),
        "event_time": event.get("ts"),
        "feature_time": _ms(),
    }


class SingleObjectAvro(Deserializer):
    """Avro single-object encoding (2 marker bytes, an 8-byte schema fingerprint, the body): the body read
    with the writer's schema, given as a file."""

    def __init__(self, schema_file: Path) -> None:
        super().__init__()
        self.schema = fastavro.parse_schema(json.loads(schema_file.read_text()))

    def __call__(self, value: bytes, ctx: Any) -> Any:
        return fastavro.schemaless_reader(io.BytesIO(value[10:]), self.schema, None)


def predictor(model: Any, version: int) -> Any:
    def predict(fv: dict[str, Any]) -> dict[str, Any]:
        proba = model.predict_proba_one(fv["features"])
        label = max(proba, key=proba.get) if proba else None
        return {
            "event_id": fv["event_id"],
            "model_version": version,
            "prediction": label,
            "probabilities": {str(k): float(v) for k, v in proba.items()},
            "prediction_time": _ms(),
        }

    return predict


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["features", "predictor"])
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--model", type=Path, help="predictor: a pickled River model (written by the benchmark)")
    p.add_argument("--version", type=int, default=1)
    p.add_argument(
        "--avro-schema", type=Path, help="predictor: read Avro single-object records of this schema"
    )
    p.add_argument("--state-dir", type=Path, default=Path("quix-state"))
    p.add_argument("--linger-ms", type=float, required=True, help="the producer's linger.ms (ours)")
    p.add_argument("--fetch-min-bytes", type=int, required=True, help="the consumer's fetch.min.bytes (ours)")
    p.add_argument("--fetch-max-wait-ms", type=int, required=True, help="its fetch.wait.max.ms (ours)")
    a = p.parse_args()
    app = Application(
        broker_address=a.bootstrap,
        consumer_group=a.group,
        auto_offset_reset="earliest",
        commit_interval=0.2,
        producer_extra_config={**PRODUCER, "linger.ms": a.linger_ms},
        consumer_extra_config={
            "fetch.min.bytes": a.fetch_min_bytes,
            "fetch.wait.max.ms": a.fetch_max_wait_ms,
        },
        state_dir=a.state_dir,
        loglevel="WARNING",
    )
    reader: Any = SingleObjectAvro(a.avro_schema) if a.avro_schema else "json"
    source = app.topic(a.input, value_deserializer=reader, key_deserializer="string")
    sink = app.topic(a.output, value_serializer="json", key_serializer="string")
    sdf = app.dataframe(source)
    if a.stage == "features":
        sdf = sdf.group_by("zipcode")
        sdf = sdf.apply(featurize, stateful=True)
    else:
        with a.model.open("rb") as f:  # written by the benchmark itself a moment ago
            model = pickle.load(f)
        sdf = sdf.apply(predictor(model, a.version))
    sdf.to_topic(sink, key=lambda out: out["event_id"])
    app.run()


if __name__ == "__main__":
    main()
