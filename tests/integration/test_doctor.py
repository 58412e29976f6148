"""`streamml doctor` against a real broker: what it finds wrong, and the fix it names."""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path

from confluent_kafka.admin import AdminClient, NewTopic

from streamml import doctor
from streamml.kafka import ensure_topics
from streamml.settings import Settings
from streamml.signing import generate, public_line, write_key_pair
from streamml.topics import Catalogue


def _run(settings: Settings, state: Path) -> tuple[bool, list[doctor.Check]]:
    found: list[doctor.Check] = []
    ok = doctor.run(settings, state, found.append)
    return ok, found


def test_missing_and_mismatching_topics_are_named_with_their_fix(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    prefix = f"d{uuid.uuid4().hex[:8]}"
    _, public = write_key_pair(tmp_path)
    settings = Settings(
        bootstrap_servers=kafka_bootstrap, topic_prefix=prefix, model_verify_keys=public, _env_file=None
    )
    ok, found = _run(settings, tmp_path / "no-stack.json")
    assert not ok
    broker = [c for c in found if c.area == "broker"]
    assert broker[0].status == "ok" and "1 broker(s)" in broker[0].detail
    assert broker[1].status == "warn" and "SECURE=1" in broker[1].fix  # PLAINTEXT is said to be unsafe
    by_area = {c.area: c for c in found}
    assert by_area["topics"].status == "fail" and "streamml topics create" in by_area["topics"].fix
    assert by_area["signing keys"].status == "ok"
    assert by_area["services"].status == "skip"

    catalogue = Catalogue(settings)
    wrong = catalogue.promotions()  # declared compacted, created here with 3 partitions and delete
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(wrong.name, 3, 1)])[wrong.name].result()
    ensure_topics(settings, [s for s in catalogue.global_topics() if s.name != wrong.name])
    ok, found = _run(settings, tmp_path / "no-stack.json")
    problems = [c for c in found if c.area == "topics"]
    assert not ok and len(problems) == 1
    assert "3 partitions, declared 1" in problems[0].detail and "cleanup.policy=delete" in problems[0].detail


def test_keys_that_cannot_work_together_and_dead_services_fail(kafka_bootstrap: str, tmp_path: Path) -> None:
    private, _ = write_key_pair(tmp_path)
    other = public_line(generate().public_key())
    settings = Settings(
        bootstrap_servers=kafka_bootstrap, model_signing_key_file=str(private), model_verify_keys=other,
        _env_file=None,
    )  # fmt: skip
    checks = doctor.signing(settings)
    assert [c.status for c in checks] == ["fail"] and "keys show" in checks[0].fix
    none = doctor.signing(Settings(bootstrap_servers=kafka_bootstrap, _env_file=None))
    assert none[0].status == "fail" and "every version would be rejected" in none[0].detail

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    state = tmp_path / "stack.json"
    state.write_text(json.dumps({"services": {"learner": {
        "service": "learner", "pid": 1, "metrics_port": dead_port, "http_port": 0, "log": "learner.log",
    }}}))  # fmt: skip
    (check,) = doctor.services(state)
    assert check.status == "fail" and "learner.log" in check.fix
