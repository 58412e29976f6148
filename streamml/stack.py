"""Runs the StreamML services as background processes (for `make demo`, the e2e tests and `make bench`).

Each service is a separate OS process (`python -m services.<name>`), as in production, and may run as N
instances: processes with the same settings but their own STREAMML_INSTANCE_ID, ports, data folder and log.
Logs go to one folder, and a state file records what was started so `make down` stops exactly that.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SERVICES = ("features", "learner", "predictor", "monitor", "trainer", "controller")
# Services that keep state or decide alone: the ones a fail-over test kills (the predictor only serves).
STATEFUL = ("features", "learner", "monitor", "trainer", "controller")
HEALTH_PATHS = {"predictor": "/healthz"}  # services with an HTTP API are ready when it answers
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = ".local/data"  # Settings.data_dir's default, relative to the repository


def free_port() -> int:
    """A free port on 127.0.0.1 below the kernel's ephemeral range (32768-60999 on Linux): a port the
    kernel hands out for outgoing connections (bind to port 0) could be taken by any client's connection
    between this choice and the service binding it (an e2e run saw a controller exit with "Address already
    in use")."""
    from streamml.localkafka import free_port_block

    return free_port_block(1)


def label_of(name: str, index: int) -> str:
    """How one instance is named in `Stack.services` and the state file: instance 0 keeps the service's
    name (so single-instance callers and `streamml top` see what they always saw), the others `name-i`."""
    return name if index == 0 else f"{name}-{index}"


def parse_instances(text: str) -> dict[str, int]:
    """`--instances`: "2" (every service) or "learner=2,features=3" (the rest keep 1)."""
    text = text.strip()
    if text.isdigit():
        n = int(text)
        if n < 1:
            raise ValueError("instances must be at least 1")
        return dict.fromkeys(SERVICES, n)
    counts = dict.fromkeys(SERVICES, 1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in SERVICES or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"bad instance count {part!r}: use N or service=N[,service=N] ({SERVICES})")
        counts[name.strip()] = int(value)
    return counts


# Services that publish model versions (and so hold the Ed25519 private key) and the one that signs its own
# state with the shared HMAC key. Everyone else gets public keys only, as their pods would.
MODEL_SIGNERS = frozenset({"learner", "trainer"})
STATE_SIGNERS = frozenset({"monitor"})


def secrets_for_role(service: str, env: dict[str, str]) -> None:
    """Remove from a service's environment the secrets its role does not need: the model signing key
    outside learner and trainer; the shared HMAC key where Ed25519 verify keys are configured, except
    for the monitor's state (the former scheme, without verify keys, still needs it everywhere)."""
    if service not in MODEL_SIGNERS:
        env.pop("STREAMML_MODEL_SIGNING_KEY_FILE", None)
    ed25519 = env.get("STREAMML_MODEL_VERIFY_KEYS") or env.get("STREAMML_MODEL_VERIFY_KEYS_FILE")
    if ed25519 and service not in STATE_SIGNERS and not env.get("STREAMML_ACCEPT_HMAC_MODELS"):
        env.pop("STREAMML_SIGNING_KEY", None)


def principal_for(service: str, env: dict[str, str], users_dir: Path) -> None:
    """On a secured cluster every service connects as its own SCRAM user (`streamml acl apply` made it),
    its password read from <users_dir>/<user>.password; no shared password is passed on."""
    from streamml.acl import password_file, user_name

    user = user_name(env.get("STREAMML_TOPIC_PREFIX") or "streamml", service)
    env.pop("STREAMML_SASL_PASSWORD", None)
    env["STREAMML_SASL_USERNAME"] = user
    env["STREAMML_SASL_PASSWORD_FILE"] = str(password_file(users_dir, user))


@dataclass
class Exit:
    """How one run of an instance ended: the signal the stack sent (None: it exited by itself)."""

    signal: str | None
    returncode: int | None
    seconds: float  # from the signal to the exit (0 when it exited by itself)


@dataclass
class ServiceProcess:
    name: str
    proc: subprocess.Popen[bytes] | None
    log_path: Path
    metrics_port: int
    http_port: int
    env: dict[str, str]
    index: int = 0
    instance_id: str = "0"
    exits: list[Exit] = field(default_factory=list)  # earlier runs of this instance too
    exit_recorded: bool = False  # this run's end is in `exits`

    def record_exit(self, sig: str | None, seconds: float) -> None:
        if self.proc is not None and not self.exit_recorded and self.proc.returncode is not None:
            self.exits.append(Exit(sig, self.proc.returncode, seconds))
            self.exit_recorded = True

    @property
    def label(self) -> str:
        return label_of(self.name, self.index)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self, timeout_s: float = 0.5) -> bool:
        """Metrics endpoint answers, and the HTTP API too where the service has one."""
        urls = [f"http://127.0.0.1:{self.metrics_port}/metrics"]
        if self.name in HEALTH_PATHS:
            urls.append(f"http://127.0.0.1:{self.http_port}{HEALTH_PATHS[self.name]}")
        try:
            for url in urls:
                try:
                    with urllib.request.urlopen(url, timeout=timeout_s):  # loopback only
                        pass
                except urllib.error.HTTPError as exc:
                    if exc.code != 401:  # 401: the API answers and wants its bearer token
                        raise
        except OSError:
            return False
        return True

    def metrics_text(self, timeout_s: float = 2.0) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # loopback only
            return str(resp.read().decode())


@dataclass
class Stack:
    """The services of one StreamML deployment, sharing one environment (broker, prefix, key).

    `instances` says how many processes each service runs (default 1). `services` maps each instance's
    label (`label_of`) to its process; the methods taking `name` and `index` address one instance, and
    `index=None` means every instance of the service.
    """

    env: dict[str, str]
    log_dir: Path
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    instances: dict[str, int] = field(default_factory=dict)
    # Secured cluster: each service connects as its own SCRAM user with the password file found here.
    users_dir: Path | None = None

    @classmethod
    def create(
        cls,
        env: Mapping[str, str],
        log_dir: Path,
        instances: int | Mapping[str, int] = 1,
        users_dir: Path | None = None,
    ) -> Stack:
        log_dir.mkdir(parents=True, exist_ok=True)
        counts = dict.fromkeys(SERVICES, instances) if isinstance(instances, int) else dict(instances)
        if any(n < 1 for n in counts.values()):
            raise ValueError(f"every service needs at least one instance, got {counts}")
        return cls(env=dict(env), log_dir=log_dir, instances=counts, users_dir=users_dir)

    def count(self, name: str) -> int:
        return self.instances.get(name, 1)

    def instance(self, name: str, index: int = 0) -> ServiceProcess:
        return self.services[label_of(name, index)]

    def instances_of(self, name: str) -> list[ServiceProcess]:
        """The started instances of a service, by index."""
        return sorted((s for s in self.services.values() if s.name == name), key=lambda s: s.index)

    def _resolve(self, name: str, index: int | None) -> list[ServiceProcess]:
        if name in self.services and index is None and name not in SERVICES:
            return [self.services[name]]  # a label such as "learner-1"
        if index is not None:
            svc = self.services.get(label_of(name, index))
            return [svc] if svc else []
        return self.instances_of(name)

    def start(self, name: str, extra_env: Mapping[str, str] | None = None, index: int = 0) -> ServiceProcess:
        """Start (or restart) one instance; it keeps its ports, instance id, data folder and log."""
        if index >= self.count(name):
            self.instances[name] = index + 1
        label = label_of(name, index)
        old = self.services.get(label)
        if old is not None and old.alive():
            raise RuntimeError(f"{label} is still running (pid {old.pid}); stop it first")
        metrics_port = old.metrics_port if old else free_port()
        http_port = old.http_port if old else free_port()
        env = {
            **os.environ,
            **self.env,
            "STREAMML_METRICS_PORT": str(metrics_port),
            "STREAMML_HTTP_PORT": str(http_port),
        }
        several = self.count(name) > 1
        instance_id = env.get("STREAMML_INSTANCE_ID", "0") if not several else str(index)
        if several:
            # Replicas share every setting but their identity and their local disk, as pods do.
            env["STREAMML_INSTANCE_ID"] = instance_id
            base = Path(env.get("STREAMML_DATA_DIR") or DEFAULT_DATA_DIR)
            env["STREAMML_DATA_DIR"] = str(base / f"instance-{index}")
        if self.users_dir is not None:
            principal_for(name, env, self.users_dir)
        env.update(extra_env or {})
        secrets_for_role(name, env)
        instance_id = env.get("STREAMML_INSTANCE_ID", instance_id)
        log_path = self.log_dir / (f"{name}-{index}.log" if several else f"{name}.log")
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"],
                cwd=REPO_ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        svc = ServiceProcess(
            name, proc, log_path, metrics_port, http_port, dict(extra_env or {}), index, instance_id,
            exits=old.exits if old else [],
        )  # fmt: skip
        self.services[label] = svc
        return svc

    def start_all(self, names: Sequence[str] = SERVICES, timeout_s: float = 60.0) -> None:
        """Every instance of each named service, then wait until all are ready."""
        for name in names:
            for index in range(self.count(name)):
                self.start(name, index=index)
        for name in names:
            self.wait_ready(name, timeout_s)

    def wait_ready(self, name: str, timeout_s: float = 60.0, index: int | None = None) -> None:
        """Until the instance's metrics endpoint answers (served once bootstrap is done); all by default."""
        deadline = time.monotonic() + timeout_s
        for svc in self._resolve(name, index):
            while True:
                if not svc.alive():
                    code = svc.proc.returncode if svc.proc else "?"
                    raise RuntimeError(f"{svc.label} exited with {code}: {self.tail(svc.label)}")
                if svc.healthy():
                    break
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{svc.label} not ready after {timeout_s} s: {self.tail(svc.label)}")
                time.sleep(0.2)

    def _stop_one(self, svc: ServiceProcess, sig: signal.Signals, timeout_s: float) -> int | None:
        if svc.proc is None:
            return None
        if svc.alive():
            started = time.monotonic()
            svc.proc.send_signal(sig)
            self._await_exit(svc, sig, started, started + timeout_s)
        else:
            svc.record_exit(None, 0.0)  # it had exited by itself
        return svc.proc.returncode

    @staticmethod
    def _await_exit(svc: ServiceProcess, sig: signal.Signals, started: float, deadline: float) -> None:
        """Wait for a signalled instance until `deadline` (then kill it) and record how it ended."""
        assert svc.proc is not None
        try:
            svc.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s ignored %s for %.0f s; killing it", svc.label, sig.name, deadline - started)
            svc.proc.kill()
            svc.proc.wait(10)
        svc.record_exit(sig.name, time.monotonic() - started)

    def stop(
        self,
        name: str,
        sig: signal.Signals = signal.SIGTERM,
        timeout_s: float = 20.0,
        index: int | None = None,
    ) -> int | None:
        """Stop a service with `sig` (SIGKILL = crash): one instance, or all when index is None.

        Returns the exit code (of instance 0 when stopping them all)."""
        codes = [self._stop_one(svc, sig, timeout_s) for svc in self._resolve(name, index)]
        return codes[0] if codes else None

    def kill(self, name: str, index: int = 0) -> int | None:
        """SIGKILL one instance: a crash, nothing flushed or committed."""
        return self.stop(name, signal.SIGKILL, index=index)

    def terminate(self, name: str, index: int = 0, timeout_s: float = 20.0) -> int | None:
        """SIGTERM one instance: a clean stop; returns its exit code (0 is clean)."""
        return self.stop(name, signal.SIGTERM, timeout_s, index=index)

    def restart(
        self,
        name: str,
        index: int = 0,
        sig: signal.Signals = signal.SIGKILL,
        wait_ready: bool = False,
        timeout_s: float = 60.0,
    ) -> int | None:
        """Stop one instance with `sig`, start it again (same identity), return the old run's exit code."""
        code = self.stop(name, sig, index=index)
        self.start(name, index=index)
        if wait_ready:
            self.wait_ready(name, timeout_s, index=index)
        return code

    def exit_codes(self) -> dict[str, list[Exit]]:
        """Every finished run of every instance, by label (a live instance that died unasked included)."""
        for svc in self.services.values():
            if svc.proc is not None and svc.proc.poll() is not None:
                svc.record_exit(None, 0.0)
        return {label: list(svc.exits) for label, svc in self.services.items()}

    def dead(self) -> list[str]:
        """Labels of instances that are not running (crashed, or stopped and not restarted)."""
        return [label for label, svc in self.services.items() if not svc.alive()]

    def stop_all(self, timeout_s: float = 20.0) -> None:
        """SIGTERM every instance at once, then wait for each (one after another took 1-2 s per instance);
        an instance still running at the deadline is killed."""
        running = [svc for svc in self.services.values() if svc.proc is not None]
        started = time.monotonic()
        signalled = []
        for svc in running:
            if svc.alive():
                svc.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                signalled.append(svc)
            else:
                svc.record_exit(None, 0.0)  # it had exited by itself
        for svc in signalled:
            self._await_exit(svc, signal.SIGTERM, started, started + timeout_s)

    def tail(self, name: str, lines: int = 30, index: int | None = None) -> str:
        """Last log lines of one instance: a label, or a service name (instance 0 unless `index`)."""
        svc = self.services.get(name) if index is None else self.services.get(label_of(name, index))
        if svc is None:
            return ""
        path = svc.log_path
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def save(self, path: Path) -> None:
        state = {
            label: {
                "service": s.name,
                "instance": s.index,
                "instance_id": s.instance_id,
                "pid": s.pid,
                "metrics_port": s.metrics_port,
                "http_port": s.http_port,
                "log": str(s.log_path),
            }
            for label, s in self.services.items()
        }
        public_env = {k: v for k, v in self.env.items() if not k.endswith(("_KEY", "_PASSWORD", "_TOKEN"))}
        path.write_text(json.dumps({"env": public_env, "services": state}, indent=2))  # never secrets
        path.chmod(0o600)


def stop_saved(path: Path, timeout_s: float = 20.0) -> list[str]:
    """Stop the processes a saved stack started (used by `make down`), all instances at once."""
    if not path.exists():
        return []
    state = json.loads(path.read_text())
    signalled: dict[str, int] = {}
    for name, info in state["services"].items():
        pid = info.get("pid")
        if not pid:
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        signalled[name] = pid
    deadline = time.monotonic() + timeout_s
    waiting = dict(signalled)
    while waiting and time.monotonic() < deadline:
        for name, pid in list(waiting.items()):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                del waiting[name]
        time.sleep(0.2)
    for pid in waiting.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    path.unlink()
    return list(signalled)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m streamml.stack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the services in the background")
    up.add_argument("--state", type=Path, default=REPO_ROOT / ".local" / "stack.json")
    up.add_argument("--logs", type=Path, default=REPO_ROOT / ".local" / "logs")
    up.add_argument(
        "--instances",
        default="1",
        help="instances per service: N for all, or service=N[,service=N] (default 1)",
    )
    up.add_argument(
        "--users-dir",
        type=Path,
        default=None,
        help="secured cluster: each service connects as its own user, password from <dir>/<user>.password",
    )
    down = sub.add_parser("down", help="stop the services started by `up`")
    down.add_argument("--state", type=Path, default=REPO_ROOT / ".local" / "stack.json")
    args = parser.parse_args(argv)
    if args.command == "up":
        try:
            counts = parse_instances(args.instances)
        except ValueError as exc:
            parser.error(str(exc))
        if args.state.exists():
            stop_saved(args.state)
        env = {k: v for k, v in os.environ.items() if k.startswith("STREAMML_")}
        stack = Stack.create(env, args.logs, counts, args.users_dir)
        try:
            stack.start_all()
        finally:
            stack.save(args.state)  # also when one failed to start: `make down` stops the others
        for label, svc in stack.services.items():
            url = f"http://127.0.0.1:{svc.metrics_port}/metrics"
            print(f"{label:12s} pid {svc.pid}  metrics {url}  log {svc.log_path}")
        for svc in stack.instances_of("predictor"):
            print(f"predict:     POST http://127.0.0.1:{svc.http_port}/predict  ({svc.label})")
    else:
        stopped = stop_saved(args.state)
        print("stopped: " + (", ".join(stopped) or "nothing was running"))


if __name__ == "__main__":
    main()
