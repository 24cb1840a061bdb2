"""The model bundle: a diffusers pipeline folder plus `manifest.json` (classes, dtypes, sha256 of every file).

`save_bundle` writes a bundle atomically, `verify_bundle` checks one without loading weights, and
`load_pipeline` turns problems into a BundleError that names the missing or broken piece instead of a
stack trace from inside transformers. The manifest itself and the verification stamp that spares a worker
from hashing the bundle on every start live in `melfusion.manifest` (torch-free).
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
import logging
import os
from pathlib import Path

import torch

from .errors import BundleError
from .files import replacing
from .limits import STUDENT_SCHEDULER_CLASS
from .manifest import (
    BUNDLE_VERSION,
    FORMAT,
    MANIFEST,
    STAMP,
    default_tiny_bundle_dir,
    file_sha256,
    read_manifest,
    stamp_is_current,
    write_stamp,
)
from .pipeline import MelFusionPipeline

log = logging.getLogger(__name__)
WEIGHT_SUFFIXES = (".safetensors", ".bin")
CPU_ALIGNMENT = 64  # bytes: what torch's CPU allocator guarantees


def component_names() -> list[str]:
    """The pipeline's components, from its constructor (the arguments without defaults)."""
    params = inspect.signature(MelFusionPipeline.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.default is inspect.Parameter.empty]


def _component_dtype(module) -> str | None:
    parameter = next(module.parameters(), None) if isinstance(module, torch.nn.Module) else None
    return None if parameter is None else str(parameter.dtype).removeprefix("torch.")


def write_manifest(pipe: MelFusionPipeline, directory: Path, *, source: str, origin: dict | None = None) -> dict:
    unlisted = {directory / MANIFEST, directory / STAMP}
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p not in unlisted)
    components = {}
    for name in component_names():
        module = getattr(pipe, name)
        components[name] = {
            "library": type(module).__module__.split(".")[0],
            "class": type(module).__name__,
            "dtype": _component_dtype(module),
            "files": [str(p.relative_to(directory)) for p in files if p.relative_to(directory).parts[0] == name],
        }
    manifest = {
        "format": FORMAT,
        "bundle_version": BUNDLE_VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "source": source,
        **({"origin": origin} if origin else {}),  # where the weights came from (e.g. hub repos @ commit)
        "components": components,
        "files": {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def save_bundle(
    pipe: MelFusionPipeline, directory: str | os.PathLike, *, source: str, origin: dict | None = None
) -> Path:
    """`save_pretrained` + manifest into a temporary sibling, then swapped in: never half-written."""
    target = Path(directory).resolve()
    with replacing(target, folder=True) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        write_manifest(pipe, staging, source=source, origin=origin)
    return target


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path.parent.name}: {path.name} missing") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: unreadable ({exc})") from None


def check_compatibility(directory: Path) -> None:
    """Configs that must agree across components for the synapse and the audio path to work."""
    try:
        _check_configs_agree(directory)
    except KeyError as exc:  # a hand-edited or foreign config lacking a setting the pipeline needs
        raise BundleError(f"{directory}: a component config lacks {exc.args[0]!r}") from None


def _check_configs_agree(directory: Path) -> None:
    config = lambda name, file="config.json": _read_json(directory / name / file)
    image_unet, music_unet = config("image_unet"), config("music_unet")
    synapse = config("synapse")
    pairs = [
        ("image_unet.block_out_channels", image_unet["block_out_channels"], "music_unet.block_out_channels", music_unet["block_out_channels"]),
        ("image_unet.layers_per_block", image_unet["layers_per_block"], "music_unet.layers_per_block", music_unet["layers_per_block"]),
        ("image_vae.latent_channels", config("image_vae")["latent_channels"], "image_unet.in_channels", image_unet["in_channels"]),
        ("mel_vae.latent_channels", config("mel_vae")["latent_channels"], "music_unet.in_channels", music_unet["in_channels"]),
        ("text_encoder.d_model", config("text_encoder")["d_model"], "music_unet.cross_attention_dim", music_unet["cross_attention_dim"]),
        ("image_text_encoder.hidden_size", config("image_text_encoder")["hidden_size"], "image_unet.cross_attention_dim", image_unet["cross_attention_dim"]),
        ("image_scheduler.num_train_timesteps", config("image_scheduler", "scheduler_config.json")["num_train_timesteps"],
         "scheduler.num_train_timesteps", config("scheduler", "scheduler_config.json")["num_train_timesteps"]),
    ]
    for left, a, right, b in pairs:
        if a != b:
            raise BundleError(f"{directory}: mismatched components: {left}={a} but {right}={b}")
    blocks = {f"up_blocks.{i}" for i in range(len(music_unet["up_block_types"]))}
    blocks |= {f"down_blocks.{i}" for i in range(len(music_unet["down_block_types"]))}
    unknown = set(synapse["blocks"]) - blocks
    if unknown:
        raise BundleError(f"{directory}: synapse blocks {sorted(unknown)} do not exist in music_unet")
    _check_student(directory, _read_json(directory / "model_index.json"), music_unet, read_manifest(directory))


def _check_student(directory: Path, index: dict, music_unet: dict, manifest: dict) -> None:
    """A student (LCMScheduler) needs a music UNet with a guidance input, and only a student has one; its
    default steps must be within its bounds, and its manifest's `origin` must name the teacher it was
    distilled from and how (what `melfusion distill` writes), so a student is never served unexplained."""
    student = index["scheduler"][1] == STUDENT_SCHEDULER_CLASS
    guidance_input = music_unet.get("time_cond_proj_dim") is not None
    if student != guidance_input:
        raise BundleError(
            f"{directory}: scheduler {index['scheduler'][1]} with a music_unet "
            f"{'with' if guidance_input else 'without'} a guidance input (time_cond_proj_dim): a distilled student "
            f"pairs {STUDENT_SCHEDULER_CLASS} with that input, a teacher neither"
        )
    if not 1 <= index["default_steps"] <= index["max_steps"]:
        raise BundleError(f"{directory}: default_steps {index['default_steps']} outside [1, max_steps {index['max_steps']}]")
    if student:
        origin = manifest.get("origin") or {}
        teacher, settings = origin.get("teacher"), origin.get("distillation")
        if not isinstance(teacher, dict) or not teacher.get("bundle") or not isinstance(settings, dict):
            raise BundleError(f"{directory}: a distilled student's manifest must name its teacher and the distillation "
                              "settings (origin.teacher.bundle, origin.distillation)")


def verify_bundle(directory: str | os.PathLike, *, hashes: bool = True, trust_stamp: bool = False) -> dict:
    """Check structure, every listed file (size, and sha256 unless hashes=False) and cross-component configs.

    A check that hashed every file records the stamp (`melfusion.manifest`) where the folder is writable;
    with `trust_stamp`, a current stamp stands in for the hashes. Returns the manifest; raises BundleError
    naming the first missing, corrupt or mismatched piece.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    index = _read_json(directory / "model_index.json")
    for name in component_names():
        if name not in index or name not in manifest["components"]:
            raise BundleError(f"{directory}: component {name!r} missing from model_index.json/manifest")
        if not (directory / name).is_dir():
            raise BundleError(f"{directory}: component folder {name}/ missing")
    stamped = hashes and trust_stamp and stamp_is_current(directory, manifest)
    hashing = hashes and not stamped
    for relative, expected in manifest["files"].items():
        path = directory / relative
        if not path.is_file():
            raise BundleError(f"{directory}: file {relative} missing")
        if path.stat().st_size != expected["bytes"] or (hashing and file_sha256(path) != expected["sha256"]):
            raise BundleError(f"{directory}: file {relative} is corrupt (checksum mismatch)")
    for path in directory.rglob("*"):
        relative = str(path.relative_to(directory))
        if path.suffix in WEIGHT_SUFFIXES and relative not in manifest["files"]:
            raise BundleError(f"{directory}: weight file {relative} is not in the manifest")
    check_compatibility(directory)
    if stamped:
        log.info("%s: files unchanged since their sha256 check (%s); not hashed again", directory, STAMP)
    elif hashing and not write_stamp(directory, manifest):
        log.info("%s: read-only, so no %s recorded: every start hashes it (run `model_store verify` "
                 "where it is writable to record one)", directory, STAMP)  # fmt: skip
    return manifest


def load_pipeline(
    directory: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    verify_hashes: bool = True,
) -> MelFusionPipeline:
    """Verify (a current stamp stands in for the sha256 of every file), then
    `MelFusionPipeline.from_pretrained`, on `device` in `dtype`."""
    verify_bundle(directory, hashes=verify_hashes, trust_stamp=True)
    try:
        pipe = MelFusionPipeline.from_pretrained(str(directory), dtype=dtype)
    except Exception as exc:  # transformers/diffusers raise many types; name the bundle, keep the cause
        raise BundleError(f"{directory}: could not load ({type(exc).__name__}: {exc})") from exc
    pipe.to(device)
    for name in component_names():
        module = getattr(pipe, name)
        if isinstance(module, torch.nn.Module):
            copy_into_aligned_memory(module)
    return pipe


def copy_into_aligned_memory(module: torch.nn.Module) -> None:
    """Give every CPU tensor that sits in a memory-mapped file memory of its own.

    safetensors places tensors at 8-byte offsets of the mapped file; torch's allocator aligns to 64.
    CPU matrix kernels take another path on unaligned data and round differently (about 1e-7 per
    layer), so without the copy a loaded bundle would not reproduce the in-memory pipeline bit for bit.
    The cost is one copy of the weights on CPU (the mapped pages become private memory); on an
    accelerator the tensors were already copied by `.to(device)`.
    """
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type == "cpu" and tensor.data_ptr() % CPU_ALIGNMENT:
            tensor.data = tensor.data.clone()


def create_tiny_bundle(directory: str | os.PathLike, *, seed: int = 0) -> Path:
    """A tiny, randomly initialised, architecturally faithful bundle (same classes, tiny configs)."""
    from .presets import build_components

    return save_bundle(MelFusionPipeline(**build_components("tiny", seed=seed)), directory, source="create-tiny")


def ensure_tiny_bundle(directory: str | os.PathLike | None = None) -> Path:
    """The embedded default: reuse the tiny bundle if it verifies, else (re)build it (about a second)."""
    directory = Path(directory) if directory else default_tiny_bundle_dir()
    try:
        verify_bundle(directory)
        return directory
    except BundleError:
        return create_tiny_bundle(directory)
