"""`melfusion generate` as a user runs it: a WAV on success; a clear message, exit 2 and no file on bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from melfusion.cli import EXIT_INPUT, main


@pytest.fixture(scope="module")
def png(tmp_path_factory, image) -> Path:
    path = tmp_path_factory.mktemp("images") / "photo.png"
    image.save(path)
    return path


def test_generate_with_the_embedded_default_bundle_writes_a_wav(tmp_path, png):
    out = tmp_path / "clip.wav"
    env = {**os.environ, "MELFUSION_HOME": str(tmp_path / "home")}
    args = ["generate", "--image", str(png), "--caption", "calm piano", "--out", str(out), "--seconds", "1.5"]
    result = subprocess.run(
        [sys.executable, "-m", "melfusion", *args, "--steps", "3", "--seed", "5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert str(out.resolve()) in result.stdout and "seed 5" in result.stdout
    info = sf.info(out)
    assert (info.samplerate, info.channels, info.frames) == (16000, 1, 24000)
    assert (tmp_path / "home" / "tiny-bundle-v1" / "manifest.json").is_file()


def test_without_an_image_the_clip_follows_the_caption_only(tmp_path, png, tiny_bundle, capsys):
    common = ["--caption", "calm piano", "--bundle", str(tiny_bundle), "--steps", "2", "--seconds", "0.5", "--seed", "3"]
    clips = {}
    for name, extra in {"caption": [], "strength 0": ["--image", str(png), "--image-strength", "0"],
                        "image": ["--image", str(png)]}.items():  # fmt: skip
        out = tmp_path / f"{name}.wav"
        assert main(["generate", *common, *extra, "--out", str(out)]) == 0
        assert f"wrote {out.resolve()}" in capsys.readouterr().out
        clips[name], rate = sf.read(out, dtype="int16")
    assert rate == 16000 and len(clips["caption"]) == 8000
    assert np.array_equal(clips["caption"], clips["strength 0"])  # α = 0 is plain text-to-music
    assert not np.array_equal(clips["caption"], clips["image"])


def test_format_loudness_and_loop(tmp_path, tiny_bundle, capsys):
    """The extension picks the format; the clip lands at the asked loudness; a loop is whole frames long."""
    from melfusion.mastering import integrated_loudness

    common = ["--caption", "calm piano", "--bundle", str(tiny_bundle), "--steps", "2", "--seed", "3"]
    mp3 = tmp_path / "clip.mp3"
    assert main(["generate", *common, "--seconds", "2", "--loudness-lufs", "-20", "--out", str(mp3)]) == 0
    assert "wrote" in capsys.readouterr().out and sf.info(mp3).format == "MP3"
    decoded, rate = sf.read(mp3)
    assert rate == 32000 and abs(integrated_loudness(decoded, rate) - (-20)) <= 1.0  # MP3 is written at 32 kHz
    loop = tmp_path / "loop.flac"
    assert main(["generate", *common, "--seconds", "1.01", "--loop", "--loudness-lufs", "off", "--out", str(loop)]) == 0
    assert (sf.info(loop).format, sf.info(loop).frames) == ("FLAC", 16000)  # 1.01 s -> 25 frames of 40 ms


def _bad_image_files(directory: Path, png: Path) -> dict[str, Path]:
    text = directory / "notes.png"
    text.write_text("this is not an image")
    truncated = directory / "truncated.png"
    truncated.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    return {"text": text, "truncated": truncated, "missing": directory / "absent.jpg"}


@pytest.mark.parametrize(
    "case, overrides, field",
    [
        ("not an image", {"--image": "text"}, "image"),
        ("truncated image", {"--image": "truncated"}, "image"),
        ("missing image", {"--image": "missing"}, "image"),
        ("empty caption", {"--caption": "  "}, "caption"),
        ("zero seconds", {"--seconds": "0"}, "seconds"),
        ("too long", {"--seconds": "31"}, "seconds"),
        ("zero steps", {"--steps": "0"}, "steps"),
        ("negative strength", {"--image-strength": "-0.1"}, "image_strength"),
        ("more image passes than steps", {"--image-steps": "3"}, "image_steps"),
        ("loudness out of range", {"--loudness-lufs": "0"}, "loudness_lufs"),
        ("format other than the file's", {"--format": "mp3"}, "out"),
        ("unknown extension", {"--out": "clip.aiff"}, "out"),
    ],
)
def test_bad_input_fails_clearly_and_leaves_no_file(tmp_path, png, tiny_bundle, capsys, case, overrides, field):
    images = _bad_image_files(tmp_path, png)
    out = tmp_path / "out" / "clip.wav"
    options = {"--image": str(png), "--caption": "calm piano", "--out": str(out), "--bundle": str(tiny_bundle)}
    options["--steps"] = "2"
    for flag, value in overrides.items():
        options[flag] = str(images[value]) if flag == "--image" else value
    code = main(["generate", *[item for pair in options.items() for item in pair]])
    message = capsys.readouterr().err
    assert code == EXIT_INPUT, case
    assert message.startswith(f"melfusion: error: {field}:"), message
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_unknown_bundle_is_a_bundle_error_not_a_traceback(tmp_path, png, capsys):
    code = main(["generate", "--image", str(png), "--caption", "x", "--out", str(tmp_path / "a.wav"), "--bundle", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 3 and "not a MelFusion bundle" in err and "Traceback" not in err


def test_bad_flags_answer_in_one_line_before_torch_is_imported(tmp_path, tiny_bundle):
    """Each bad invocation exits 2 with one line; torch, diffusers and transformers are never imported (the
    embedded bundle's limits are read from its JSON once it exists: after the first use)."""
    cases = [["--out", "clip.aiff"], ["--device", "foo"], ["--dtype", "float16"], ["--threads", "0"],
             ["--steps", "0"], ["--image", str(tmp_path / "absent.png")]]  # fmt: skip
    code = f"""
import contextlib, io, sys
from melfusion.cli import main
for extra in {cases!r}:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["generate", "--caption", "calm", "--out", "{tmp_path / 'clip.wav'}", *extra])
    print(code, err.getvalue().strip().count(chr(10)), err.getvalue().strip())
print("imported:", [name for name in ("torch", "diffusers", "transformers") if name in sys.modules])
"""
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "tiny-bundle-v1").symlink_to(tiny_bundle)
    env = {**os.environ, "MELFUSION_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    lines = result.stdout.splitlines()
    assert lines[-1] == "imported: []", result.stdout + result.stderr
    fields = ["out", "device", "dtype", "threads", "steps", "image"]
    for line, field in zip(lines[:-1], fields, strict=True):
        assert line.startswith(f"2 0 melfusion: error: {field}:"), line  # exit 2, a single line naming the field
    assert not (tmp_path / "clip.wav").exists()


@pytest.mark.parametrize("device", ["cuda:99", "xpu:7"])
def test_a_device_this_machine_lacks_is_one_line(tmp_path, tiny_bundle, capsys, device):
    out = tmp_path / "clip.wav"
    args = ["generate", "--caption", "x", "--out", str(out), "--bundle", str(tiny_bundle), "--device", device]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("melfusion: error: device:") and err.count("\n") == 1 and not out.exists()
