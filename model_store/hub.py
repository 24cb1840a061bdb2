"""`pull`: assemble a real-weights bundle from the Hugging Face hub.

Image side from Stable Diffusion 1.5, mel VAE and vocoder from AudioLDM (TANGO decodes with AudioLDM's),
music UNet + FLAN-T5 encoder + noise schedule from a TANGO checkpoint (converted by `model_store.tango`),
tokenizer and config from the text encoder TANGO's `main_config.json` names.

The pre-flight, `plan_pull`, imports neither torch nor diffusers. Under one deadline for all of it, it asks
the hub about the three repositories at once, reads TANGO's `main_config.json` (a few hundred bytes: it
names two more repositories), asks about those two, and chooses the files: an offline machine, a deleted
repository or a missing file fails in seconds with one line, before anything large is downloaded. The
commits the hub answers with are pinned for the downloads and recorded in the manifest. The noise
schedule's repository is the one exception: it is a handful of known constants, used (and recorded) when
that repository does not answer.

Files are chosen per component folder, as the library that owns the format reads them with
`from_pretrained(subfolder=...)`: configs, tokenizer files and weights, in safetensors where the folder has
them, else the pickled `.bin` (diffusers and transformers load those with torch's `weights_only=True`).
Other frameworks' weights (Flax, TensorFlow, ONNX) and variants (`.fp16.`, `.non_ema.`) are left out.
Only TANGO's checkpoint, which is not in a library's layout, is named file by file.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from melfusion.errors import MelFusionError

from .tango import MAIN_CONFIG, MAIN_WEIGHTS, VAE_CONFIG, read_main_config

if TYPE_CHECKING:
    import torch

SD_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # runwayml/stable-diffusion-v1-5's successor
TANGO_REPO = "declare-lab/tango-full-ft-audio-music-caps"
AUDIOLDM_REPO = "cvssp/audioldm"
HUB_DEADLINE_S = 10.0  # for all of pull's questions before it downloads, DNS included


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


class Deadline:
    """One deadline shared by every question of the pre-flight."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.ends = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.ends - time.monotonic())

    def passed(self) -> HubUnavailable:
        from huggingface_hub import constants

        return HubUnavailable(
            f"no answer from the Hugging Face hub at {constants.ENDPOINT} within {self.seconds:g} s "
            "(the deadline for all of pull's questions before it downloads; --hub-deadline sets it)"
        )


def ask_hub(questions: dict[str, Callable[[], T]], deadline: Deadline) -> dict[str, T | HubUnavailable]:
    """Every question at once, each in a daemon thread; its answer, or the HubUnavailable it raised.

    Raises HubUnavailable when the deadline passes first: httpx's timeouts do not cover name resolution,
    so a thread still waiting then is abandoned.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        offline = HubUnavailable("HF_HUB_OFFLINE is set: pull needs the Hugging Face hub (unset it, or use create-tiny)")
        return dict.fromkeys(questions, offline)
    answers: dict[str, T | HubUnavailable] = {}
    crashes: list[Exception] = []  # anything but the hub being unavailable is a bug: raised here, as it is

    def run(name: str, ask: Callable[[], T]) -> None:
        try:
            answers[name] = ask()
        except HubUnavailable as exc:
            answers[name] = exc
        except Exception as exc:
            crashes.append(exc)

    threads = [threading.Thread(target=run, args=item, daemon=True) for item in questions.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(deadline.remaining())
    if crashes:
        raise crashes[0]
    answered = dict(answers)
    if len(answered) < len(questions):
        raise deadline.passed()
    return answered


def answer_or_raise(answer: T | HubUnavailable) -> T:
    if isinstance(answer, HubUnavailable):
        raise answer
    return answer


@dataclass(frozen=True)
class Listing:
    """A source as the hub (or a local folder) shows it: the commit and every file with its size."""

    source: str
    commit: str  # "local folder" for a folder
    sizes: dict[str, int]

    @property
    def is_local(self) -> bool:
        return is_local(self.source)

    def select(self, wanted: Iterable[Folder | Named]) -> dict[str, int]:
        """The files `wanted` chooses, with sizes; a required one that is absent is named in the error."""
        chosen: dict[str, int] = {}
        for want in wanted:
            chosen |= {path: self.sizes[path] for path in want.choose(self.source, self.sizes)}
        return chosen


SAFETENSORS, PICKLE = "safetensors", "pickled .bin"
_VARIANT = re.compile(r"\.(fp16|bf16|fp32|non_ema|ema)\.")  # diffusers/transformers weight variants
_READ_BY_LIBRARIES = (".json", ".txt", ".model")  # configs, tokenizer vocabularies, SentencePiece models


def weight_format(path: str) -> str | None:
    """safetensors, pickled .bin (shard indexes included), or None for anything else."""
    if path.endswith((".safetensors", ".safetensors.index.json")):
        return SAFETENSORS
    if path.endswith((".bin", ".bin.index.json")):
        return PICKLE
    return None


@dataclass(frozen=True)
class Folder:
    """A component folder as its library's `from_pretrained(subfolder=...)` reads it ("" = the root):
    configs and tokenizer files, plus the weights in one format, safetensors where present."""

    path: str
    weights: bool = True  # False: configs and tokenizer files only

    def choose(self, source: str, sizes: dict[str, int]) -> list[str]:
        prefix = f"{self.path}/" if self.path else ""
        inside = [p for p in sizes if p.startswith(prefix) and "/" not in p[len(prefix):]]
        usable = [p for p in inside if not _VARIANT.search(p.rsplit("/", 1)[-1])]
        formats = {weight_format(p) for p in usable} - {None}
        preferred = SAFETENSORS if SAFETENSORS in formats else PICKLE
        keep = {None, preferred} if self.weights else {None}
        if self.weights and not formats:
            found = ", ".join(sorted(inside)) or "nothing"
            raise HubUnavailable(f"{source} has no weights in {prefix or 'its root'} (safetensors or .bin; found {found})")
        chosen = [p for p in usable if weight_format(p) in keep and (weight_format(p) or p.endswith(_READ_BY_LIBRARIES))]
        if not chosen:
            raise HubUnavailable(f"{source} has no {prefix or 'config at its root'}")
        return sorted(chosen)


@dataclass(frozen=True)
class Named:
    """One file of a format `pull` reads itself (TANGO's checkpoint), by name."""

    path: str
    required: bool = True

    def choose(self, source: str, sizes: dict[str, int]) -> list[str]:
        if self.path not in sizes and self.required:
            raise HubUnavailable(f"{source} has no {self.path}")
        return [self.path] if self.path in sizes else []


IMAGE_FILES = (Folder("vae"), Folder("unet"), Folder("text_encoder"), Folder("tokenizer", weights=False),
               Folder("scheduler", weights=False))  # fmt: skip
AUDIO_FILES = (Folder("vae"), Folder("vocoder"))
TANGO_FILES = (Named(MAIN_CONFIG), Named(VAE_CONFIG, required=False), Named(MAIN_WEIGHTS))
T5_FILES = (Folder("", weights=False),)
T5_WEIGHTS = (Folder(""),)  # only if the TANGO checkpoint lacks its text encoder
SCHEDULER_FILES = (Folder("scheduler", weights=False),)

# TANGO trains and samples with the noise schedule of stabilityai/stable-diffusion-2-1 (scheduler_config.json),
# a repository deleted in November 2025. Its values (melfusion.presets.sd_scheduler("v_prediction")) are
# used when the repository TANGO names does not answer.
KNOWN_SCHEDULE = "known constants (scaled_linear 0.00085-0.012, 1000 steps, v_prediction)"


def list_sources(sources: dict[str, str], deadline: Deadline) -> dict[str, Listing | HubUnavailable]:
    """Each source's files: local folders read here, hub repositories asked all at once under `deadline`."""
    listings: dict[str, Listing | HubUnavailable] = {}
    for role, source in sources.items():
        if is_local(source):
            root = Path(source)
            sizes = {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}
            listings[role] = Listing(source, "local folder", sizes)
    questions = {role: _asker(source, deadline) for role, source in sources.items() if role not in listings}
    return listings | (ask_hub(questions, deadline) if questions else {})


def _asker(repo: str, deadline: Deadline) -> Callable[[], Listing]:
    return lambda: _list_hub_repo(repo, timeout=deadline.remaining())


def _list_hub_repo(repo: str, *, timeout: float) -> Listing:
    from huggingface_hub import HfApi

    with hub_errors(repo):
        info = HfApi().model_info(repo, timeout=timeout, files_metadata=True)
        return Listing(repo, info.sha, {f.rfilename: f.size or 0 for f in info.siblings or ()})


@contextlib.contextmanager
def hub_errors(repo: str) -> Iterator[None]:
    """The hub client's errors, as one HubUnavailable line each."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        yield
    except GatedRepoError:
        raise HubUnavailable(f"{repo} is gated: accept its licence on the hub and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise HubUnavailable(f"{repo}: no such model repository on {constants.ENDPOINT}") from None
    except MelFusionError:
        raise
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


def read_tango_config(listing: Listing, deadline: Deadline) -> dict:
    """TANGO's `main_config.json` (a few hundred bytes), fetched under the pre-flight's deadline."""
    if listing.is_local:
        return read_main_config(Path(listing.source))

    def download() -> Path:
        from huggingface_hub import hf_hub_download

        with hub_errors(listing.source):
            return Path(hf_hub_download(listing.source, MAIN_CONFIG, revision=listing.commit,
                                        etag_timeout=deadline.remaining()))  # fmt: skip

    path = answer_or_raise(ask_hub({MAIN_CONFIG: download}, deadline)[MAIN_CONFIG])
    return read_main_config(path.parent)


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
        """Repositories with their commits, every file with its size (and how pickled weights load), the total."""
        lines = []
        for role, files in self.files.items():
            listing = self.listings[role]
            lines.append(f"{role}: {listing.source} @ {listing.commit}, {len(files)} files, {_size(sum(files.values()))}")
            for path, size in files.items():
                note = "  pickled: loaded with torch weights_only=True" if weight_format(path) == PICKLE else ""
                lines.append(f"  {path:<48} {_size(size):>10}{note}")
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
    """Ask about every source before anything large is fetched, all within `deadline_s`; raise
    HubUnavailable naming the first gap. Imports neither torch nor diffusers."""
    deadline = Deadline(deadline_s)
    listings = {role: answer_or_raise(answer) for role, answer in list_sources(asdict(sources), deadline).items()}
    files = {role: listings[role].select(wanted) for role, wanted in
             (("image", IMAGE_FILES), ("tango", TANGO_FILES), ("audio", AUDIO_FILES))}  # fmt: skip
    main_config = read_tango_config(listings["tango"], deadline)
    unet_config = main_config.get("unet_model_config_path")  # else tango.read_unet_config uses TANGO's published one
    files["tango"] |= listings["tango"].select([Named(unet_config, required=False)] if unet_config else [])
    t5, scheduler = main_config["text_encoder_name"], main_config["scheduler_name"]
    named = list_sources({"text_encoder": t5, "scheduler": scheduler}, deadline)
    try:
        listings["text_encoder"] = answer_or_raise(named["text_encoder"])
        files["text_encoder"] = listings["text_encoder"].select(T5_FILES)
    except HubUnavailable as exc:
        raise HubUnavailable(f"text encoder {t5!r} named by {sources.tango}/{MAIN_CONFIG}: {exc}") from None
    plan = PullPlan(sources, listings, files, main_config)
    try:
        listing = answer_or_raise(named["scheduler"])
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
