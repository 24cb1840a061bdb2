"""`pull`: assemble a real-weights bundle from the Hugging Face hub.

Image side from Stable Diffusion 1.5, mel VAE and vocoder from AudioLDM (TANGO decodes with AudioLDM's),
music UNet + FLAN-T5 encoder + noise schedule from a TANGO checkpoint (converted by `model_store.tango`),
tokenizer and config from the text encoder TANGO's `main_config.json` names.

`plan_pull` asks about every repository `pull` will touch (TANGO's `main_config.json`, a few hundred
bytes, is read first because it names two of them) under a short deadline and lists the files it will
fetch with their sizes, before anything large is downloaded: an offline machine, a deleted repository or
a missing file fails in seconds with one line. The commits the hub answers with are pinned for the
downloads and recorded in the manifest. The noise schedule's repository is the one exception: it is a
handful of known constants, used (and recorded) when that repository does not answer.
"""

from __future__ import annotations

import fnmatch
import json
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

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


T = TypeVar("T")


def within_deadline(ask: Callable[[], T], deadline_s: float) -> T:
    """Run `ask` (hub questions) with a hard deadline.

    Raises HubUnavailable within `deadline_s`: httpx's timeouts do not cover name resolution, so the
    questions run in a daemon thread that is abandoned at the deadline.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise HubUnavailable("HF_HUB_OFFLINE is set: pull needs the Hugging Face hub (unset it, or use create-tiny)")
    answers: list[T] = []
    failures: list[HubUnavailable] = []

    def run() -> None:
        try:
            answers.append(ask())
        except HubUnavailable as exc:
            failures.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(deadline_s)
    if failures:
        raise failures[0]
    if worker.is_alive():
        raise HubUnavailable(f"no answer from the Hugging Face hub at {constants.ENDPOINT} within {deadline_s:g} s")
    return answers[0]


@dataclass(frozen=True)
class Listing:
    """A source as the hub (or a local folder) shows it: the commit and every file with its size."""

    source: str
    commit: str  # "local folder" for a folder
    sizes: dict[str, int]

    @property
    def is_local(self) -> bool:
        return is_local(self.source)

    def select(self, wanted: Iterable[Wanted]) -> dict[str, int]:
        """The files `wanted` names, with sizes; a required one that is absent is named in the error."""
        chosen: dict[str, int] = {}
        for want in wanted:
            found = [path for pattern in want.patterns for path in sorted(fnmatch.filter(self.sizes, pattern))]
            if want.first_only:
                found = found[:1]
            if not found and want.required:
                raise HubUnavailable(f"{self.source} has no {' or '.join(want.patterns)}")
            chosen |= {path: self.sizes[path] for path in found}
        return chosen


@dataclass(frozen=True)
class Wanted:
    """Files `pull` needs from a source: glob patterns, in order of preference if `first_only`."""

    patterns: tuple[str, ...]
    required: bool = True
    first_only: bool = True  # e.g. safetensors if present, else the pickled .bin


def weights(folder: str, stem: str) -> Wanted:
    prefix = f"{folder}/" if folder else ""
    return Wanted((f"{prefix}{stem}.safetensors", f"{prefix}{stem}.bin"))


def config(path: str, *, required: bool = True) -> Wanted:
    return Wanted((path,), required=required)


IMAGE_FILES = (
    config("vae/config.json"), weights("vae", "diffusion_pytorch_model"),
    config("unet/config.json"), weights("unet", "diffusion_pytorch_model"),
    config("text_encoder/config.json"), weights("text_encoder", "model"),
    Wanted(("tokenizer/*",), first_only=False),
    config("scheduler/scheduler_config.json"),
)  # fmt: skip
AUDIO_FILES = (
    config("vae/config.json"), weights("vae", "diffusion_pytorch_model"),
    config("vocoder/config.json"), weights("vocoder", "model"),
)  # fmt: skip
TANGO_FILES = (config("main_config.json"), config("vae_config.json", required=False), config("pytorch_model_main.bin"))
T5_FILES = (
    config("config.json"),
    Wanted(("spiece.model", "tokenizer.json"), first_only=False),
    config("tokenizer_config.json", required=False), config("special_tokens_map.json", required=False),
)  # fmt: skip
T5_WEIGHTS = (weights("", "model"),)  # only if the TANGO checkpoint lacks its text encoder
SCHEDULER_FILES = (config("scheduler/scheduler_config.json"),)

# TANGO trains and samples with the noise schedule of stabilityai/stable-diffusion-2-1 (scheduler_config.json),
# a repository deleted in November 2025. Its values (melfusion.presets.sd_scheduler("v_prediction")) are
# used when the repository TANGO names does not answer.
KNOWN_SCHEDULE = "known constants (scaled_linear 0.00085-0.012, 1000 steps, v_prediction)"


def list_source(source: str, *, deadline_s: float = HUB_DEADLINE_S) -> Listing:
    """The files of a local folder, or of a hub repository at its current commit (under the deadline)."""
    if is_local(source):
        root = Path(source)
        sizes = {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}
        return Listing(source, "local folder", sizes)
    return within_deadline(lambda: _list_hub_repo(source, timeout=deadline_s), deadline_s)


def _list_hub_repo(repo: str, *, timeout: float) -> Listing:
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        info = HfApi().model_info(repo, timeout=timeout, files_metadata=True)
        return Listing(repo, info.sha, {f.rfilename: f.size or 0 for f in info.siblings or ()})
    except GatedRepoError:
        raise HubUnavailable(f"{repo} is gated: accept its licence on the hub and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise HubUnavailable(f"{repo}: no such model repository on {constants.ENDPOINT}") from None
    except Exception as exc:  # httpx/OS errors of many kinds: all mean "cannot ask the hub"
        raise HubUnavailable(
            f"cannot reach the Hugging Face hub at {constants.ENDPOINT} ({type(exc).__name__}: {exc}); "
            "pull needs network access (offline: create-tiny / create-random, or copy a pulled bundle)"
        ) from None


def fetch(listing: Listing, files: Iterable[str]) -> Path:
    """The folder holding `files` of a source: the folder itself, or a pinned hub snapshot.

    huggingface_hub shows a progress bar per file and resumes a partial download from its cache,
    so an interrupted `pull` picks up where it stopped.
    """
    if listing.is_local:
        return Path(listing.source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(listing.source, revision=listing.commit, allow_patterns=list(files)))


@dataclass
class PullPlan:
    """Every source `pull` touches, the files it will fetch from each, and where the schedule comes from."""

    sources: PullSources
    listings: dict[str, Listing]  # role -> listing: image, tango, audio, text_encoder, scheduler (if it answered)
    files: dict[str, dict[str, int]]  # role -> path -> bytes
    main_config: dict
    schedule_note: str = ""  # why the known constants are used, if they are

    @property
    def total_bytes(self) -> int:
        return sum(sum(files.values()) for files in self.files.values())

    def describe(self) -> str:
        lines = []
        for role, files in self.files.items():
            listing = self.listings[role]
            lines.append(f"{role}: {listing.source} @ {listing.commit}, {len(files)} files, {_size(sum(files.values()))}")
            lines += [f"  {path:<48} {_size(size):>10}" for path, size in files.items()]
        if self.schedule_note:
            lines.append(f"scheduler: {self.schedule_note}")
        lines.append(f"total to fetch: {_size(self.total_bytes)} (files already in the hub cache are not fetched again)")
        return "\n".join(lines)

    def origin(self) -> dict[str, str]:
        origin = {listing.source: listing.commit for listing in self.listings.values()}
        if self.schedule_note:
            origin[self.main_config["scheduler_name"]] = self.schedule_note
        return origin


def plan_pull(sources: PullSources, *, deadline_s: float = HUB_DEADLINE_S) -> PullPlan:
    """Ask about every source before anything large is fetched; raise HubUnavailable naming the first gap."""
    from .tango import MAIN_CONFIG, check_main_config

    listings = {role: list_source(source, deadline_s=deadline_s) for role, source in asdict(sources).items()}
    files = {role: listings[role].select(wanted) for role, wanted in
             (("image", IMAGE_FILES), ("tango", TANGO_FILES), ("audio", AUDIO_FILES))}  # fmt: skip
    main_config = check_main_config(json.loads((fetch(listings["tango"], [MAIN_CONFIG]) / MAIN_CONFIG).read_text()))
    t5, scheduler = main_config["text_encoder_name"], main_config["scheduler_name"]
    try:
        listings["text_encoder"] = list_source(t5, deadline_s=deadline_s)
        files["text_encoder"] = listings["text_encoder"].select(T5_FILES)
    except HubUnavailable as exc:
        raise HubUnavailable(f"text encoder {t5!r} named by {sources.tango}/{MAIN_CONFIG}: {exc}") from None
    plan = PullPlan(sources, listings, files, main_config)
    try:
        listing = list_source(scheduler, deadline_s=deadline_s)
        files["scheduler"] = listing.select(SCHEDULER_FILES)
        listings["scheduler"] = listing
    except HubUnavailable as exc:
        plan.schedule_note = f"{KNOWN_SCHEDULE}: {scheduler} unavailable ({exc})"
    return plan


def _size(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count} B"


def image_components(folder: Path) -> dict:
    """SD 1.5's VAE, UNet, CLIP text encoder + tokenizer and noise schedule (as the pipeline's DDIM)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from .tango import ddim_scheduler

    return {
        "image_vae": AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        "image_unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        "image_text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
        "image_tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        "image_scheduler": ddim_scheduler(DDIMScheduler.load_config(folder, subfolder="scheduler")),
    }


def audio_components(folder: Path) -> dict:
    """AudioLDM's mel VAE and HiFi-GAN vocoder (diffusers layout, 16 kHz, 64 mels)."""
    from diffusers import AutoencoderKL
    from transformers import SpeechT5HifiGan

    return {
        "mel_vae": AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        "vocoder": SpeechT5HifiGan.from_pretrained(folder, subfolder="vocoder"),
    }


def music_components(plan: PullPlan, folders: dict[str, Path]) -> dict:
    """TANGO's converted UNet, T5 encoder and schedule, plus the FLAN-T5 tokenizer."""
    from diffusers import DDIMScheduler
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    from melfusion.presets import sd_scheduler

    from .tango import convert_tango_checkpoint

    if "scheduler" in folders:
        schedule = DDIMScheduler.load_config(folders["scheduler"], subfolder="scheduler")
    else:  # the known constants: SD 2.1's betas with v-prediction
        schedule = dict(sd_scheduler("v_prediction").config)
    components = convert_tango_checkpoint(
        folders["tango"],
        text_encoder_config=T5Config.from_pretrained(folders["text_encoder"]),
        scheduler_config=schedule,
    )
    if "text_encoder" not in components:
        t5 = plan.listings["text_encoder"]
        folder = fetch(t5, t5.select(T5_WEIGHTS))
        components["text_encoder"] = T5EncoderModel.from_pretrained(folder).eval()
    components["tokenizer"] = T5Tokenizer.from_pretrained(folders["text_encoder"])
    return components


def pull_bundle(directory: str | os.PathLike, *, plan: PullPlan, dtype: torch.dtype) -> Path:
    """Download, convert and save a bundle of the real models into `directory` (written atomically),
    then verify what was written."""
    from melfusion.bundle import save_bundle, verify_bundle
    from melfusion.pipeline import MelFusionPipeline
    from melfusion.synapse import VisualSynapse

    from .tango import mel_vae_scale

    folders = {role: fetch(plan.listings[role], files) for role, files in plan.files.items()}
    audio = audio_components(folders["audio"])
    scale = mel_vae_scale(folders["tango"], audio["mel_vae"].config.scaling_factor, audio_source=plan.sources.audio)
    audio["mel_vae"].register_to_config(scaling_factor=scale)
    components = {
        **image_components(folders["image"]),
        **audio,
        **music_components(plan, folders),
        "synapse": VisualSynapse(),  # the paper's learned α until a trained synapse is released
    }
    pipe = MelFusionPipeline(**components).to(dtype=dtype)  # keeps T5's `wo` in float32
    path = save_bundle(pipe, directory, source="pull", origin=plan.origin())
    verify_bundle(path)
    return path
