"""The trainable model of Algorithm 1: the music UNet with the visual synapse attached, as one nn.Module.

One module holding both, with the mixing inside `forward`, is what lets Accelerate's DDP wrapper see
every trainable parameter (UNet and α) in a forward pass and average their gradients across processes.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from ..attention import ImageFeatures, mixing_image_features
from ..synapse import VisualSynapse


class SynapseDenoiser(torch.nn.Module):
    def __init__(self, music_unet: UNet2DConditionModel, synapse: VisualSynapse):
        super().__init__()
        self.music_unet = music_unet
        self.synapse = synapse

    def forward(
        self,
        noisy_latents: torch.Tensor,  # (B, C, T, F) z_t^M
        timesteps: torch.Tensor,  # (B,)
        text_states: torch.Tensor,  # (B, S, D) c = T^M(Y)
        text_mask: torch.Tensor,  # (B, S)
        features: ImageFeatures,  # one pseudo-step: row b's K_l^I, V_l^I at timesteps[b]
        image_strength: torch.Tensor,  # (B,) 1 where the row sees its image, 0 where it is dropped
        timestep_cond: torch.Tensor | None = None,  # (B, D) a few-step student's guidance input (melfusion.student)
    ) -> torch.Tensor:
        """ε_θ(z_t^M, c, t) (or v) with eq. 5-6 applied in the synapse blocks (Algorithm 1, lines 8-10)."""
        with mixing_image_features(
            self.music_unet, self.synapse, features, text_mask=text_mask, row_strength=image_strength
        ):
            return self.music_unet(
                noisy_latents, timesteps, encoder_hidden_states=text_states, encoder_attention_mask=text_mask,
                timestep_cond=timestep_cond,
            ).sample
