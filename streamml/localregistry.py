"""A local Schema Registry for development and tests: Apicurio Registry from Maven Central, no Docker.

`make registry-up` fetches `io.apicurio:apicurio-registry-app:<version>:zip:all` once with Maven (into
`.local/apicurio-<version>`), and starts it on 127.0.0.1 with in-memory storage and BACKWARD as the global
compatibility rule. Clients use its Confluent-compatible API: `STREAMML_SCHEMA_REGISTRY_URL` is
`http://127.0.0.1:<port>/apis/ccompat/v7`. State (pid, port, log) lives in `.local/registry`, so
`make registry-down` stops the process this started, by its pid.

Usage: python -m streamml.localregistry {fetch,up,down,status,url} [--home DIR] [--port N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from streamml.errors import StreamMLError
from streamml.localkafka import HOST, die_with_parent_prefix, free_port_block, java_binary, pid_alive

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
VERSION = "2.6.13.Final"
ARTIFACT = f"io.apicurio:apicurio-registry-app:{VERSION}:zip:all"
RUNNER = f"apicurio-registry-app-{VERSION}-runner.jar"
CCOMPAT_PATH = "/apis/ccompat/v7"
STATE_FILE = "registry.json"
LOG_FILE = "registry.log"
HEAP_MB = 256


class LocalRegistryError(StreamMLError):
    pass


def default_home() -> Path:
    return Path(os.environ.get("STREAMML_REGISTRY_HOME", REPO_ROOT / ".local" / "registry"))


def default_dist_dir() -> Path:
    return Path(os.environ.get("STREAMML_REGISTRY_DIST", REPO_ROOT / ".local" / f"apicurio-{VERSION}"))


def fetch(dist_dir: Path | None = None) -> Path:
    """The unpacked registry distribution, fetched with Maven and unpacked once (later calls return it)."""
    dist = (dist_dir or default_dist_dir()).resolve()
    if (dist / RUNNER).is_file() and (dist / "lib").is_dir():
        return dist
    mvn = shutil.which("mvn")
    if mvn is None:
        raise LocalRegistryError(f"cannot fetch Apicurio Registry {VERSION}: Maven (mvn) is not installed")
    staging = dist.with_name(dist.name + ".partial")  # renamed when complete: never half a distribution
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    cmd = [mvn, "-q", "-B", "dependency:copy", f"-Dartifact={ARTIFACT}", f"-DoutputDirectory={staging}"]
    log.info("Fetching Apicurio Registry %s with Maven into %s", VERSION, dist)
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    except subprocess.TimeoutExpired as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise LocalRegistryError(f"fetching Apicurio Registry {VERSION} took over 15 min") from exc
    archives = list(staging.glob("*.zip"))
    if result.returncode != 0 or len(archives) != 1:
        shutil.rmtree(staging, ignore_errors=True)
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise LocalRegistryError(
            f"could not fetch {ARTIFACT} with Maven (exit code {result.returncode}); "
            f"check access to Maven Central.\n{tail}"
        )
    with zipfile.ZipFile(archives[0]) as archive:
        for member in archive.namelist():  # no absolute paths or '..' out of the folder
            target = (staging / member).resolve()
            if not target.is_relative_to(staging.resolve()):
                raise LocalRegistryError(f"{archives[0].name}: unsafe path {member!r} in the archive")
        archive.extractall(staging)
    archives[0].unlink()
    if not (staging / RUNNER).is_file():
        shutil.rmtree(staging, ignore_errors=True)
        raise LocalRegistryError(f"{ARTIFACT} did not hold {RUNNER}")
    shutil.rmtree(dist, ignore_errors=True)
    staging.rename(dist)
    return dist


@dataclass(frozen=True)
class RegistryState:
    pid: int
    port: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{CCOMPAT_PATH}"


class LocalRegistry:
    """One Apicurio Registry process on 127.0.0.1 (in-memory storage: schemas live as long as it runs).

    With die_with_parent the process gets SIGTERM when the process that started it dies (test fixtures)."""

    def __init__(
        self, home: Path, port: int | None = None, dist_dir: Path | None = None, die_with_parent: bool = False
    ) -> None:
        self.home = home.resolve()
        self.port = port
        self.dist_dir = dist_dir
        self.die_with_parent = die_with_parent
        self._child: subprocess.Popen[bytes] | None = None

    @property
    def state(self) -> RegistryState | None:
        path = self.home / STATE_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return RegistryState(int(data["pid"]), int(data["port"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LocalRegistryError(f"{path} is damaged ({exc}); delete it and start again") from exc

    @property
    def url(self) -> str:
        state = self.state
        if state is None:
            raise LocalRegistryError(f"no local registry in {self.home} (run `make registry-up`)")
        return state.url

    def running(self) -> bool:
        state = self.state
        return state is not None and pid_alive(state.pid) and _answers(state.url)

    def start(self, timeout_s: float = 120.0) -> str:
        """Start the registry (or find it running) and return its Confluent-compatible API URL."""
        state = self.state
        if state is not None and pid_alive(state.pid):
            if _wait_ready(state.url, timeout_s, state.pid):
                return state.url
            raise LocalRegistryError(f"the registry (pid {state.pid}) does not answer at {state.url}")
        dist = fetch(self.dist_dir)
        self.home.mkdir(parents=True, exist_ok=True)
        port = self.port or free_port_block(1)
        cmd = [
            java_binary(),
            f"-Xmx{HEAP_MB}m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",  # starts faster; the registry is not a hot path in tests
            f"-Dquarkus.http.host={HOST}",
            f"-Dquarkus.http.port={port}",
            "-Dregistry.rules.global.compatibility=BACKWARD",
            "-Dquarkus.log.level=WARN",
            "-Dquarkus.analytics.disabled=true",
            "-jar",
            str(dist / RUNNER),
        ]
        if self.die_with_parent:
            cmd = [*die_with_parent_prefix(), *cmd]
        with open(self.home / LOG_FILE, "ab") as out:
            self._child = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=dist,
                start_new_session=not self.die_with_parent,
            )
        state = RegistryState(self._child.pid, port)
        (self.home / STATE_FILE).write_text(json.dumps({"pid": state.pid, "port": state.port}))
        if not _wait_ready(state.url, timeout_s, state.pid):
            self.stop()
            raise LocalRegistryError(
                f"the registry did not answer at {state.url} within {timeout_s:.0f} s; "
                f"log: {self.home / LOG_FILE}\n{self.log_tail()}"
            )
        return state.url

    def stop(self, timeout_s: float = 20.0) -> bool:
        """Stop the registry this home started, by its pid; True if one was running."""
        state = self.state
        if state is None:
            return False
        alive = pid_alive(state.pid)
        if alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(state.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while pid_alive(state.pid) and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.1)
            if pid_alive(state.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(state.pid, signal.SIGKILL)
        self._reap()
        (self.home / STATE_FILE).unlink(missing_ok=True)
        return alive

    def _reap(self) -> None:
        if self._child is not None and self._child.poll() is not None:
            self._child = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.home / LOG_FILE).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/subjects", timeout=2) as response:  # (our own URL)
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _wait_ready(url: str, timeout_s: float, pid: int) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _answers(url):
            return True
        if not pid_alive(pid):
            return False
        time.sleep(0.2)
    return False


def main(argv: Sequence[str] | None = None) -> int:
    description = __doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m streamml.localregistry", description=description)
    parser.add_argument("command", choices=["fetch", "up", "down", "status", "url"])
    parser.add_argument("--home", type=Path, default=None, help="state folder (default .local/registry)")
    parser.add_argument("--port", type=int, default=None, help="port to listen on (default: a free one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    registry = LocalRegistry(args.home or default_home(), port=args.port)
    try:
        if args.command == "fetch":
            print(fetch())
        elif args.command == "up":
            started = time.monotonic()
            url = registry.start()
            print(f"Schema Registry (Apicurio {VERSION}) ready in {time.monotonic() - started:.1f} s")
            print(f"export STREAMML_SCHEMA_REGISTRY_URL={url}")
        elif args.command == "down":
            print("stopped" if registry.stop() else "no local registry was running")
        elif args.command == "status":
            state = registry.state
            up = registry.running()
            where = f" at {state.url} (pid {state.pid})" if state else ""
            print(f"{'running' if up else 'not running'}{where}")
            return 0 if up else 1
        else:
            print(registry.url)
    except LocalRegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
