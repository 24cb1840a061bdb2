"""Evaluate models on a triplet set: generate per variant, then FAD, KL, FD and IMSM (paper Tables 1, 2, 11, 14).

A variant is a model and an image strength: the untouched TANGO UNet on captions alone (the paper's
text-to-music baseline), the trained model on captions alone (α = 0) and with the image (learned α), or
another trained model such as a fixed-α run of Table 14 (`melfusion.training.experiments`). Models other
than the evaluated one share its frozen parts (`sharing_frozen_parts`), so each adds one music UNet.

Rows stream through in batches: a batch's image features (1.4 GB per row at 400 steps and SD 1.5 size)
live on the device only while that batch is generated, and only embeddings are kept, so memory does not
grow with the number of rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..attention import ImageFeatures
from ..bundle import load_pipeline
from ..dataset.audio import fit_length, load_audio
from ..dataset.manifest import Triplet, Triplets
from ..errors import InputError
from ..images import load_image
from ..pipeline import MelFusionPipeline
from .evaluators import AudioEmbedder, Evaluators
from .metrics import frechet_distance, imsm, kl_divergence

Classifier = Callable[[list[np.ndarray], int], np.ndarray]  # (waveforms, rate) -> (N, labels) probabilities
MEANINGLESS = "tiny random CLIP/CLAP evaluators (no --clip/--clap folders): these figures are meaningless"
FROZEN_PARTS = ("image_vae", "image_unet", "image_text_encoder", "text_encoder", "mel_vae", "vocoder")


@dataclass(frozen=True)
class Variant:
    name: str
    image_strength: float  # 0 = caption only (α = 0); 1 = the synapse's α as they are
    pipe: MelFusionPipeline | None = None  # another model sharing the frozen parts; None: the evaluated one


def sharing_frozen_parts(pipe: MelFusionPipeline, bundle: Path) -> MelFusionPipeline:
    """The bundle's music UNet and synapse on `pipe`'s device, with `pipe`'s frozen parts (same SD, T5, VAE)."""
    other = load_pipeline(bundle)  # weights are memory-mapped: the frozen copies are dropped unread
    other.register_modules(**{name: getattr(pipe, name) for name in FROZEN_PARTS})
    other.register_modules(music_unet=other.music_unet.to(pipe.device, pipe.music_unet.dtype),
                           synapse=other.synapse.to(pipe.device))
    other.set_progress_bar_config(disable=True)
    return other


def default_variants(baseline: MelFusionPipeline | None = None) -> list[Variant]:
    """TANGO (when its untouched UNet is given), then the trained model without and with the image."""
    tango = [Variant("TANGO (untouched UNet, caption only)", 0.0, baseline)] if baseline is not None else []
    return [*tango, Variant("caption only (trained UNet, α = 0)", 0.0), Variant("image + caption (learned α)", 1.0)]


@dataclass(frozen=True)
class Scores:
    variant: str
    rows: int  # triplets generated and scored
    fad: float
    kl: float
    fd: float
    imsm: float


@dataclass
class _Embeddings:
    """What the metrics need of a set of clips, gathered batch by batch."""

    fad: list[np.ndarray] = field(default_factory=list)
    fd: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    imsm: list[np.ndarray] = field(default_factory=list)

    def add(self, waveforms: list[np.ndarray], rate: int, embedders: tuple[AudioEmbedder, ...]) -> None:
        for store, embed in zip((self.fad, self.fd, self.labels, self.imsm), embedders):
            store.append(embed(waveforms, rate))

    def stacked(self) -> _Embeddings:
        return _Embeddings(*([np.concatenate(part)] for part in (self.fad, self.fd, self.labels, self.imsm)))


def _load_rows(
    rows: list[tuple[int, Triplet]], triplets: Triplets, rate: int, length: int
) -> tuple[list, list, list[tuple[int, Triplet]]]:
    """References, images and (place, row) of the rows whose files decode; the others are rejected."""
    references, images, kept = [], [], []
    for place, row in rows:
        try:
            reference, image = fit_length(load_audio(row.audio, rate), length), load_image(row.image)
        except (InputError, ValueError) as exc:
            triplets.reject(row, str(exc))
            continue
        references.append(reference)
        images.append(image)
        kept.append((place, row))
    return references, images, kept


def evaluate(
    pipe: MelFusionPipeline,
    triplets: Triplets,
    evaluators: Evaluators,
    variants: list[Variant],
    *,
    steps: int,
    seconds: float,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 4,
    fad_embedder: AudioEmbedder | None = None,
    fd_embedder: AudioEmbedder | None = None,
    classifier: Classifier | None = None,
    imsm_audio_embedder: AudioEmbedder | None = None,
) -> list[Scores]:
    """One Scores per variant; rows whose files fail to decode move from `triplets.rows` to `triplets.bad`.

    `imsm_audio_embedder`: an audio encoder aligned to the frozen CLIP text encoder, as the paper builds
    IMSM's A_CLAP (section 4.2.1); then both matrices use CLIP's text embeddings. Without it, A_CLAP uses
    CLAP's own audio and text towers, the closest public stand-in.
    """
    embedders = (fad_embedder or evaluators.audio_embeddings, fd_embedder or evaluators.audio_pooled,
                 classifier or evaluators.label_distribution, imsm_audio_embedder or evaluators.audio_embeddings)
    rate, length = pipe.sampling_rate, round(seconds * pipe.sampling_rate)
    references, generated = _Embeddings(), {v.name: _Embeddings() for v in variants}
    image_embeddings, captions = [], []
    rows = list(enumerate(triplets.rows))
    for start in tqdm(range(0, len(rows), batch_size), desc="evaluating", unit="batch"):
        waveforms, images, kept = _load_rows(rows[start:start + batch_size], triplets, rate, length)
        if not kept:
            continue
        seeds = [seed + place for place, _ in kept]  # a row's clip does not depend on the batching
        batch_captions = [row.caption for _, row in kept]
        references.add(waveforms, rate, embedders)
        image_embeddings.append(evaluators.image_embeddings(images))
        captions += batch_captions
        features: dict[str, ImageFeatures] = {}  # this batch's only: per synapse layout, freed after the batch
        for variant in variants:
            model = variant.pipe or pipe
            layout = json.dumps(dict(model.synapse.config), sort_keys=True, default=str)
            if variant.image_strength > 0 and layout not in features:
                features[layout] = ImageFeatures.concat([model.encode_image(image, steps) for image in images])
            audios = model(batch_captions, image_features=features.get(layout), seconds=seconds,
                           num_inference_steps=steps, guidance_scale=guidance_scale,
                           image_strength=variant.image_strength, seed=seeds).audios
            generated[variant.name].add(list(audios), rate, embedders)
        del features
    if len(captions) < 2:
        raise InputError("data", "evaluation needs at least two usable rows (covariances, IMSM)")

    # Scores per variant against the references
    clip_text = evaluators.clip_text_embeddings(captions)
    imsm_text = clip_text if imsm_audio_embedder is not None else evaluators.clap_text_embeddings(captions)
    image_embeddings, reference = np.concatenate(image_embeddings), references.stacked()
    results = []
    for variant in variants:
        clips = generated[variant.name].stacked()
        results.append(Scores(
            variant.name,
            len(captions),
            fad=frechet_distance(reference.fad[0], clips.fad[0]),
            kl=kl_divergence(reference.labels[0], clips.labels[0]),
            fd=frechet_distance(reference.fd[0], clips.fd[0]),
            imsm=imsm(image_embeddings, clip_text, clips.imsm[0], imsm_text,
                      clip_scale=evaluators.clip_scale, clap_scale=evaluators.clap_scale),
        ))
    return results


def format_table(scores: list[Scores], *, meaningful: bool, skipped: int) -> str:
    """A Markdown table shaped like the paper's Table 1 (objective metrics)."""
    lines = [
        f"Evaluated on {scores[0].rows} rows ({skipped} skipped).",
        *([] if meaningful else [f"**Warning: {MEANINGLESS}.**"]),
        "",
        "| Variant | FAD ↓ | KL ↓ | FD ↓ | IMSM ↑ |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(f"| {s.variant} | {s.fad:.3f} | {s.kl:.3f} | {s.fd:.3f} | {s.imsm:.3f} |" for s in scores),
    ]
    return "\n".join(lines) + "\n"
