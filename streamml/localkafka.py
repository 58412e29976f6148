"""Run a real Apache Kafka cluster (KRaft, 1 or 3 nodes) as local Java processes, without Docker.

Used by `make kafka-up` / `make kafka-down` and by the pytest broker fixture, so both run the same broker.
PLAINTEXT by default; secure mode (`make kafka-up SECURE=1`) adds TLS, SCRAM logins and ACLs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from base64 import urlsafe_b64encode
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from streamml.errors import StreamMLError
from streamml.tlsca import ADMIN_NAME, BROKER_NAME, TlsFiles, ensure_tls, write_private_file

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY_DIR = REPO_ROOT / "deploy" / "kafka"
POM_FILE = DEPLOY_DIR / "pom.xml"
LOG4J_CONFIG = DEPLOY_DIR / "log4j2.properties"

HOST = "127.0.0.1"
DEFAULT_BASE_PORT = 9092
MAX_BROKERS = 9
CLUSTER_FILE = "cluster.json"
ADMIN_ENV_FILE = "admin.env"
TLS_DIR = "tls"
SCRAM_MECHANISM = "SCRAM-SHA-512"
# Who may do anything on a secure cluster: the nodes themselves (inter-broker and controller traffic) and the
# operator's admin certificate. Kafka names a TLS peer by its certificate's subject DN, in RFC 2253 form.
SUPER_USERS = (f"User:CN={BROKER_NAME}", f"User:CN={ADMIN_NAME}")
_PROC = Path("/proc")
# Ports handed out by free_port_block stay below Linux's ephemeral range so that outgoing client
# connections cannot be holding them.
_FREE_PORT_RANGE = (20000, 32000)
# Ports this process handed out: free when chosen, but their server may not have bound them yet (a stack
# picks every service's ports before starting them), so they are never handed out twice.
_HANDED_OUT: set[int] = set()


class LocalKafkaError(StreamMLError):
    """The local Kafka cluster could not be set up, started or stopped."""


def default_home() -> Path:
    """Where `make kafka-up` keeps the cluster: STREAMML_KAFKA_HOME or the git-ignored .local/kafka."""
    return Path(os.environ.get("STREAMML_KAFKA_HOME") or REPO_ROOT / ".local" / "kafka").resolve()


def default_libs_dir() -> Path:
    """Where the broker jars live: STREAMML_KAFKA_LIBS or the git-ignored .local/kafka-libs."""
    return Path(os.environ.get("STREAMML_KAFKA_LIBS") or REPO_ROOT / ".local" / "kafka-libs").resolve()


def pinned_kafka_version(pom: Path = POM_FILE) -> str:
    """The Kafka version pinned in the pom, so a stale jar folder is noticed and refreshed."""
    try:
        root = ElementTree.parse(pom).getroot()
    except (OSError, ElementTree.ParseError) as exc:
        raise LocalKafkaError(f"cannot read the Kafka jar pom {pom}: {exc}") from exc
    for element in root.iter():
        if element.tag.rpartition("}")[2] == "kafka.version" and element.text:
            return element.text.strip()
    raise LocalKafkaError(f"{pom} does not pin <kafka.version>")


def jars_present(libs_dir: Path, pom: Path = POM_FILE) -> bool:
    """True when libs_dir already holds the pinned broker jar (then Maven is not run)."""
    return (libs_dir / f"kafka_2.13-{pinned_kafka_version(pom)}.jar").is_file()


def java_binary() -> str:
    """The java launcher: $JAVA_HOME/bin/java if set, else java on PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    found = shutil.which("java")
    if found is None:
        raise LocalKafkaError(
            "Java is not installed: the local Kafka broker needs a Java 17+ runtime "
            "(e.g. `apt-get install openjdk-17-jre-headless`), or point STREAMML_BOOTSTRAP_SERVERS "
            "at an existing broker."
        )
    return found


def fetch_jars(libs_dir: Path, pom: Path = POM_FILE) -> Path:
    """Resolve the pinned Kafka jars with Maven into libs_dir, once; later calls return at once."""
    libs_dir = libs_dir.resolve()
    if jars_present(libs_dir, pom):
        return libs_dir
    version = pinned_kafka_version(pom)
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise LocalKafkaError(
            f"could not fetch the Kafka {version} jars: Java is not installed (Kafka needs Java 17+)."
        )
    mvn = shutil.which("mvn")
    if mvn is None:
        raise LocalKafkaError(
            f"could not fetch the Kafka {version} jars: Maven (mvn) is not installed "
            "(e.g. `apt-get install maven`)."
        )
    # Maven writes into a staging folder that is renamed when complete, so an interrupted download is
    # never mistaken for a usable jar folder.
    staging = libs_dir.with_name(libs_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(pom),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={staging}",
        "-DincludeScope=runtime",
    ]
    logger.info("Fetching the Kafka %s jars with Maven into %s", version, libs_dir)
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LocalKafkaError(f"could not fetch the Kafka {version} jars: Maven took over 15 min") from exc
    if result.returncode != 0 or not (staging / f"kafka_2.13-{version}.jar").is_file():
        shutil.rmtree(staging, ignore_errors=True)
        output = _last_lines(result.stdout + result.stderr, 20)
        raise LocalKafkaError(
            f"could not fetch the Kafka {version} jars with Maven (exit code {result.returncode}); "
            f"check network access to Maven Central.\n{output}"
        )
    if libs_dir.exists():
        ours = (".jar", ".jsa", ".lock")  # jars, and the class-sharing archive made from them
        stray = [p.name for p in libs_dir.iterdir() if not (p.is_file() and p.suffix in ours)]
        if stray:
            shutil.rmtree(staging, ignore_errors=True)
            raise LocalKafkaError(
                f"could not fetch the Kafka jars: {libs_dir} holds files other than jars ({stray[:3]}); "
                "point STREAMML_KAFKA_LIBS at an empty folder."
            )
        shutil.rmtree(libs_dir)
    staging.rename(libs_dir)
    return libs_dir


def new_cluster_id() -> str:
    """A KRaft cluster id: a uuid4 as 22 base64url characters, the form kafka-storage expects.

    Like Kafka's own Uuid.randomUuid, never one starting with "-", which command lines take for an option.
    """
    while True:
        cluster_id = urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def ports_per_node(secure: bool) -> int:
    """A PLAINTEXT node listens on 2 ports (clients, controller); a secure one on 3 (plus INTERNAL)."""
    return 3 if secure else 2


def port_layout(brokers: int, base_port: int) -> list[tuple[int, int]]:
    """(broker port, controller port) per node: brokers on base..base+N-1, controllers on base+N..base+2N-1.

    With one node this is Kafka's usual 9092 (clients) / 9093 (controller).
    """
    return [(base_port + i, base_port + brokers + i) for i in range(brokers)]


def internal_ports(brokers: int, base_port: int) -> list[int]:
    """Secure mode's INTERNAL (inter-broker and admin) port per node: base+2N..base+3N-1, after the ports
    of port_layout, which keep their places (one secure node: 9092 clients, 9093 controller, 9094 admin)."""
    return [base_port + 2 * brokers + i for i in range(brokers)]


def node_config(node_id: int, brokers: int, base_port: int, data_dir: Path) -> dict[str, str]:
    """server.properties of one combined broker+controller node; every listener binds 127.0.0.1."""
    ports = port_layout(brokers, base_port)
    broker_port, controller_port = ports[node_id - 1]
    voters = ",".join(f"{i + 1}@{HOST}:{cport}" for i, (_, cport) in enumerate(ports))
    replication = min(brokers, 3)
    min_isr = max(1, replication - 1)
    return {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.voters": voters,
        "listeners": f"PLAINTEXT://{HOST}:{broker_port},CONTROLLER://{HOST}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{broker_port}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(data_dir),
        # Topics come from the catalogue (`streamml topics create`), never from a producer's typo or a name
        # a record made up: with auto-creation a record for pipeline "ghost" created ghost's topics.
        "auto.create.topics.enable": "false",
        "num.partitions": "1",
        "default.replication.factor": str(replication),
        "min.insync.replicas": str(min_isr),
        "offsets.topic.replication.factor": str(replication),
        "transaction.state.log.replication.factor": str(replication),
        "transaction.state.log.min.isr": str(min_isr),
        "share.coordinator.state.topic.replication.factor": str(replication),
        "share.coordinator.state.topic.min.isr": str(min_isr),
        # Tests create many short-lived groups; waiting 3 s for more members only slows them down.
        "group.initial.rebalance.delay.ms": "0",
        "offsets.topic.num.partitions": "5",
        "transaction.state.log.num.partitions": "5",
        # A crashed exactly-once instance's open transaction holds back every read_committed reader of the
        # partitions it wrote to until the broker aborts it: at its transaction.timeout.ms (10 s for our
        # data loops), found by a sweep every this often (Kafka's default 10 s made that 10-20 s).
        "transaction.abort.timed.out.transaction.cleanup.interval.ms": "1000",
    }


def secure_node_config(
    node_id: int, brokers: int, base_port: int, data_dir: Path, tls: TlsFiles, key_pem: str, chain_pem: str
) -> dict[str, str]:
    """server.properties of one node of a secure cluster: node_config with three TLS listeners and ACLs.

    CLIENT (SASL_SSL, SCRAM-SHA-512) is for applications; INTERNAL (mutual TLS) carries inter-broker
    traffic and the operator's admin client; CONTROLLER (mutual TLS) the KRaft quorum. Every node presents
    the same certificate, CN=streamml-broker, as server and as client, so the nodes are super users and
    nothing else is unless an ACL says so.

    The node's key (key_pem, unencrypted PKCS#8) and chain (chain_pem) are given inline: a PEM keystore
    *file* needs ssl.key.password and so an encrypted key, and the PBES2 encryption we can write is one
    Java 17 cannot read. So the config holds the private key: write it readable by its owner only.
    """
    config = node_config(node_id, brokers, base_port, data_dir)
    client_port, controller_port = port_layout(brokers, base_port)[node_id - 1]
    internal_port = internal_ports(brokers, base_port)[node_id - 1]
    listeners = {
        "listeners": (
            f"CLIENT://{HOST}:{client_port},INTERNAL://{HOST}:{internal_port},"
            f"CONTROLLER://{HOST}:{controller_port}"
        ),
        "advertised.listeners": f"CLIENT://{HOST}:{client_port},INTERNAL://{HOST}:{internal_port}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "CLIENT:SASL_SSL,INTERNAL:SSL,CONTROLLER:SSL",
        "inter.broker.listener.name": "INTERNAL",
    }
    security = {
        # One key and chain for every listener and for the node's own connections to the other nodes.
        "ssl.keystore.type": "PEM",
        "ssl.keystore.key": _pem_value(key_pem),
        "ssl.keystore.certificate.chain": _pem_value(chain_pem),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(tls.ca_cert),
        # Mutual TLS on INTERNAL and CONTROLLER: a controller listener that accepted anonymous peers would
        # see the brokers as User:ANONYMOUS, and the authorizer would deny them CLUSTER_ACTION.
        "ssl.client.auth": "required",
        # Applications log in with SCRAM on CLIENT and need no certificate there.
        "listener.name.client.ssl.client.auth": "none",
        "sasl.enabled.mechanisms": SCRAM_MECHANISM,
        "listener.name.client.sasl.enabled.mechanisms": SCRAM_MECHANISM,
        f"listener.name.client.{SCRAM_MECHANISM.lower()}.sasl.jaas.config": (
            "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        ),
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found": "false",
        "super.users": ";".join(SUPER_USERS),
    }
    replaced = {key: value for key, value in config.items() if key not in listeners}
    return {**replaced, **listeners, **security}


def _pem_value(pem: str) -> str:
    """PEM text as one .properties value: each line break written as the escape \\n."""
    return "\\n".join(pem.strip().splitlines())


def render_properties(config: dict[str, str]) -> str:
    """Java .properties text (values are ports, paths, ids and escaped PEM: none needs more escaping)."""
    lines = ["# Written by streamml.localkafka; regenerated on every start."]
    lines += [f"{key}={value}" for key, value in config.items()]
    return "\n".join(lines) + "\n"


def die_with_parent_prefix() -> list[str]:
    """The command prefix that makes a child get SIGTERM when its parent dies (`setpriv --pdeathsig`), or
    nothing. Linux sends that signal when the *thread* that started the child ends, not the process: a
    broker restarted from a worker thread (make chaos restarts brokers on a thread of its own) was
    terminated 25 ms after that thread finished, and every chaos run went on with one broker fewer. So
    only children started on the main thread get it; the others are stopped by pid by whoever started
    them, as always."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return []
    return [setpriv, "--pdeathsig", "TERM", "--"]


def port_is_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:port (SO_REUSEADDR, as the JVM uses, ignores TIME_WAIT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def port_answers(port: int, timeout_s: float = 0.5) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def free_port_block(n: int, attempts: int = 200) -> int:
    """First port of n consecutive free ports on 127.0.0.1, picked at random so parallel runs rarely clash.

    A cluster of N brokers needs free_port_block(2 * N) as its base_port (see port_layout), a secure one
    free_port_block(3 * N) (see internal_ports), i.e. free_port_block(ports_per_node(secure) * N).
    """
    low, high = _FREE_PORT_RANGE
    for _ in range(attempts):
        base = random.randrange(low, high - n)
        ports = range(base, base + n)
        if _HANDED_OUT.isdisjoint(ports) and all(port_is_free(port) for port in ports):
            _HANDED_OUT.update(ports)
            return base
    raise LocalKafkaError(f"found no {n} consecutive free ports in {low}..{high}")


@dataclass(frozen=True)
class ClusterLayout:
    """What home/cluster.json records: fixed once the storage is formatted."""

    brokers: int
    base_port: int
    cluster_id: str
    secure: bool = False


@dataclass(frozen=True)
class KafkaNode:
    """Files and ports of one node; everything lives under <home>/node-<id>/."""

    node_id: int
    broker_port: int  # the CLIENT listener in secure mode
    controller_port: int
    root: Path
    internal_port: int | None = None  # secure mode only: inter-broker and admin (mutual TLS)

    @property
    def ports(self) -> tuple[int, ...]:
        return tuple(p for p in (self.broker_port, self.controller_port, self.internal_port) if p is not None)

    @property
    def admin_port(self) -> int:
        """Where the operator's admin client connects: INTERNAL when secure, else the broker port."""
        return self.internal_port if self.internal_port is not None else self.broker_port

    @property
    def properties(self) -> Path:
        return self.root / "server.properties"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def server_log(self) -> Path:
        return self.log_dir / "server.log"

    @property
    def console_log(self) -> Path:
        return self.root / "console.log"

    @property
    def pid_file(self) -> Path:
        return self.root / "kafka.pid"

    def is_formatted(self) -> bool:
        return (self.data_dir / "meta.properties").is_file()


class LocalKafka:
    """A KRaft cluster of combined broker+controller nodes running as background Java processes.

    State lives under `home` (configs, data, logs, pid files), so a second process - another
    `make kafka-up`, or `make kafka-down` - finds and controls the same cluster. With die_with_parent
    the nodes stay in the caller's process group and get SIGTERM when the caller dies (Linux, setpriv),
    so a killed test run leaves no broker behind.

    With secure=True every listener speaks TLS with certificates of a local CA in home/tls/ (see
    secure_node_config): applications log in with SCRAM on `bootstrap`, the operator with a client
    certificate on `admin_bootstrap`, and ACLs decide what each may do.
    """

    def __init__(
        self,
        home: Path,
        brokers: int = 1,
        base_port: int = DEFAULT_BASE_PORT,
        libs_dir: Path | None = None,
        heap_mb: int = 512,
        die_with_parent: bool = False,
        secure: bool = False,
    ) -> None:
        if not 1 <= brokers <= MAX_BROKERS:
            raise LocalKafkaError(f"brokers must be between 1 and {MAX_BROKERS}, got {brokers}")
        ports = ports_per_node(secure) * brokers
        if not 1024 <= base_port <= 65535 - ports:
            raise LocalKafkaError(f"base port {base_port} leaves no room for {ports} ports")
        if heap_mb < 128:
            raise LocalKafkaError(f"heap_mb must be at least 128, got {heap_mb}")
        self.home = home.resolve()
        self.brokers = brokers
        self.base_port = base_port
        self.libs_dir = (libs_dir or default_libs_dir()).resolve()
        self.heap_mb = heap_mb
        # For test fixtures: brokers that die with the process that started them, even if it is killed,
        # instead of outliving it in their own session as `make kafka-up` brokers must.
        self.die_with_parent = die_with_parent
        self.secure = secure
        internal: list[int | None] = [*internal_ports(brokers, base_port)] if secure else [None] * brokers
        self.nodes = [
            KafkaNode(i + 1, bport, cport, self.home / f"node-{i + 1}", internal[i])
            for i, (bport, cport) in enumerate(port_layout(brokers, base_port))
        ]
        # Popen handles of nodes this object launched, so their exit status is collected (no zombies).
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    @classmethod
    def from_home(cls, home: Path, libs_dir: Path | None = None) -> LocalKafka:
        """The cluster already set up in home (its size, ports and mode come from home/cluster.json)."""
        layout = _read_layout(home.resolve())
        if layout is None:
            raise LocalKafkaError(f"no local Kafka cluster in {home} (run `make kafka-up` first)")
        return cls(
            home, brokers=layout.brokers, base_port=layout.base_port, libs_dir=libs_dir, secure=layout.secure
        )

    @property
    def bootstrap(self) -> str:
        """bootstrap.servers for clients of this cluster (the SASL_SSL CLIENT listeners when secure)."""
        return ",".join(f"{HOST}:{node.broker_port}" for node in self.nodes)

    @property
    def admin_bootstrap(self) -> str:
        """bootstrap.servers of the operator's admin client: the mutual-TLS INTERNAL listeners when secure."""
        return ",".join(f"{HOST}:{node.admin_port}" for node in self.nodes)

    @property
    def tls_dir(self) -> Path:
        """Where a secure cluster keeps its CA, certificates and keys (made on first start)."""
        return self.home / TLS_DIR

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(self.tls_dir)

    @property
    def ca_file(self) -> Path:
        """The CA certificate clients of a secure cluster trust (STREAMML_SSL_CA_LOCATION)."""
        return self.tls.ca_cert

    def admin_env(self) -> dict[str, str]:
        """STREAMML_* settings of the operator's admin client: mutual TLS on INTERNAL when secure."""
        if not self.secure:
            return {"STREAMML_BOOTSTRAP_SERVERS": self.bootstrap}
        tls = self.tls
        return {
            "STREAMML_BOOTSTRAP_SERVERS": self.admin_bootstrap,
            "STREAMML_SECURITY_PROTOCOL": "SSL",
            "STREAMML_SSL_CA_LOCATION": str(tls.ca_cert),
            "STREAMML_SSL_CERTIFICATE_LOCATION": str(tls.admin_cert),
            "STREAMML_SSL_KEY_LOCATION": str(tls.admin_key),
        }

    def client_env(self, username: str, password_file: Path) -> dict[str, str]:
        """STREAMML_* settings of an application logging in as username (SCRAM, SASL_SSL) when secure.

        Holds the password file's path, never the password. A PLAINTEXT cluster has no logins: there it is
        the bootstrap alone, so callers need not care which mode runs.
        """
        if not self.secure:
            return {"STREAMML_BOOTSTRAP_SERVERS": self.bootstrap}
        return {
            "STREAMML_BOOTSTRAP_SERVERS": self.bootstrap,
            "STREAMML_SECURITY_PROTOCOL": "SASL_SSL",
            "STREAMML_SASL_MECHANISM": SCRAM_MECHANISM,
            "STREAMML_SASL_USERNAME": username,
            "STREAMML_SASL_PASSWORD_FILE": str(Path(password_file).resolve()),
            "STREAMML_SSL_CA_LOCATION": str(self.ca_file),
        }

    def write_admin_env(self) -> Path:
        """home/admin.env: admin_env() as KEY=VALUE lines (paths only, no secret), readable by its owner."""
        path = self.home / ADMIN_ENV_FILE
        text = "".join(f"{key}={value}\n" for key, value in self.admin_env().items())
        write_private_file(path, text.encode())
        return path

    def node(self, node_id: int) -> KafkaNode:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise LocalKafkaError(f"no node {node_id}: this cluster has nodes 1..{self.brokers}")

    def write_configs(self) -> None:
        """Write every node's server.properties (done by start; public so tests can inspect them).

        When secure, first makes (or renews) the TLS material; the configs then hold the broker's private
        key, so they are written readable by their owner only.
        """
        if self.secure:
            self._write_secure_configs()
            return
        for node in self.nodes:
            node.root.mkdir(parents=True, exist_ok=True)
            text = render_properties(node_config(node.node_id, self.brokers, self.base_port, node.data_dir))
            if not node.properties.is_file() or node.properties.read_text() != text:
                node.properties.write_text(text)

    def _write_secure_configs(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        tls = ensure_tls(self.tls_dir)
        key_pem, chain_pem = tls.read_broker_pem()
        for node in self.nodes:
            node.root.mkdir(parents=True, exist_ok=True)
            config = secure_node_config(
                node.node_id, self.brokers, self.base_port, node.data_dir, tls, key_pem, chain_pem
            )
            text = render_properties(config)
            path = node.properties
            if not path.is_file() or path.stat().st_mode & 0o077 or path.read_text() != text:
                write_private_file(path, text.encode())

    def is_formatted(self) -> bool:
        return all(node.is_formatted() for node in self.nodes)

    def node_pids(self) -> dict[int, int]:
        """node id -> pid of every node whose Kafka process is alive."""
        pids = {}
        for node in self.nodes:
            pid = self._node_pid(node)
            if pid is not None:
                pids[node.node_id] = pid
        return pids

    def is_running(self) -> bool:
        """True when every node's process is alive and its broker port accepts connections."""
        pids = self.node_pids()
        return len(pids) == len(self.nodes) and all(port_answers(n.broker_port) for n in self.nodes)

    def start(self, timeout_s: float = 60.0) -> str:
        """Start whatever nodes are not running, wait until all brokers serve, return bootstrap.servers."""
        self.check_layout()
        running = self.node_pids()
        to_start = [node for node in self.nodes if node.node_id not in running]
        if not to_start:
            self._wait_ready(time.monotonic() + timeout_s, watch=self.nodes)
            logger.info("Kafka already running at %s (pids %s)", self.bootstrap, sorted(running.values()))
            return self.bootstrap
        java = java_binary()
        fetch_jars(self.libs_dir)
        deadline = time.monotonic() + timeout_s
        self._check_ports_free(to_start)
        cluster_id = self._ensure_layout_file()
        self.write_configs()
        self._format([node for node in to_start if not node.is_formatted()], java, cluster_id, deadline)
        for node in to_start:
            self._launch(node, java)
        try:
            self._wait_ready(deadline, watch=self.nodes)
        except LocalKafkaError:
            self._stop_nodes(to_start, timeout_s=10.0)
            raise
        logger.info("Kafka ready at %s", self.bootstrap)
        return self.bootstrap

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop every node: SIGTERM (Kafka shuts down cleanly), then SIGKILL whatever is left at timeout."""
        self._stop_nodes(self.nodes, timeout_s)

    def stop_node(self, node_id: int, timeout_s: float = 30.0) -> None:
        """Stop one node, leaving the others serving (to test broker failures)."""
        self._stop_nodes([self.node(node_id)], timeout_s)

    def start_node(self, node_id: int, timeout_s: float = 60.0) -> None:
        """Restart one stopped node and wait until it is registered again."""
        self.check_layout()
        node = self.node(node_id)
        if self._node_pid(node) is not None:
            return
        java = java_binary()
        fetch_jars(self.libs_dir)
        deadline = time.monotonic() + timeout_s
        self._check_ports_free([node])
        cluster_id = self._ensure_layout_file()
        self.write_configs()
        if not node.is_formatted():
            self._format([node], java, cluster_id, deadline)
        self._launch(node, java)
        try:
            self._wait_ready(deadline, watch=[node])
        except LocalKafkaError:
            self._stop_nodes([node], timeout_s=10.0)
            raise

    def logs(self, lines: int = 50) -> str:
        """The last lines of each node's server log (and of its console, where the JVM reports crashes)."""
        sections = []
        for node in self.nodes:
            sections.append(f"==> node {node.node_id}: {node.server_log} <==")
            sections.append(_tail(node.server_log, lines) if node.server_log.is_file() else "(no log yet)")
            console = _tail(node.console_log, lines) if node.console_log.is_file() else ""
            if any(line and not line.startswith("--- ") for line in console.splitlines()):
                sections.append(f"==> node {node.node_id}: {node.console_log} <==")
                sections.append(console)
        return "\n".join(sections)

    def wipe(self) -> None:
        """Stop the cluster and delete its home (all topics and data)."""
        self.stop()
        if not self.home.exists():
            return
        if not (self.home / CLUSTER_FILE).is_file() and any(self.home.iterdir()):
            raise LocalKafkaError(f"{self.home} does not look like a local Kafka home; not deleting it")
        shutil.rmtree(self.home)

    def check_layout(self) -> None:
        """Refuse a home whose formatted storage belongs to a cluster of another size, ports or mode."""
        layout = _read_layout(self.home)
        if layout is None or (layout.brokers, layout.base_port, layout.secure) == self._layout_key():
            return
        if not any(self.home.glob("node-*/data/meta.properties")):
            return
        if layout.secure != self.secure:
            held, wanted = ("secure", "PLAINTEXT") if layout.secure else ("PLAINTEXT", "secure")
            raise LocalKafkaError(
                f"{self.home} holds a {held} cluster, not a {wanted} one: `make kafka-down` stops it and "
                f"`python -m streamml.localkafka down --wipe --home {self.home}` deletes it with its data, "
                "or point STREAMML_KAFKA_HOME (or --home) at another folder"
            )
        raise LocalKafkaError(
            f"{self.home} holds a {layout.brokers}-broker cluster on base port {layout.base_port}, "
            f"not {self.brokers} on {self.base_port}: delete it with "
            f"`python -m streamml.localkafka down --wipe --home {self.home}` or use another --home"
        )

    # -- internals ---------------------------------------------------------------------------------

    def _layout_key(self) -> tuple[int, int, bool]:
        return (self.brokers, self.base_port, self.secure)

    def _ensure_layout_file(self) -> str:
        """Create home/cluster.json on first start; the cluster id in it must never change."""
        layout = _read_layout(self.home)
        if layout is not None and (layout.brokers, layout.base_port, layout.secure) == self._layout_key():
            return layout.cluster_id
        # New, or never formatted (check_layout passed): the layout may still change.
        self.home.mkdir(parents=True, exist_ok=True)
        cluster_id = layout.cluster_id if layout is not None else new_cluster_id()
        data = {
            "brokers": self.brokers,
            "base_port": self.base_port,
            "cluster_id": cluster_id,
            "secure": self.secure,
        }
        (self.home / CLUSTER_FILE).write_text(json.dumps(data, indent=2) + "\n")
        return cluster_id

    def _check_ports_free(self, nodes: Iterable[KafkaNode]) -> None:
        for node in nodes:
            for port in node.ports:
                if not port_is_free(port):
                    raise LocalKafkaError(
                        f"port {HOST}:{port} needed by Kafka node {node.node_id} is already in use by "
                        "another process; stop it or choose another base port (--port)"
                    )

    def _jvm_args(self, node: KafkaNode, java: str, heap_mb: int) -> list[str]:
        return [
            java,
            f"-Xms{min(256, heap_mb)}m",
            f"-Xmx{heap_mb}m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={node.log_dir}",
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            "-cp",
            f"{self.libs_dir}/*",
        ]

    def _format(self, nodes: Sequence[KafkaNode], java: str, cluster_id: str, deadline: float) -> None:
        """Format the KRaft storage of new nodes (in parallel: each is a JVM start)."""
        if not nodes:
            return
        logger.info("Formatting KRaft storage of %d node(s), cluster id %s", len(nodes), cluster_id)
        procs = []
        for node in nodes:
            node.log_dir.mkdir(parents=True, exist_ok=True)
            cmd = [
                *self._jvm_args(node, java, heap_mb=256),
                "-XX:TieredStopAtLevel=1",
                "kafka.tools.StorageTool",
                "format",
                f"--cluster-id={cluster_id}",
                f"--config={node.properties}",
            ]
            procs.append((node, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
        failures = []
        for node, proc in procs:
            try:
                out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            if proc.returncode != 0:
                text = _last_lines(out.decode("utf-8", "replace"), 15)
                failures.append(f"node {node.node_id} (exit code {proc.returncode}):\n{text}")
        if failures:
            raise LocalKafkaError("formatting the Kafka storage failed for " + "\n".join(failures))

    def _launch(self, node: KafkaNode, java: str) -> None:
        node.log_dir.mkdir(parents=True, exist_ok=True)
        class_flags, dump_lock = _class_sharing_flags(self.libs_dir, java)
        cmd = [*self._jvm_args(node, java, self.heap_mb), *class_flags, "kafka.Kafka", str(node.properties)]
        if self.die_with_parent:
            cmd = [*die_with_parent_prefix(), *cmd]
        with node.console_log.open("ab") as console:
            console.write(f"--- started {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
            console.flush()
            # Own session: Ctrl-C in the terminal that ran `make kafka-up` must not kill the broker.
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                cwd=node.root,
                start_new_session=not self.die_with_parent,
            )
        self._children[proc.pid] = proc
        node.pid_file.write_text(f"{proc.pid}\n")
        if dump_lock is not None:
            dump_lock.write_text(f"{proc.pid}\n")
        logger.info("Started Kafka node %d (pid %d) on %s:%d", node.node_id, proc.pid, HOST, node.broker_port)

    def _wait_ready(self, deadline: float, watch: Sequence[KafkaNode]) -> None:
        """Wait until the watched nodes' ports answer and the cluster reports them as registered brokers."""
        expected = {node.node_id for node in watch}
        admin: AdminClient | None = None
        last_error = "broker ports not open yet"
        while True:
            for node in watch:
                if self._node_pid(node) is None:
                    raise LocalKafkaError(
                        f"Kafka node {node.node_id} exited while starting; its last log lines:\n"
                        f"{self.logs(40)}"
                    )
            if all(port_answers(port) for node in watch for port in {node.broker_port, node.admin_port}):
                if admin is None:
                    admin = _quiet_admin(self.admin_bootstrap, self._admin_tls_config())
                try:
                    metadata = admin.list_topics(timeout=max(0.5, min(2.0, deadline - time.monotonic())))
                except KafkaException as exc:
                    last_error = str(exc)
                else:
                    registered = set(metadata.brokers)
                    if expected <= registered:
                        return
                    last_error = f"brokers registered so far: {sorted(registered)}"
            if time.monotonic() >= deadline:
                raise LocalKafkaError(
                    f"Kafka at {self.bootstrap} was not ready in time ({last_error}); "
                    f"its last log lines:\n{self.logs(40)}"
                )
            time.sleep(0.2)

    def _admin_tls_config(self) -> dict[str, str]:
        """librdkafka options of the admin client's mutual-TLS connection (none when PLAINTEXT)."""
        if not self.secure:
            return {}
        tls = self.tls
        return {
            "security.protocol": "SSL",
            "ssl.ca.location": str(tls.ca_cert),
            "ssl.certificate.location": str(tls.admin_cert),
            "ssl.key.location": str(tls.admin_key),
        }

    def _stop_nodes(self, nodes: Sequence[KafkaNode], timeout_s: float) -> None:
        pids = {node.node_id: pid for node in nodes if (pid := self._node_pid(node)) is not None}
        for pid in pids.values():
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        alive = dict(pids)
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = {nid: pid for nid, pid in alive.items() if self._still_running(pid)}
        for node_id, pid in alive.items():
            logger.warning(
                "Kafka node %d (pid %d) ignored SIGTERM for %.0f s; killing it", node_id, pid, timeout_s
            )
            _signal(pid, signal.SIGKILL)
        kill_deadline = time.monotonic() + 10.0
        while alive and time.monotonic() < kill_deadline:
            time.sleep(0.05)
            alive = {nid: pid for nid, pid in alive.items() if self._still_running(pid)}
        if alive:
            raise LocalKafkaError(f"could not stop Kafka processes {sorted(alive.values())}")
        for node in nodes:
            node.pid_file.unlink(missing_ok=True)
        for pid in pids.values():
            self._children.pop(pid, None)
        if pids:
            logger.info("Stopped Kafka node(s) %s", sorted(pids))

    def _node_pid(self, node: KafkaNode) -> int | None:
        """The live Kafka process of node: from its pid file, else found by its command line."""
        try:
            pid: int | None = int(node.pid_file.read_text().strip())
        except (OSError, ValueError):
            pid = None
        if pid is not None and self._is_kafka(pid, node):
            return pid
        for found in _scan_kafka_processes(node.properties):
            node.pid_file.write_text(f"{found}\n")
            return found
        node.pid_file.unlink(missing_ok=True)
        return None

    def _still_running(self, pid: int) -> bool:
        """Whether a process known to be one of ours has not exited yet (zombies count as exited).

        Its command line cannot tell: the kernel empties it while the process is exiting.
        """
        child = self._children.get(pid)
        if child is not None:
            return child.poll() is None
        if pid_alive(pid):
            return True
        _reap(pid)
        return False

    def _is_kafka(self, pid: int, node: KafkaNode) -> bool:
        """True when pid is a live (not zombie) Kafka process of node; a recycled pid does not count."""
        child = self._children.get(pid)
        if child is not None:
            return child.poll() is None  # our unreaped child: its pid cannot have been recycled
        if not self._still_running(pid):
            return False
        if not _PROC.is_dir():
            return True
        try:
            argv = (_PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return b"kafka.Kafka" in argv and str(node.properties).encode() in argv


def _class_sharing_flags(libs_dir: Path, java: str) -> tuple[list[str], Path | None]:
    """JVM flags for a class-data-sharing archive, which halves the broker's start time (JDK 17 AppCDS).

    The archive is keyed by the JVM and the jar set, so an upgrade makes a new one. The first broker
    launched without an archive records its classes at exit; a lock (holding that broker's pid, written by
    the caller) keeps other brokers from writing the same file. Returns (flags, lock to write the pid to).
    """
    try:
        real_java = Path(java).resolve()
        jars = sorted(p.name for p in libs_dir.glob("*.jar"))
        key = f"{real_java}:{real_java.stat().st_mtime_ns}:{','.join(jars)}"
        archive = libs_dir / f"kafka-classes-{hashlib.sha256(key.encode()).hexdigest()[:12]}.jsa"
        quiet = "-Xlog:cds*=off"
        if archive.is_file():
            return [f"-XX:SharedArchiveFile={archive}", quiet], None
        lock = archive.with_suffix(".lock")
        if not _claim_lock(lock):
            return [], None
        return [f"-XX:ArchiveClassesAtExit={archive}", quiet], lock
    except OSError as exc:
        logger.debug("Class-data sharing disabled: %s", exc)
        return [], None


def _claim_lock(lock: Path) -> bool:
    """Create lock exclusively; a lock whose owner died (or never wrote its pid) is taken over."""
    for _ in range(2):
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            try:
                owner = lock.read_text().strip()
                age = time.time() - lock.stat().st_mtime
            except OSError:
                continue
            if owner.isdigit() and pid_alive(int(owner)):
                return False
            if not owner.isdigit() and age < 60:
                return False
            lock.unlink(missing_ok=True)
    return False


def pid_alive(pid: int) -> bool:
    """True when pid runs and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = (_PROC / str(pid) / "stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state not in ("Z", "X")


def _read_layout(home: Path) -> ClusterLayout | None:
    path = home / CLUSTER_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        secure = data.get("secure", False)  # absent in homes made before secure mode existed
        if not isinstance(secure, bool):
            raise TypeError(f"secure must be true or false, not {secure!r}")
        return ClusterLayout(int(data["brokers"]), int(data["base_port"]), str(data["cluster_id"]), secure)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LocalKafkaError(f"{path} is damaged ({exc}); delete {home} to start afresh") from exc


def _scan_kafka_processes(properties: Path) -> list[int]:
    """Pids of Kafka processes started with this server.properties (when the pid file was lost)."""
    if not _PROC.is_dir():
        return []
    wanted = str(properties).encode()
    found = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if b"kafka.Kafka" in argv and wanted in argv and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def _reap(pid: int) -> None:
    """Collect the exit status of a dead child we started (no-op for other processes)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _quiet_admin(bootstrap: str, extra: dict[str, str] | None = None) -> AdminClient:
    """An admin client that keeps librdkafka's connection-refused chatter out of the terminal.

    extra: more client options, e.g. the TLS ones of a secure cluster's admin listener.
    """
    silent = logging.getLogger(f"{__name__}.librdkafka")
    silent.propagate = False
    silent.addHandler(logging.NullHandler())
    conf: dict[str, str | int | float | bool] = {
        "bootstrap.servers": bootstrap,
        "log_level": 0,
        "socket.connection.setup.timeout.ms": 2000,
        **(extra or {}),
    }
    return AdminClient(conf, logger=silent, error_cb=lambda _err: None)


def _last_lines(text: str, lines: int) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def _tail(path: Path, lines: int) -> str:
    """Last lines of a file without reading all of it (server logs grow to megabytes)."""
    if lines <= 0:
        return ""
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        end = handle.tell()
        block = 8192
        data = b""
        while end > 0 and data.count(b"\n") <= lines:
            step = min(block, end)
            end -= step
            handle.seek(end)
            data = handle.read(step) + data
    return _last_lines(data.decode("utf-8", "replace"), lines)


# -- command line (a dev tool behind `make kafka-up` / `kafka-down` / `kafka-logs`) ------------------


def _cluster_for(args: argparse.Namespace, must_exist: bool) -> LocalKafka | None:
    home = Path(args.home).resolve() if args.home else default_home()
    libs = Path(args.libs).resolve() if getattr(args, "libs", None) else None
    if _read_layout(home) is None:
        if must_exist:
            raise LocalKafkaError(f"no local Kafka cluster in {home} (run `make kafka-up` first)")
        return None
    return LocalKafka.from_home(home, libs_dir=libs)


def _cmd_up(args: argparse.Namespace) -> int:
    home = Path(args.home).resolve() if args.home else default_home()
    libs = Path(args.libs).resolve() if args.libs else default_libs_dir()
    layout = _read_layout(home)
    brokers = args.brokers or (layout.brokers if layout else 1)
    port = args.port or (layout.base_port if layout else DEFAULT_BASE_PORT)
    secure = args.secure if args.secure is not None else (layout.secure if layout else False)
    kafka = LocalKafka(
        home, brokers=brokers, base_port=port, libs_dir=libs, heap_mb=args.heap_mb, secure=secure
    )
    kafka.check_layout()
    if kafka.is_running():
        print(f"Kafka already running at {kafka.bootstrap} (pids {sorted(kafka.node_pids().values())})")
        if kafka.secure:
            _print_secure_access(kafka)
        return 0
    began = time.monotonic()
    if not jars_present(libs):
        fetch_jars(libs)
        print(f"Fetched the Kafka jars into {libs} in {time.monotonic() - began:.1f} s")
    kind = "warm start" if kafka.is_formatted() else "cold start, storage formatted"
    started = time.monotonic()
    bootstrap = kafka.start(timeout_s=args.timeout)
    noun = "broker" if brokers == 1 else "brokers"
    took = time.monotonic() - started
    if not kafka.secure:
        print(f"Kafka ready at {bootstrap} ({brokers} {noun}, {kind}, {took:.1f} s)")
        print(f"  export STREAMML_BOOTSTRAP_SERVERS={bootstrap}")
        print(f"  data and logs: {kafka.home}")
        return 0
    print(f"Secure Kafka ready at {bootstrap} ({brokers} {noun}, {kind}, {took:.1f} s)")
    _print_secure_access(kafka)
    print(f"  data and logs: {kafka.home}")
    return 0


def _print_secure_access(kafka: LocalKafka) -> None:
    """Where clients and the operator connect, and the operator's settings file (paths only, no keys)."""
    env_file = kafka.write_admin_env()
    print(f"  applications: {kafka.bootstrap} (SASL_SSL, {SCRAM_MECHANISM} users, CA {kafka.ca_file})")
    print(f"  operator (admin, mutual TLS): {kafka.admin_bootstrap}")
    print(f"  admin client settings: {env_file} (load with `set -a; . {env_file}; set +a`)")


def _cmd_down(args: argparse.Namespace) -> int:
    kafka = _cluster_for(args, must_exist=False)
    if kafka is None:
        print("No local Kafka cluster to stop")
        return 0
    pids = kafka.node_pids()
    if args.wipe:
        kafka.wipe()
        print(f"Kafka stopped and {kafka.home} deleted")
    else:
        kafka.stop()
        print(f"Kafka stopped ({len(pids)} process(es))" if pids else "Kafka was not running")
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    kafka = _cluster_for(args, must_exist=True)
    assert kafka is not None
    print(kafka.logs(args.lines))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    kafka = _cluster_for(args, must_exist=False)
    if kafka is None:
        print("No local Kafka cluster (run `make kafka-up`)")
        return 1
    pids = kafka.node_pids()
    for node in kafka.nodes:
        pid = pids.get(node.node_id)
        if pid is None:
            state = "stopped"
        elif port_answers(node.broker_port):
            state = f"running (pid {pid})"
        else:
            state = f"starting (pid {pid})"
        if kafka.secure:
            print(f"node {node.node_id}  {HOST}:{node.broker_port} (admin {HOST}:{node.admin_port})  {state}")
        else:
            print(f"node {node.node_id}  {HOST}:{node.broker_port}  {state}")
    print(f"bootstrap: {kafka.bootstrap}")
    if kafka.secure:
        print(f"admin bootstrap: {kafka.admin_bootstrap}")
        env_file = kafka.home / ADMIN_ENV_FILE
        print(f"security: secure (TLS, {SCRAM_MECHANISM} logins, ACLs; admin settings in {env_file})")
    else:
        print("security: PLAINTEXT (no TLS, no logins)")
    return 0 if kafka.is_running() else 1


def _cmd_client_env(args: argparse.Namespace) -> int:
    """KEY=VALUE lines of a SCRAM user's settings on this cluster (paths only: the password stays in its
    file), for `env $(cat FILE) streamml ...`; `make demo SECURE=1` runs the CLI and producer this way."""
    kafka = _cluster_for(args, must_exist=True)
    assert kafka is not None
    if not kafka.secure:
        print("error: this cluster is PLAINTEXT: it has no users", file=sys.stderr)
        return 1
    users = Path(args.users).resolve() if args.users else kafka.home / "users"
    password_file = users / f"{args.user}.password"
    if not password_file.is_file():
        print(f"error: no {password_file}: run `streamml acl apply` as the operator first", file=sys.stderr)
        return 1
    for key, value in kafka.client_env(args.user, password_file).items():
        print(f"{key}={value}")
    return 0


def _cmd_jars(args: argparse.Namespace) -> int:
    libs = Path(args.libs).resolve() if args.libs else default_libs_dir()
    began = time.monotonic()
    fetch_jars(libs)
    print(f"Kafka {pinned_kafka_version()} jars in {libs} ({time.monotonic() - began:.1f} s)")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m streamml.localkafka", description="Run a local Apache Kafka cluster (no Docker)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    home_help = "cluster folder (default: $STREAMML_KAFKA_HOME or .local/kafka)"
    libs_help = "jar folder (default: $STREAMML_KAFKA_LIBS or .local/kafka-libs)"

    up = sub.add_parser("up", help="start the cluster (formats storage on first use)")
    up.add_argument("--brokers", type=int, default=None, help="number of nodes, 1 or 3 (default 1)")
    up.add_argument("--port", type=int, default=None, help=f"first broker port (default {DEFAULT_BASE_PORT})")
    up.add_argument("--home", help=home_help)
    up.add_argument("--libs", help=libs_help)
    up.add_argument("--heap-mb", type=int, default=512, help="JVM heap per node in MB (default 512)")
    up.add_argument("--timeout", type=float, default=90.0, help="seconds to wait until ready")
    up.add_argument(
        "--secure",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="TLS everywhere, SCRAM logins for applications, mutual TLS for the operator, ACLs "
        "(default: as the existing cluster, else PLAINTEXT)",
    )
    up.set_defaults(func=_cmd_up)

    down = sub.add_parser("down", help="stop the cluster")
    down.add_argument("--home", help=home_help)
    down.add_argument("--wipe", action="store_true", help="also delete all its data")
    down.set_defaults(func=_cmd_down)

    logs = sub.add_parser("logs", help="print the last lines of each node's log")
    logs.add_argument("--lines", type=int, default=50)
    logs.add_argument("--home", help=home_help)
    logs.set_defaults(func=_cmd_logs)

    status = sub.add_parser("status", help="show which nodes run (exit code 1 if not all)")
    status.add_argument("--home", help=home_help)
    status.set_defaults(func=_cmd_status)

    client_env = sub.add_parser("client-env", help="a SCRAM user's STREAMML_* settings (secure cluster)")
    client_env.add_argument("--user", required=True, help="the user, e.g. streamml-cli")
    client_env.add_argument("--users", help="folder of <user>.password files (default: <home>/users)")
    client_env.add_argument("--home", help=home_help)
    client_env.set_defaults(func=_cmd_client_env)

    jars = sub.add_parser("jars", help="only fetch the pinned Kafka jars")
    jars.add_argument("--libs", help=libs_help)
    jars.set_defaults(func=_cmd_jars)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        code: int = args.func(args)
    except StreamMLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `... status | head -1` stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
