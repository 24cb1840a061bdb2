"""The objective metrics of paper section 4.2.1 on embeddings and label distributions (numpy in, float out).

Which network makes the embeddings decides which of the paper's numbers a figure is comparable to: the
paper's FAD uses VGGish embeddings, its FD PANNs embeddings and its KL a PANNs/PaSST-style classifier's
labels; `melfusion eval` defaults to CLAP for all three (see evaluation/evaluators.py).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg


IMSM_GROUP = 32  # rows per eq. 8 matrix; see `imsm`


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) between two (N, D) embedding sets (FAD, FD, FID).

    Small sets give singular covariances; as in pytorch-fid/frechet_audio_distance, `eps`·I is added to
    both when the square root of their product is singular or non-finite.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error", linalg.LinAlgWarning)
        try:
            root = linalg.sqrtm(cov_a @ cov_b)
        except linalg.LinAlgWarning:  # singular product: fewer samples than dimensions
            root = np.full_like(cov_a, np.nan)
    if not np.isfinite(root).all():
        offset = np.eye(cov_a.shape[0]) * eps
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    distance = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root.real)
    return float(max(distance, 0.0))  # rounding can leave -1e-12 for identical sets


def kl_divergence(reference: np.ndarray, generated: np.ndarray, eps: float = 1e-8) -> float:
    """Mean over pairs of KL(p_ref ‖ p_gen) between (N, labels) classifier distributions (reference-based)."""
    p = np.clip(np.asarray(reference, dtype=np.float64), eps, None)
    q = np.clip(np.asarray(generated, dtype=np.float64), eps, None)
    return float((p * np.log(p / q)).sum(axis=1).mean())


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, M) logits."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) cosine similarities between the rows of a (N, D) and b (M, D)."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def imsm_matrix(
    image: np.ndarray, clip_text: np.ndarray, audio: np.ndarray, clap_text: np.ndarray,
    *, clip_scale: float = 100.0, clap_scale: float = 100.0,
) -> np.ndarray:
    """A_IMSM = A_CLIP · A_CLAPᵀ (eq. 8) for N (image, text, music) triples: (N images, N clips).

    A_CLIP[i, j] and A_CLAP[k, j] are the softmax over captions j of the models' scaled cosine logits
    (image i or clip k against caption j), as in the authors' `imsm_calculator.py`; the text is the bridge,
    so A_IMSM[i, k] is the chance that image i and clip k pick the same caption.
    """
    a_clip = softmax(clip_scale * cosine(image, clip_text))  # (N, N) rows: images, columns: texts
    a_clap = softmax(clap_scale * cosine(audio, clap_text))  # (N, N) rows: clips, columns: texts
    return a_clip @ a_clap.T


def imsm_score(matrix: np.ndarray) -> float:
    """One eq. 8 matrix as a number in [0, 1]: how often image i ranks its own clip above another clip.

    The pairwise ranking (the AUC of A_IMSM[i, i] against the row's other entries; ties count half) is
    0.5 for music unrelated to its image and 1 when every image picks its own clip. The mean of the
    diagonal would shrink like 1/N (each entry is a product of softmaxes over N captions); the authors'
    script softmaxes the matrix once more, flattening every entry towards 1/N.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    own = np.diag(matrix)[:, None]  # (N, 1)
    wins = (own > matrix).sum(axis=1) + 0.5 * ((own == matrix).sum(axis=1) - 1)  # the diagonal ties itself
    return float((wins / (matrix.shape[1] - 1)).mean())


def imsm(
    image: np.ndarray, clip_text: np.ndarray, audio: np.ndarray, clap_text: np.ndarray,
    *, clip_scale: float = 100.0, clap_scale: float = 100.0, group: int = IMSM_GROUP,
) -> float:
    """IMSM of a test set: `imsm_score` of eq. 8 over consecutive groups of `group` to 2·group−1 rows, averaged.

    The paper does not say how its per-dataset figures (0.5-0.95) reduce the matrix. Eq. 8 itself depends
    on N: with more captions in the softmaxes, more of them resemble each image, so even good music scores
    lower on a larger set. Fixed-size groups make the figure comparable across test sets and subsets.
    """
    groups = np.array_split(np.arange(len(image)), max(1, len(image) // group))
    scores = [imsm_score(imsm_matrix(image[g], clip_text[g], audio[g], clap_text[g],
                                     clip_scale=clip_scale, clap_scale=clap_scale)) for g in groups]
    return float(np.mean(scores))
