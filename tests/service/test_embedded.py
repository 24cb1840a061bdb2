"""The README's one command: `python -m embedded` runs redis, a worker and the API, and writes a WAV."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest
import soundfile as sf

from embedded.processes import PROJECT_ROOT, settings_env


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
