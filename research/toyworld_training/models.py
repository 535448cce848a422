"""The toy model's components, and a run's weights as modules: builders, loaders, seeding and export.

- :func:`make_vae`, :func:`make_text_encoder`, :func:`make_unet` (:data:`UNET_ARCHS`), :func:`make_scheduler`:
  the architectures of the shipped pipeline; :class:`ImageEncoder`: the image tower of the contrastive
  stage (not shipped).
- :func:`load_vae`, :func:`load_text_encoder`, :func:`load_unet_checkpoint`, :func:`unet_init_state`: a run's
  checkpoints (``vae.pt``, ``clip.pt`` + ``rows.pt``, ``unet.pt``) as modules.
- :func:`seed_from_model` starts a run from an exported folder; :func:`assemble_pipeline` and :func:`export`
  give the run's diffusers pipeline and folder.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from torch import nn

from diffusers_conceptexpress.toyworld.scenes import IMAGE_SIZE
from diffusers_conceptexpress.toyworld.tokenizer import build_tokenizer

from .conditioning import word_row_ids
from .runs import Logger, save_ckpt

LATENT = IMAGE_SIZE // 2

TEXT_DIM = 64

MAX_LEN = 77


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_DIM,
            intermediate_size=4 * TEXT_DIM,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=MAX_LEN,
            hidden_act="gelu",
            projection_dim=TEXT_DIM,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


UNET_ARCHS = ("attn-32-16-8", "attn-32-16")


def make_unet(arch: str = "attn-32-16-8"):
    """The toy UNet on the 32x32 latent, channels (32, 64, 64), one layer per block.

    - ``"attn-32-16-8"`` (first shipped model): cross-attention blocks at 32x32, 16x16 and 8x8, mid block at
      8x8, heads (1, 2, 2).
    - ``"attn-32-16"``: SD's layout one level down: SD 2.x at 512 px has attention blocks at 64/32/16, a
      plain ResNet level at 8x8 and the mid block's attention at 8x8; here attention blocks at 32/16, a plain
      ResNet level at 8x8, mid-block attention at 8x8, head dim 16 (heads 2, 4, 4). The blurry 8x8 maps then
      get ~30% of the authors' aggregation weight instead of 64%.
    """
    from diffusers import UNet2DConditionModel

    if arch not in UNET_ARCHS:
        raise ValueError(f"unknown UNet architecture {arch!r}; choose one of {UNET_ARCHS}")
    if arch == "attn-32-16-8":
        down = ("CrossAttnDownBlock2D",) * 3  # 32x32, 16x16, 8x8 (no 4x4 level)
        up = ("CrossAttnUpBlock2D",) * 3
        heads = (1, 2, 2)
    else:
        down = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
        up = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
        heads = (2, 4, 4)
    return UNet2DConditionModel(
        sample_size=LATENT,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=heads,  # number of heads per level (diffusers' legacy name)
        cross_attention_dim=TEXT_DIM,
        norm_num_groups=16,
    )


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


class ImageEncoder(nn.Module):
    """Small CNN for the contrastive stage (not shipped)."""

    def __init__(self, dim: int = TEXT_DIM) -> None:
        super().__init__()
        ch = [3, 32, 64, 96, 128]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(ch):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.GroupNorm(8, b), nn.SiLU()]
            layers += [nn.Conv2d(b, b, 3, padding=1), nn.GroupNorm(8, b), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.head = nn.Linear(ch[-1] * 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net(x)
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))


def load_vae(run_dir: Path):
    state = torch.load(run_dir / "vae.pt", weights_only=False)
    vae = make_vae()
    vae.load_state_dict(state["model"])
    vae.register_to_config(scaling_factor=float(state["scaling"]))
    return vae.eval().requires_grad_(False)


def load_text_encoder(run_dir: Path, rows: bool = True):
    """The run's tokenizer and frozen text encoder; with ``rows``, the word rows of the ``rows`` stage
    (``rows.pt``, when the run has one) replace those words' input embeddings."""
    tokenizer = build_tokenizer(run_dir / "tokenizer")
    text = make_text_encoder(tokenizer)
    text.load_state_dict(torch.load(run_dir / "clip.pt", weights_only=False)["text"])
    if rows and (run_dir / "rows.pt").exists():
        state = torch.load(run_dir / "rows.pt", weights_only=False)
        with torch.no_grad():
            text.get_input_embeddings().weight[word_row_ids(tokenizer, state["words"])] = state["rows"]
    return tokenizer, text.eval().requires_grad_(False)


def unet_init_state(path: str | Path) -> dict:
    """Warm-start weights: the EMA of a ``unet.pt`` checkpoint, or the UNet of an exported diffusers folder."""
    path = Path(path)
    if path.is_dir():
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(path / "unet").state_dict()
    return torch.load(path, weights_only=False, map_location="cpu")["ema"]


def load_unet_checkpoint(path: str | Path, which: str = "ema"):
    """The UNet of a ``unet.pt`` training checkpoint (``which``: "ema" or "unet" weights), in eval mode."""
    state = torch.load(path, weights_only=False, map_location="cpu")
    unet = make_unet(state.get("arch", "attn-32-16-8"))
    unet.load_state_dict(state[which])
    return unet.eval()


def assemble_pipeline(run_dir: Path, unet, cls=None):
    from diffusers_conceptexpress import ConceptExpressPipeline

    cls = cls or ConceptExpressPipeline
    tokenizer, text = load_text_encoder(run_dir)
    return cls(
        vae=load_vae(run_dir), text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=make_scheduler()
    )


def seed_from_model(run_dir: Path, model: Path, log: Logger) -> None:
    """Start a run from an exported diffusers folder (e.g. the shipped model, ``toyworld.model_path()``).

    Its VAE and text encoder become the run's finished "vae" and "clip" stages (``vae.pt``, ``clip.pt``;
    existing ones are kept), so that a later session, which has only the shipped weights, can go on training
    the UNet (``--unet-init`` the same folder: its UNet is the warm start). The tokenizer is rebuilt (it is
    deterministic) and must equal the folder's.
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    tokenizer = build_tokenizer(run_dir / "tokenizer")
    theirs = json.loads((model / "tokenizer" / "vocab.json").read_text())
    if theirs != tokenizer.get_vocab():
        raise SystemExit(f"{model}: its tokenizer is not the toy tokenizer this trainer builds")
    if not (run_dir / "vae.pt").exists():
        vae = AutoencoderKL.from_pretrained(model / "vae")
        save_ckpt(run_dir / "vae.pt", model=vae.state_dict(), scaling=vae.config.scaling_factor, done=True)
    if not (run_dir / "clip.pt").exists():
        text = CLIPTextModel.from_pretrained(model / "text_encoder")
        save_ckpt(run_dir / "clip.pt", text=text.state_dict(), done=True)
    log(stage="seed", model=str(model))


def export(run_dir: Path, out: Path, which: str = "ema") -> None:
    """Write the diffusers folder (float32 safetensors, ~11 MB) from the run's checkpoints.

    float32 rather than fp16: ``from_pretrained`` without ``dtype`` then gives every component the same dtype
    (transformers loads the text encoder in float32, diffusers keeps fp16 weights as fp16: a mixed pipeline
    fails on the first matmul), and fp16 brings nothing on a CPU.
    """
    pipe = assemble_pipeline(run_dir, load_unet_checkpoint(run_dir / "unet.pt", which))
    out.mkdir(parents=True, exist_ok=True)
    # a plain SD folder: no community-pipeline entry (pipeline.py) next to model_index.json
    pipe.save_pretrained(out, safe_serialization=True, pipeline_code=False)
    # the stock StableDiffusionPipeline reads model_index.json: name it as such
    index = json.loads((out / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    index.setdefault("safety_checker", [None, None])
    index.setdefault("feature_extractor", [None, None])
    index.setdefault("requires_safety_checker", False)
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    # transformers 4.x loads the slow CLIPTokenizer, which needs the vocab and merges files as well
    for name in ("vocab.json", "merges.txt"):
        (out / "tokenizer" / name).write_bytes((run_dir / "tokenizer" / name).read_bytes())
    for path in out.rglob("*"):
        if path.is_file():
            path.chmod(0o644)
