"""Architectures of the bundle's components at three sizes, built from configs with the real classes.

"full" is Stable Diffusion 1.5 + TANGO (FLAN-T5-large, AudioLDM mel VAE, 16 kHz HiFi-GAN) as listed in
`shared/REFERENCE.md`; "small" keeps every layout at a few % of the width (benchmarks); "tiny" is the
diffusers test-suite pattern (channels of 32, one layer per block) for tests and the quick start.
Weights are random; tokenizers are built in code, so nothing is downloaded.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    SpeechT5HifiGan,
    SpeechT5HifiGanConfig,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from .synapse import VisualSynapse


@dataclass(frozen=True)
class ModelSize:
    """Widths and depths of every component; one instance per named size below."""

    block_out_channels: tuple[int, ...]  # shared by both UNets so image and music K/V widths match per block
    layers_per_block: int
    image_heads: int | tuple[int, ...]  # diffusers' `attention_head_dim` (it is the number of heads)
    music_heads: int | tuple[int, ...]
    image_latent_size: int  # SD latent side; image resolution = this × 8
    image_vae_channels: tuple[int, ...]
    clip_hidden: int
    clip_layers: int
    clip_heads: int
    clip_intermediate: int
    t5_d_model: int
    t5_layers: int
    t5_heads: int
    t5_d_kv: int
    t5_d_ff: int
    mel_vae_channels: tuple[int, ...]
    vae_layers: int
    vocoder_channels: int
    vocoder_resblock_kernels: tuple[int, ...]
    image_grid: int  # synapse: stored image tokens per layer = image_grid²
    # TANGO (and so a pulled bundle) samples with SD 2.1's v-prediction; the sizes create-random writes
    # use it too, so random and real bundles run the same code path. Tiny keeps the paper's epsilon.
    prediction_type: str = "v_prediction"
    norm_groups: int = 32
    clip_vocab: int = 49408  # CLIP ViT-L/14
    t5_vocab: int = 32128  # FLAN-T5


SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        image_heads=2,
        music_heads=(2, 2, 4, 4),
        image_latent_size=8,
        image_vae_channels=(32, 32, 32, 32),
        clip_hidden=32,
        clip_layers=2,
        clip_heads=4,
        clip_intermediate=37,
        t5_d_model=32,
        t5_layers=2,
        t5_heads=4,
        t5_d_kv=8,
        t5_d_ff=37,
        mel_vae_channels=(32, 32, 32),
        vae_layers=1,
        vocoder_channels=32,
        vocoder_resblock_kernels=(3,),
        image_grid=4,
        clip_vocab=1000,
        t5_vocab=1000,
        prediction_type="epsilon",
    ),
    "small": ModelSize(
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        image_heads=8,
        music_heads=(2, 4, 8, 8),
        image_latent_size=32,
        image_vae_channels=(32, 64, 128, 128),
        clip_hidden=256,
        clip_layers=4,
        clip_heads=4,
        clip_intermediate=1024,
        t5_d_model=256,
        t5_layers=4,
        t5_heads=4,
        t5_d_kv=64,
        t5_d_ff=704,
        mel_vae_channels=(64, 128, 256),
        vae_layers=2,
        vocoder_channels=256,
        vocoder_resblock_kernels=(3, 7, 11),
        image_grid=8,
    ),
    "full": ModelSize(
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        image_heads=8,
        music_heads=(5, 10, 20, 20),
        image_latent_size=64,
        image_vae_channels=(128, 256, 512, 512),
        clip_hidden=768,
        clip_layers=12,
        clip_heads=12,
        clip_intermediate=3072,
        t5_d_model=1024,
        t5_layers=24,
        t5_heads=16,
        t5_d_kv=64,
        t5_d_ff=2816,
        mel_vae_channels=(128, 256, 512),
        vae_layers=2,
        vocoder_channels=1024,
        vocoder_resblock_kernels=(3, 7, 11),
        image_grid=8,
    ),
}

# TANGO / AudioLDM audio settings (REFERENCE.md): 16 kHz, hop 160, 64 mel bins, mel VAE ÷4.
SAMPLING_RATE = 16000
MEL_BINS = 64
MEL_VAE_SCALING = 0.9227914214134216
SD_VAE_SCALING = 0.18215
POSTERIOR_STD = 0.01  # of a random VAE, in scaled latent units (their spread is ~1): see narrow_posterior


def sd_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """SD 1.5's DDIM settings; TANGO's (SD 2.1's) are the same betas with v-prediction."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def _unet(size: ModelSize, *, in_channels: int, cross_attention_dim: int, heads, sample_size, music: bool):
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=size.block_out_channels,
        layers_per_block=size.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,
        norm_num_groups=size.norm_groups,
        use_linear_projection=music,  # TANGO: linear projections and fp32 attention scores
        upcast_attention=music,
    )


def _vae(size: ModelSize, channels: tuple[int, ...], *, in_channels: int, latent_channels: int, sample_size: int):
    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=size.vae_layers,
        latent_channels=latent_channels,
        norm_num_groups=size.norm_groups,
        sample_size=sample_size,
    )


def build_clip_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP BPE vocabulary: real CLIPTokenizer class, no download."""
    symbols = string.ascii_lowercase + string.digits + ".,!?'-"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols:
        vocab.setdefault(symbol, len(vocab))
        vocab.setdefault(symbol + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_t5_tokenizer() -> T5Tokenizer:
    """A small Unigram vocabulary (FLAN-T5's model type) of music words and single characters."""
    words = (
        "a the and of with in on for to calm happy sad upbeat slow fast piano guitar drums bass violin strings "
        "synth beat song music melody rhythm jazz rock pop ambient electronic orchestral acoustic soft loud "
        "dreamy epic sunset beach city night forest rain summer party"
    ).split()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{word}", -5.0) for word in words]
    pieces += [(char, -8.0) for char in string.ascii_lowercase + string.digits + ".,!?'-"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


@torch.no_grad()
def scale_vocoder_init(vocoder: SpeechT5HifiGan, residual_gain: float = 0.5) -> None:
    """Random HiFi-GAN weights whose activations stay O(1) through every layer, in any dtype.

    HiFi-GAN's own init (normal, std `initializer_range`, whatever the width) either prints silence
    (~1e-11 at 0.01, written as 16-bit PCM) or grows by the width at every layer (4e12 by `conv_post`
    at 0.2 and small size, inf in float16). Scaling each conv by 1/sqrt(fan-in) keeps the signal's
    scale, and the damped residual convs keep HiFi-GAN's 15 residual additions from compounding, so a
    random vocoder writes audible noise that tests can compare and float16 can hold.
    """
    for name, module in vocoder.named_modules():
        if isinstance(module, torch.nn.ConvTranspose1d):  # each output sums in_channels × kernel/stride taps
            fan_in = module.in_channels * module.kernel_size[0] / module.stride[0]
        elif isinstance(module, torch.nn.Conv1d):
            fan_in = module.in_channels * module.kernel_size[0]
        else:
            continue
        gain = residual_gain if name.startswith("resblocks.") else 1.0
        module.weight.normal_(0.0, gain / fan_in**0.5)
        if module.bias is not None:
            module.bias.zero_()


@torch.no_grad()
def calibrate_scaling_factor(vae: AutoencoderKL, sample_shape: tuple[int, ...]) -> None:
    """Set `scaling_factor` = 1 / std of the latents, the rule SD's 0.18215 came from, so a random VAE
    hands the diffusion loops unit-variance latents (a random VAE's latents are ~20x smaller)."""
    generator = torch.Generator().manual_seed(0)
    samples = torch.rand((4, *sample_shape), generator=generator) * 2 - 1
    std = vae.encode(samples).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)


@torch.no_grad()
def narrow_posterior(vae: AutoencoderKL, std: float = POSTERIOR_STD) -> None:
    """Give a random VAE the narrow posterior that training leaves a KL-VAE with: `std` in the units the
    diffusion model sees (after `scaling_factor`), whatever the input.

    A random VAE's log-variance is ~0: a posterior std of ~1 before scaling, 3.7 after at tiny size, next
    to latent means that vary by ~1. Training samples z_0 from the posterior (as TANGO does), so on a random
    bundle ~93% of every target was sampling noise and nothing a condition says could be learned from it.
    Only the log-variance rows change: the posterior mean, hence every encoding and generation, stays as it was.
    """
    moments = vae.quant_conv  # encoder features -> (mean, log-variance) channels
    half = moments.out_channels // 2
    moments.weight[half:].zero_()
    moments.bias[half:].fill_(2 * math.log(std / vae.config.scaling_factor))


def build_components(size_name: str = "tiny", *, seed: int = 0, prediction_type: str | None = None) -> dict:
    """Every component of a MelFusionPipeline at `size_name`, randomly initialised from `seed`.

    `prediction_type` of the music schedule defaults to the size's (v-prediction, TANGO's, except tiny).
    """
    size = SIZES[size_name]
    torch.manual_seed(seed)
    image_tokenizer, tokenizer = build_clip_tokenizer(), build_t5_tokenizer()
    image_vae = _vae(size, size.image_vae_channels, in_channels=3, latent_channels=4, sample_size=size.image_latent_size * 8)
    image_vae.register_to_config(scaling_factor=SD_VAE_SCALING)
    image_text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=size.clip_vocab,
            hidden_size=size.clip_hidden,
            intermediate_size=size.clip_intermediate,
            num_hidden_layers=size.clip_layers,
            num_attention_heads=size.clip_heads,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    image_unet = _unet(
        size,
        in_channels=4,
        cross_attention_dim=size.clip_hidden,
        heads=size.image_heads,
        sample_size=size.image_latent_size,
        music=False,
    )
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=size.t5_vocab,
            d_model=size.t5_d_model,
            d_kv=size.t5_d_kv,
            d_ff=size.t5_d_ff,
            num_layers=size.t5_layers,
            num_heads=size.t5_heads,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    music_unet = _unet(
        size,
        in_channels=8,
        cross_attention_dim=size.t5_d_model,
        heads=size.music_heads,
        sample_size=(256, MEL_BINS // 4),  # 10.24 s; any multiple of 8 frames works
        music=True,
    )
    mel_vae = _vae(size, size.mel_vae_channels, in_channels=1, latent_channels=8, sample_size=1024)
    mel_vae.register_to_config(scaling_factor=MEL_VAE_SCALING)
    vocoder = SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=MEL_BINS,
            sampling_rate=SAMPLING_RATE,
            upsample_initial_channel=size.vocoder_channels,
            upsample_rates=[5, 4, 2, 2, 2],  # product 160 = hop length
            upsample_kernel_sizes=[16, 16, 8, 4, 4],
            resblock_kernel_sizes=list(size.vocoder_resblock_kernels),
            resblock_dilation_sizes=[[1, 3, 5]] * len(size.vocoder_resblock_kernels),
            normalize_before=False,
        )
    )
    scale_vocoder_init(vocoder)
    synapse = VisualSynapse(image_grid=size.image_grid)
    if size_name != "full":  # full size keeps SD's and AudioLDM's published factors for real weights
        calibrate_scaling_factor(image_vae, (3, size.image_latent_size * 8, size.image_latent_size * 8))
        calibrate_scaling_factor(mel_vae, (1, 256, MEL_BINS))
    for vae in (image_vae, mel_vae):
        narrow_posterior(vae)
    for model in (image_vae, image_text_encoder, image_unet, text_encoder, music_unet, mel_vae, vocoder):
        model.eval()
    return dict(
        image_vae=image_vae,
        image_unet=image_unet,
        image_text_encoder=image_text_encoder,
        image_tokenizer=image_tokenizer,
        image_scheduler=sd_scheduler("epsilon"),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        music_unet=music_unet,
        mel_vae=mel_vae,
        vocoder=vocoder,
        scheduler=sd_scheduler(prediction_type or size.prediction_type),
        synapse=synapse,
    )
