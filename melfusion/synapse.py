"""The visual synapse (paper section 3.2, eq. 5-6): learned per-block α that mix image K/V into music K/V.

The synapse owns only its parameters and the rules that pair image layers with music layers and image
tokens with text tokens; the attention processors in `melfusion.attention` do the per-layer math.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

TokenMatching = Literal["caption_tokens", "global"]
TOKEN_MATCHINGS: tuple[str, ...] = ("caption_tokens", "global")

# The paper's learned α for SD 1.5's three attention up-blocks (section 5.1 / the issue tracker).
PAPER_ALPHAS = (0.37, 0.59, 0.63)
DECODER_BLOCKS = ("up_blocks.1", "up_blocks.2", "up_blocks.3")


class VisualSynapse(ModelMixin, ConfigMixin):
    """One α per attention block of the music UNet, plus how image tokens meet text tokens.

    Args:
        blocks: UNet blocks carrying the synapse. The paper attaches it to the decoder (`up_blocks.1..3`);
            encoder blocks (`down_blocks.*`) are allowed for the Table 2 ablation.
        initial_alphas: α per block before training/loading (the paper's learned 0.37, 0.59, 0.63 by default).
        share_alpha: one α for all blocks (Table 2, "same α for all blocks").
        image_grid: the image's H×W self-attention tokens are average-pooled to image_grid×image_grid
            before they are stored. This keeps the per-step feature cache small (64 tokens instead of up
            to 4096 per layer at SD 1.5 size) and independent of the caption, so one image's features are
            reusable across captions, CFG branches, seeds and jobs.
        token_matching: how the pooled image tokens are matched to the S text tokens, since eq. 5 mixes
            tensors of one shape:
            - "caption_tokens" (default): the raster-ordered image tokens are split into as many contiguous
              bands as the caption has real (unpadded) tokens, and each caption token receives the mean of
              its band. Every part of the image reaches the music, padding stays masked (so α = 0 is
              exactly text-to-music), and the spatial order survives as token order — the same idea as the
              authors' code, which adaptive-pools image features to the text length.
            - "global": every caption token receives the mean over the whole image: a position-free
              "style" signal, robust to captions of one or two tokens.
    """

    @register_to_config
    def __init__(
        self,
        blocks: tuple[str, ...] | list[str] = DECODER_BLOCKS,
        initial_alphas: tuple[float, ...] | list[float] = PAPER_ALPHAS,
        share_alpha: bool = False,
        image_grid: int = 8,
        token_matching: TokenMatching = "caption_tokens",
    ):
        super().__init__()
        if token_matching not in TOKEN_MATCHINGS:
            raise ValueError(f"token_matching must be one of {TOKEN_MATCHINGS}, got {token_matching!r}")
        if image_grid < 1:
            raise ValueError(f"image_grid must be >= 1, got {image_grid}")
        if len(blocks) == 0:
            raise ValueError("the synapse needs at least one block")
        count = 1 if share_alpha else len(blocks)
        if len(initial_alphas) not in (1, count):
            raise ValueError(f"expected {count} alphas for blocks {list(blocks)}, got {len(initial_alphas)}")
        initial = list(initial_alphas) * (count if len(initial_alphas) == 1 else 1)
        self.alphas = torch.nn.Parameter(torch.tensor(initial[:count], dtype=torch.float32))

    def alpha_for(self, block: str) -> torch.Tensor:
        """The α of one block, clamped to [0, 1] so eq. 5 stays a convex combination.

        The clamp is straight-through: its gradient is 1 outside the range too, so an α that an optimiser
        step pushed past 0 or 1 still learns whether to come back (a plain clamp's gradient is 0 there, and
        the α would be stuck). α stays the stored parameter itself, so bundles keep the paper's values;
        training also projects α back into [0, 1] after each step, so it never drifts far outside.
        """
        index = 0 if self.config.share_alpha else self.config.blocks.index(block)
        alpha = self.alphas[index]
        return alpha + (alpha.clamp(0.0, 1.0) - alpha).detach()

    def block_of(self, layer: str) -> str | None:
        """`up_blocks.2.attentions.1.transformer_blocks.0.attn2.processor` -> `up_blocks.2` if it is a synapse block."""
        parts = layer.split(".")
        block = ".".join(parts[:2])
        return block if block in self.config.blocks and "attentions" in parts else None

    def token_matching_matrix(self, text_mask: torch.Tensor, num_image_tokens: int) -> torch.Tensor:
        """Weights P with `image_kv_for_text = P @ image_kv`.

        Args:
            text_mask: (B, S) 1 for real caption tokens, 0 for padding.
            num_image_tokens: N, the stored image tokens per layer (image_grid²).

        Returns:
            (B, S, N) rows summing to 1 on real tokens and to 0 on padding.
        """
        mask = text_mask.to(torch.float32)
        batch, seq = mask.shape
        if self.config.token_matching == "global":
            weights = torch.full((batch, seq, num_image_tokens), 1.0 / num_image_tokens)
            return weights * mask[:, :, None]
        weights = torch.zeros(batch, seq, num_image_tokens)
        eye = torch.eye(num_image_tokens)[None]  # (1, N, N): pooling the identity gives the pooling matrix
        for row in range(batch):
            real = mask[row].nonzero().flatten()
            if len(real) == 0:
                continue
            bands = F.adaptive_avg_pool1d(eye, len(real))[0].T  # (n_real, N)
            weights[row, real] = bands
        return weights

    def pool_image_tokens(self, kv: torch.Tensor) -> torch.Tensor:
        """(B, H·W, D) self-attention K or V of a square latent -> (B, grid², D)."""
        batch, tokens, dim = kv.shape
        side = int(round(tokens**0.5))
        if side * side != tokens:
            raise ValueError(f"image self-attention has {tokens} tokens: not a square latent")
        grid = self.config.image_grid
        if side == grid:
            return kv
        spatial = kv.transpose(1, 2).reshape(batch, dim, side, side)
        pooled = F.adaptive_avg_pool2d(spatial.float(), grid).to(kv.dtype)  # (B, D, grid, grid)
        return pooled.flatten(2).transpose(1, 2)
