"""Child processes of the local stack: redis-server, `python -m workers`, `python -m service`."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
from redis import Redis
from redis.exceptions import RedisError

T = TypeVar("T")
PROJECT_ROOT = Path(__file__).resolve().parents[1]  # children import this checkout's packages


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on `port` now (bound as uvicorn binds, with SO_REUSEADDR)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def wait_until(predicate: Callable[[], T], *, timeout: float, what: str, process: Child | None = None) -> T:
    """Poll `predicate` until it returns something truthy, and return that; fail early, with the child's
    log, if the child died meanwhile."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if process is not None and process.popen.poll() is not None:
            raise RuntimeError(
                f"{process.name} exited with {process.popen.returncode} before {what}:\n{process.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(0.1)
    return value


@dataclass
class Child:
    name: str
    popen: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def is_running(self) -> bool:
        return self.popen.poll() is None

    def stop(self, *, timeout: float = 30.0) -> int:
        """SIGTERM, wait (a worker finishes its job first), SIGKILL only if it will not go."""
        if self.is_running():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


def spawn(name: str, command: list[str], *, log_dir: Path, env: dict[str, str] | None = None) -> Child:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT, start_new_session=True
        )
    return Child(name, popen, log_path)


def find_redis_server(*, install: bool) -> str:
    """Path of redis-server; with install=True, apt-get it if missing (Debian/Ubuntu, as root)."""
    path = shutil.which("redis-server")
    if path is None and install:
        print("redis-server not found; installing it with apt-get ...", flush=True)
        apt = [] if os.geteuid() == 0 else ["sudo"]
        for step in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "redis-server"]):
            if subprocess.run(apt + step, check=False).returncode != 0:
                break
        path = shutil.which("redis-server")
    if path is None:
        raise SystemExit("redis-server is not installed and could not be installed: apt-get install redis-server")
    return path


def start_redis(*, port: int, data_dir: Path, install: bool = False) -> Child:
    """A private redis-server on loopback: no persistence, `noeviction` so queued jobs are never dropped."""
    data_dir.mkdir(parents=True, exist_ok=True)
    command = [find_redis_server(install=install), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
               "--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction"]  # fmt: skip
    child = spawn("redis", command, log_dir=data_dir)
    client = Redis(port=port)

    def answers() -> bool:
        try:
            return client.ping()
        except RedisError:
            return False

    wait_until(answers, timeout=20, what="redis-server answering", process=child)
    return child


def settings_env(**settings: str | int | Path) -> dict[str, str]:
    """The current environment plus MELFUSION_* variables (keyword `redis_url` -> MELFUSION_REDIS_URL)."""
    env = dict(os.environ)
    env.update({f"MELFUSION_{name.upper()}": str(value) for name, value in settings.items()})
    return env


def start_worker(*, env: dict[str, str], log_dir: Path, name: str = "worker") -> Child:
    return spawn(name, [sys.executable, "-m", "workers"], log_dir=log_dir, env=env)


def start_api(*, env: dict[str, str], log_dir: Path, name: str = "api") -> Child:
    """The API, returned once /livez answers."""
    child = spawn(name, [sys.executable, "-m", "service"], log_dir=log_dir, env=env)
    url = f"http://{env['MELFUSION_HOST']}:{env['MELFUSION_PORT']}/livez"

    def answers() -> bool:
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(answers, timeout=60, what=f"{name} answering {url}", process=child)
    return child
