"""Tiny Stable-Diffusion-shaped pipelines built from configs, offline (no weights are downloaded).

Three flavours mirror the structure of the real models the package supports:

- ``"sd1"``: SD 1.x: tokenizer pads with ``<|endoftext|>``, quick-gelu text encoder, conv projections,
  epsilon prediction.
- ``"sd2"``: SD 2.x-base: tokenizer pads with ``"!"`` (id 0), gelu text encoder, linear projections,
  per-block head counts, epsilon prediction.
- ``"sd2-v"``: SD 2.x-768: as ``"sd2"`` plus ``upcast_attention=True`` and v-prediction.

Latent 16x16 (images 32x32, VAE factor 2); attention at 16x16 and 8x8, mid block at 4x4.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffusers_conceptexpress.toyworld.tokenizer import build_tokenizer

KINDS = ("sd1", "sd2", "sd2-v")
WORDS = ("a", "photo", "of", "and", "in", "the", "snow", "cat", "dog", "red", "blue")


def tiny_tokenizer(directory: str | Path, pad: str = "<|endoftext|>") -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer with a few whole-word tokens (:data:`WORDS`), model_max_length 77: the
    toy world's tokenizer builder with this vocabulary."""
    return build_tokenizer(directory, words=WORDS, pad=pad, max_length=77)


def tiny_vae(**config) -> AutoencoderKL:
    """A two-block ``AutoencoderKL`` (VAE factor 2, 4 latent channels); ``config`` adds or overrides fields."""
    return AutoencoderKL(
        **{
            "block_out_channels": (16, 32),
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
            "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
            "latent_channels": 4,
            "norm_num_groups": 8,
            **config,
        }
    )


def tiny_components(kind: str, workdir: str | Path, seed: int = 0) -> dict:
    """Components (vae, text_encoder, tokenizer, unet, scheduler) of a tiny pipeline of the given kind."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    sd2 = kind != "sd1"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4, 8) if sd2 else 4,
        use_linear_projection=sd2,
        upcast_attention=kind == "sd2-v",
        norm_num_groups=8,
    )
    vae = tiny_vae(sample_size=32)
    tokenizer = tiny_tokenizer(Path(workdir) / f"tokenizer-{kind}", pad="!" if sd2 else "<|endoftext|>")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=len(tokenizer),  # as in SD: one embedding row per tokenizer entry
            max_position_embeddings=77,
            hidden_act="gelu" if sd2 else "quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=32,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if kind == "sd2-v" else "epsilon",
    )
    for module in (unet, vae, text_encoder):
        module.eval()
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": scheduler,
    }


def tiny_sdxl_components(workdir: str | Path, seed: int = 0) -> dict:
    """Components of a tiny SDXL pipeline with SDXL's structure, offline.

    As SDXL: no attention in the first block (attention at downsampling factors 2 and 4 only, two transformer
    layers per block at factor 4), ``addition_embed_type="text_time"`` (``text_embeds`` + 6 ``time_ids``),
    linear projections, two text encoders (``CLIPTextModel`` and ``CLIPTextModelWithProjection``, of different
    widths, 24 + 40 = the cross-attention width), ``tokenizer`` padding with [EOT] and ``tokenizer_2`` with
    "!", and text_encoder_2's config with ``eos_token_id=2`` (SDXL's: transformers then pools at
    ``argmax(input_ids)``). Latent 32x32 (images 64x64, VAE factor 2); attention grids 16x16 and 8x8.
    """
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    widths = (24, 40)  # text_encoder, text_encoder_2
    projection = 16  # text_embeds
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + projection,
        cross_attention_dim=sum(widths),
        norm_num_groups=8,
    )
    vae = tiny_vae(sample_size=64, scaling_factor=0.13025)  # SDXL's VAE scaling factor
    tokenizer = tiny_tokenizer(Path(workdir) / "tokenizer", pad="<|endoftext|>")
    tokenizer_2 = tiny_tokenizer(Path(workdir) / "tokenizer_2", pad="!")

    def text_config(tok: CLIPTokenizer, width: int, eos: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=3,
            num_attention_heads=4,
            vocab_size=len(tok),
            max_position_embeddings=77,
            hidden_act="gelu",
            bos_token_id=tok.bos_token_id,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id,
            projection_dim=projection,
        )

    text_encoder = CLIPTextModel(text_config(tokenizer, widths[0], tokenizer.eos_token_id))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer_2, widths[1], 2))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval()
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "unet": unet,
        "scheduler": scheduler,
    }
