"""MelFusionPipeline: image + caption -> music, the paper's Algorithm 2 (section 3.3) on diffusers parts.

Image side (frozen Stable Diffusion 1.5 layout): VAE-encode the image, DDIM-invert it with the empty
prompt to z_T (line 1), then denoise it again while recording the decoder self-attention K/V of every
step (line 6). Music side (TANGO layout): FLAN-T5 caption embedding (line 3), Gaussian latent (line 2),
a CFG denoising loop whose decoder cross-attention K/V are mixed with the image's (lines 4-10), mel VAE
decode (line 11) and HiFi-GAN vocoder (line 12). Both loops share one timestep grid, so image step i is
paired with music step i.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    LCMScheduler,
    TCDScheduler,
    UNet2DConditionModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer, SpeechT5HifiGan, T5EncoderModel, T5Tokenizer

from .attention import ImageFeatures, attach_mixers, attach_recorders
from .audio import latent_frames
from .errors import GenerationCancelled, InputError
from .feature_cache import ImageFeatureCache
from .images import fit_square
from .limits import DEFAULT_WINDOW_SECONDS, SCHEDULERS, GenerationLimits
from .precision import NonFiniteOutput, finite_rows, first_non_finite, keep_float32_modules
from .request import GenerationRequest, random_seed
from .schedulers import GridDDIMInverseScheduler, GridDDIMScheduler
from .shapes import ShapeBuckets
from .student import guidance_embedding
from .synapse import VisualSynapse
from .windows import TimeWindows, plan_windows

log = logging.getLogger(__name__)

ImageGuidance = Literal["conditional", "both"]
Phase = Literal["image_inversion", "image_denoise", "music_denoise"]
# Where the synapse's image K/V come from. "inversion" (default): recorded during DDIM inversion itself,
# i.e. ε_ψ(z_t^I, ∅, t) on the inverted latents, which is what Algorithm 2's line 6 evaluates; one SD pass
# per step. "redenoise": a second SD pass denoising z_T^I back down the grid, recording there; twice the
# cost, and equal to "inversion" up to the inversion's error (tested with an exact inversion).
ImageFeatureSource = Literal["inversion", "redenoise"]
# Without shape buckets, captions are padded (masked) to a multiple of this many tokens: a handful of
# caption shapes (one for every caption up to 32 tokens) instead of one per caption length.
TEXT_PAD_MULTIPLE = 32
LOOP_DECODE_CONTEXT = 16  # latent frames (0.64 s at 16 kHz) decoded on each side of a loop's seam
NonFinitePolicy = Literal["raise", "report"]


@dataclass(frozen=True)
class StepInfo:
    """One finished UNet step, for progress reporting; `step` counts across all phases."""

    phase: Phase
    step: int
    total: int
    timestep: int

    @property
    def fraction(self) -> float:
        return self.step / self.total


@dataclass
class MelFusionOutput(BaseOutput):
    audios: np.ndarray  # (B, samples) float32 in [-1, 1]-ish, at `sampling_rate`; shorter clips end in zeros
    sampling_rate: int
    seeds: list[int]
    lengths: list[int]  # samples of each clip
    errors: list[NonFiniteOutput | None] | None = None  # per row: NaN/inf and where it began (on_non_finite="report")

    def clip(self, row: int) -> np.ndarray:
        """Row `row`'s waveform at its own length."""
        return self.audios[row, : self.lengths[row]]


class _StepTracker:
    """Counts steps over the phases of one call: progress bar, caller's callback, cooperative cancel."""

    def __init__(self, total: int, callback=None, should_cancel=None, bar=None):
        self.total, self.done = total, 0
        self.callback, self.should_cancel = callback, should_cancel
        self.bar = bar

    def check_cancel(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise GenerationCancelled(f"cancelled after {self.done} of {self.total} steps")

    def advance(self, phase: Phase, timestep: torch.Tensor) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_description_str(phase, refresh=False)  # which pass the count is in
            self.bar.update()
        if self.callback is not None:
            self.callback(StepInfo(phase, self.done, self.total, int(timestep)))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MelFusionPipeline(DiffusionPipeline):
    """Image + caption -> music waveform (MelFusion, CVPR 2024).

    Components: the frozen SD 1.5 image side (`image_vae`, `image_unet`, `image_text_encoder`,
    `image_tokenizer`, `image_scheduler`), the TANGO music side (`text_encoder`, `tokenizer`,
    `music_unet`, `mel_vae`, `vocoder`, `scheduler`) and the `synapse` with its learned α.
    """

    model_cpu_offload_seq = "image_text_encoder->image_vae->image_unet->text_encoder->music_unet->mel_vae->vocoder"

    def __init__(
        self,
        image_vae: AutoencoderKL,
        image_unet: UNet2DConditionModel,
        image_text_encoder: CLIPTextModel,
        image_tokenizer: CLIPTokenizer,
        image_scheduler: DDIMScheduler,
        text_encoder: T5EncoderModel,
        tokenizer: T5Tokenizer,
        music_unet: UNet2DConditionModel,
        mel_vae: AutoencoderKL,
        vocoder: SpeechT5HifiGan,
        scheduler: DDIMScheduler | LCMScheduler,  # LCMScheduler: a distilled student (melfusion.student)
        synapse: VisualSynapse,
        hop_length: int = 160,
        n_fft: int = 1024,
        win_length: int = 1024,
        mel_fmin: float = 0.0,
        mel_fmax: float = 8000.0,
        max_seconds: float = 30.0,
        default_seconds: float = 10.0,
        max_steps: int = 1000,
        default_steps: int = 100,
        default_guidance_scale: float = 7.0,
        timestep_spacing: str = "trailing",
        image_features_from: str = "inversion",  # an ImageFeatureSource (a plain str for diffusers' config)
        window_seconds: float = DEFAULT_WINDOW_SECONDS,
    ):
        super().__init__()
        if image_features_from not in get_args(ImageFeatureSource):
            raise ValueError(f"image_features_from must be one of {get_args(ImageFeatureSource)}, got {image_features_from!r}")
        # The schedulers' own configs say the spacing the pipeline samples with, so whoever loads a
        # scheduler folder alone gets the same grid.
        image_scheduler = type(image_scheduler).from_config(image_scheduler.config, timestep_spacing=timestep_spacing)
        scheduler = type(scheduler).from_config(scheduler.config, timestep_spacing=timestep_spacing)
        self.register_modules(
            image_vae=image_vae,
            image_unet=image_unet,
            image_text_encoder=image_text_encoder,
            image_tokenizer=image_tokenizer,
            image_scheduler=image_scheduler,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            music_unet=music_unet,
            mel_vae=mel_vae,
            vocoder=vocoder,
            scheduler=scheduler,
            synapse=synapse,
        )
        # Mel/STFT settings (16 kHz, hop 160, 64 mels in TANGO) travel in model_index.json with the bundle.
        self.register_to_config(
            hop_length=hop_length,
            n_fft=n_fft,
            win_length=win_length,
            mel_fmin=mel_fmin,
            mel_fmax=mel_fmax,
            max_seconds=max_seconds,
            default_seconds=default_seconds,
            max_steps=max_steps,
            default_steps=default_steps,
            default_guidance_scale=default_guidance_scale,
            timestep_spacing=timestep_spacing,
            image_features_from=image_features_from,
            window_seconds=window_seconds,
        )
        # The synapse's processors are attached once, here; per-call and per-step state lives in tensors.
        attach_recorders(self.image_unet, self.synapse)
        self.music_unet.synapse_state = attach_mixers(self.music_unet, self.synapse)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.image_vae_scale)
        self._empty_prompt_cache: dict[tuple, torch.Tensor] = {}
        self.feature_cache: ImageFeatureCache | None = None
        self.shape_buckets: ShapeBuckets | None = None  # set on a compiled pipeline: calls padded to warmed shapes
        self.shape_misses: Counter[str] = Counter()  # calls that fit no bucket, by what missed

    def to(self, *args, **kwargs) -> MelFusionPipeline:
        """`DiffusionPipeline.to`, except that modules their library keeps in float32 stay in float32.

        A whole-pipeline cast would otherwise also cast FLAN-T5's feed-forward output layers (`wo`,
        transformers' `_keep_in_fp32_modules`), which overflow in float16.
        """
        super().to(*args, **kwargs)
        for name in self.components:
            module = getattr(self, name)
            if isinstance(module, torch.nn.Module):
                keep_float32_modules(module)
        return self

    @property
    def feature_recorder(self):
        """Where the image UNet's recorders leave each step's K/V (kept on the UNet, like `synapse_state`)."""
        return self.image_unet.feature_recorder

    @property
    def synapse_state(self):
        """The tensors the music UNet's mixers read (kept on the UNet: training may attach its own synapse)."""
        return self.music_unet.synapse_state

    def compile_unets(
        self, mode: str | None = None, *, backend: str = "inductor", image_backend: str | None = None
    ) -> None:
        """`torch.compile` both UNets in place (module identity, configs and saving are unchanged).

        The synapse's processors never change and read only tensors, so one graph per input shape (rows,
        clip frames, caption tokens) serves every call; set `shape_buckets` and run `warm_up` so that every
        call meets a shape compiled beforehand. `mode="reduce-overhead"` adds CUDA graphs, which remove the
        per-kernel launch cost that bounds eager UNet steps on a large GPU. `image_backend` compiles the
        image UNet with another backend (e.g. "cudagraphs": CUDA graphs over eager kernels, captured in
        seconds where inductor compiles for minutes).
        """
        # Both UNets run UNet2DConditionModel.forward, one code object to dynamo: with automatic dynamic
        # shapes the second UNet's shapes would turn both into one slow dynamic graph (no CUDA graphs).
        # Static graphs, one per UNet and shape, need a cache larger than dynamo's default 8.
        torch._dynamo.config.automatic_dynamic_shapes = False
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.music_unet.compile(mode=mode, backend=backend)
        if image_backend is None:
            self.image_unet.compile(mode=mode, backend=backend)
        else:
            self.image_unet.compile(backend=image_backend)

    def enable_feature_cache(self, max_bytes: int) -> None:
        """Keep the image features of recent images (LRU, `max_bytes`); a warm worker's repeat photos
        then cost only the music loop."""
        self.feature_cache = ImageFeatureCache(max_bytes)

    # -- static shapes (melfusion/shapes.py) ------------------------------------------------------
    def warm_up(self, buckets: ShapeBuckets, *, steps: int = 3) -> int:
        """Run every shape of `buckets` once, so that a compiled pipeline compiles (and captures) all its
        graphs before any request needs one; returns the number of calls made. Graphs depend on shapes, not
        on the step count; 3 steps call each UNet 3 times, enough for CUDA graph trees, which warm a graph
        up on its first call and record it on the second.

        Per clip length and caption length, one call of each batch size with CFG (a call without CFG is
        padded to the same UNet rows); in the first of those rounds every row has a photo of its own, which
        warms the image UNet at each batch size too.
        """
        too_long = [tokens for tokens in buckets.caption_tokens if tokens > self.tokenizer.model_max_length]
        if too_long:
            limit = self.tokenizer.model_max_length
            raise ValueError(f"caption buckets {too_long} exceed the tokenizer's limit, {limit} tokens")
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, buckets.graphs + 8)
        cache, self.feature_cache = self.feature_cache, None  # warm-up photos are not worth keeping
        calls = 0
        try:
            for index, (seconds, tokens) in enumerate(itertools.product(buckets.seconds, buckets.caption_tokens)):
                caption = self._caption_of_length(tokens)
                for size in buckets.batch_sizes:
                    photos = [Image.new("RGB", (64, 64), (37 * k % 256, 90, 160)) for k in range(size)]  # all distinct
                    self([caption] * size, photos if index == 0 else None, seconds=seconds, num_inference_steps=steps,
                         guidance_scale=7.0, seed=0)  # fmt: skip
                    calls += 1
        finally:
            self.feature_cache = cache
        return calls

    def _caption_of_length(self, tokens: int) -> str:
        """A caption of at most `tokens` tokens (end token included), as long as the tokenizer allows."""
        words = tokens
        while (length := len(self.tokenizer("music " * words).input_ids)) > tokens:
            words -= max(1, length - tokens)
        return "music " * words

    def _shape_miss(self, what: str, detail: str) -> None:
        """A compiled pipeline met a shape it was not warmed on: it runs at its own shape (a new graph)."""
        self.shape_misses[what] += 1
        log.warning("%s outside the warmed shapes (%s): compiling a new graph while serving", what, detail)

    def _padded_rows(self, rows: int, with_unconditional: bool) -> int:
        """The batch rows a call runs: `rows` up to a warmed size (the padded rows are thrown away)."""
        if self.shape_buckets is None:
            return rows
        padded = self.shape_buckets.rows_for(rows, with_unconditional)
        if padded is None:
            self._shape_miss("batch_size", f"{rows} rows, warmed {self.shape_buckets.batch_sizes}")
        return padded or rows

    def _latent_seconds(self, seconds: float) -> float:
        """The clip length whose latent a call samples: the smallest warmed length at least as long (the
        clip is cut from it), or `seconds` itself."""
        if self.shape_buckets is None:
            return seconds
        frames = lambda length: self.music_latent_shape(1, length)[2]  # lengths round up to whole UNet strides
        bucket = next((length for length in self.shape_buckets.seconds if frames(length) >= frames(seconds)), None)
        if bucket is None:
            self._shape_miss("seconds", f"{seconds} s, warmed {self.shape_buckets.seconds}")
        return bucket or seconds

    def _latent_frames(self, seconds: list[float], loops: list[bool]) -> list[int]:
        """Each clip's latent frames. Longer clips and loops run in windows of the trained length (which
        the buckets should hold); a shorter clip is sampled at its clip-length bucket and cut from it."""
        window = self.window_frames
        frames = [self.clip_frames(length, loop) for length, loop in zip(seconds, loops)]
        short = {length for length, count, loop in zip(seconds, frames, loops) if not loop and count < window}
        bucketed = {length: self.music_latent_shape(1, self._latent_seconds(length))[2] for length in short}
        frames = [bucketed.get(length, count) if not loop else count for length, count, loop in zip(seconds, frames, loops)]
        windowed = any(loop or count > window for count, loop in zip(frames, loops))
        buckets = self.shape_buckets
        if windowed and buckets is not None and window not in {self.music_latent_shape(1, s)[2] for s in buckets.seconds}:
            self._shape_miss("seconds", f"windows of {self.config.window_seconds} s, warmed {buckets.seconds}")
        return frames

    def _padded_image_rows(self, images: int) -> int:
        """The image-UNet batch for `images` new photos: up to a warmed size (padded rows are thrown away)."""
        if self.shape_buckets is None:
            return images
        padded = self.shape_buckets.image_rows_for(images)
        if padded is None:
            self._shape_miss("image_batch", f"{images} new photos, warmed {self.shape_buckets.batch_sizes}")
        return padded or images

    def _caption_length(self, tokens: int) -> int:
        """Tokens the captions are padded to: the warmed bucket, else the next multiple of TEXT_PAD_MULTIPLE."""
        bucket = None if self.shape_buckets is None else self.shape_buckets.caption_tokens_for(tokens)
        if self.shape_buckets is not None and bucket is None:
            self._shape_miss("caption_tokens", f"{tokens} tokens, warmed {self.shape_buckets.caption_tokens}")
        return bucket or -(-tokens // TEXT_PAD_MULTIPLE) * TEXT_PAD_MULTIPLE

    # -- geometry -------------------------------------------------------------------------------
    @property
    def image_vae_scale(self) -> int:
        return 2 ** (len(self.image_vae.config.block_out_channels) - 1)

    @property
    def image_resolution(self) -> int:
        """The square pixel size the SD side works at (512 for SD 1.5)."""
        return self.image_unet.config.sample_size * self.image_vae_scale

    @property
    def sampling_rate(self) -> int:
        return self.vocoder.config.sampling_rate

    @property
    def limits(self) -> GenerationLimits:
        return GenerationLimits.from_config(self.config)

    @property
    def is_student(self) -> bool:
        """A few-step student (`melfusion distill`): guidance is an input of its UNet, not a CFG batch."""
        return isinstance(self.scheduler, LCMScheduler)

    @property
    def samples_per_latent_frame(self) -> int:
        return self.config.hop_length * self.mel_vae_scale

    @property
    def mel_vae_scale(self) -> int:
        return 2 ** (len(self.mel_vae.config.block_out_channels) - 1)

    @property
    def window_frames(self) -> int:
        """The latent length the music UNet was trained on (`window_seconds`): longer clips and loops are
        denoised in overlapping windows of it (`melfusion.windows`)."""
        return self.music_latent_shape(1, self.config.window_seconds)[2]

    def clip_frames(self, seconds: float, loop: bool) -> int:
        """A clip's latent length: rounded up to what the UNet can halve, or for a loop the nearest whole
        number of frames (its windows wrap, so any length works, and the loop lasts exactly that long)."""
        if loop:
            return max(1, round(seconds * self.sampling_rate / self.samples_per_latent_frame))
        return self.music_latent_shape(1, seconds)[2]

    def music_latent_shape(self, batch_size: int, seconds: float) -> tuple[int, int, int, int]:
        """(B, C, T, F): the mel VAE shrinks time and mel axes by its scale; T must halve through the UNet."""
        vae_scale = self.mel_vae_scale
        unet_scale = 2 ** (len(self.music_unet.config.block_out_channels) - 1)
        frames = latent_frames(
            seconds,
            sampling_rate=self.sampling_rate,
            hop_length=self.config.hop_length,
            vae_scale=vae_scale,
            unet_scale=unet_scale,
        )
        mel_bins = self.vocoder.config.model_in_dim // vae_scale
        return (batch_size, self.music_unet.config.in_channels, frames, mel_bins)

    # -- schedulers -----------------------------------------------------------------------------
    def _on_grid(self, scheduler_class, config):
        """A `scheduler_class` from `config` with the pipeline's grid spacing.

        "trailing" (Lin et al. 2023) starts every grid at t = 999 and ends it near 0. SD's "leading" starts
        at 1 + (n-1)·⌊1000/n⌋: 799 for the paper's 400 steps, i.e. sampling would begin from pure noise
        at a step that expects some signal, and 1000 steps would index past the schedule. Settings that
        `scheduler_class` does not take (a student's LCM settings, for its DDIM grid) are left out.
        """
        config = {key: value for key, value in config.items() if key in scheduler_class._get_init_keys(scheduler_class)}
        return scheduler_class.from_config(config, timestep_spacing=self.config.timestep_spacing)

    def timestep_grid(self, num_inference_steps: int) -> torch.Tensor:
        """The descending timesteps shared by inversion, image denoising and music denoising."""
        ddim = self._on_grid(DDIMScheduler, self.scheduler.config)
        ddim.set_timesteps(num_inference_steps)
        return ddim.timesteps

    def make_scheduler(self, name: str, timesteps: torch.Tensor):
        """A fresh music scheduler per call (schedulers are stateful), on the shared grid.

        All honour the bundle scheduler's `prediction_type` (epsilon in the paper, v for TANGO). "ddpm"
        is TANGO's own sampler: stochastic, so its step noise comes from the request's seeded generators.
        """
        if name == "ddpm":
            scheduler = DDPMScheduler.from_config(self.scheduler.config)
            scheduler.set_timesteps(timesteps=timesteps.tolist())
        elif name == "ddim":
            scheduler = self._on_grid(GridDDIMScheduler, self.scheduler.config)
            scheduler.set_timesteps(len(timesteps))
        elif name == "dpmpp":
            scheduler = DPMSolverMultistepScheduler.from_config(
                self.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
            )
            scheduler.set_timesteps(timesteps=timesteps.tolist())
        elif name in ("tcd", "lcm"):  # a student's consistency steps: "lcm" draws fresh noise between them from
            # the seeded generators, "tcd" (stepped with γ = 0) re-noises along the step's own predicted noise
            scheduler = (TCDScheduler if name == "tcd" else LCMScheduler).from_config(self.scheduler.config)
            scheduler.set_timesteps(timesteps=timesteps.tolist())
        else:
            raise InputError("scheduler", f"unknown scheduler {name!r}; choose one of {SCHEDULERS}")
        return scheduler

    def _image_schedulers(self, num_inference_steps: int) -> tuple[GridDDIMInverseScheduler, GridDDIMScheduler]:
        # SD's betas on the music grid's spacing, so both image loops walk the music grid, grid point to grid point.
        inverse = self._on_grid(GridDDIMInverseScheduler, self.image_scheduler.config)
        forward = self._on_grid(GridDDIMScheduler, self.image_scheduler.config)
        inverse.set_timesteps(num_inference_steps)
        forward.set_timesteps(num_inference_steps)
        return inverse, forward

    # -- image side: Algorithm 2, lines 1 and 6 ---------------------------------------------------
    def _empty_prompt_embeds(self, device: torch.device) -> torch.Tensor:
        """CLIP embedding of "" (SD's unconditional prompt), computed once per device and dtype."""
        key = (device, self.image_unet.dtype)
        if key not in self._empty_prompt_cache:
            ids = self.image_tokenizer(
                "", padding="max_length", max_length=self.image_tokenizer.model_max_length, return_tensors="pt"
            ).input_ids.to(device)
            self._empty_prompt_cache[key] = self.image_text_encoder(ids)[0].to(self.image_unet.dtype)
        return self._empty_prompt_cache[key]

    def prepare_image_latents(self, image: Image.Image) -> torch.Tensor:
        """E^I(I): resize/crop to the SD resolution, VAE-encode (the posterior mean: deterministic)."""
        device = self._execution_device
        pixels = self.image_processor.preprocess(fit_square(image, self.image_resolution))
        pixels = pixels.to(device=device, dtype=self.image_vae.dtype)
        latents = self.image_vae.encode(pixels).latent_dist.mean
        return (latents * self.image_vae.config.scaling_factor).to(self.image_unet.dtype)

    def invert_image_latents(
        self, latents: torch.Tensor, num_inference_steps: int, tracker: _StepTracker | None = None
    ) -> torch.Tensor:
        """DDIM inversion (line 1): z_0 -> z_T with the empty prompt, up the shared grid.

        The recorder keeps each step's synapse K/V: the features of the "inversion" source.
        """
        inverse, _ = self._image_schedulers(num_inference_steps)
        return self._walk_image_grid(latents, inverse, "image_inversion", tracker or _StepTracker(num_inference_steps))

    def denoise_image_latents(
        self, latents: torch.Tensor, num_inference_steps: int, tracker: _StepTracker | None = None
    ) -> tuple[torch.Tensor, ImageFeatures]:
        """Reverse diffusion from z_T^I, recording the synapse blocks' self-attention K/V per step (the
        "redenoise" source). Returns the reconstructed z_0^I (used to check the inversion) and the features.
        """
        _, scheduler = self._image_schedulers(num_inference_steps)
        latents = self._walk_image_grid(latents, scheduler, "image_denoise", tracker or _StepTracker(num_inference_steps))
        return latents, self.feature_recorder.features()

    def _walk_image_grid(self, latents: torch.Tensor, scheduler, phase: Phase, tracker: _StepTracker) -> torch.Tensor:
        """One SD UNet call per step of `scheduler`'s grid, the recorder keeping each step's synapse K/V."""
        empty = self._empty_prompt_embeds(latents.device).expand(latents.shape[0], -1, -1)
        self.feature_recorder.start()
        unet_timesteps = scheduler.timesteps.to(latents.device)  # on the device: no copy per step
        for i, t in enumerate(scheduler.timesteps):
            tracker.check_cancel()
            noise_pred = self.image_unet(latents, unet_timesteps[i], encoder_hidden_states=empty, return_dict=False)[0]
            self.feature_recorder.keep(t)
            latents = scheduler.step(noise_pred, t, latents).prev_sample
            tracker.advance(phase, t)
        return latents

    @property
    def image_passes_per_step(self) -> int:
        return 1 if self.config.image_features_from == "inversion" else 2

    @torch.no_grad()
    def encode_image(
        self, image: Image.Image, num_inference_steps: int, tracker: _StepTracker | None = None
    ) -> ImageFeatures:
        """The image-features object for one image on the grid of `num_inference_steps` (cacheable)."""
        return self.encode_images([image], num_inference_steps, tracker)[0]

    @torch.no_grad()
    def encode_images(
        self, images: list[Image.Image], num_inference_steps: int, tracker: _StepTracker | None = None
    ) -> list[ImageFeatures]:
        """The features of each image on the grid of `num_inference_steps` (lines 1 and 6), one object per image.

        Images the feature cache holds cost nothing. The others, a photo repeated in the batch once, are
        VAE-encoded and DDIM-inverted together: one SD UNet pass per grid step for all of them, padded to
        a warmed batch size (padded rows are zeros, thrown away).
        """
        keys = [self._feature_key(image, num_inference_steps) for image in images]
        found: dict[str, ImageFeatures | None] = {}
        for key in dict.fromkeys(keys):
            found[key] = self.feature_cache.get(key) if self.feature_cache is not None else None
        new = [key for key, features in found.items() if features is None]
        if new:
            z_0 = torch.cat([self.prepare_image_latents(images[keys.index(key)]) for key in new])  # (n, 4, h, w)
            z_0 = F.pad(z_0, (0, 0, 0, 0, 0, 0, 0, self._padded_image_rows(len(new)) - len(new)))
            z_T = self.invert_image_latents(z_0, num_inference_steps, tracker)
            if self.config.image_features_from == "inversion":
                batch = self.feature_recorder.features()
            else:
                _, batch = self.denoise_image_latents(z_T, num_inference_steps, tracker)
            for row, key in enumerate(new):
                found[key] = batch.row(row)
                if self.feature_cache is not None:
                    self.feature_cache.put(key, found[key])
        return [found[key] for key in keys]

    def _feature_key(self, image: Image.Image, num_inference_steps: int) -> str:
        """What determines an image's features: its SD-sized pixels, the grid, the synapse layout."""
        square = fit_square(image, self.image_resolution)
        settings = (num_inference_steps, self.config.image_features_from)
        return ImageFeatureCache.key(square, settings, self.synapse.config)

    def _needs_image_pass(self, images: list[Image.Image], num_inference_steps: int) -> bool:
        """Whether any of `images` must go through the image side (the cache holds none of them)."""
        if self.feature_cache is None:
            return bool(images)
        return any(self._feature_key(image, num_inference_steps) not in self.feature_cache for image in images)

    # -- music side ---------------------------------------------------------------------------------
    def encode_captions(
        self, captions: list[str], negative_captions: list[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """T^M(Y) (line 3): FLAN-T5 states and mask; with CFG (`negative_captions` given), rows are
        negative_captions + captions ("" is TANGO's unconditional caption).

        Padded with masked tokens to a warmed caption length (`_caption_length`).
        """
        texts = (negative_captions or []) + captions
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.tokenizer.model_max_length, return_tensors="pt"
        )
        pad = self._caption_length(tokens.input_ids.shape[1]) - tokens.input_ids.shape[1]
        ids = F.pad(tokens.input_ids, (0, pad), value=self.tokenizer.pad_token_id).to(self._execution_device)
        mask = F.pad(tokens.attention_mask, (0, pad), value=0).to(self._execution_device)
        states = self.text_encoder(input_ids=ids, attention_mask=mask)[0]
        return states.to(self.music_unet.dtype), mask

    def prepare_music_latents(
        self, shape: tuple[int, ...], generators: list[torch.Generator], scheduler, frames: list[int] | None = None
    ) -> torch.Tensor:
        """z_T^M ~ N(0, I) (line 2). Drawn on the CPU, one generator per item, so a seed gives the same
        clip on any device and whether or not the item shares a batch; row r has `frames[r]` frames (the
        rest of the row, up to the batch's longest clip, stays 0 and is never read)."""
        frames = frames or [shape[2]] * shape[0]
        latents = torch.zeros(shape, dtype=torch.float32)
        for row, (generator, length) in enumerate(zip(generators, frames, strict=True)):
            one = (1, shape[1], length, *shape[3:])
            latents[row, :, :length] = randn_tensor(one, generator=generator, device=torch.device("cpu"), dtype=torch.float32)[0]
        latents = latents.to(device=self._execution_device, dtype=self.music_unet.dtype)
        return latents * scheduler.init_noise_sigma

    def decode_latents(
        self,
        latents: torch.Tensor,
        num_samples: int,
        earlier_checks: tuple[tuple[str, torch.dtype, torch.Tensor], ...] = (),
    ) -> tuple[np.ndarray, list[NonFiniteOutput | None]]:
        """D^M then V (lines 11-12): latent -> mel -> waveform, trimmed to the requested length.

        Returns the audio and, per row, where NaN/inf first appeared (None: finite). `earlier_checks`
        (component, dtype, finite rows) come first, in pipeline order, so a NaN is blamed on the component
        where it began, not on the vocoder.
        """
        mel = self.mel_vae.decode(latents / self.mel_vae.config.scaling_factor).sample  # (B, 1, T, mels)
        audio = self.vocoder(mel.squeeze(1).to(self.vocoder.dtype))[:, :num_samples]  # (B, samples)
        outputs = (("music_unet", latents), ("mel_vae", mel), ("vocoder", audio))
        checks = (*earlier_checks, *((name, out.dtype, finite_rows(out)) for name, out in outputs))
        return audio.float().cpu().numpy(), first_non_finite(checks)

    def decode_loop(
        self, latents: torch.Tensor, earlier_checks: tuple[tuple[str, torch.dtype, torch.Tensor], ...] = ()
    ) -> tuple[np.ndarray, list[NonFiniteOutput | None]]:
        """A loop's (1, C, T, F) latent -> exactly T frames of audio that wrap (and its NaN/inf check, as
        `decode_latents`): decoded with LOOP_DECODE_CONTEXT frames of its own end before it and of its
        start after it, then cut to one period, so the decoders see the seam as they see any other frame."""
        length = latents.shape[2]
        wrapped = torch.arange(-LOOP_DECODE_CONTEXT, length + LOOP_DECODE_CONTEXT, device=latents.device) % length
        samples = (length + 2 * LOOP_DECODE_CONTEXT) * self.samples_per_latent_frame
        audio, errors = self.decode_latents(latents[:, :, wrapped], samples, earlier_checks)
        start = LOOP_DECODE_CONTEXT * self.samples_per_latent_frame
        return audio[:, start : start + length * self.samples_per_latent_frame], errors

    def image_rows(
        self, strength: torch.Tensor, has_image: torch.Tensor, with_unconditional: bool, image_guidance: str
    ) -> torch.Tensor:
        """Per-row synapse strength for the UNet batch [uncond…, cond…] (0 on rows without an image).

        "conditional" (default): only the conditional branch sees the image, so the unconditional branch
        is the true unconditional model and CFG amplifies image and caption together — the usual joint
        guidance for several conditions, and at image_strength = 0 exactly TANGO's text CFG. "both": the
        image enters both branches, so guidance amplifies the caption only and the image acts at strength
        α whatever the guidance scale.
        """
        conditional = strength * has_image
        if not with_unconditional:
            return conditional
        unconditional = conditional if image_guidance == "both" else torch.zeros_like(conditional)
        return torch.cat([unconditional, conditional])

    def load_synapse(
        self,
        features: ImageFeatures | None,
        feature_rows: list[int],
        text_mask: torch.Tensor,
        row_strength: torch.Tensor,
        feature_steps: list[int],
        unet_rows: torch.Tensor | None = None,
    ) -> None:
        """Hand the mixers this call's image K/V (lines 7-9).

        Batch row b reads image feature_rows[b] of `features` (-1: none); in the UNet batch [uncond…, cond…]
        a row at strength 0 reads zeros instead, so it is exactly text-to-music whatever its image holds.
        `unet_rows`: the call rows the UNet's batch reads first, when it runs the call's windows a few at
        a time (`select_rows`).
        """
        num_tokens = self.synapse.config.image_grid**2
        image_of_row = torch.tensor(feature_rows).repeat(len(row_strength) // len(feature_rows))
        self.synapse_state.load(
            features,
            token_matching=self.synapse.token_matching_matrix(text_mask, num_tokens).to(text_mask.device),
            row_strength=row_strength,
            feature_rows=torch.where(row_strength.cpu() > 0, image_of_row, -1),
            feature_steps=feature_steps,
            num_tokens=num_tokens,
            dtype=self.music_unet.dtype,
            unet_rows=unet_rows,
        )

    # -- Algorithm 2 --------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        caption: str | list[str],
        image: Image.Image | list[Image.Image | None] | None = None,
        *,
        image_features: ImageFeatures | None = None,
        seconds: float | list[float] | None = None,
        loop: bool | list[bool] = False,
        num_inference_steps: int | None = None,
        guidance_scale: float | list[float] | None = None,
        image_strength: float | list[float] | None = None,
        image_guidance: ImageGuidance | None = None,
        scheduler: str | None = None,
        seed: int | list[int] | None = None,
        image_steps: int | None = None,
        negative_caption: str | list[str | None] | None = None,
        guidance_start: float | None = None,
        guidance_end: float | None = None,
        callback: Callable[[StepInfo], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        on_non_finite: NonFinitePolicy = "raise",
    ) -> MelFusionOutput:
        """Generate one clip per caption.

        Args:
            caption: text prompt(s), one clip each; None rows follow their image only.
            image: one image for all captions, one per caption (None rows: caption only), or None.
            image_features: features from `encode_image` on the image grid; skips the image side.
            seconds: clip length (bundle default if None), at most the bundle's `max_seconds`; one for all
                or one per caption. Clips of `window_seconds` or longer are denoised in windows of that
                length (`melfusion.windows`); shorter ones share a call only with clips of their length.
            loop: make the clip a seamless loop (circular windows, wrapped decoding), one for all or per
                caption; it lasts `seconds` rounded to a whole latent frame (40 ms at 16 kHz, hop 160).
            num_inference_steps: denoising steps of the music loop.
            guidance_scale: CFG scale, one for all or one per caption (bundle default, the paper's 7);
                <= 1 disables CFG (in a batch where others use CFG, such a row is its conditional branch).
                A student takes it as an input of its UNet instead of a CFG batch.
            image_strength: scales every α, one for all or per caption: 0 = caption only, 1 = learned α.
            image_guidance: which CFG branch sees the image, "conditional" or "both" (see `image_rows`).
            scheduler: "ddim" (the paper's), "dpmpp" (DPM-Solver++, good in ~20 steps) or "ddpm" (TANGO's);
                a distilled student's are "tcd" and "lcm" (see limits.STUDENT_SCHEDULERS). Default: the
                bundle's first (ddim, or tcd).
            seed: int (item i gets seed + i) or one per caption; random if None, echoed in the output.
            image_steps: image passes on a coarser grid (default: one per music step); each music step
                then reads the recorded step nearest to its timestep.
            negative_caption: replaces "" in the unconditional CFG branch, one for all or one per caption.
            guidance_start, guidance_end: the guidance interval, fractions of the trajectory: CFG runs on the
                steps i with start <= i/steps < end, the others on the conditional rows alone (`guided_steps`).
            callback: called with a StepInfo after every UNet step of every phase.
            should_cancel: polled before every step; True raises GenerationCancelled.
            on_non_finite: "raise" NonFiniteOutput if any clip has NaN/inf; "report" it per row in
                `errors` instead (the other rows are unaffected: a batch fails row by row).
        """
        # 1. Check inputs: every row a resolved GenerationRequest (its defaults and ranges)
        captions = [caption] if isinstance(caption, str | None) else list(caption)
        batch = len(captions)
        images = self._per_row("image", image, batch)
        columns = zip(
            captions, self._per_row("negative_caption", negative_caption, batch),
            self._per_row("seconds", seconds, batch), self._per_row("loop", loop, batch),
            self._per_row("guidance_scale", guidance_scale, batch),
            self._per_row("image_strength", image_strength, batch), self._seeds(seed, batch), strict=True,
        )  # fmt: skip
        requests = [
            _request_of(
                caption=row_caption, negative_caption=row_negative, seconds=row_seconds, loop=row_loop, steps=num_inference_steps,
                guidance_scale=row_guidance, image_strength=row_strength, image_guidance=image_guidance,
                scheduler=scheduler, seed=row_seed, image_steps=image_steps, guidance_start=guidance_start,
                guidance_end=guidance_end,
            ).resolved(self.limits)
            for row_caption, row_negative, row_seconds, row_loop, row_guidance, row_strength, row_seed in columns
        ]  # fmt: skip
        first = requests[0]
        steps, image_steps, scheduler = first.steps, first.image_steps, first.scheduler
        guidance_start, guidance_end = first.guidance_start, first.guidance_end
        seconds = [request.seconds for request in requests]
        loops = [request.loop for request in requests]
        guidance = [max(request.guidance_scale, 1.0) for request in requests]  # <= 1: no guidance, i.e. 1
        strength = [request.image_strength for request in requests]
        seeds = [request.seed for request in requests]
        if image_features is not None:
            images = [None] * batch
        for request, img in zip(requests, images, strict=True):
            request.check_condition(has_image=img is not None or image_features is not None)
        has_image = [(img is not None or image_features is not None) and s > 0 for img, s in zip(images, strength)]
        with_unconditional = max(guidance) > 1.0 and not self.is_student  # a student's guidance is an input
        captions = [request.caption or "" for request in requests]  # image only: the empty caption
        negatives = [request.negative_caption or "" for request in requests]

        # 1b. Static shapes (compiled pipelines): the UNet runs `rows` windows at a time, a warmed batch (the
        #     last group topped up with copies of its last window, thrown away); a clip shorter than the
        #     window is sampled at its clip-length bucket (and cut from it); captions are padded in step 4
        rows = self._padded_rows(batch, with_unconditional)
        frames = self._latent_frames(seconds, loops)

        # 2. Timestep grids: the music sampler's, and the image side's (the same, or a coarser one)
        timesteps = self.timestep_grid(steps)
        image_grid = self.timestep_grid(image_steps)
        music_scheduler = self.make_scheduler(scheduler, timesteps)
        to_encode = [img for img, used in zip(images, has_image) if used and img is not None]
        image_total = image_steps * self.image_passes_per_step * self._needs_image_pass(to_encode, image_steps)
        total = image_total + steps
        tracker = _StepTracker(total, callback, should_cancel, bar=self.progress_bar(total=total))
        try:
            # 3. Visual guidance: z_T^I = DDIM_Invert(E^I(I)) and K_l^I, V_l^I per step (lines 1, 6), the new
            #    photos of the batch in one pass
            image_features, feature_rows = self._image_features_of_rows(
                images, has_image, image_features, image_steps, image_grid, batch, tracker
            )

            # 4. Encode the caption: c = T^M(Y) (line 3), plus "" for the CFG branch
            text_states, text_mask = self.encode_captions(captions, negatives if with_unconditional else None)

            # 5. Music latent z_T^M ~ N(0, I) (line 2), one seeded generator per row, and its time windows
            generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
            try:
                windows = plan_windows(frames, loops, self.window_frames)
            except ValueError as exc:
                raise InputError("seconds", str(exc)) from None
            shape = self.music_latent_shape(batch, 1.0)[:2] + (max(frames), self.music_latent_shape(1, 1.0)[3])
            latents = self.prepare_music_latents(shape, generators, music_scheduler, frames)
            step_options = self._step_options(music_scheduler, generators, seeds, latents.device)

            # 6. Denoising loop with the visual synapse (lines 4-10), over windows of at most the trained
            # length, `rows` at a time: the UNet sees the shapes of a warmed batch at a warmed length
            device = latents.device

            def rows_for(cfg: bool) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
                """A step's call rows, [uncond…, cond…] with CFG, else cond only: caption states and mask, the
                windows in UNet batches with the rows each reads, and the mixers loaded with those rows' images."""
                count = batch * (1 + cfg)
                row_strength = self.image_rows(torch.tensor(strength), torch.tensor(has_image), cfg, first.image_guidance)
                chunks = window_chunks(windows, rows, batch, cfg)
                self.load_synapse(
                    image_features, feature_rows, text_mask[-count:], row_strength, nearest_steps(timesteps, image_grid),
                    unet_rows=chunks[0][1],
                )  # fmt: skip
                return text_states[-count:], text_mask[-count:], chunks

            scale = torch.tensor(guidance, device=device, dtype=latents.dtype)
            guided = guided_steps(steps, guidance_start, guidance_end) if with_unconditional else [False] * steps
            # A compiled pipeline is warmed on the CFG batch only (shapes.py): it runs the steps outside the
            # interval on that batch too and uses their conditional half, so the interval saves no UNet time there
            cfg_batch = [with_unconditional] * steps if self.shape_buckets is not None else guided
            condition = self.guidance_condition(guidance, device) if self.is_student else None
            unet_timesteps = music_scheduler.timesteps.to(device)  # on the device: no copy per step
            for i, t in enumerate(music_scheduler.timesteps):  # t on the host: no step waits for the device
                tracker.check_cancel()
                if i == 0 or cfg_batch[i] != cfg_batch[i - 1]:  # CFG starts or stops: another UNet batch
                    states, mask, chunks = rows_for(cfg_batch[i])
                self.synapse_state.select_step(i)  # K_l^I, V_l^I met by music step i (lines 7-9)
                window_latents = windows.gather(latents)
                predictions = torch.empty_like(window_latents)
                for chunk, unet_rows in chunks:
                    if len(chunks) > 1:
                        self.synapse_state.select_rows(unet_rows)  # each window reads its clip's image and strength
                    chunk_latents = window_latents[chunk]
                    model_input = torch.cat([chunk_latents] * 2) if cfg_batch[i] else chunk_latents
                    model_input = music_scheduler.scale_model_input(model_input, t)
                    noise_pred = self.music_unet(
                        model_input, unet_timesteps[i], encoder_hidden_states=states[unet_rows],
                        encoder_attention_mask=mask[unet_rows],
                        timestep_cond=None if condition is None else condition[windows.rows[chunk]], return_dict=False,
                    )[0]  # fmt: skip
                    if cfg_batch[i]:
                        uncond, cond = noise_pred.chunk(2)
                        row_scale = scale[windows.rows[chunk]].view(-1, 1, 1, 1)  # each row its own guidance
                        noise_pred = uncond + row_scale * (cond - uncond) if guided[i] else cond
                    count = min(len(chunk), len(windows) - int(chunk[0]))  # the top-up copies are thrown away
                    predictions[chunk[:count]] = noise_pred[:count]
                noise_pred = windows.blend(predictions, latents)  # the cross-faded mean where windows overlap
                latents = music_scheduler.step(noise_pred, t, latents, **step_options).prev_sample  # line 10
                tracker.advance("music_denoise", t)
        finally:
            tracker.close()
            self.synapse_state.release()  # a cached ImageFeatures object is not kept alive here

        # 7. Decode: s = D^M(z_0^M), w = V(s) (lines 11-12), each clip at its length; NaN/inf judged row by row
        text_of_rows = text_states.unflatten(0, (-1, batch)).transpose(0, 1)  # (B, 1 or 2 branches, S, D)
        checks = (
            ("image_unet", self.image_unet.dtype, self._finite_image_rows(image_features, feature_rows)),
            ("text_encoder", text_states.dtype, finite_rows(text_of_rows)),
        )
        lengths = [
            length * self.samples_per_latent_frame if row_loop else round(row_seconds * self.sampling_rate)
            for length, row_loop, row_seconds in zip(frames, loops, seconds)
        ]
        if len(set(frames)) == 1 and not any(loops):
            audios, errors = self.decode_latents(latents, max(lengths), checks)
            for row, length in enumerate(lengths):
                audios[row, length:] = 0
        else:  # one clip at a time, each at its own length
            audios, errors = np.zeros((batch, max(lengths)), dtype=np.float32), []
            for row, (length, row_loop) in enumerate(zip(frames, loops)):
                latent = latents[row : row + 1, :, :length]
                row_checks = tuple((name, dtype, finite[row : row + 1]) for name, dtype, finite in checks)
                decode = self.decode_loop if row_loop else partial(self.decode_latents, num_samples=lengths[row])
                decoded, row_errors = decode(latent, earlier_checks=row_checks)
                audios[row, : lengths[row]] = decoded[0]
                errors += row_errors
        if on_non_finite == "raise" and any(errors):
            raise next(error for error in errors if error is not None)
        return MelFusionOutput(
            audios=audios, sampling_rate=self.sampling_rate, seeds=seeds, lengths=lengths, errors=errors
        )

    def _image_features_of_rows(
        self,
        images: list[Image.Image | None],
        has_image: list[bool],
        image_features: ImageFeatures | None,
        image_steps: int,
        image_grid: torch.Tensor,
        batch: int,
        tracker: _StepTracker,
    ) -> tuple[ImageFeatures | None, list[int]]:
        """The call's image features and, per row, which of them it reads (-1: none)."""
        if image_features is not None and any(has_image):
            self._check_features(image_features, image_grid, batch)
            single = image_features.batch_size == 1
            return image_features, [(0 if single else r) if used else -1 for r, used in enumerate(has_image)]
        to_encode = [img for img, used in zip(images, has_image) if used and img is not None]
        if not to_encode:
            return None, [-1] * len(images)
        per_image = iter(self.encode_images(to_encode, image_steps, tracker))
        parts: list[ImageFeatures] = []
        position: dict[int, int] = {}  # id of an image's features -> its index in `parts` (a repeated photo once)
        feature_rows = []
        for img, used in zip(images, has_image):
            if used and img is not None:
                features = next(per_image)
                feature_rows.append(position.setdefault(id(features), len(parts)))
                if feature_rows[-1] == len(parts):
                    parts.append(features)
            else:
                feature_rows.append(-1)
        return ImageFeatures.concat(parts), feature_rows

    @staticmethod
    def _finite_image_rows(features: ImageFeatures | None, feature_rows: list[int]) -> torch.Tensor:
        """(B,) False where a row reads image features holding NaN/inf."""
        if features is None:
            return torch.ones(len(feature_rows), dtype=torch.bool)
        finite = features.finite_rows()
        return torch.cat([finite, finite.new_ones(1)])[torch.tensor(feature_rows)]  # row -1 reads the appended True

    @staticmethod
    def _step_options(
        scheduler, generators: list[torch.Generator], seeds: list[int], device: torch.device
    ) -> dict:
        """`scheduler.step`'s options: DDPM (TANGO's sampler) and a student's "lcm" draw fresh noise every
        step, through these generators; a student's "tcd" is stepped with γ = 0 and draws none.

        The noise is drawn on the device the loop runs on, one generator per row, so no step copies noise
        from the host: on the CPU each row's own generator goes on after z_T; on an accelerator a generator
        of that device seeded with the row's seed. A DDPM clip is therefore defined by the seed and the kind
        of device (CPU and CUDA generators draw different numbers); DDIM and DPM-Solver++ draw nothing after
        z_T, which is drawn on the CPU: their clips are the same on any device.
        """
        if isinstance(scheduler, TCDScheduler):
            return {"eta": 0.0}  # TCD's γ = 0: deterministic, a seed follows the teacher's trajectory
        if not isinstance(scheduler, DDPMScheduler | LCMScheduler):
            return {}
        if device.type == "cpu":
            return {"generator": generators}
        return {"generator": [torch.Generator(device).manual_seed(seed) for seed in seeds]}

    def generate(
        self,
        requests: list[GenerationRequest],
        images: list[Image.Image | ImageFeatures | None],
        callback: Callable[[StepInfo], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> MelFusionOutput:
        """Every clip of the resolved requests, in one call: a batch is a list of requests (see `batch_key`),
        each giving `num_outputs` rows (its `variations`), in order.

        Args:
            requests: resolved requests sharing one `batch_key`; each row keeps its guidance, strength, seed.
            images: one per request: an image, its `encode_image` features, or None (caption only).
                Features are accepted only for every row at once.
            callback, should_cancel: as in `__call__`.

        Returns:
            The clips, with `errors` per row: a row with NaN/inf fails alone (NonFiniteOutput naming the component).
        """
        if len({request.batch_key(self.limits) for request in requests}) != 1:
            raise InputError(
                "requests",
                "rows of one batch must share the UNet's clip length (see batch_key), steps, image steps, "
                "scheduler, image guidance, CFG and its interval",
            )
        if len(images) != len(requests):
            raise InputError("image", f"give one image (or None) per request ({len(requests)})")
        features = [image for image in images if isinstance(image, ImageFeatures)]
        if features and len(features) != len(images):
            raise InputError("image_features", "give features for every row or for none")
        rows = [(row, image) for request, image in zip(requests, images) for row in request.variations()]
        first = requests[0]
        return self(
            [row.caption for row, _ in rows],
            None if features or all(image is None for image in images) else [image for _, image in rows],
            image_features=ImageFeatures.concat([image for _, image in rows]) if features else None,
            seconds=[row.seconds for row, _ in rows],
            loop=[row.loop for row, _ in rows],
            num_inference_steps=first.steps,
            guidance_scale=[row.guidance_scale for row, _ in rows],
            image_strength=[row.image_strength for row, _ in rows],
            image_guidance=first.image_guidance,
            scheduler=first.scheduler,
            seed=[row.seed for row, _ in rows],
            image_steps=first.image_steps,
            guidance_start=first.guidance_start,
            guidance_end=first.guidance_end,
            negative_caption=[row.negative_caption for row, _ in rows],
            callback=callback,
            should_cancel=should_cancel,
            on_non_finite="report",
        )

    def guidance_condition(self, guidance: list[float], device: torch.device) -> torch.Tensor:
        """(B, D) a student UNet's guidance input, one scale (≥ 1) per row (`melfusion.student.guidance_embedding`)."""
        embedding = guidance_embedding(torch.tensor(guidance), self.music_unet.config.time_cond_proj_dim)
        return embedding.to(device=device, dtype=self.music_unet.dtype)

    def spectrogram_png(self, audio: np.ndarray) -> bytes:
        """The clip's log-mel spectrogram as a PNG (`melfusion.spectrogram`; needs matplotlib)."""
        from .spectrogram import spectrogram_png

        return spectrogram_png(self, audio)

    @staticmethod
    def _per_row(field: str, value, count: int) -> list:
        """A value for all rows, or a list with one per row."""
        if not isinstance(value, list | tuple):
            return [value] * count
        if len(value) == 1:
            return list(value) * count
        if len(value) != count:
            raise InputError(field, f"give one value or one per caption ({count}), got {len(value)}")
        return list(value)

    @staticmethod
    def _seeds(seed: int | list[int] | None, count: int) -> list[int]:
        if seed is None:
            seed = random_seed()
        if isinstance(seed, int):
            return [seed + i for i in range(count)]
        if len(seed) != count:
            raise InputError("seed", f"give one seed or one per caption ({count}), got {len(seed)}")
        return list(seed)

    @staticmethod
    def _check_features(features: ImageFeatures, grid: torch.Tensor, batch_size: int) -> None:
        if not torch.equal(features.timesteps.cpu(), grid.cpu()):
            raise InputError("image_features", "captured on another timestep grid (different steps?)")
        if features.batch_size not in (1, batch_size):
            raise InputError("image_features", f"batch of {features.batch_size} for {batch_size} captions")


def window_chunks(
    windows: TimeWindows, rows: int, clips: int, with_unconditional: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The windows in groups of `rows` (the last one topped up by repeating its last window), each with the
    rows of the CFG batch [uncond…, cond…] of `clips` clips its windows read: text states, mask, synapse."""
    count = len(windows)
    chunks = []
    for start in range(0, count, rows):
        chunk = torch.arange(start, start + rows).clamp(max=count - 1)
        clip_rows = windows.rows[chunk]
        chunks.append((chunk, torch.cat([clip_rows, clip_rows + clips]) if with_unconditional else clip_rows))
    return chunks


def _request_of(**given) -> GenerationRequest:
    """A request of the arguments given (None: the declared default)."""
    return GenerationRequest(**{name: value for name, value in given.items() if value is not None})


def nearest_steps(timesteps: torch.Tensor, image_grid: torch.Tensor) -> list[int]:
    """For each music timestep, the index of the nearest image-grid timestep (the same index on one grid)."""
    distance = (timesteps[:, None].float() - image_grid[None, :].float()).abs()
    return distance.argmin(dim=1).tolist()


def guided_steps(steps: int, start: float, end: float) -> list[bool]:
    """Which steps run CFG under the guidance interval [start, end) (fractions of the trajectory, 0 = pure
    noise): step i if start <= i/steps < end. Guidance matters less at some noise levels (Kynkäänniemi et
    al. 2024 found it harmful at the noisiest); each step outside the interval halves the UNet's batch."""
    return [start <= i / steps < end for i in range(steps)]
