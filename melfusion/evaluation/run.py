"""Evaluate a bundle on a triplet set: generate per variant, then FAD, KL, FD and IMSM (paper Tables 1 and 14).

Variants: text only (α = 0, the TANGO baseline), image + text with the bundle's learned α, and image + text
with every α fixed to a value (Table 14). Image features are computed once per row and reused by every
variant, since they do not depend on α.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from ..dataset.audio import fit_length, load_audio
from ..dataset.manifest import Triplets
from ..errors import InputError
from ..images import load_image
from ..pipeline import MelFusionPipeline
from ..synapse import VisualSynapse
from .evaluators import AudioEmbedder, Evaluators
from .metrics import frechet_distance, imsm_matrix, imsm_score, kl_divergence

Classifier = Callable[[list[np.ndarray], int], np.ndarray]  # (waveforms, rate) -> (N, labels) probabilities
MEANINGLESS = "tiny random CLIP/CLAP evaluators (no --clip/--clap folders): these figures are meaningless"


@dataclass(frozen=True)
class Variant:
    name: str
    image_strength: float  # 0 = caption only (α = 0); 1 = the synapse's α as they are
    alpha: float | None = None  # every α held at this value; None keeps the learned ones


def default_variants(fixed_alphas: tuple[float, ...] = (0.1, 0.5, 0.9)) -> list[Variant]:
    return [
        Variant("text only (α = 0)", 0.0),
        Variant("image + text (learned α)", 1.0),
        *(Variant(f"image + text (α = {a:g})", 1.0, a) for a in fixed_alphas),
    ]


@dataclass(frozen=True)
class Scores:
    variant: str
    rows: int  # triplets generated and scored
    fad: float
    kl: float
    fd: float
    imsm: float


@contextlib.contextmanager
def alphas_held_at(synapse: VisualSynapse, value: float | None) -> Iterator[None]:
    if value is None:
        yield
        return
    learned = synapse.alphas.data.clone()
    synapse.alphas.data.fill_(value)
    try:
        yield
    finally:
        synapse.alphas.data.copy_(learned)


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
    fad_embedder: AudioEmbedder | None = None,
    fd_embedder: AudioEmbedder | None = None,
    classifier: Classifier | None = None,
) -> list[Scores]:
    """One Scores per variant; rows whose files fail to decode move from `triplets.rows` to `triplets.bad`."""
    fad_embedder = fad_embedder or evaluators.audio_embeddings
    fd_embedder = fd_embedder or evaluators.audio_pooled
    classifier = classifier or evaluators.label_distribution
    rate, length = pipe.sampling_rate, round(seconds * pipe.sampling_rate)

    # 1. References and image features, once per row
    references, images, features = [], [], []
    for row in tqdm(list(triplets.rows), desc="encoding references", unit="row"):
        try:
            reference, image = fit_length(load_audio(row.audio, rate), length), load_image(row.image)
        except (InputError, ValueError) as exc:
            triplets.reject(row, str(exc))
            continue
        references.append(reference)
        images.append(image)
        features.append(pipe.encode_image(image, steps))
    if len(triplets.rows) < 2:
        raise InputError("data", "evaluation needs at least two usable rows (covariances, IMSM)")
    captions = [row.caption for row in triplets.rows]
    image_embeddings, clip_text = evaluators.image_embeddings(images), evaluators.clip_text_embeddings(captions)
    clap_text = evaluators.clap_text_embeddings(captions)
    reference_fad, reference_fd = fad_embedder(references, rate), fd_embedder(references, rate)
    reference_labels = classifier(references, rate)

    # 2. Generate and score each variant
    results = []
    for variant in variants:
        with alphas_held_at(pipe.synapse, variant.alpha):
            generated = [
                pipe(caption, image_features=f, seconds=seconds, num_inference_steps=steps,
                     guidance_scale=guidance_scale, image_strength=variant.image_strength, seed=seed + i).audios[0]
                for i, (caption, f) in enumerate(tqdm(list(zip(captions, features)), desc=variant.name, unit="clip"))
            ]
        matrix = imsm_matrix(image_embeddings, clip_text, evaluators.audio_embeddings(generated, rate), clap_text,
                             clip_scale=evaluators.clip_scale, clap_scale=evaluators.clap_scale)
        results.append(Scores(
            variant.name,
            len(captions),
            fad=frechet_distance(reference_fad, fad_embedder(generated, rate)),
            kl=kl_divergence(reference_labels, classifier(generated, rate)),
            fd=frechet_distance(reference_fd, fd_embedder(generated, rate)),
            imsm=imsm_score(matrix),
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

