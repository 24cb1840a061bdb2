"""Fréchet distance, KL and IMSM (eq. 8) on small hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from melfusion.evaluation.metrics import frechet_distance, imsm, imsm_matrix, imsm_score, kl_divergence


def test_frechet_distance_is_zero_for_identical_sets():
    a = np.random.default_rng(0).normal(size=(40, 5))
    assert frechet_distance(a, a.copy()) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_a_hand_computed_value():
    # 1-D: means 1 and 3, sample variances 2 and 8 -> (1-3)² + 2 + 8 - 2·√(2·8) = 6
    assert frechet_distance(np.array([[0.0], [2.0]]), np.array([[1.0], [5.0]])) == pytest.approx(6.0)
    # 2-D, diagonal covariances: per axis (μa-μb)² + σa² + σb² - 2σaσb
    a = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])  # mean 0, cov diag(2/3, 8/3)
    b = a * 3 + np.array([1.0, -1.0])  # mean (1, -1), cov diag(6, 24)
    expected = 2 + (2 / 3 + 6 - 2 * math.sqrt(4)) + (8 / 3 + 24 - 2 * math.sqrt(64))
    assert frechet_distance(a, b) == pytest.approx(expected)


def test_frechet_distance_is_symmetric():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(30, 4)), rng.normal(loc=0.5, scale=2.0, size=(25, 4))
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, b) > 1.0


def test_kl_divergence_of_label_distributions():
    p = np.array([[0.5, 0.5], [0.1, 0.9]])
    q = np.array([[0.25, 0.75], [0.1, 0.9]])
    expected = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75) + 0.0) / 2
    assert kl_divergence(p, q) == pytest.approx(expected)
    assert kl_divergence(p, p) == pytest.approx(0.0)


def test_imsm_matrix_is_eq_8_on_hand_made_embeddings():
    # Two triples whose image, text and audio embeddings are the axes: image 0 ~ text 0 ~ audio 1, crossed
    image = np.array([[1.0, 0.0], [0.0, 1.0]])
    text = np.array([[2.0, 0.0], [0.0, 3.0]])  # lengths must not matter: cosine similarity
    audio = np.array([[0.0, 1.0], [1.0, 0.0]])
    matrix = imsm_matrix(image, text, audio, text, clip_scale=1.0, clap_scale=1.0)
    hi, lo = math.e / (math.e + 1), 1 / (math.e + 1)  # softmax over captions of cosines (1, 0)
    a_clip = np.array([[hi, lo], [lo, hi]])
    a_clap = np.array([[lo, hi], [hi, lo]])
    np.testing.assert_allclose(matrix, a_clip @ a_clap.T)
    assert imsm_score(matrix) == 0.0  # every image prefers the other image's clip
    assert imsm_score(imsm_matrix(image, text, audio[::-1], text, clip_scale=1.0, clap_scale=1.0)) == 1.0


def triples(n: int, rng: np.random.Generator, *, noise: float) -> tuple[np.ndarray, ...]:
    """n (image, text, audio) embeddings around n shared topics; `noise` blurs image and audio."""
    topics = rng.normal(size=(n, 16))
    return (topics + noise * rng.normal(size=(n, 16)), topics, topics + noise * rng.normal(size=(n, 16)))


def test_imsm_does_not_change_with_the_number_of_rows():
    """Eq. 8's diagonal falls like 1/N for equally good music; IMSM must not move."""
    rng = np.random.default_rng(0)
    scores, diagonals = {}, {}
    for n in (256, 1024, 4096):
        image, text, audio = triples(n, rng, noise=1.5)
        matrix = imsm_matrix(image, text, audio, text, clip_scale=10.0, clap_scale=10.0)
        diagonals[n] = float(np.diag(matrix).mean())
        scores[n] = imsm(image, text, audio, text, clip_scale=10.0, clap_scale=10.0)
    assert diagonals[4096] < diagonals[256] / 10  # what the old score did
    assert max(scores.values()) - min(scores.values()) < 0.03 and min(scores.values()) > 0.8


def test_imsm_of_music_unrelated_to_its_image_is_one_half():
    rng = np.random.default_rng(1)
    image, text, _ = triples(512, rng, noise=0.5)
    unrelated = rng.normal(size=(512, 16))
    assert imsm(image, text, unrelated, text, clip_scale=10.0, clap_scale=10.0) == pytest.approx(0.5, abs=0.03)
