"""Attention processors of the visual synapse: record K/V on the image UNet, mix them in on the music UNet.

A write processor sits on the image UNet's self-attention (`attn1`) of the synapse blocks and records the
pooled K and V of every denoising step (Algorithm 2, line 6). A read-and-mix processor sits on the music
UNet's cross-attention (`attn2`) of the same blocks and applies eq. 5-6 (lines 7-9). Both are attached
only for the duration of one call (`recording_self_attention`, `mixing_image_features`), so the UNets run
their stock processors otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

from .synapse import VisualSynapse


@dataclass
class ImageFeatures:
    """What the synapse consumes from one image or a batch of images: pooled self-attention K/V.

    `keys[site]` and `values[site]` are (steps, B, grid², D), where `site` names an attention module
    shared by both UNets (`up_blocks.1.attentions.0`) and step i belongs to `timesteps[i]` (descending).
    The object depends on the image, the timestep grid and the synapse's image_grid only — not on the
    caption, seed or guidance — so it can be cached per image and reused.
    """

    timesteps: torch.Tensor
    keys: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return next(iter(self.keys.values())).shape[1]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ImageFeatures:
        move = lambda t: t.to(device=device, dtype=dtype)
        return ImageFeatures(
            self.timesteps.to(device),
            {k: move(v) for k, v in self.keys.items()},
            {k: move(v) for k, v in self.values.items()},
        )

    @classmethod
    def concat(cls, parts: list[ImageFeatures]) -> ImageFeatures:
        """Join features of single images into one batch; all must share one timestep grid."""
        first = parts[0]
        for other in parts[1:]:
            if not torch.equal(other.timesteps.cpu(), first.timesteps.cpu()):
                raise ValueError("image features were captured on different timestep grids")
        return cls(
            first.timesteps,
            {k: torch.cat([p.keys[k] for p in parts], dim=1) for k in first.keys},
            {k: torch.cat([p.values[k] for p in parts], dim=1) for k in first.values},
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.keys.values(), *self.values.values()])


def site_of(processor_name: str) -> str:
    """`up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor` -> `up_blocks.1.attentions.0`."""
    return processor_name.split(".transformer_blocks.")[0]


class KeyValueHookProcessor:
    """AttnProcessor2_0's computation with a hook between the K/V projections and the attention.

    Only the features the SD/TANGO transformer blocks use are supported (no group/spatial norm, no
    residual inside the processor): `_check_supported` refuses other layouts rather than compute them
    wrongly. With an identity hook the result is bit-identical to diffusers' AttnProcessor2_0.
    """

    def on_key_value(self, attn: Attention, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        batch_size = hidden_states.shape[0]
        if attention_mask is not None:
            length = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key, value = self.on_key_value(attn, attn.to_k(context), attn.to_v(context))  # (B, S, inner)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, T, head_dim)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states / attn.rescale_output_factor


def _check_supported(name: str, attn: Attention) -> None:
    unsupported = [
        flag
        for flag in ("spatial_norm", "group_norm", "norm_q", "norm_k", "norm_cross")
        if getattr(attn, flag, None) not in (None, False)
    ]
    if unsupported or attn.residual_connection:
        raise ValueError(f"{name}: attention layout not supported by the synapse ({unsupported or 'residual'})")


class SelfAttentionRecorder(KeyValueHookProcessor):
    """Write side: stores the pooled self-attention K/V of one image-UNet layer at the current step."""

    def __init__(self, site: str, store: _FeatureStore):
        self.site = site
        self.store = store

    def on_key_value(self, attn, key, value):
        pool = self.store.synapse.pool_image_tokens
        self.store.keys[self.site].append(pool(key))
        self.store.values[self.site].append(pool(value))
        return key, value


class SynapseMixer(KeyValueHookProcessor):
    """Read side: eq. 5-6 on one music-UNet cross-attention layer, K = w·K_img + (1-w)·K_music.

    w = α_block · image_strength, per batch row (zero on CFG rows that must not see the image).
    """

    def __init__(self, site: str, block: str, state: _MixState):
        self.site = site
        self.block = block
        self.state = state

    def on_key_value(self, attn, key, value):
        state = self.state
        image_key = state.features.keys[self.site][state.step]  # (B_img, N, D)
        image_value = state.features.values[self.site][state.step]
        matching = state.token_matching.to(key.dtype)  # (B, S, N)
        weight = (state.synapse.alpha_for(self.block) * state.row_strength).to(key.dtype)[:, None, None]
        image_key = matching @ image_key.repeat(state.image_repeats, 1, 1)  # (B, S, D)
        image_value = matching @ image_value.repeat(state.image_repeats, 1, 1)
        return weight * image_key + (1 - weight) * key, weight * image_value + (1 - weight) * value


@dataclass
class _FeatureStore:
    synapse: VisualSynapse
    keys: dict[str, list[torch.Tensor]]
    values: dict[str, list[torch.Tensor]]

    def features(self, timesteps: torch.Tensor) -> ImageFeatures:
        stack = lambda steps: torch.stack(steps)
        return ImageFeatures(
            timesteps.cpu(),
            {site: stack(v) for site, v in self.keys.items()},
            {site: stack(v) for site, v in self.values.items()},
        )


@dataclass
class _MixState:
    synapse: VisualSynapse
    features: ImageFeatures
    token_matching: torch.Tensor  # (B, S, N)
    row_strength: torch.Tensor  # (B,) image_strength, 0 on rows that do not see the image
    image_repeats: int  # the music batch is the image batch repeated (CFG branches)
    step: int = 0


def synapse_sites(unet: UNet2DConditionModel, synapse: VisualSynapse, attention: str) -> dict[str, str]:
    """Processor names of `attention` ("attn1" or "attn2") in the synapse blocks, keyed by name -> block."""
    sites = {}
    for name in unet.attn_processors:
        block = synapse.block_of(name)
        if block is not None and name.endswith(f"{attention}.processor"):
            sites[name] = block
    return sites


@contextlib.contextmanager
def _swapped_processors(unet: UNet2DConditionModel, replacements: dict) -> Iterator[None]:
    original = unet.attn_processors
    modules = dict(unet.named_modules())
    for name in replacements:
        _check_supported(name, modules[name.removesuffix(".processor")])
    unet.set_attn_processor({**original, **replacements})
    try:
        yield
    finally:
        unet.set_attn_processor(original)


@contextlib.contextmanager
def recording_self_attention(unet: UNet2DConditionModel, synapse: VisualSynapse) -> Iterator[_FeatureStore]:
    """Attach recorders to the image UNet's synapse self-attention layers for the `with` body."""
    sites = {name: site_of(name) for name in synapse_sites(unet, synapse, "attn1")}
    store = _FeatureStore(synapse, {s: [] for s in sites.values()}, {s: [] for s in sites.values()})
    with _swapped_processors(unet, {name: SelfAttentionRecorder(site, store) for name, site in sites.items()}):
        yield store


@contextlib.contextmanager
def mixing_image_features(
    unet: UNet2DConditionModel,
    synapse: VisualSynapse,
    features: ImageFeatures,
    *,
    text_mask: torch.Tensor,
    row_strength: torch.Tensor,
) -> Iterator[_MixState]:
    """Attach mixers to the music UNet's synapse cross-attention layers; set `state.step` per step."""
    layers = synapse_sites(unet, synapse, "attn2")
    missing = {site_of(n) for n in layers} - set(features.keys)
    if missing:
        raise ValueError(f"image features lack synapse sites {sorted(missing)}")
    num_tokens = next(iter(features.keys.values())).shape[2]
    state = _MixState(
        synapse,
        features,
        synapse.token_matching_matrix(text_mask, num_tokens).to(text_mask.device),
        row_strength,
        image_repeats=text_mask.shape[0] // features.batch_size,
    )
    with _swapped_processors(unet, {n: SynapseMixer(site_of(n), b, state) for n, b in layers.items()}):
        yield state
