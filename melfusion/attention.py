"""Attention processors of the visual synapse: record K/V on the image UNet, mix them in on the music UNet.

A write processor sits on the image UNet's self-attention (`attn1`) of the synapse blocks and hands the
pooled K and V of each step to a `FeatureRecorder` (Algorithm 2, line 6). A read-and-mix processor sits on
the music UNet's cross-attention (`attn2`) of the same blocks and applies eq. 5-6 (lines 7-9).

Both are attached once, when the pipeline is built or loaded, and never swapped: everything that changes
between calls or steps lives in tensors of a `SynapseState` (the step's image K/V in buffers that stay put,
one row per UNet row, and the strength per row). A caption-only row reads zeros at strength 0, which is
exactly plain text-to-music. That is what lets `torch.compile` (CUDA graphs included) keep one graph per
shape for the whole loop: the shapes depend on the batch, never on how many of its rows carry a photo.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
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

    def row(self, index: int) -> ImageFeatures:
        """The features of one image of a batch, in memory of their own (a cache entry keeps no batch alive)."""
        take = lambda t: t[:, index : index + 1].contiguous()
        return ImageFeatures(
            self.timesteps, {k: take(v) for k, v in self.keys.items()}, {k: take(v) for k, v in self.values.items()}
        )

    def finite_rows(self) -> torch.Tensor:
        """(B,) True where every step's K and V of that image are finite (no host sync: a device tensor)."""
        tensors = [*self.keys.values(), *self.values.values()]
        return torch.stack([torch.isfinite(t).transpose(0, 1).flatten(1).all(1) for t in tensors]).all(0)


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
    """Write side: hands the pooled self-attention K/V of one image-UNet layer to the recorder."""

    def __init__(self, site: str, recorder: FeatureRecorder):
        self.site = site
        self.recorder = recorder

    def on_key_value(self, attn, key, value):
        pool = self.recorder.synapse.pool_image_tokens
        self.recorder.latest[self.site] = (pool(key), pool(value))  # (B, grid², D) each
        return key, value


class FeatureRecorder:
    """Collects the image UNet's synapse K/V, step by step, into an ImageFeatures object.

    The processors leave only the latest step's tensors in `latest`; `keep` copies them out right after
    each UNet call (a CUDA-graph replay overwrites its outputs on the next call). `latest` is one dict
    whose keys (the sites) never change: a compiled UNet guards on them, and a dict emptied before each
    image made every image UNet compile twice.
    """

    def __init__(self, synapse: VisualSynapse, sites: list[str]):
        self.synapse = synapse
        empty = torch.zeros(0)
        self.latest: dict[str, tuple[torch.Tensor, torch.Tensor]] = {site: (empty, empty) for site in sites}
        self.start()

    def start(self) -> None:
        """Begin a new walk over the grid (the sites in `latest` stay)."""
        self.kept: list[tuple[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = []

    def keep(self, timestep: torch.Tensor | int) -> None:
        """After a UNet call at `timestep`: keep the K/V it recorded."""
        self.kept.append((int(timestep), {site: (k.clone(), v.clone()) for site, (k, v) in self.latest.items()}))

    def features(self) -> ImageFeatures:
        """The kept steps, in descending timestep order (inversion records them ascending)."""
        steps = sorted(self.kept, key=lambda item: -item[0])
        sites = steps[0][1]
        stack = lambda which: {s: torch.stack([kv[s][which] for _, kv in steps]) for s in sites}  # (steps, B, N, D)
        return ImageFeatures(torch.tensor([t for t, _ in steps]), stack(0), stack(1))


class SynapseMixer(KeyValueHookProcessor):
    """Read side: eq. 5-6 on one music-UNet cross-attention layer, K = w·K_img + (1-w)·K_music.

    w = α_block · strength of the row (zero on rows that must not see an image), read from the state's
    tensors, so the processor itself never changes.
    """

    def __init__(self, site: str, block: str, state: SynapseState):
        self.site = site
        self.block = block
        self.state = state

    def on_key_value(self, attn, key, value):
        state = self.state
        weight = (state.synapse.alpha_for(self.block) * state.row_strength).to(key.dtype)[:, None, None]  # (B, 1, 1)
        matching = state.token_matching.to(key.dtype)  # (B, S, N)
        image_key = matching @ state.keys[self.site]  # (B, S, D)
        image_value = matching @ state.values[self.site]
        return weight * image_key + (1 - weight) * key, weight * image_value + (1 - weight) * value


class SynapseState:
    """The tensors the music UNet's mixers read: set per call and per step, never replaced while shapes hold.

    - `keys[site]`, `values[site]`: (R, N, D) the image K/V that each of the R UNet rows meets at the current
      step, zeros for a row without an image; views into one buffer that `select_step` fills with one gather,
      so their shapes follow the batch and never how many of its rows carry a photo;
    - `row_strength`: (R,) image_strength of the row, 0 where the row sees no image;
    - `token_matching`: (R, S, N) how the N image tokens meet the S text tokens.
    """

    def __init__(self, synapse: VisualSynapse, widths: dict[str, int]):
        self.synapse = synapse  # whose α the mixers apply
        self.widths = widths  # site -> K/V width
        self.keys: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}
        self.row_strength = torch.zeros(1)
        self.token_matching = torch.zeros(1, 1, 1)
        self._buffer = torch.zeros(0, 0)  # (R, W): every site's K then V, flattened side by side
        self._source: torch.Tensor | None = None  # (steps, B_img + 1, W): the call's features, a zero row last
        self._source_rows = torch.zeros(0, dtype=torch.long)  # (R,) the source row each UNet row reads
        self.feature_steps: list[int] = []  # music step i reads feature step feature_steps[i]
        self._step = 0  # the music step `select_step` last gathered
        # The call's rows (CFG: [uncond…, cond…] of every clip): source row, strength, token matching. The
        # UNet's R rows are all of them, or (`select_rows`) the rows a batch of windows reads.
        self._call_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def load(
        self,
        features: ImageFeatures | None,
        *,
        token_matching: torch.Tensor,
        row_strength: torch.Tensor,
        feature_rows: torch.Tensor,
        feature_steps: list[int],
        num_tokens: int,
        dtype: torch.dtype,
        unet_rows: torch.Tensor | None = None,
    ) -> None:
        """Set the call's tensors: call row r reads image `feature_rows[r]` of `features` (-1: no image, zeros).

        `features` None is a caption-only call: every row reads zeros (at strength 0). The UNet's rows
        read call rows `unet_rows` (default: all, in order), until `select_rows` points them at others.
        """
        device = token_matching.device
        missing = set(self.widths) - set(features.keys) if features is not None else set()
        if missing:
            raise ValueError(f"image features lack synapse sites {sorted(missing)}")
        unet_rows = torch.arange(len(feature_rows)) if unet_rows is None else unet_rows
        rows = len(unet_rows)
        layout = [(store, site, num_tokens * width)  # every site's K, then every site's V
                  for store in ("keys", "values") for site, width in self.widths.items()]  # fmt: skip
        self._buffer = _reuse(self._buffer, (rows, sum(size for *_, size in layout)), dtype, device)
        offset = 0
        for store, site, size in layout:  # (R, N, D) views: the mixers' tensors stay where the gather writes
            getattr(self, store)[site] = self._buffer[:, offset : offset + size].view(rows, num_tokens, -1)
            offset += size
        self.release()
        if features is None:
            self._buffer.zero_()
        else:
            images = features.batch_size
            source = torch.zeros(len(features.timesteps), images + 1, self._buffer.shape[1], dtype=dtype, device=device)
            offset = 0
            for store, site, size in layout:
                source[:, :images, offset : offset + size] = getattr(features, store)[site].flatten(2)
                offset += size
            self._source = source
            self.feature_steps = feature_steps
        source_rows = torch.where(feature_rows < 0, 0 if features is None else features.batch_size, feature_rows)
        self._call_rows = (source_rows.to(device), row_strength.to(device=device, dtype=torch.float32), token_matching)
        self._step = 0
        self.select_rows(unet_rows)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Point the UNet's rows at call rows `rows` (a batch of windows, each reading its own clip's image,
        strength and caption) and gather their image K/V at the current step, into the same buffers."""
        source_rows, row_strength, token_matching = (value[rows.to(value.device)] for value in self._call_rows)
        self._source_rows = _assign(self._source_rows, source_rows)
        self.row_strength = _assign(self.row_strength, row_strength)
        self.token_matching = _assign(self.token_matching, token_matching)
        if self.feature_steps:
            self.select_step(self._step)

    def select_step(self, step: int) -> None:
        """Gather the image K/V each row meets at music step `step` into the mixers' buffer (lines 7-9)."""
        self._step = step
        if self._source is not None:
            torch.index_select(self._source[self.feature_steps[step]], 0, self._source_rows, out=self._buffer)

    def release(self) -> None:
        """Drop the call's features (the buffer keeps the last step's K/V until the next `load`)."""
        self._source, self.feature_steps, self._call_rows = None, [], None


def _reuse(buffer: torch.Tensor | None, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if buffer is not None and buffer.shape == shape and buffer.dtype == dtype and buffer.device == device:
        return buffer
    return torch.zeros(shape, dtype=dtype, device=device)


def _assign(buffer: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` copied into `buffer` when shapes allow (the address a CUDA graph captured stays valid)."""
    if buffer.shape == value.shape and buffer.dtype == value.dtype and buffer.device == value.device:
        return buffer.copy_(value)
    return value.clone()


def synapse_sites(unet: UNet2DConditionModel, synapse: VisualSynapse, attention: str) -> dict[str, str]:
    """Processor names of `attention` ("attn1" or "attn2") in the synapse blocks, keyed by name -> block."""
    sites = {}
    for name in unet.attn_processors:
        block = synapse.block_of(name)
        if block is not None and name.endswith(f"{attention}.processor"):
            sites[name] = block
    return sites


def _attach(unet: UNet2DConditionModel, replacements: dict) -> None:
    modules = dict(unet.named_modules())
    for name in replacements:
        _check_supported(name, modules[name.removesuffix(".processor")])
    unet.set_attn_processor({**unet.attn_processors, **replacements})


def _remove(unet: UNet2DConditionModel, kind: type) -> None:
    """Give the layers that carry a `kind` processor diffusers' stock attention back."""
    stock = {name: AttnProcessor2_0() for name, p in unet.attn_processors.items() if isinstance(p, kind)}
    if stock:
        unet.set_attn_processor({**unet.attn_processors, **stock})


def attach_recorders(unet: UNet2DConditionModel, synapse: VisualSynapse) -> FeatureRecorder:
    """Put recorders for `synapse` on the image UNet's synapse self-attention layers; returns their recorder
    (also kept as `unet.feature_recorder`). The pipeline does this once; another synapse's recorders go."""
    _remove(unet, SelfAttentionRecorder)
    sites = synapse_sites(unet, synapse, "attn1")
    recorder = unet.feature_recorder = FeatureRecorder(synapse, [site_of(name) for name in sites])
    _attach(unet, {name: SelfAttentionRecorder(site_of(name), recorder) for name in sites})
    return recorder


def attach_mixers(unet: UNet2DConditionModel, synapse: VisualSynapse) -> SynapseState:
    """Put mixers for `synapse` on the music UNet's synapse cross-attention layers; returns the state they
    read. The pipeline does this once; mixers of another synapse (other blocks, other α) are removed."""
    _remove(unet, SynapseMixer)
    layers = synapse_sites(unet, synapse, "attn2")
    modules = dict(unet.named_modules())
    widths = {site_of(n): modules[n.removesuffix(".processor")].to_k.out_features for n in layers}
    state = SynapseState(synapse, widths)
    _attach(unet, {n: SynapseMixer(site_of(n), block, state) for n, block in layers.items()})
    return state


@contextlib.contextmanager
def mixing_image_features(
    unet: UNet2DConditionModel,
    synapse: VisualSynapse,
    features: ImageFeatures,
    *,
    text_mask: torch.Tensor,
    row_strength: torch.Tensor,
    step: int = 0,
) -> Iterator[SynapseState]:
    """The music UNet mixes `features` at `step` for the `with` body (training and tests; one image
    per row, or one for all rows). Attaches the mixers on first use and leaves them at strength 0."""
    state = getattr(unet, "synapse_state", None)
    if state is None or state.synapse is not synapse:  # training may bring its own synapse (ablations)
        state = unet.synapse_state = attach_mixers(unet, synapse)
    num_tokens = next(iter(features.keys.values())).shape[2]
    rows = text_mask.shape[0]
    state.load(
        features,
        token_matching=synapse.token_matching_matrix(text_mask, num_tokens).to(text_mask.device),
        row_strength=row_strength,
        feature_rows=torch.arange(rows) % features.batch_size,
        feature_steps=list(range(next(iter(features.keys.values())).shape[0])),
        num_tokens=num_tokens,
        dtype=unet.dtype,
    )
    state.select_step(step)
    try:
        yield state
    finally:
        # A new tensor, not zero_(): training runs backward after the `with` body, through this one.
        state.row_strength = torch.zeros_like(state.row_strength)
        state.release()
