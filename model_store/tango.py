"""TANGO's released checkpoint -> the bundle's music components, on the stock diffusers/transformers classes.

TANGO (`declare-lab/tango`, `models.py`) publishes `AudioDiffusion.state_dict()` as `pytorch_model_main.bin`:
`unet.*` is a diffusers UNet2DConditionModel, `text_encoder.*` the FLAN-T5 encoder (T5EncoderModel) it
ran with, and `group_in.*`/`group_out.*` exist only when the UNet was initialised from a 4-channel SD UNet
(channel adapters our pipeline does not run). The schedulers hold no weights. `main_config.json` holds
AudioDiffusion's arguments: the UNet config is a path inside TANGO's code repository
(`configs/diffusion_model_config.json`), usually absent from the model repository, so its published values
are kept below; the noise schedule is that of `scheduler_name` (SD 2.1: v-prediction).

Torch, diffusers and transformers load inside the functions that build models, so `pull`'s pre-flight can
read and check `main_config.json` before paying for them.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from melfusion.errors import BundleError

if TYPE_CHECKING:
    import torch
    from diffusers import DDIMScheduler
    from transformers import T5Config

MAIN_CONFIG = "main_config.json"
MAIN_WEIGHTS = "pytorch_model_main.bin"
VAE_CONFIG = "vae_config.json"

# declare-lab/tango configs/diffusion_model_config.json (diffusers 0.10 layout; SD's block layout, 8 channels).
TANGO_UNET_CONFIG: dict = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],  # diffusers' historic name for the number of heads
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,  # FLAN-T5-large d_model
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 8,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
    "upcast_attention": True,
}
# TANGO hard-codes latents of (8, 256, 16) = 10.24 s; its config's sample_size is unused, ours is the default.
MUSIC_LATENT_SIZE = (256, 16)
ADAPTER_PREFIXES = ("group_in.", "group_out.")


class ConversionError(BundleError):
    """A TANGO checkpoint that cannot be mapped onto the bundle's classes; the message says which part."""


@dataclass
class TangoWeights:
    """`pytorch_model_main.bin` split by owner, prefixes removed."""

    unet: dict[str, torch.Tensor] = field(default_factory=dict)
    text_encoder: dict[str, torch.Tensor] = field(default_factory=dict)


def split_state_dict(state: Mapping[str, torch.Tensor]) -> TangoWeights:
    """Route `unet.*` and `text_encoder.*` keys to their models; refuse anything else by name.

    A `module.` prefix (a checkpoint saved from a DistributedDataParallel wrapper) is removed first.
    """
    weights = TangoWeights()
    adapters, unknown = [], []
    for key, tensor in state.items():
        key = key.removeprefix("module.")
        owner, _, name = key.partition(".")
        if owner == "unet":
            weights.unet[name] = tensor
        elif owner == "text_encoder":
            weights.text_encoder[name] = tensor
        elif key.startswith(ADAPTER_PREFIXES):
            adapters.append(key)
        else:
            unknown.append(key)
    if adapters:
        raise ConversionError(
            "checkpoint has group_in/group_out channel adapters (a UNet initialised from a 4-channel SD UNet); "
            "only TANGO's 8-channel UNet layout converts"
        )
    if unknown:
        raise ConversionError(f"checkpoint has keys outside unet.* and text_encoder.*: {_some(unknown)}")
    if not weights.unet:
        raise ConversionError("checkpoint has no unet.* weights")
    return weights


def unet_config(tango_config: Mapping) -> dict:
    """A diffusers-0.10 UNet config (TANGO's) -> arguments of today's UNet2DConditionModel.

    Bookkeeping keys (`_class_name`, `_diffusers_version`) are dropped; a setting today's class does not
    know is an error rather than silently ignored, since it could change the architecture.
    """
    from diffusers import UNet2DConditionModel

    accepted = set(inspect.signature(UNet2DConditionModel.__init__).parameters) - {"self"}
    settings = {k: v for k, v in tango_config.items() if not k.startswith("_")}
    unknown = sorted(set(settings) - accepted)
    if unknown:
        raise ConversionError(f"UNet config has settings diffusers' UNet2DConditionModel lacks: {unknown}")
    return {**settings, "sample_size": MUSIC_LATENT_SIZE}


def load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> torch.nn.Module:
    """`load_state_dict` that names missing, unexpected or mis-shaped keys instead of dumping them all.

    Keys the model ties to another (T5's `encoder.embed_tokens.weight` is `shared.weight`) may be absent.
    """
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False, one line per weight
        lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise ConversionError(f"{what}: weights do not fit the config: {_some(lines or [str(exc)], 2)}") from None
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise ConversionError(f"{what}: checkpoint lacks {len(missing)} weights: {_some(missing)}")
    if result.unexpected_keys:
        raise ConversionError(f"{what}: checkpoint has unknown weights: {_some(result.unexpected_keys)}")
    return model.eval()


def ddim_scheduler(config: Mapping) -> DDIMScheduler:
    """The DDIM sampler for a scheduler config of the SD family (SD 1.5's PNDM, SD 2.1's DDIM/DDPM).

    The noise schedule and `prediction_type` (what the UNet was trained to output) carry over; sampling
    options are SD's (no clipping, alphas of the last step kept), as the pipeline's DDIM and DPM++ expect.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=config.get("num_train_timesteps", 1000),
        beta_start=config["beta_start"],
        beta_end=config["beta_end"],
        beta_schedule=config["beta_schedule"],
        trained_betas=config.get("trained_betas"),
        prediction_type=config.get("prediction_type", "epsilon"),
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=config.get("steps_offset", 1),
    )


def read_main_config(directory: Path) -> dict:
    path = directory / MAIN_CONFIG
    try:
        return check_main_config(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: unreadable TANGO config ({exc})") from None
    except ConversionError as exc:
        raise ConversionError(f"{path}: {exc}") from None


def check_main_config(config: dict) -> dict:
    """The settings of `main_config.json` that conversion relies on: a T5 text encoder and a schedule."""
    if "t5" not in str(config.get("text_encoder_name", "")).lower():
        raise ConversionError(f"{MAIN_CONFIG}: text encoder {config.get('text_encoder_name')!r} is not T5; the bundle's is")
    if not config.get("scheduler_name"):
        raise ConversionError(f"{MAIN_CONFIG}: no scheduler_name")
    return config


def mel_vae_scale(directory: Path, audio_scale: float, *, audio_source: str) -> float:
    """The latent scale TANGO was trained with: its own `vae_config.json`'s, if the checkpoint has one.

    TANGO multiplies mel-VAE latents by this factor; another AudioLDM repository's VAE has another
    factor (off by 1-5%), which would shift every latent the UNet sees, so a mismatch is an error.
    """
    path = directory / VAE_CONFIG
    if not path.is_file():
        return audio_scale
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path}: unreadable ({exc})") from None
    scale = config.get("scale_factor", config.get("scaling_factor"))
    if scale is None:
        return audio_scale
    if abs(scale - audio_scale) > 1e-6 * abs(scale):
        raise ConversionError(
            f"mel VAE scale: TANGO's {VAE_CONFIG} has {scale} but {audio_source} has {audio_scale} "
            f"({100 * (audio_scale / scale - 1):+.1f}%); use an --audio-repo whose VAE TANGO was trained with"
        )
    return float(scale)


def read_unet_config(directory: Path, main_config: Mapping) -> dict:
    """The UNet config `main_config.json` points to, if the checkpoint folder has it; else TANGO's published one."""
    relative = main_config.get("unet_model_config_path")
    if relative and (directory / relative).is_file():
        return json.loads((directory / relative).read_text())
    return TANGO_UNET_CONFIG


def convert_tango_checkpoint(
    directory: str | Path, *, text_encoder_config: T5Config, scheduler_config: Mapping
) -> dict:
    """A downloaded TANGO folder -> `music_unet`, `scheduler` and, if the checkpoint has it, `text_encoder`.

    Args:
        directory: holds `main_config.json` and `pytorch_model_main.bin`.
        text_encoder_config: the config of `main_config["text_encoder_name"]` (FLAN-T5-large).
        scheduler_config: the scheduler config of `main_config["scheduler_name"]` (SD 2.1's).

    Returns:
        Pipeline components by name. TANGO's own T5 weights are used when present (they are exactly what
        its UNet was trained against, frozen or not); without them the caller loads the named T5.

    Raises:
        ConversionError: naming the file, prefix or weights that do not convert.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import T5EncoderModel

    directory = Path(directory)
    main_config = read_main_config(directory)
    path = directory / MAIN_WEIGHTS
    try:  # mmap: a 4.8 GB checkpoint is paged in as the models copy it, not held twice
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise ConversionError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    weights = split_state_dict(state)
    unet = UNet2DConditionModel(**unet_config(read_unet_config(directory, main_config)))
    components = {
        "music_unet": load_weights(unet, weights.unet, "music UNet"),
        "scheduler": ddim_scheduler(scheduler_config),
    }
    if weights.text_encoder:
        encoder = T5EncoderModel(text_encoder_config)
        components["text_encoder"] = load_weights(encoder, weights.text_encoder, "text encoder")
    return components


def _some(keys: list[str], shown: int = 5) -> str:
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
