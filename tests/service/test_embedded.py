"""The README's one command: `python -m embedded` runs redis, a worker and the API, and writes a WAV; a busy
port is one line; SIGTERM to `--keep-running` stops every process it started."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import soundfile as sf

from embedded.processes import PROJECT_ROOT, free_port, settings_env, wait_until


def test_embedded_default_makes_a_clip_and_cleans_up(tmp_path):
    command = [sys.executable, "-m", "embedded", "--port", "0", "--workdir", str(tmp_path), "--seconds", "1",
               "--steps", "4"]  # fmt: skip
    run = subprocess.run(command, env=settings_env(torch_threads=1), cwd=PROJECT_ROOT, capture_output=True, text=True,
                         timeout=300, check=False)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    wav = re.search(r"^wrote (\S+\.wav) ", run.stdout, re.MULTILINE).group(1)
    waveform, rate = sf.read(wav)
    assert rate == 16000 and len(waveform) == 16000
    assert "succeeded 100%" in run.stdout
    api = re.search(r"to (http://127\.0\.0\.1:\d+)/jobs/", run.stdout).group(1)
    with pytest.raises(httpx.ConnectError):  # the API (and the rest) stopped with the command
        httpx.get(f"{api}/livez")


def test_a_busy_port_is_refused_in_one_line_before_anything_starts(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", free_port()))
        server.listen()
        port = server.getsockname()[1]
        started = time.monotonic()
        command = [sys.executable, "-m", "embedded", "--port", str(port), "--workdir", str(tmp_path)]
        run = subprocess.run(command, env=settings_env(), cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and f"port {port} is in use" in run.stderr, run.stderr
    assert time.monotonic() - started < 10 and not any(tmp_path.iterdir())  # nothing was started


def children_of(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def is_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_stops_a_kept_running_stack(tmp_path):
    command = [sys.executable, "-m", "embedded", "--keep-running", "--port", "0", "--workdir", str(tmp_path),
               "--seconds", "0.5", "--steps", "2"]  # fmt: skip
    embedded = subprocess.Popen(command, env=settings_env(torch_threads=1), cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        output = []
        for line in embedded.stdout:
            output.append(line)
            if line.startswith("demo page at"):
                break
        children = children_of(embedded.pid)
        assert len(children) == 3, "".join(output)  # redis-server, the worker, the API
        embedded.send_signal(signal.SIGTERM)
        assert embedded.wait(timeout=90) == 128 + signal.SIGTERM
        wait_until(lambda: not any(map(is_alive, children)), timeout=30, what="every child stopped")
    finally:
        if embedded.poll() is None:
            embedded.kill()
