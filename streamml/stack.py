"""Runs the StreamML services as background processes (for `make demo`, the e2e tests and `make bench`).

Each service is a separate OS process (`python -m services.<name>`), as in production; logs go to one
folder, and a state file records what was started so `make down` stops exactly that.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SERVICES = ("features", "learner", "predictor", "monitor", "trainer", "controller")
HEALTH_PATHS = {"predictor": "/healthz"}  # services with an HTTP API are ready when it answers
REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServiceProcess:
    name: str
    proc: subprocess.Popen[bytes] | None
    log_path: Path
    metrics_port: int
    http_port: int
    env: dict[str, str]

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
                with urllib.request.urlopen(url, timeout=timeout_s):  # loopback only
                    pass
        except OSError:
            return False
        return True

    def metrics_text(self, timeout_s: float = 2.0) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # loopback only
            return str(resp.read().decode())


@dataclass
class Stack:
    """The services of one StreamML deployment, sharing one environment (broker, prefix, key)."""

    env: dict[str, str]
    log_dir: Path
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    @classmethod
    def create(cls, env: Mapping[str, str], log_dir: Path) -> Stack:
        log_dir.mkdir(parents=True, exist_ok=True)
        return cls(env=dict(env), log_dir=log_dir)

    def start(self, name: str, extra_env: Mapping[str, str] | None = None) -> ServiceProcess:
        """Start (or restart) one service; it keeps its ports across restarts."""
        old = self.services.get(name)
        metrics_port = old.metrics_port if old else free_port()
        http_port = old.http_port if old else free_port()
        env = {
            **os.environ,
            **self.env,
            "STREAMML_METRICS_PORT": str(metrics_port),
            "STREAMML_HTTP_PORT": str(http_port),
            **(extra_env or {}),
        }
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"],
                cwd=REPO_ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        svc = ServiceProcess(name, proc, log_path, metrics_port, http_port, dict(extra_env or {}))
        self.services[name] = svc
        return svc

    def start_all(self, names: Sequence[str] = SERVICES) -> None:
        for name in names:
            self.start(name)
        for name in names:
            self.wait_ready(name)

    def wait_ready(self, name: str, timeout_s: float = 60.0) -> None:
        """Until the service's metrics endpoint answers (it is served once bootstrap is done)."""
        svc = self.services[name]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not svc.alive():
                raise RuntimeError(
                    f"{name} exited with {svc.proc.returncode if svc.proc else '?'}: {self.tail(name)}"
                )
            if svc.healthy():
                return
            time.sleep(0.2)
        raise TimeoutError(f"{name} not ready after {timeout_s} s: {self.tail(name)}")

    def stop(self, name: str, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 20.0) -> int | None:
        """Stop one service with `sig` (SIGKILL = crash); returns its exit code."""
        svc = self.services.get(name)
        if svc is None or svc.proc is None:
            return None
        if svc.alive():
            svc.proc.send_signal(sig)
            try:
                svc.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                svc.proc.kill()
                svc.proc.wait(10)
        return svc.proc.returncode

    def stop_all(self) -> None:
        for name in list(self.services):
            self.stop(name)

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.services[name].log_path
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def save(self, path: Path) -> None:
        state = {
            n: {
                "pid": s.pid,
                "metrics_port": s.metrics_port,
                "http_port": s.http_port,
                "log": str(s.log_path),
            }
            for n, s in self.services.items()
        }
        public_env = {k: v for k, v in self.env.items() if not k.endswith(("_KEY", "_PASSWORD"))}
        path.write_text(json.dumps({"env": public_env, "services": state}, indent=2))  # never secrets
        path.chmod(0o600)


def stop_saved(path: Path, timeout_s: float = 20.0) -> list[str]:
    """Stop the processes a saved stack started (used by `make down`)."""
    if not path.exists():
        return []
    state = json.loads(path.read_text())
    stopped = []
    for name, info in state["services"].items():
        pid = info.get("pid")
        if not pid:
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            os.kill(pid, signal.SIGKILL)
        stopped.append(name)
    path.unlink()
    return stopped


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m streamml.stack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the services in the background")
    up.add_argument("--state", type=Path, default=REPO_ROOT / ".local" / "stack.json")
    up.add_argument("--logs", type=Path, default=REPO_ROOT / ".local" / "logs")
    down = sub.add_parser("down", help="stop the services started by `up`")
    down.add_argument("--state", type=Path, default=REPO_ROOT / ".local" / "stack.json")
    args = parser.parse_args(argv)
    if args.command == "up":
        if args.state.exists():
            stop_saved(args.state)
        env = {k: v for k, v in os.environ.items() if k.startswith("STREAMML_")}
        stack = Stack.create(env, args.logs)
        stack.start_all()
        stack.save(args.state)
        for name, svc in stack.services.items():
            url = f"http://127.0.0.1:{svc.metrics_port}/metrics"
            print(f"{name:10s} pid {svc.pid}  metrics {url}  log {svc.log_path}")
        print(f"predict:   POST http://127.0.0.1:{stack.services['predictor'].http_port}/predict")
    else:
        stopped = stop_saved(args.state)
        print("stopped: " + (", ".join(stopped) or "nothing was running"))


if __name__ == "__main__":
    main()
