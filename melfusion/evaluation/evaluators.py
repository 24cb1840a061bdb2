"""CLIP and CLAP, the evaluator networks: from local folders, or tiny random ones whose figures mean nothing.

CLAP (`transformers.ClapModel`, e.g. a local copy of laion/clap-htsat-unfused) provides the default audio
embedders and classifier: FAD uses its projected audio embedding, FD its un-projected pooled audio
feature, KL its zero-shot distribution over `MUSIC_LABELS`. The paper's FAD/FD/KL use VGGish, PANNs and an
AudioSet classifier; numbers from CLAP are comparable between our variants, not to the paper's tables.
Any `AudioEmbedder` can take their place in `evaluation.run.evaluate`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    PreTrainedTokenizerBase,
)

from ..dataset.audio import resample
from ..presets import build_clip_tokenizer
from .metrics import cosine, softmax

AudioEmbedder = Callable[[list[np.ndarray], int], np.ndarray]  # (waveforms, sampling rate) -> (N, D)

# Zero-shot labels for the KL classifier: genres, moods and instruments of MusicCaps/MeLBench captions.
MUSIC_LABELS = (
    "rock", "pop", "jazz", "classical", "electronic", "hip hop", "folk", "country", "blues", "metal", "ambient",
    "reggae", "piano", "guitar", "drums", "violin", "synthesizer", "vocals", "calm", "happy", "sad", "energetic",
)


@dataclass
class Evaluators:
    clip: CLIPModel
    clip_images: CLIPImageProcessor
    clip_tokenizer: PreTrainedTokenizerBase
    clap: ClapModel
    clap_audio: ClapFeatureExtractor
    clap_tokenizer: PreTrainedTokenizerBase
    meaningful: bool  # False when either network is a tiny random stand-in

    @classmethod
    def load(cls, clip_dir: str | os.PathLike | None, clap_dir: str | os.PathLike | None) -> Evaluators:
        """Models from local folders (no download); a missing folder falls back to a tiny random model."""
        tiny = cls.tiny_random()
        local = {"local_files_only": True}
        clip = (tiny.clip, tiny.clip_images, tiny.clip_tokenizer)
        if clip_dir:
            clip = (CLIPModel.from_pretrained(clip_dir, **local).eval(), CLIPImageProcessor.from_pretrained(clip_dir, **local),
                    AutoTokenizer.from_pretrained(clip_dir, **local))
        clap = (tiny.clap, tiny.clap_audio, tiny.clap_tokenizer)
        if clap_dir:
            clap = (ClapModel.from_pretrained(clap_dir, **local).eval(), ClapFeatureExtractor.from_pretrained(clap_dir, **local),
                    AutoTokenizer.from_pretrained(clap_dir, **local))
        return cls(*clip, *clap, meaningful=bool(clip_dir and clap_dir))

    @classmethod
    def tiny_random(cls, seed: int = 0) -> Evaluators:
        """Real CLIP/CLAP classes at a few thousand parameters, random weights, built in code."""
        torch.manual_seed(seed)
        text = {"vocab_size": 1000, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                "intermediate_size": 37, "max_position_embeddings": 77}
        clip = CLIPModel(CLIPConfig(
            text_config=text | {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
            vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "intermediate_size": 37},
            projection_dim=16,
        ))
        clap = ClapModel(ClapConfig(
            text_config=text | {"max_position_embeddings": 80},
            audio_config={"spec_size": 128, "window_size": 4, "num_mel_bins": 64, "patch_size": 4, "patch_stride": 4,
                          "hidden_size": 32, "depths": [1, 1], "num_attention_heads": [2, 2],
                          "patch_embeds_hidden_size": 16, "enable_fusion": False},
            projection_dim=16,
        ))
        return cls(
            clip.eval(),
            CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
            build_clip_tokenizer(),
            clap.eval(),
            ClapFeatureExtractor(max_length_s=2, truncation="rand_trunc"),  # spec_size 128 holds 2 s
            build_clip_tokenizer(),
            meaningful=False,
        )

    @property
    def clip_scale(self) -> float:
        return float(self.clip.logit_scale.detach().exp())

    @property
    def clap_scale(self) -> float:
        return float(self.clap.logit_scale_a.detach().exp())

    @torch.no_grad()
    def image_embeddings(self, images: list[Image.Image]) -> np.ndarray:
        pixels = self.clip_images(images, return_tensors="pt").pixel_values
        return self.clip.get_image_features(pixel_values=pixels).pooler_output.numpy()

    @torch.no_grad()
    def clip_text_embeddings(self, texts: list[str]) -> np.ndarray:
        tokens = self.clip_tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        return self.clip.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output.numpy()

    @torch.no_grad()
    def clap_text_embeddings(self, texts: list[str]) -> np.ndarray:
        tokens = self.clap_tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        return self.clap.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output.numpy()

    def _audio_inputs(self, waveforms: list[np.ndarray], sampling_rate: int) -> torch.Tensor:
        rate = self.clap_audio.sampling_rate  # 48 kHz for LAION CLAP
        clips = [resample(w.astype(np.float32), sampling_rate, rate) for w in waveforms]
        return self.clap_audio(clips, sampling_rate=rate, return_tensors="pt").input_features

    @torch.no_grad()
    def audio_embeddings(self, waveforms: list[np.ndarray], sampling_rate: int) -> np.ndarray:
        """CLAP's projected audio embedding: the default FAD embedder and IMSM's audio side."""
        inputs = self._audio_inputs(waveforms, sampling_rate)
        return self.clap.get_audio_features(input_features=inputs).pooler_output.numpy()

    @torch.no_grad()
    def audio_pooled(self, waveforms: list[np.ndarray], sampling_rate: int) -> np.ndarray:
        """CLAP's pooled audio-encoder feature before the projection: the default FD embedder."""
        return self.clap.audio_model(input_features=self._audio_inputs(waveforms, sampling_rate)).pooler_output.numpy()

    def label_distribution(self, waveforms: list[np.ndarray], sampling_rate: int) -> np.ndarray:
        """Zero-shot CLAP classifier over MUSIC_LABELS: (N, labels) probabilities, the default for KL."""
        labels = self.clap_text_embeddings([f"this is {label} music" for label in MUSIC_LABELS])
        return softmax(self.clap_scale * cosine(self.audio_embeddings(waveforms, sampling_rate), labels))
