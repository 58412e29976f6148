"""The local Kafka runner's generated configs, layout checks and helpers, without starting Java."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from streamml import localkafka
from streamml.errors import StreamMLError
from streamml.localkafka import LocalKafka, LocalKafkaError, free_port_block, new_cluster_id, port_is_free


def read_properties(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key] = value
    return pairs


def test_single_node_config_is_a_combined_node_on_loopback(tmp_path: Path) -> None:
    kafka = LocalKafka(tmp_path, brokers=1, base_port=19500)
    kafka.write_configs()

    props = read_properties(tmp_path / "node-1" / "server.properties")

    assert props["process.roles"] == "broker,controller"
    assert props["node.id"] == "1"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19501"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19500,CONTROLLER://127.0.0.1:19501"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19500"
    assert props["controller.listener.names"] == "CONTROLLER"
    assert props["inter.broker.listener.name"] == "PLAINTEXT"
    assert props["log.dirs"] == str(tmp_path.resolve() / "node-1" / "data")
    for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor"):
        assert props[key] == "1"
    assert props["min.insync.replicas"] == "1"
    assert props["transaction.state.log.min.isr"] == "1"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert kafka.bootstrap == "127.0.0.1:19500"


def test_three_node_config_replicates_three_ways_with_min_isr_two(tmp_path: Path) -> None:
    kafka = LocalKafka(tmp_path, brokers=3, base_port=19600)
    kafka.write_configs()

    nodes = [read_properties(tmp_path / f"node-{i}" / "server.properties") for i in (1, 2, 3)]

    voters = "1@127.0.0.1:19603,2@127.0.0.1:19604,3@127.0.0.1:19605"
    for node_id, props in enumerate(nodes, start=1):
        assert props["node.id"] == str(node_id)
        assert props["process.roles"] == "broker,controller"
        assert props["controller.quorum.voters"] == voters
        broker_port, controller_port = 19600 + node_id - 1, 19603 + node_id - 1
        assert props["listeners"] == (
            f"PLAINTEXT://127.0.0.1:{broker_port},CONTROLLER://127.0.0.1:{controller_port}"
        )
        assert props["advertised.listeners"] == f"PLAINTEXT://127.0.0.1:{broker_port}"
        assert props["default.replication.factor"] == "3"
        assert props["offsets.topic.replication.factor"] == "3"
        assert props["transaction.state.log.replication.factor"] == "3"
        assert props["min.insync.replicas"] == "2"
        assert props["transaction.state.log.min.isr"] == "2"
    # Each node keeps its own data.
    assert len({props["log.dirs"] for props in nodes}) == 3
    assert kafka.bootstrap == "127.0.0.1:19600,127.0.0.1:19601,127.0.0.1:19602"


def test_every_listener_binds_loopback_only(tmp_path: Path) -> None:
    kafka = LocalKafka(tmp_path, brokers=3, base_port=19700)
    kafka.write_configs()
    for node in kafka.nodes:
        props = read_properties(node.properties)
        for listener in props["listeners"].split(","):
            assert listener.split("://")[1].rsplit(":", 1)[0] == "127.0.0.1"


@pytest.mark.parametrize("brokers", [1, 3])
def test_brokers_never_create_topics_on_their_own(tmp_path: Path, brokers: int) -> None:
    """Topics come from the catalogue: a producer or consumer naming an unknown topic must not create it."""
    kafka = LocalKafka(tmp_path, brokers=brokers, base_port=19800)
    kafka.write_configs()
    for node in kafka.nodes:
        assert read_properties(node.properties)["auto.create.topics.enable"] == "false"


def test_cluster_id_is_22_chars_of_base64url_for_16_bytes() -> None:
    first, second = new_cluster_id(), new_cluster_id()
    assert len(first) == 22
    assert len(base64.urlsafe_b64decode(first + "==")) == 16
    assert first != second


def test_cluster_id_never_starts_with_a_dash() -> None:
    # One id in 64 would, and kafka-storage would then read it as an option.
    assert not any(new_cluster_id().startswith("-") for _ in range(3000))


def write_layout(home: Path, brokers: int, base_port: int, formatted: bool) -> None:
    layout = {"brokers": brokers, "base_port": base_port, "cluster_id": new_cluster_id()}
    (home / "cluster.json").write_text(json.dumps(layout))
    if formatted:
        (home / "node-1" / "data").mkdir(parents=True)
        (home / "node-1" / "data" / "meta.properties").write_text("node.id=1\n")


def test_start_refuses_a_home_formatted_for_another_cluster_size(tmp_path: Path) -> None:
    write_layout(tmp_path, brokers=1, base_port=19800, formatted=True)

    with pytest.raises(LocalKafkaError, match="1-broker cluster"):
        LocalKafka(tmp_path, brokers=3, base_port=19800).start()

    reopened = LocalKafka.from_home(tmp_path)
    assert (reopened.brokers, reopened.base_port) == (1, 19800)


def test_a_home_never_formatted_may_change_its_layout(tmp_path: Path) -> None:
    # e.g. a first `up` that failed because its port was busy, retried with --port.
    write_layout(tmp_path, brokers=1, base_port=19800, formatted=False)

    LocalKafka(tmp_path, brokers=1, base_port=19850).check_layout()


def test_from_home_without_a_cluster_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(StreamMLError, match="kafka-up"):
        LocalKafka.from_home(tmp_path)


@pytest.mark.parametrize(("brokers", "base_port"), [(0, 9092), (10, 9092), (1, 80), (3, 65533)])
def test_rejects_impossible_cluster_shapes(tmp_path: Path, brokers: int, base_port: int) -> None:
    with pytest.raises(LocalKafkaError):
        LocalKafka(tmp_path, brokers=brokers, base_port=base_port)


def test_fetch_jars_without_maven_says_the_jars_could_not_be_fetched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "mvn" else f"/usr/bin/{name}")

    with pytest.raises(StreamMLError, match=r"could not fetch the Kafka .* jars: Maven"):
        localkafka.fetch_jars(tmp_path / "libs")


def test_fetch_jars_does_not_run_maven_when_the_pinned_jar_is_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = localkafka.pinned_kafka_version()
    (tmp_path / f"kafka_2.13-{version}.jar").write_bytes(b"")

    def no_maven(*args: object, **kwargs: object) -> None:
        raise AssertionError("maven must not run")

    monkeypatch.setattr(subprocess, "run", no_maven)
    assert localkafka.fetch_jars(tmp_path) == tmp_path.resolve()


def test_pinned_version_comes_from_the_pom() -> None:
    pom = (localkafka.POM_FILE).read_text()
    assert f"<kafka.version>{localkafka.pinned_kafka_version()}</kafka.version>" in pom


def test_free_port_block_is_bindable_and_port_is_free_sees_listeners() -> None:
    base = free_port_block(4)
    assert all(port_is_free(base + i) for i in range(4))

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", base))
        listener.listen()
        assert not port_is_free(base)


def test_logs_show_the_last_lines_of_each_node(tmp_path: Path) -> None:
    kafka = LocalKafka(tmp_path, brokers=3, base_port=19900)
    kafka.nodes[0].log_dir.mkdir(parents=True)
    kafka.nodes[0].server_log.write_text("".join(f"line {i}\n" for i in range(1, 20001)))

    text = kafka.logs(lines=3)

    assert "line 19998\nline 19999\nline 20000" in text
    assert "line 19997" not in text
    assert text.count("(no log yet)") == 2  # nodes 2 and 3 never ran


def test_nothing_runs_in_a_fresh_home(tmp_path: Path) -> None:
    kafka = LocalKafka(tmp_path, brokers=1, base_port=free_port_block(2))
    assert kafka.node_pids() == {}
    assert not kafka.is_running()
    kafka.stop()  # stopping a cluster that never ran is fine
