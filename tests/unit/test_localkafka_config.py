"""The local Kafka runner's generated configs, layout checks and helpers, without starting Java."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import threading
import time
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


@pytest.mark.parametrize("secure", [False, True])
def test_every_listener_binds_loopback_only(tmp_path: Path, secure: bool) -> None:
    kafka = LocalKafka(tmp_path, brokers=3, base_port=19700, secure=secure)
    kafka.write_configs()
    for node in kafka.nodes:
        props = read_properties(node.properties)
        listeners = props["listeners"].split(",")
        assert len(listeners) == (3 if secure else 2)
        for listener in listeners:
            assert listener.split("://")[1].rsplit(":", 1)[0] == "127.0.0.1"


@pytest.mark.parametrize("secure", [False, True])
@pytest.mark.parametrize("brokers", [1, 3])
def test_brokers_never_create_topics_on_their_own(tmp_path: Path, brokers: int, secure: bool) -> None:
    """Topics come from the catalogue: a producer or consumer naming an unknown topic must not create it."""
    kafka = LocalKafka(tmp_path, brokers=brokers, base_port=19800, secure=secure)
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


def test_free_ports_are_never_handed_out_twice_before_their_servers_bind_them() -> None:
    """A stack picks every service's ports before starting any: a port picked twice lets one service
    start and the other exit with "Address already in use" (seen once in `make chaos`)."""
    picked = [free_port_block(1) for _ in range(300)] + [free_port_block(3) + i for i in range(3)]
    assert len(set(picked)) == len(picked)


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


# -- secure mode (`make kafka-up SECURE=1`) ------------------------------------------------------------


def java_unescape(value: str) -> str:
    """The \\n escapes of a .properties value as Java's Properties.load reads them."""
    return value.replace("\\n", "\n")


def test_secure_node_has_sasl_ssl_clients_and_mutual_tls_internal_and_controller_listeners(
    tmp_path: Path,
) -> None:
    kafka = LocalKafka(tmp_path, brokers=1, base_port=19500, secure=True)
    kafka.write_configs()

    props = read_properties(tmp_path / "node-1" / "server.properties")

    assert props["listeners"] == (
        "CLIENT://127.0.0.1:19500,INTERNAL://127.0.0.1:19502,CONTROLLER://127.0.0.1:19501"
    )
    assert props["advertised.listeners"] == "CLIENT://127.0.0.1:19500,INTERNAL://127.0.0.1:19502"
    assert props["listener.security.protocol.map"] == "CLIENT:SASL_SSL,INTERNAL:SSL,CONTROLLER:SSL"
    assert props["inter.broker.listener.name"] == "INTERNAL"
    assert props["controller.listener.names"] == "CONTROLLER"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19501"
    assert props["ssl.client.auth"] == "required"
    assert props["listener.name.client.ssl.client.auth"] == "none"
    assert props["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert props["listener.name.client.sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert props["listener.name.client.scram-sha-512.sasl.jaas.config"] == (
        "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    )
    assert props["authorizer.class.name"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["super.users"] == "User:CN=streamml-broker;User:CN=streamml-admin"
    assert props["ssl.truststore.type"] == "PEM"
    assert props["ssl.truststore.location"] == str(kafka.ca_file)
    assert "PLAINTEXT" not in props["listener.security.protocol.map"]
    assert (kafka.bootstrap, kafka.admin_bootstrap) == ("127.0.0.1:19500", "127.0.0.1:19502")


def test_secure_node_gets_the_broker_key_and_chain_inline_in_an_owner_only_config(tmp_path: Path) -> None:
    """A PEM keystore file would need ssl.key.password and an encrypted key Java 17 cannot decrypt (PBES2)."""
    kafka = LocalKafka(tmp_path, brokers=1, base_port=19500, secure=True)
    kafka.write_configs()

    props = read_properties(kafka.nodes[0].properties)

    assert props["ssl.keystore.type"] == "PEM"
    assert java_unescape(props["ssl.keystore.key"]) == (kafka.tls_dir / "broker.key").read_text().strip()
    chain = java_unescape(props["ssl.keystore.certificate.chain"])
    assert chain == (kafka.tls_dir / "broker.pem").read_text().strip()
    assert chain.count("BEGIN CERTIFICATE") == 2
    for absent in ("ssl.keystore.location", "ssl.keystore.password", "ssl.key.password"):
        assert absent not in props
    assert oct(kafka.nodes[0].properties.stat().st_mode & 0o777) == oct(0o600)


def test_secure_config_over_an_old_readable_one_becomes_owner_only(tmp_path: Path) -> None:
    # e.g. a PLAINTEXT home that never formatted its storage, started again with SECURE=1
    LocalKafka(tmp_path, brokers=1, base_port=19500).write_configs()
    properties = tmp_path / "node-1" / "server.properties"
    properties.chmod(0o644)

    LocalKafka(tmp_path, brokers=1, base_port=19500, secure=True).write_configs()

    assert properties.stat().st_mode & 0o777 == 0o600
    assert read_properties(properties)["inter.broker.listener.name"] == "INTERNAL"


def test_secure_three_nodes_use_three_ports_each(tmp_path: Path) -> None:
    kafka = LocalKafka(tmp_path, brokers=3, base_port=19600, secure=True)
    kafka.write_configs()

    nodes = [read_properties(node.properties) for node in kafka.nodes]

    voters = "1@127.0.0.1:19603,2@127.0.0.1:19604,3@127.0.0.1:19605"
    for node_id, props in enumerate(nodes, start=1):
        client, controller, internal = 19599 + node_id, 19602 + node_id, 19605 + node_id
        assert props["controller.quorum.voters"] == voters
        assert props["listeners"] == (
            f"CLIENT://127.0.0.1:{client},INTERNAL://127.0.0.1:{internal},CONTROLLER://127.0.0.1:{controller}"
        )
        assert props["min.insync.replicas"] == "2"
    assert kafka.bootstrap == "127.0.0.1:19600,127.0.0.1:19601,127.0.0.1:19602"
    assert kafka.admin_bootstrap == "127.0.0.1:19606,127.0.0.1:19607,127.0.0.1:19608"
    # One CA and one broker certificate for the whole cluster.
    assert len({read_properties(n.properties)["ssl.keystore.certificate.chain"] for n in kafka.nodes}) == 1


def test_plaintext_cluster_makes_no_tls_material(tmp_path: Path) -> None:
    kafka = LocalKafka(tmp_path, brokers=1, base_port=19500)
    kafka.write_configs()
    assert not kafka.tls_dir.exists()
    assert "ssl.keystore.key" not in read_properties(kafka.nodes[0].properties)


def test_secure_cluster_needs_room_for_three_ports_per_node(tmp_path: Path) -> None:
    LocalKafka(tmp_path, brokers=3, base_port=65528)  # 6 ports fit
    with pytest.raises(LocalKafkaError, match="9 ports"):
        LocalKafka(tmp_path, brokers=3, base_port=65528, secure=True)


def test_secure_mode_is_recorded_and_restored(tmp_path: Path) -> None:
    kafka = LocalKafka(tmp_path, brokers=1, base_port=19500, secure=True)
    kafka._ensure_layout_file()

    assert json.loads((tmp_path / "cluster.json").read_text())["secure"] is True
    reopened = LocalKafka.from_home(tmp_path)
    assert reopened.secure
    assert reopened.admin_bootstrap == "127.0.0.1:19502"


def test_a_home_from_before_secure_mode_is_plaintext(tmp_path: Path) -> None:
    write_layout(tmp_path, brokers=1, base_port=19800, formatted=False)
    assert not LocalKafka.from_home(tmp_path).secure


@pytest.mark.parametrize(("held", "wanted"), [(False, True), (True, False)])
def test_start_refuses_a_home_formatted_in_the_other_mode(tmp_path: Path, held: bool, wanted: bool) -> None:
    LocalKafka(tmp_path, brokers=1, base_port=19800, secure=held)._ensure_layout_file()
    (tmp_path / "node-1" / "data").mkdir(parents=True)
    (tmp_path / "node-1" / "data" / "meta.properties").write_text("node.id=1\n")

    with pytest.raises(LocalKafkaError) as caught:
        LocalKafka(tmp_path, brokers=1, base_port=19800, secure=wanted).start()

    message = str(caught.value)
    assert ("holds a secure cluster" if held else "holds a PLAINTEXT cluster") in message
    assert "make kafka-down" in message and "--wipe" in message and "STREAMML_KAFKA_HOME" in message


def test_a_never_formatted_home_may_become_secure(tmp_path: Path) -> None:
    write_layout(tmp_path, brokers=1, base_port=19800, formatted=False)

    LocalKafka(tmp_path, brokers=1, base_port=19800, secure=True).check_layout()


def test_admin_env_is_mutual_tls_on_the_internal_listeners(tmp_path: Path) -> None:
    kafka = LocalKafka(tmp_path, brokers=3, base_port=19600, secure=True)
    tls = tmp_path.resolve() / "tls"

    assert kafka.tls_dir == tls
    assert kafka.ca_file == tls / "ca.pem"
    assert kafka.admin_env() == {
        "STREAMML_BOOTSTRAP_SERVERS": "127.0.0.1:19606,127.0.0.1:19607,127.0.0.1:19608",
        "STREAMML_SECURITY_PROTOCOL": "SSL",
        "STREAMML_SSL_CA_LOCATION": str(tls / "ca.pem"),
        "STREAMML_SSL_CERTIFICATE_LOCATION": str(tls / "admin.pem"),
        "STREAMML_SSL_KEY_LOCATION": str(tls / "admin.key"),
    }


def test_client_env_is_scram_over_tls_with_the_password_in_a_file(tmp_path: Path) -> None:
    kafka = LocalKafka(tmp_path, brokers=1, base_port=19500, secure=True)
    password_file = tmp_path / "learner.password"

    assert kafka.client_env("learner", password_file) == {
        "STREAMML_BOOTSTRAP_SERVERS": "127.0.0.1:19500",
        "STREAMML_SECURITY_PROTOCOL": "SASL_SSL",
        "STREAMML_SASL_MECHANISM": "SCRAM-SHA-512",
        "STREAMML_SASL_USERNAME": "learner",
        "STREAMML_SASL_PASSWORD_FILE": str(password_file.resolve()),
        "STREAMML_SSL_CA_LOCATION": str(tmp_path.resolve() / "tls" / "ca.pem"),
    }


def test_plaintext_envs_are_the_bootstrap_alone(tmp_path: Path) -> None:
    kafka = LocalKafka(tmp_path, brokers=1, base_port=19500)
    assert kafka.admin_bootstrap == kafka.bootstrap == "127.0.0.1:19500"
    assert kafka.admin_env() == {"STREAMML_BOOTSTRAP_SERVERS": "127.0.0.1:19500"}
    assert kafka.client_env("learner", tmp_path / "pw") == {"STREAMML_BOOTSTRAP_SERVERS": "127.0.0.1:19500"}


def test_admin_env_file_is_owner_only_and_names_paths_not_keys(tmp_path: Path) -> None:
    kafka = LocalKafka(tmp_path, brokers=1, base_port=19500, secure=True)
    kafka.write_configs()

    path = kafka.write_admin_env()

    assert path == tmp_path.resolve() / "admin.env"
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert "-----BEGIN" not in text
    assert dict(line.split("=", 1) for line in text.splitlines()) == kafka.admin_env()


def test_cli_up_takes_secure_from_the_home_unless_told(tmp_path: Path) -> None:
    parser = localkafka._parser()
    assert parser.parse_args(["up"]).secure is None
    assert parser.parse_args(["up", "--secure"]).secure is True
    assert parser.parse_args(["up", "--no-secure"]).secure is False


def test_cli_status_says_whether_the_cluster_is_secure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    LocalKafka(tmp_path / "s", brokers=1, base_port=19500, secure=True)._ensure_layout_file()
    LocalKafka(tmp_path / "p", brokers=1, base_port=19500)._ensure_layout_file()

    assert localkafka.main(["status", "--home", str(tmp_path / "s")]) == 1  # not running
    secure_out = capsys.readouterr().out
    localkafka.main(["status", "--home", str(tmp_path / "p")])
    plain_out = capsys.readouterr().out

    assert "security: secure" in secure_out and "admin bootstrap: 127.0.0.1:19502" in secure_out
    assert "security: PLAINTEXT" in plain_out
    assert plain_out.splitlines()[0] == "node 1  127.0.0.1:19500  stopped"


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) not installed")
def test_a_child_started_on_a_worker_thread_outlives_that_thread() -> None:
    """Linux signals a parent-death child when the thread that started it ends: make chaos restarted its
    broker on a thread of its own, and the broker got SIGTERM 25 ms after that thread finished."""
    assert localkafka.die_with_parent_prefix()[:2] == [shutil.which("setpriv"), "--pdeathsig"]  # main thread
    started: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        started.append(subprocess.Popen([*localkafka.die_with_parent_prefix(), "sleep", "30"]))
        time.sleep(1.0)  # (the thread outlives the child's start, as a broker start waits for it to serve)

    worker = threading.Thread(target=start)
    worker.start()
    worker.join()
    try:
        time.sleep(0.5)
        assert started[0].poll() is None, f"the child died with its thread ({started[0].returncode})"
    finally:
        started[0].kill()
        started[0].wait()
