"""`pull`: assemble a real-weights bundle from the Hugging Face hub.

Image side from Stable Diffusion 1.5, mel VAE and vocoder from AudioLDM (TANGO decodes with AudioLDM's),
music UNet + FLAN-T5 encoder + noise schedule from a TANGO checkpoint (converted by `model_store.tango`),
tokenizer and config from the text encoder TANGO's `main_config.json` names. The hub is asked about
every repository first, under a short deadline, so an offline machine fails in seconds with one clear
line instead of stalling in a download; the commits it answers with are pinned and recorded in the manifest.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from melfusion.errors import MelFusionError

if TYPE_CHECKING:
    import torch

SD_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # runwayml/stable-diffusion-v1-5's successor
TANGO_REPO = "declare-lab/tango-full-ft-audio-music-caps"
AUDIOLDM_REPO = "cvssp/audioldm"
HUB_DEADLINE_S = 10.0  # for all the pre-flight questions together, DNS included


class HubUnavailable(MelFusionError):
    """The hub cannot be asked (offline, unreachable, repository missing or gated)."""


@dataclass(frozen=True)
class PullSources:
    """Hub repositories a bundle is assembled from."""

    image: str = SD_REPO
    tango: str = TANGO_REPO
    audio: str = AUDIOLDM_REPO


def is_local(source: str) -> bool:
    """A source may be a local folder in the hub repository's layout (a copy for machines without the hub)."""
    return Path(source).is_dir()


def resolve_revisions(sources: Iterable[str], *, deadline_s: float = HUB_DEADLINE_S) -> dict[str, str]:
    """Ask the hub for the current commit of each source that is not a local folder.

    Raises HubUnavailable within `deadline_s`: httpx's timeouts do not cover name resolution, so the
    questions run in a daemon thread that is abandoned at the deadline.
    """
    repos = [source for source in dict.fromkeys(sources) if not is_local(source)]
    if not repos:
        return {}
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise HubUnavailable("HF_HUB_OFFLINE is set: pull needs the Hugging Face hub (unset it, or use create-tiny)")
    answers: dict[str, str] = {}
    failures: list[HubUnavailable] = []

    def ask() -> None:
        try:
            for repo in repos:
                answers[repo] = _commit_of(repo, timeout=deadline_s)
        except HubUnavailable as exc:
            failures.append(exc)

    worker = threading.Thread(target=ask, daemon=True)
    worker.start()
    worker.join(deadline_s)
    if failures:
        raise failures[0]
    if worker.is_alive():
        raise HubUnavailable(f"no answer from the Hugging Face hub at {constants.ENDPOINT} within {deadline_s:g} s")
    return answers


def _commit_of(repo: str, *, timeout: float) -> str:
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return HfApi().model_info(repo, timeout=timeout).sha
    except GatedRepoError:
        raise HubUnavailable(f"{repo} is gated: accept its licence on the hub and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise HubUnavailable(f"{repo}: no such model repository on {constants.ENDPOINT}") from None
    except Exception as exc:  # httpx/OS errors of many kinds: all mean "cannot ask the hub"
        raise HubUnavailable(
            f"cannot reach the Hugging Face hub at {constants.ENDPOINT} ({type(exc).__name__}: {exc}); "
            "pull needs network access (offline: create-tiny / create-random, or copy a pulled bundle)"
        ) from None


def _scheduler_config(source: str, revision: str | None) -> dict:
    from diffusers import DDIMScheduler

    return DDIMScheduler.load_config(source, subfolder="scheduler", revision=revision)


def image_components(source: str, revision: str | None) -> dict:
    """SD 1.5's VAE, UNet, CLIP text encoder + tokenizer and noise schedule (as the pipeline's DDIM)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from .tango import ddim_scheduler

    return {
        "image_vae": AutoencoderKL.from_pretrained(source, subfolder="vae", revision=revision),
        "image_unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", revision=revision),
        "image_text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", revision=revision),
        "image_tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision),
        "image_scheduler": ddim_scheduler(_scheduler_config(source, revision)),
    }


def audio_components(source: str, revision: str | None) -> dict:
    """AudioLDM's mel VAE and HiFi-GAN vocoder (diffusers layout, 16 kHz, 64 mels)."""
    from diffusers import AutoencoderKL
    from transformers import SpeechT5HifiGan

    return {
        "mel_vae": AutoencoderKL.from_pretrained(source, subfolder="vae", revision=revision),
        "vocoder": SpeechT5HifiGan.from_pretrained(source, subfolder="vocoder", revision=revision),
    }


def music_components(source: str, revision: str | None) -> tuple[dict, dict[str, str]]:
    """TANGO's converted UNet, T5 encoder and schedule, plus the FLAN-T5 tokenizer.

    Returns the components and the further sources they came from (the text encoder and scheduler
    that TANGO's `main_config.json` names) with their commits, for the manifest.
    """
    from huggingface_hub import snapshot_download
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    from .tango import MAIN_WEIGHTS, convert_tango_checkpoint, read_main_config

    if is_local(source):
        folder = Path(source)
    else:
        folder = Path(snapshot_download(source, revision=revision, allow_patterns=["*.json", MAIN_WEIGHTS]))
    main_config = read_main_config(folder)
    t5, scheduler = main_config["text_encoder_name"], main_config["scheduler_name"]
    revisions = resolve_revisions([t5, scheduler])
    components = convert_tango_checkpoint(
        folder,
        text_encoder_config=T5Config.from_pretrained(t5, revision=revisions.get(t5)),
        scheduler_config=_scheduler_config(scheduler, revisions.get(scheduler)),
    )
    if "text_encoder" not in components:
        components["text_encoder"] = T5EncoderModel.from_pretrained(t5, revision=revisions.get(t5)).eval()
    components["tokenizer"] = T5Tokenizer.from_pretrained(t5, revision=revisions.get(t5))
    return components, {t5: revisions.get(t5, "local folder"), scheduler: revisions.get(scheduler, "local folder")}


def pull_bundle(
    directory: str | os.PathLike, *, sources: PullSources, revisions: dict[str, str], dtype: torch.dtype
) -> Path:
    """Download, convert and save a bundle of the real models into `directory` (written atomically).

    `revisions` (from `resolve_revisions`) pins each hub repository to the commit the hub answered with;
    sources that are local folders have none.
    """
    from melfusion.bundle import save_bundle
    from melfusion.pipeline import MelFusionPipeline
    from melfusion.synapse import VisualSynapse

    music, further = music_components(sources.tango, revisions.get(sources.tango))
    components = {
        **image_components(sources.image, revisions.get(sources.image)),
        **audio_components(sources.audio, revisions.get(sources.audio)),
        **music,
        "synapse": VisualSynapse(),  # the paper's learned α until a trained synapse is released
    }
    origin = {source: revisions.get(source, "local folder") for source in asdict(sources).values()} | further
    pipe = MelFusionPipeline(**components).to(dtype=dtype)
    return save_bundle(pipe, directory, source="pull", origin=origin)
