"""Evaluate models on a triplet set: generate per variant, then FAD, KL, FD and IMSM (paper Tables 1, 2, 11, 14).

A variant is a model and an image strength: the untouched TANGO UNet on captions alone (the paper's
text-to-music baseline), the trained model on captions alone (α = 0) and with the image (learned α), or
another trained model such as a fixed-α run of Table 14 (`melfusion.training.experiments`). Models other
than the evaluated one share its frozen parts (`sharing_frozen_parts`), so each adds one music UNet.

Rows stream through in batches: a batch's image features (1.4 GB per row at 400 steps and SD 1.5 size)
live on the device only while that batch is generated, and only embeddings are kept, so memory does not
grow with the number of rows. One image pass per row serves every variant: it records the synapse sites
of all their layouts at once (Table 2's encoder, decoder and both arms). Under `accelerate launch` each
process generates every N-th row and the embeddings are gathered, so the scores are those of one process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ..attention import ImageFeatures, attach_recorders
from ..bundle import load_pipeline
from ..dataset.audio import fit_length, load_audio
from ..dataset.manifest import Triplet, Triplets
from ..errors import InputError
from ..images import load_image
from ..launch import process_state
from ..pipeline import ImageFeatureSource, MelFusionPipeline
from ..synapse import VisualSynapse
from .evaluators import AudioEmbedder, Evaluators
from .metrics import frechet_distance, imsm, kl_divergence

Classifier = Callable[[list[np.ndarray], int], np.ndarray]  # (waveforms, rate) -> (N, labels) probabilities
MEANINGLESS = "tiny random CLIP/CLAP evaluators (no --clip/--clap folders): these figures are meaningless"
FROZEN_PARTS = ("image_vae", "image_unet", "image_text_encoder", "text_encoder", "mel_vae", "vocoder")
TRAINING_FEATURES: ImageFeatureSource = "redenoise"  # what training mixes in: K/V along the re-denoised trajectory
FEATURE_SOURCES = {"redenoise": "re-denoised, as in training", "inversion": "recorded during inversion, the service default"}


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

    @classmethod
    def joined(cls, parts: list[_Embeddings], order: np.ndarray) -> _Embeddings:
        """The parts' rows one after another, then reordered by `order`: one array per metric."""
        return cls(*([np.concatenate([a for part in parts for a in getattr(part, name)])[order]]
                     for name in ("fad", "fd", "labels", "imsm")))


@dataclass
class _Shard:
    """What one process measured of its rows, in the order of `places` (the rows' places in the set)."""

    places: list[int] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)  # CLIP image embeddings, one array per batch
    references: _Embeddings = field(default_factory=_Embeddings)
    generated: dict[str, _Embeddings] = field(default_factory=dict)


def _load_rows(rows: list[tuple[int, Triplet]], shard: _Shard, rate: int, length: int) -> tuple[list, list, list]:
    """References, images and (place, row) of the rows whose files decode; the others are noted as rejected."""
    references, images, kept = [], [], []
    for place, row in rows:
        try:
            reference, image = fit_length(load_audio(row.audio, rate), length), load_image(row.image)
        except (InputError, ValueError) as exc:
            shard.rejected.append((place, str(exc)))
            continue
        references.append(reference)
        images.append(image)
        kept.append((place, row))
    return references, images, kept


def recording_synapses(pipe: MelFusionPipeline, variants: list[Variant]) -> dict[int, VisualSynapse]:
    """Per image grid, one recorder layout holding every site the variants with an image mix in.

    The variants share `pipe`'s image UNet, whose recorders follow one synapse at a time (the evaluated
    model's decoder blocks); recording the union of their blocks lets one image pass serve them all.
    """
    sites: dict[int, list[str]] = {}  # image grid -> blocks to record
    for variant in variants:
        model = variant.pipe or pipe
        if model.image_unet is not pipe.image_unet:
            raise InputError("variants", f"{variant.name}: its model must share the evaluated model's image side")
        if variant.image_strength > 0:
            blocks = sites.setdefault(model.synapse.config.image_grid, [])
            blocks += [block for block in model.synapse.config.blocks if block not in blocks]
    own = pipe.synapse.config  # the common case, the evaluated model's layout alone: keep its recorders
    return {grid: pipe.synapse if (grid, blocks) == (own.image_grid, list(own.blocks))
            else VisualSynapse(blocks=tuple(blocks), initial_alphas=(0.0,), image_grid=grid) for grid, blocks in sites.items()}


@contextlib.contextmanager
def features_from(pipe: MelFusionPipeline, source: ImageFeatureSource) -> Iterator[None]:
    """`pipe.encode_image` computes `source` features in the body; its own setting and recorders come back after."""
    kept = pipe.config.image_features_from
    pipe.register_to_config(image_features_from=source)
    try:
        yield
    finally:
        pipe.register_to_config(image_features_from=kept)
        if pipe.feature_recorder.synapse is not pipe.synapse:
            attach_recorders(pipe.image_unet, pipe.synapse)


def _generate_shard(
    pipe: MelFusionPipeline,
    rows: list[tuple[int, Triplet]],
    evaluators: Evaluators,
    variants: list[Variant],
    embedders: tuple[AudioEmbedder, ...],
    *,
    steps: int,
    seconds: float,
    guidance_scale: float | None,
    seed: int,
    batch_size: int,
    show_progress: bool,
) -> _Shard:
    """Generate every variant's clip for `rows` and keep only their embeddings."""
    rate, length = pipe.sampling_rate, round(seconds * pipe.sampling_rate)
    shard = _Shard(generated={v.name: _Embeddings() for v in variants})
    recording = recording_synapses(pipe, variants)
    for start in tqdm(range(0, len(rows), batch_size), desc="evaluating", unit="batch", disable=not show_progress):
        waveforms, images, kept = _load_rows(rows[start:start + batch_size], shard, rate, length)
        if not kept:
            continue
        seeds = [seed + place for place, _ in kept]  # a row's clip does not depend on batching or sharding
        captions = [row.caption for _, row in kept]
        shard.places += [place for place, _ in kept]
        shard.captions += captions
        shard.references.add(waveforms, rate, embedders)
        shard.images.append(evaluators.image_embeddings(images))
        features: dict[int, ImageFeatures] = {}  # this batch's only, per image grid: freed after the batch
        for grid, synapse in recording.items():
            if pipe.feature_recorder.synapse is not synapse:
                attach_recorders(pipe.image_unet, synapse)
            features[grid] = ImageFeatures.concat([pipe.encode_image(image, steps) for image in images])
        for variant in variants:
            model = variant.pipe or pipe
            audios = model(captions, image_features=features.get(model.synapse.config.image_grid), seconds=seconds,
                           num_inference_steps=steps, guidance_scale=guidance_scale,
                           image_strength=variant.image_strength, seed=seeds).audios
            shard.generated[variant.name].add(list(audios), rate, embedders)
        del features
    return shard


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
    image_features_from: ImageFeatureSource = TRAINING_FEATURES,
    fad_embedder: AudioEmbedder | None = None,
    fd_embedder: AudioEmbedder | None = None,
    classifier: Classifier | None = None,
    imsm_audio_embedder: AudioEmbedder | None = None,
) -> list[Scores]:
    """One Scores per variant; rows whose files fail to decode move from `triplets.rows` to `triplets.bad`.

    Under `accelerate launch`, process r generates rows r, r + N, ...; every process returns the same
    scores, computed from everyone's embeddings in row order. `image_features_from`: the image K/V the
    synapse mixes in; by default those training used ("redenoise"), not the service's faster default.

    `imsm_audio_embedder`: an audio encoder aligned to the frozen CLIP text encoder, as the paper builds
    IMSM's A_CLAP (section 4.2.1); then both matrices use CLIP's text embeddings. Without it, A_CLAP uses
    CLAP's own audio and text towers, the closest public stand-in.
    """
    state = process_state()
    embedders = (fad_embedder or evaluators.audio_embeddings, fd_embedder or evaluators.audio_pooled,
                 classifier or evaluators.label_distribution, imsm_audio_embedder or evaluators.audio_embeddings)
    every_row = list(enumerate(triplets.rows))
    with features_from(pipe, image_features_from):
        mine = _generate_shard(
            pipe, every_row[state.process_index::state.num_processes], evaluators, variants, embedders,
            steps=steps, seconds=seconds, guidance_scale=guidance_scale, seed=seed, batch_size=batch_size,
            show_progress=state.is_main_process,
        )
    shards = gather_object([mine])  # every process's, in process order
    for place, reason in sorted(r for shard in shards for r in shard.rejected):
        triplets.reject(every_row[place][1], reason)
    places = np.array([place for shard in shards for place in shard.places])
    if len(places) < 2:
        raise InputError("data", "evaluation needs at least two usable rows (covariances, IMSM)")

    # Scores per variant against the references, rows in set order (IMSM groups consecutive rows)
    order = np.argsort(places)
    captions = [caption for shard in shards for caption in shard.captions]
    captions = [captions[i] for i in order]
    image_embeddings = np.concatenate([a for shard in shards for a in shard.images])[order]
    reference = _Embeddings.joined([shard.references for shard in shards], order)
    clip_text = evaluators.clip_text_embeddings(captions)
    imsm_text = clip_text if imsm_audio_embedder is not None else evaluators.clap_text_embeddings(captions)
    results = []
    for variant in variants:
        clips = _Embeddings.joined([shard.generated[variant.name] for shard in shards], order)
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


def format_table(
    scores: list[Scores], *, meaningful: bool, skipped: int, image_features_from: ImageFeatureSource = TRAINING_FEATURES
) -> str:
    """A Markdown table shaped like the paper's Table 1 (objective metrics), saying which image features it used."""
    lines = [
        f"Evaluated on {scores[0].rows} rows ({skipped} skipped); image features: {image_features_from} "
        f"({FEATURE_SOURCES[image_features_from]}).",
        *([] if meaningful else [f"**Warning: {MEANINGLESS}.**"]),
        "",
        "| Variant | FAD ↓ | KL ↓ | FD ↓ | IMSM ↑ |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(f"| {s.variant} | {s.fad:.3f} | {s.kl:.3f} | {s.fd:.3f} | {s.imsm:.3f} |" for s in scores),
    ]
    return "\n".join(lines) + "\n"
