"""Train the toy-world text-to-image model from scratch on this CPU (or a GPU), in resumable stages.

Stages (each resumes from its last checkpoint in ``--run-dir``; a finished stage is skipped):

1. ``vae``: AutoencoderKL (32, 64), factor 2, 4 latent channels, trained on random 32x32 crops of scenes
   (fully convolutional, so it transfers to 64x64); its ``scaling_factor`` is set to 1 / the measured latent
   std.
2. ``pool``: render ``--pool`` scenes, encode them once (posterior mean), tokenize their captions and keep
   their object label maps.
3. ``clip``: CLIP-style contrastive pretraining of the text encoder (CLIPTextModel, 64-d, 3 layers) against a
   small CNN image encoder on the scenes; captions use the method's template ("a photo of a red circle and a
   blue star"). The [EOT] state of the EMPTY prompt is pulled towards the mean image embedding (generic
   "objects"), which is what the method's background filter relies on.
4. ``unet``: UNet2DConditionModel on the 32x32 latent (``--unet-arch``: "attn-32-16", SD's layout one level
   down, shipped; or "attn-32-16-8", the first model; none at 4x4; ``--unet-init`` warm-starts), with the text
   encoder FROZEN (as SD trained on a frozen CLIP). Epsilon prediction, SD's scaled-linear betas, 10%
   empty captions (classifier-free guidance), horizontal flips, EMA weights, ``--unet-weighting`` (plain MSE or
   normalised per noise level). ``--compound-prob`` gives that share of captions in the form of the method's
   learning prompts, ONE input slot per object ("a photo of <x_0> and <x_1>", each slot the sum of its
   object's word embeddings: ``compound_conditioning``); ``--single-prob`` gives a share the method's
   single-concept learning prompt "a photo of <x_k>" for one object k of the scene, with the loss masked to
   that object's latent cells (``single_object_conditioning``); ``--eot-weight`` adds, on a second small batch of
   clean latents at t = 0 with the empty prompt (the localization pass), a hinge loss that makes the [EOT]
   map salient on every object and low on the background (``eot_objectness_loss``; needs a pool with
   labels); ``--contrast-weight`` adds a cross-entropy that ranks an object's own one-slot prompt first by the
   masked loss among the same object with the other shapes (and, with ``--contrast-swap shape,colour``, the
   other colours) (``slot_contrast_loss``; ``--contrast-margin`` makes it a hinge on the error ratio, and
   ``--contrast-own-only`` lets it lower only the own slot's error); ``--unet-target teacher`` replaces the
   noise as the denoising target by the ``--unet-init`` UNet's own prediction for the same input (a frozen
   teacher: the fine-tune keeps the starting model's function except where the other losses move it), and
   ``--unet-train`` names the only parameters it trains;
   ``--group-weight`` adds, on the same pass, a hinge that keeps each cell's self-attention on its own object
   or on the background (``self_attention_grouping_loss``). Every ``--diag-every`` steps it logs the attention
   diagnostics on fixed held-out scenes: the empty prompt's [EOT] object/background ratio and k-means (true K)
   mIoU from the method's own ``localize_concepts``.
5. ``export``: writes the diffusers folder (float32 safetensors) to ``--out``.

Example (the shipped model)::

    python -m diffusers_conceptexpress.toyworld.train --run-dir .toyworld-runs/main --threads 1 \
        --unet-minutes 75 --out src/diffusers_conceptexpress/toyworld/model

Logs go to ``<run-dir>/log.jsonl`` (one JSON object per line) and stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionRecorder, capture_attention, nearest_factor, unet_cross_attention_factors
from ..localization import LocalizationConfig, find_eot_index
from . import WORDS
from .scenes import COLORS, IMAGE_SIZE, RIM_WIDTH, SHAPES, STRIPE_SHADE, caption_for, render_scene

LATENT = IMAGE_SIZE // 2
TEXT_DIM = 64
MAX_LEN = 77
SEED_OFFSET_TRAIN = 1_000_000  # training scenes use seeds >= this; held-out / test scenes use small seeds


# ----------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(itertools.pairwise(symbols))]
        best, i = min(pairs)
        if best == math.inf:
            break
        first, second = symbols[i], symbols[i + 1]
        out, j = [], 0
        while j < len(symbols):
            if j < len(symbols) - 1 and symbols[j] == first and symbols[j + 1] == second:
                out.append(first + second)
                j += 2
            else:
                out.append(symbols[j])
                j += 1
        symbols = out
    return symbols


def word_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """BPE merges that make every word ONE token, found by simulating BPE with the merges so far."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    changed = True
    while changed:
        changed = False
        for word in words:
            symbols = _bpe([*word[:-1], word[-1] + "</w>"], ranks)
            if len(symbols) > 1:
                pair = (symbols[0], symbols[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                changed = True
    return merges


def build_tokenizer(directory: str | Path):
    """Byte-level CLIP BPE tokenizer where every toy word is one token; pads with "!" (id 0) like SD 2.x."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    merges = word_merges(WORDS)
    vocab_list = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges)]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = CLIPTokenizer(
        vocab=str(directory / "vocab.json"),
        merges=str(directory / "merges.txt"),
        pad_token="!",
        model_max_length=MAX_LEN,
    )
    tok.save_pretrained(directory)
    return tok


# ------------------------------------------------------------------------------ models
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


# ----------------------------------------------------------------------------- helpers
class Logger:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "log.jsonl"
        self.t0 = time.time()

    def __call__(self, **record) -> None:
        record = {"time": time.strftime("%H:%M:%S"), **record}
        line = json.dumps(record)
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def save_ckpt(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def scene_batch(seeds, labels: bool = False, rim: int = RIM_WIDTH, stripe_shade: float = STRIPE_SHADE):
    """Images (B, 3, 64, 64) in [-1, 1] and captions of scenes ``seeds`` (``rim``, ``stripe_shade``: see
    ``render_scene``);
    with ``labels``, also their object label maps (B, 64, 64) uint8: 0 = background, i + 1 = the visible
    pixels of object i."""
    scenes = [render_scene(int(s), rim=rim, stripe_shade=stripe_shade) for s in seeds]
    out = to_tensor([s.image for s in scenes]), [s.caption for s in scenes]
    if not labels:
        return out
    maps = np.zeros((len(scenes), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for b, scene in enumerate(scenes):
        for i, m in enumerate(scene.masks):
            maps[b][m] = i + 1
    return (*out, torch.from_numpy(maps))


# ------------------------------------------------------------------------------- stages
def stage_vae(args, run_dir: Path, log: Logger) -> None:
    ckpt = run_dir / "vae.pt"
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state.get("done"):
            return
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
    rng = np.random.default_rng(args.seed + step)
    torch.manual_seed(args.seed + step)
    vae.train()
    t0 = time.time()
    while step < args.vae_steps:
        seeds = SEED_OFFSET_TRAIN + rng.integers(0, 10**8, args.vae_batch)
        x, _ = scene_batch(seeds, rim=args.rim, stripe_shade=args.stripe_shade)
        ox, oy = rng.integers(0, IMAGE_SIZE - 32 + 1, 2)
        x = x[:, :, oy : oy + 32, ox : ox + 32]
        lr = (
            1e-3
            * min(1.0, (step + 1) / 100)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.vae_steps)))
        )
        for g in opt.param_groups:
            g["lr"] = lr
        post = vae.encode(x).latent_dist
        z = post.sample()
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        loss = mse + F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0 or step == args.vae_steps:
            psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-10))
            log(
                stage="vae",
                step=step,
                loss=round(loss.item(), 5),
                psnr=round(psnr, 2),
                s=round(time.time() - t0, 1),
            )
        if step % 200 == 0:
            save_ckpt(ckpt, model=vae.state_dict(), opt=opt.state_dict(), step=step)
    # measure the latent std on full 64x64 scenes
    vae.eval()
    with torch.no_grad():
        x, _ = scene_batch(
            range(SEED_OFFSET_TRAIN - 5000, SEED_OFFSET_TRAIN - 4744),
            rim=args.rim,
            stripe_shade=args.stripe_shade,
        )
        z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
    scaling = 1.0 / z.std().item()
    psnr = 10 * math.log10(4.0 / F.mse_loss(rec, x).item())
    log(
        stage="vae",
        done=True,
        latent_std=round(z.std().item(), 4),
        scaling_factor=round(scaling, 4),
        psnr_64=round(psnr, 2),
    )
    save_ckpt(ckpt, model=vae.state_dict(), opt=opt.state_dict(), step=step, done=True, scaling=scaling)


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


def _unet_init_state(path: str | Path) -> dict:
    """Warm-start weights: the EMA of a ``unet.pt`` checkpoint, or the UNet of an exported diffusers folder."""
    path = Path(path)
    if path.is_dir():
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(path / "unet").state_dict()
    return torch.load(path, weights_only=False, map_location="cpu")["ema"]


def load_vae(run_dir: Path):
    state = torch.load(run_dir / "vae.pt", weights_only=False)
    vae = make_vae()
    vae.load_state_dict(state["model"])
    vae.register_to_config(scaling_factor=float(state["scaling"]))
    return vae.eval().requires_grad_(False)


def _pool_batches(
    run_dir: Path, starts: list[int], size: int, rim: int, threads: int, stripe_shade: float = STRIPE_SHADE
) -> list[tuple]:
    """Pool batches of 256 scenes beginning at ``starts``: (latents fp16, token ids, images uint8, labels)."""
    from transformers import CLIPTokenizer

    torch.set_num_threads(threads)
    vae = load_vae(run_dir)
    tokenizer = CLIPTokenizer.from_pretrained(run_dir / "tokenizer")
    out = []
    for start in starts:
        seeds = range(SEED_OFFSET_TRAIN + start, SEED_OFFSET_TRAIN + min(size, start + 256))
        x, caps, lab = scene_batch(seeds, labels=True, rim=rim, stripe_shade=stripe_shade)
        with torch.no_grad():
            lat = (vae.encode(x).latent_dist.mean * vae.config.scaling_factor).half()
        ids = tokenizer(caps, padding="max_length", max_length=MAX_LEN, return_tensors="pt").input_ids
        out.append((lat, ids, ((x + 1) * 127.5).round().to(torch.uint8), lab))
    return out


def stage_pool(args, run_dir: Path, log: Logger) -> None:
    path = run_dir / "pool.pt"
    if path.exists():
        return
    build_tokenizer(run_dir / "tokenizer")
    starts = list(range(0, args.pool, 256))
    t0 = time.time()
    if args.pool_workers > 1:  # the VAE encoding dominates: contiguous runs of batches, one process each
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        per = math.ceil(len(starts) / args.pool_workers)
        parts = [starts[i : i + per] for i in range(0, len(starts), per)]
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(len(parts), mp_context=ctx) as ex:
            jobs = [
                ex.submit(_pool_batches, run_dir, part, args.pool, args.rim, 1, args.stripe_shade)
                for part in parts
            ]
            batches = [batch for job in jobs for batch in job.result()]
    else:
        batches = _pool_batches(run_dir, starts, args.pool, args.rim, args.threads, args.stripe_shade)
    lat, ids, images, labels = (list(part) for part in zip(*batches, strict=True))
    log(stage="pool", n=args.pool, s=round(time.time() - t0, 1))
    save_ckpt(
        path, latents=torch.cat(lat), ids=torch.cat(ids), images=torch.cat(images), labels=torch.cat(labels)
    )


def stage_clip(args, run_dir: Path, log: Logger) -> None:
    ckpt = run_dir / "clip.pt"
    tokenizer = build_tokenizer(run_dir / "tokenizer")
    text = make_text_encoder(tokenizer)
    image_enc = ImageEncoder()
    proj = nn.Linear(TEXT_DIM, TEXT_DIM, bias=False)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*text.parameters(), *image_enc.parameters(), *proj.parameters(), logit_scale]
    opt = torch.optim.AdamW(params, lr=args.clip_lr, weight_decay=0.05)
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state.get("done"):
            return
        text.load_state_dict(state["text"])
        image_enc.load_state_dict(state["image"])
        proj.load_state_dict(state["proj"])
        logit_scale.data.copy_(state["logit_scale"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
    pool = torch.load(run_dir / "pool.pt", weights_only=False)
    images, ids = pool["images"], pool["ids"]
    n = images.shape[0]
    clip_len = 24  # captions are at most 19 tokens; positions >= 24 only ever hold padding
    empty = tokenizer([""], padding="max_length", max_length=clip_len, return_tensors="pt").input_ids
    eos = tokenizer.eos_token_id
    g = torch.Generator().manual_seed(args.seed + 1 + step)
    text.train()
    image_enc.train()
    t0 = time.time()

    def pooled(tok_ids: torch.Tensor) -> torch.Tensor:
        hidden = text(tok_ids).last_hidden_state
        pos = (tok_ids == eos).int().argmax(-1)
        return hidden[torch.arange(hidden.shape[0]), pos]

    while step < args.clip_steps:
        idx = torch.randint(0, n, (args.clip_batch,), generator=g)
        x = images[idx].float() / 127.5 - 1.0
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
        tok = ids[idx, :clip_len]
        lr = (
            args.clip_lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.clip_steps))
        )
        for grp in opt.param_groups:
            grp["lr"] = lr
        t_emb = F.normalize(proj(pooled(torch.cat([tok, empty]))), dim=-1)
        t_emb, e_emb = t_emb[:-1], t_emb[-1]
        i_emb = F.normalize(image_enc(x), dim=-1)
        logits = logit_scale.exp().clamp(max=100) * t_emb @ i_emb.T
        same = (tok[:, None, :] == tok[None, :, :]).all(-1).float()  # identical captions are all positives
        target = same / same.sum(1, keepdim=True)
        loss_c = 0.5 * (
            -(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.log_softmax(0)).sum(0).mean()
        )
        generic = F.normalize(i_emb.mean(0).detach(), dim=-1)
        loss_e = 1 - (e_emb * generic).sum()
        loss = loss_c + 0.5 * loss_e
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 50 == 0 or step == args.clip_steps:
            acc = (logits.argmax(1) == torch.arange(len(idx))).float()
            acc = (same[torch.arange(len(idx)), logits.argmax(1)] > 0).float().mean().item()
            log(
                stage="clip",
                step=step,
                loss=round(loss_c.item(), 4),
                empty_cos=round(1 - loss_e.item(), 3),
                t2i_acc=round(acc, 3),
                scale=round(logit_scale.exp().item(), 1),
                s=round(time.time() - t0, 1),
            )
        if step % 200 == 0 or step == args.clip_steps:
            save_ckpt(
                ckpt,
                text=text.state_dict(),
                image=image_enc.state_dict(),
                proj=proj.state_dict(),
                logit_scale=logit_scale.data,
                opt=opt.state_dict(),
                step=step,
                done=step >= args.clip_steps,
            )


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


def assemble_pipeline(run_dir: Path, unet, cls=None):
    from diffusers_conceptexpress import ConceptExpressPipeline

    cls = cls or ConceptExpressPipeline
    tokenizer, text = load_text_encoder(run_dir)
    return cls(
        vae=load_vae(run_dir), text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=make_scheduler()
    )


def attention_diagnostics(pipe, seeds, rim: int = RIM_WIDTH) -> dict:
    """EOT object/background ratio of the empty prompt and k-means (true K + background) mIoU on scenes."""
    from ..evaluation import mask_metrics

    ratios, mious = [], []
    for s in seeds:
        scene = render_scene(int(s), num_objects=2 + int(s) % 2, rim=rim)
        res = pipe.localize_concepts(
            scene.image,
            method="kmeans",
            num_concepts=len(scene.masks) + 1,
            generator=torch.Generator().manual_seed(0),
        )
        eot = F.interpolate(res.eot_map[None, None].float(), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear")[
            0, 0
        ].numpy()
        obj = np.any(scene.masks, axis=0)
        ratios.append(float(eot[obj].mean() / max(eot[~obj].mean(), 1e-12)))
        mious.append(mask_metrics(scene.masks, [np.asarray(m, dtype=bool) for m in res.masks]).miou)
    ratios_a = np.array(ratios)
    return {
        "eot_ratio_mean": round(float(ratios_a.mean()), 3),
        "eot_share_gt1": round(float((ratios_a > 1).mean()), 3),
        "kmeans_miou": round(float(np.mean(mious)), 3),
    }


CONDITIONING_CAPTIONS = ("true", "wrong shape", "wrong colour", "empty")


@torch.no_grad()
def conditioning_gain(
    pipe, seeds, timesteps=(250, 550, 750, 850), noise_seed: int = 0, rim: int = RIM_WIDTH
) -> dict:
    """How much the UNet uses each word: epsilon MSE per timestep with altered captions, on single objects.

    On single-object scenes (``seeds``), the epsilon-prediction MSE with the true caption, with the shape
    word swapped for another shape, the colour word swapped, and the empty prompt, all with the same noise.
    Returns ``{t: {"true": mse, "wrong shape": relative gap, ...}}`` where a gap is ``(mse - true) / true``:
    what the UNet gains from that part of the prompt at that noise level (about 0: ignored there).
    """
    rng = np.random.default_rng(noise_seed)
    scenes = [render_scene(int(s), num_objects=1, rim=rim) for s in seeds]
    captions = {name: [] for name in CONDITIONING_CAPTIONS}
    for scene in scenes:
        obj = dict(scene.objects[0])
        other_shape = rng.choice([x for x in SHAPES if x != obj["shape"]])
        other_colour = rng.choice([x for x in COLORS if x != obj["color"]])
        captions["true"].append(scene.caption)
        captions["wrong shape"].append(caption_for([{**obj, "shape": str(other_shape)}]))
        captions["wrong colour"].append(caption_for([{**obj, "color": str(other_colour)}]))
        captions["empty"].append("")
    tok = pipe.tokenizer
    cond = {
        name: pipe.text_encoder(
            tok(text, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        ).last_hidden_state
        for name, text in captions.items()
    }
    vae, unet = pipe.vae, pipe.unet
    z0 = vae.encode(to_tensor([sc.image for sc in scenes])).latent_dist.mean * vae.config.scaling_factor
    acp = make_scheduler().alphas_cumprod
    g = torch.Generator().manual_seed(noise_seed)
    out = {}
    for t in timesteps:
        eps = torch.randn(z0.shape, generator=g)
        zt = acp[t].sqrt() * z0 + (1 - acp[t]).sqrt() * eps
        tt = torch.full((len(scenes),), int(t))
        mse = {
            k: float(((unet(zt, tt, encoder_hidden_states=c).sample - eps) ** 2).mean())
            for k, c in cond.items()
        }
        base = mse["true"]
        out[int(t)] = {
            "true": round(base, 5),
            **{k: round((mse[k] - base) / base, 4) for k in CONDITIONING_CAPTIONS[1:]},
        }
    return out


def object_phrases(caption: str) -> list[list[str]]:
    """The words of each object of a template caption: "a photo of a red circle and a blue striped star" ->
    [["red", "circle"], ["blue", "striped", "star"]]."""
    body = caption.removeprefix("a photo of ")
    return [phrase.removeprefix("a ").split() for phrase in body.split(" and ")]


def _distinct_objects(tokenizer, ids: torch.Tensor) -> tuple[list[list[int]], list[tuple[str, ...]]]:
    """Per caption, the index of each of its objects (caption order) among the distinct objects of all
    captions, and those objects' words (("red", "circle"), ("blue", "striped", "star"), ...)."""
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    keys, slot_of, per_caption = [], {}, []
    for row in ids.tolist():
        words = [tokenizer.convert_ids_to_tokens(i).removesuffix("</w>") for i in row if i not in special]
        slots = []
        for phrase in object_phrases(" ".join(words)):
            key = tuple(phrase)
            if key not in slot_of:
                slot_of[key] = len(keys)
                keys.append(key)
            slots.append(slot_of[key])
        per_caption.append(slots)
    return per_caption, keys


def _slot_rows(tokenizer, text, phrases) -> torch.Tensor:
    """(S, d): each phrase's one-slot input embedding, the sum of its word embeddings."""
    table = text.get_input_embeddings()
    return torch.stack(
        [
            table.weight[tokenizer(" ".join(phrase), add_special_tokens=False).input_ids].sum(0)
            for phrase in phrases
        ]
    )


def _object_slots(tokenizer, text, ids: torch.Tensor) -> tuple[list[list[int]], torch.Tensor]:
    """The one-slot form of every object of every caption: per caption, the slot index of each of its objects
    (caption order), and the slots' input embeddings (S, d), each the sum of its object's word embeddings."""
    per_caption, keys = _distinct_objects(tokenizer, ids)
    return per_caption, _slot_rows(tokenizer, text, keys)


def _caption_index(per_caption: list[list[int]]) -> torch.Tensor:
    """(N, max objects) long: the distinct-object row of caption n's k-th object, -1 past its last object."""
    index = torch.full((len(per_caption), max(map(len, per_caption))), -1, dtype=torch.long)
    for n, slots in enumerate(per_caption):
        index[n, : len(slots)] = torch.tensor(slots)
    return index


def _encode_with_slots(
    tokenizer, text, slot_lists: list[list[int]], rows: torch.Tensor, length: int, batch: int
):
    """Text-encoder states (N, length, d) float16 of "a photo of <x_a> and <x_b> ..." for each list of slots."""
    table = text.get_input_embeddings()
    new_ids = _slot_sequences(tokenizer, slot_lists, table.weight.shape[0], length)
    extended = torch.nn.Embedding.from_pretrained(torch.cat([table.weight, rows]), freeze=True)
    text.set_input_embeddings(extended)
    try:
        return torch.cat(
            [text(new_ids[i : i + batch]).last_hidden_state.half() for i in range(0, len(new_ids), batch)]
        )
    finally:
        text.set_input_embeddings(table)


def _slot_sequences(tokenizer, slot_lists: list[list[int]], vocab: int, length: int) -> torch.Tensor:
    """(N, length) token ids of "a photo of <x_a> and <x_b> ...": slot s is the id ``vocab + s``, a row
    appended after the vocabulary's."""
    head = tokenizer("a photo of", add_special_tokens=False).input_ids
    joiner = tokenizer("and", add_special_tokens=False).input_ids
    seqs = []
    for slots in slot_lists:
        seq = list(head)
        for k, slot in enumerate(slots):
            seq += ([] if k == 0 else joiner) + [vocab + slot]
        seq = [tokenizer.bos_token_id, *seq, tokenizer.eos_token_id]
        seqs.append(seq + [tokenizer.pad_token_id] * (length - len(seq)))
    return torch.tensor(seqs)


@torch.no_grad()
def compound_conditioning(tokenizer, text, ids: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Text-encoder states of the learning-prompt form of every caption: ONE input slot per object.

    "a photo of a red circle and a blue star" becomes "a photo of <x_0> and <x_1>", where the input
    embedding of ``<x_i>`` is the sum of its object's word embeddings (red + circle, blue + striped + star):
    the structure of ConceptExpress's prompts ("a photo of <c_0> and <c_1>"), in which one learned token
    stands for a whole object, as one word ("dog") does in Stable Diffusion's captions.

    Args:
        ids: (N, 77) token ids of template captions (padded).

    Returns:
        (N, 77, d) float16 last hidden states.
    """
    per_caption, rows = _object_slots(tokenizer, text, ids)
    return _encode_with_slots(tokenizer, text, per_caption, rows, ids.shape[1], batch)


@torch.no_grad()
def single_object_conditioning(tokenizer, text, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The method's single-concept learning prompt for every object of every caption: "a photo of <x_k>".

    The prompt depends only on the object's words, so it is encoded once per distinct object (at most
    colours x shapes x [striped]).

    Args:
        ids: (N, 77) token ids of template captions (padded).

    Returns:
        states: (S, 77, d) float16 last hidden states, one per distinct object;
        index: (N, max objects) long, the row of ``states`` of caption n's k-th object (caption order, the
        order of the scene's masks and labels k + 1), -1 where caption n has fewer objects.
    """
    per_caption, rows = _object_slots(tokenizer, text, ids)
    states = _encode_with_slots(tokenizer, text, [[s] for s in range(rows.shape[0])], rows, ids.shape[1], 512)
    return states, _caption_index(per_caption)


CONTRAST_SWAPS = ("shape", "colour")


def contrast_candidates(words: tuple[str, ...], swap: tuple[str, ...] = ("shape",)) -> list[tuple[str, ...]]:
    """An object's words with its shape, or its colour, replaced by every other one: the candidates of
    ``slot_contrast_loss``.

    The own object comes at the position of its shape among ``SHAPES`` (the first ``len(SHAPES)`` candidates
    are the object's colour and texture with every shape, in that order); with "colour" in ``swap`` the
    object's shape and texture with every OTHER colour follow, in the order of ``COLORS``. So every object has
    the same number of candidates: 6 for ("shape",), 13 for ("shape", "colour").

    >>> contrast_candidates(("red", "striped", "heart"))[:2]
    [('red', 'striped', 'circle'), ('red', 'striped', 'square')]
    """
    unknown = set(swap) - set(CONTRAST_SWAPS)
    if unknown or "shape" not in swap:
        raise ValueError(f"swap must hold 'shape' and may hold 'colour' (got {swap!r})")
    colour, rest = words[0], words[1:-1]
    found = [(colour, *rest, shape) for shape in SHAPES]
    if "colour" in swap:
        found += [(other, *rest, words[-1]) for other in COLORS if other != colour]
    return found


@torch.no_grad()
def slot_contrast_conditioning(
    tokenizer, text, ids: torch.Tensor, swap: tuple[str, ...] = ("shape",)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The single-concept learning prompt "a photo of <x>" of every object, and of its ``contrast_candidates``
    (the same object with another shape, or another colour): the candidates of ``slot_contrast_loss``.

    Args:
        ids: (N, 77) token ids of template captions (padded).
        swap: ("shape",) or ("shape", "colour"): what the candidates change.

    Returns:
        states: (S, C, 77, d) float16 last hidden states, one row per distinct object, C candidates each;
        index: (N, max objects) long, the row of ``states`` of caption n's k-th object (caption order), -1
        where caption n has fewer objects;
        truth: (S,) long, the position of each object's own slot among its candidates.
    """
    per_caption, keys = _distinct_objects(tokenizer, ids)
    phrases = [c for key in keys for c in contrast_candidates(key, swap)]
    rows = _slot_rows(tokenizer, text, phrases)
    states = _encode_with_slots(tokenizer, text, [[s] for s in range(len(phrases))], rows, ids.shape[1], 512)
    truth = torch.tensor([SHAPES.index(key[-1]) for key in keys])
    return states.view(len(keys), -1, *states.shape[1:]), _caption_index(per_caption), truth


def slot_contrast_loss(
    pred: torch.Tensor,
    eps: torch.Tensor,
    mask: torch.Tensor,
    truth: torch.Tensor,
    temperature: float = 1.0,
    margin: float | None = None,
    own_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the object's own slot among its candidate slots, scored by the method's masked loss.

    The learned token of ConceptExpress lands where the masked epsilon error inside its concept's mask is
    lowest. On the eleventh model a heart's pixels were explained better by the slot "colour + circle" than by
    "colour + heart" (docs/toyworld.md, eleventh model, item 6), so the learned tokens of hearts drew circles.
    This loss asks the UNet to rank the true slot first: the logits are minus the summed squared error inside
    the mask (the log-likelihood of a Gaussian denoiser, up to the noise level's weight), the same noisy latent
    and noise for every candidate.

    Args:
        pred: (B, C, 4, h, w) noise predictions, candidate c conditioned on "a photo of <candidate c>".
        eps: (B, 4, h, w) the noise.
        mask: (B, 1, h, w) the object's latent mask.
        truth: (B,) long, the own slot's candidate.
        temperature: the logits are minus the summed squared error over this (cross-entropy form).
        margin: if given, a hinge instead of the cross-entropy: per object ``relu(margin - (log e_min -
            log e_own))``, e_own the own slot's summed squared error and e_min the lowest of the others'. It
            is 0, with no gradient, once every other slot's error is at least ``exp(margin)`` times the own
            one, so the loss acts only where the ranking is wrong or narrow (scale-free: a ratio of errors).
        own_only: the other candidates' errors are constants (detached): the gradient only lowers the own
            slot's masked error, where the ranking asks for it, and never pushes the other slots' predictions
            away from the object (the fourteenth trial's control: pushing them shifted the UNet's colours).
    Returns:
        the mean loss, and the share of the batch whose own slot has the lowest error.
    """
    sse = (((pred - eps[:, None]) ** 2) * mask[:, None]).sum(dim=(2, 3, 4))
    if own_only:
        own_column = F.one_hot(truth, sse.shape[1]).bool()
        sse = torch.where(own_column, sse, sse.detach())
    top1 = (sse.argmin(1) == truth).float().mean()
    if margin is None:
        return F.cross_entropy(-sse / temperature, truth), top1
    log_sse = torch.log(sse + 1e-8)
    own = log_sse.gather(1, truth[:, None])[:, 0]
    others = log_sse.scatter(1, truth[:, None], float("inf")).amin(1)
    return F.relu(margin - (others - own)).mean(), top1


def object_latent_masks(labels: torch.Tensor, objects: torch.Tensor, size: int = LATENT) -> torch.Tensor:
    """Each scene's chosen object on the latent grid, as the method puts a mask there (area share > 0.5).

    Args:
        labels: (B, H, W) uint8 label maps (0 = background, k + 1 = object k; ``scene_batch``).
        objects: (B,) long, the object k of each scene.
    Returns:
        (B, 1, size, size) float32 in {0, 1}.
    """
    hit = (labels.long() == (objects[:, None, None] + 1)).float()[:, None]
    return (F.interpolate(hit, size=(size, size), mode="area") > 0.5).float()


def _flipped(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """(B, ...) with item b mirrored left-right where ``flip[b]`` (the pool's horizontal-flip augmentation)."""
    return torch.where(flip.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)


def _noised(
    alphas_cumprod: torch.Tensor, z0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """(B, 4, h, w): the forward process at timesteps ``t``, sqrt(acp) z0 + sqrt(1 - acp) eps."""
    a = alphas_cumprod[t].sqrt()[:, None, None, None]
    s = (1 - alphas_cumprod[t]).sqrt()[:, None, None, None]
    return a * z0 + s * eps


def _pick_objects(
    index: torch.Tensor, labels: torch.Tensor, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One object k of each scene, uniformly among its objects (one draw from ``g``), and its latent mask.

    Args:
        index: (B, max objects) the scenes' rows of a ``_caption_index`` (-1 past their last object).
        labels: (B, H, W) the scenes' label maps, flipped as their latents are.
    Returns:
        k (B,) long, and ``object_latent_masks`` of those objects, (B, 1, 32, 32).
    """
    count = (index >= 0).sum(1)
    k = (torch.rand(len(index), generator=g) * count).long().clamp(max=index.shape[1] - 1)
    return k, object_latent_masks(labels, k)


def segment_shares(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) integer label maps -> (B, segments, h, w): the share of each cell of an h x w grid that each
    segment (0 = background, i + 1 = object i) covers; H and W multiples of h and w."""
    onehot = F.one_hot(labels.long(), int(labels.max()) + 1).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(onehot, size)


def eot_objectness_loss(
    eot: torch.Tensor, labels: torch.Tensor, target: float = 2.0, background: float = 0.5
) -> torch.Tensor:
    """Hinge loss that makes the empty prompt's [EOT] map salient on every object and low on the background.

    Args:
        eot: (B, h, w) [EOT] cross-attention of the empty prompt (probabilities, head- and layer-averaged).
        labels: (B, H, W) integer object label maps (0 = background, i + 1 = object i), H and W multiples
            of h and w.
        target: wanted object ratio: mean of the map over an object / mean over the image (capped per scene
            at 0.9 / the share of the image that objects cover, so it stays reachable).
        background: pure-background cells should stay below this multiple of the image mean.

    Returns:
        scalar: mean over present objects of relu(log target - log ratio) + mean over cells with no object
        of relu(map / image mean - background). Zero once every object and background cell is on the right
        side, so it stops pulling there.
    """
    frac = segment_shares(labels, tuple(eot.shape[-2:]))  # (B, objects + 1, h, w)
    mean = eot.mean((1, 2))
    area = frac.sum((2, 3))
    ratio = (frac * eot[:, None]).sum((2, 3)) / area.clamp_min(1e-6) / mean[:, None]
    present = area[:, 1:] > 0
    coverage = 1.0 - frac[:, 0].mean((1, 2))
    wanted = torch.clamp(0.9 / coverage.clamp_min(1e-6), max=target)
    objects = F.relu(torch.log(wanted)[:, None] - torch.log(ratio[:, 1:].clamp_min(1e-6)))[present]
    cells = F.relu(eot / mean[:, None, None] - background)[frac[:, 0] > 0.99]
    zero = eot.sum() * 0.0
    return (objects.mean() if objects.numel() else zero) + (cells.mean() if cells.numel() else zero)


def self_attention_grouping_loss(
    maps: list[torch.Tensor], labels: torch.Tensor, target: float = 0.8
) -> torch.Tensor:
    """Hinge loss that keeps each cell's self-attention inside its own object (or inside the background).

    Args:
        maps: per layer, (B, r * r, r * r) head-averaged self-attention probabilities (rows sum to 1) on a
            square r x r grid.
        labels: (B, H, W) integer object label maps (0 = background, i + 1 = object i), H and W multiples
            of every r.
        target: the wanted share of a row's attention that falls on the cells of its own segment.

    Returns:
        scalar: mean over layers of the mean, over "pure" query cells (at least 99% of the cell in one
        segment), of relu(target - attention mass on that segment); the key axis counts every cell by the
        share of it that the segment covers. Zero once every pure cell attends enough to its own segment.
    """
    zero = labels.new_zeros((), dtype=torch.float32)
    terms = []
    for attn in maps:
        r = math.isqrt(attn.shape[-1])
        frac = segment_shares(labels, (r, r)).flatten(2)  # (B, segments, r * r)
        share, segment = frac.max(1)  # (B, r * r): the query cell's main segment
        mass = torch.bmm(attn.float(), frac.transpose(1, 2))  # (B, r * r, segments)
        own = mass.gather(2, segment[..., None])[..., 0]
        pure = share > 0.99
        terms.append(F.relu(target - own)[pure].mean() if pure.any() else zero + attn.sum() * 0.0)
    return torch.stack(terms).mean() if terms else zero


def aggregate_self_attention(maps: list[torch.Tensor], size: int) -> torch.Tensor:
    """The method's aggregated self-attention ("reference" weighting, as ``AttentionRecorder``), differentiable.

    Args:
        maps: per layer, (B, r * r, r * r) head-averaged self-attention on a square r x r grid.
        size: R, the side of the aggregation grid (the latent side).

    Returns:
        (B, R * R, R * R): keys upsampled bilinearly, queries repeated (nearest), each layer weighted r / R,
        summed, every row normalised to sum to 1.
    """
    total = None
    for attn in maps:
        b, n_q, _ = attn.shape
        r = math.isqrt(n_q)
        keys = F.interpolate(attn.float().reshape(b * n_q, 1, r, r), size=(size, size), mode="bilinear")
        keys = keys.reshape(b, n_q, size * size) * (r / size)
        line = torch.div(torch.arange(size, device=attn.device) * r, size, rounding_mode="floor")
        rows = keys[:, (line[:, None] * r + line[None, :]).reshape(-1)]
        total = rows if total is None else total + rows
    return total / total.sum(-1, keepdim=True).clamp_min(1e-30)


def self_attention_coherence_loss(
    attn: torch.Tensor, labels: torch.Tensor, max_distance: float = 0.05, background: bool = True
) -> torch.Tensor:
    """Hinge loss that makes the aggregated self-attention rows of one object (or of the background) alike.

    FINCH, the method's clustering, links rows by the symmetric KL divergence; an object whose rows differ
    comes out in fragments. This pulls every row of a segment towards the segment's mean row.

    Args:
        attn: (B, R * R, R * R) aggregated self-attention (rows sum to 1), e.g. ``aggregate_self_attention``.
        labels: (B, H, W) integer object label maps (0 = background), H and W multiples of R.
        max_distance: allowed symmetric KL divergence between a row and its segment's mean row.
        background: score the background's cells too (one segment); otherwise objects only.

    Returns:
        scalar: mean, over pure cells (>= 99% of the cell in one segment), of
        relu(symKL(row, mean row of the segment's pure cells) - max_distance).
    """
    segment, pure, _, means = _segment_mean_rows(attn, labels, background)
    if not pure.any():
        return attn.sum() * 0.0
    b, cell = pure.nonzero(as_tuple=True)
    return F.relu(_symmetric_kl(attn[b, cell], means[b, segment[b, cell]]) - max_distance).mean()


def self_attention_separation_loss(
    attn: torch.Tensor, labels: torch.Tensor, margin: float = 1.0
) -> torch.Tensor:
    """Hinge loss that keeps the mean aggregated self-attention rows of DIFFERENT objects apart.

    The method's post-clustering joins two neighbouring clusters when the symmetric KL between their mean
    rows is at most the chosen FINCH level's tau (0.3-0.55 on coarse levels of the toy grid); objects that
    touch and attend alike then come out as one concept (docs/benchmarks.md).

    Args:
        attn: (B, R * R, R * R) aggregated self-attention, as for :func:`self_attention_coherence_loss`.
        labels: (B, H, W) integer object label maps (0 = background).
        margin: wanted symmetric KL between the mean rows (over pure cells) of two objects of one scene.

    Returns:
        scalar: mean over the object pairs of every scene of relu(margin - symKL(mean_i, mean_j)); 0 (in the
        graph) when no scene has two objects with pure cells.
    """
    _, _, counts, means = _segment_mean_rows(attn, labels, background=False)
    present = counts[:, 1:] > 0  # (B, objects): objects with pure cells
    terms = []
    for b in range(attn.shape[0]):
        objs = (present[b].nonzero().flatten() + 1).tolist()
        for i, first in enumerate(objs):
            for second in objs[i + 1 :]:
                terms.append(F.relu(margin - _symmetric_kl(means[b, first], means[b, second])))
    return torch.stack(terms).mean() if terms else attn.sum() * 0.0


def _symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """0.5 (KL(p||q) + KL(q||p)) over the last dim, entries clamped to at least 1e-12 (as the clustering)."""
    p, q = p.clamp_min(1e-12), q.clamp_min(1e-12)
    return 0.5 * ((p - q) * (p.log() - q.log())).sum(-1)


def _segment_mean_rows(attn: torch.Tensor, labels: torch.Tensor, background: bool):
    """Per scene and segment, the mean row over the segment's pure cells (>= 99% of the cell in it).

    Returns ``(segment, pure, counts, means)``: (B, R * R) main segment and purity of every cell,
    (B, segments) pure-cell counts and (B, segments, R * R) mean rows (0 where a segment has no pure cell).
    """
    size = math.isqrt(attn.shape[-1])
    frac = segment_shares(labels, (size, size)).flatten(2)  # (B, segments, R * R)
    share, segment = frac.max(1)  # (B, R * R)
    pure = (share > 0.99) & ((segment > 0) | background)
    member = F.one_hot(segment, frac.shape[1]).float() * pure[..., None].float()  # (B, R * R, segments)
    counts = member.sum(1)
    means = torch.bmm(member.transpose(1, 2), attn) / counts.clamp_min(1)[..., None]
    return segment, pure, counts, means


class NoiseLevelWeights:
    """Per-noise-level loss normalisation: weight each sample by 1 / (running mean MSE of its timestep bin).

    With uniform epsilon-MSE the low-noise steps dominate the gradient (their MSE is 10-40x that of the
    high-noise steps, where the layout and the shape of an object are decided), so a small model learns
    colour and texture first and shape last. Dividing each sample's MSE by the running mean of its bin (the
    optimum of EDM2's learned per-noise-level uncertainty weighting) gives every noise level the same share.
    The weights are rescaled so that their mean over the bins is 1: the loss keeps plain MSE's scale.

    ``bins`` equal-width bins over ``[0, num_timesteps)``; ``decay`` is the running mean's per-update decay.
    """

    def __init__(self, bins: int = 20, num_timesteps: int = 1000, decay: float = 0.99) -> None:
        self.bins, self.num_timesteps, self.decay = bins, num_timesteps, decay
        self.mean = torch.full((bins,), float("nan"))

    def bin(self, t: torch.Tensor) -> torch.Tensor:
        return (t * self.bins // self.num_timesteps).clamp(0, self.bins - 1)

    def update(self, t: torch.Tensor, mse: torch.Tensor) -> None:
        """Fold per-sample MSEs (shape ``(B,)``) at timesteps ``t`` (``(B,)``) into the running means."""
        for b, v in zip(self.bin(t).tolist(), mse.detach().float().tolist(), strict=True):
            m = self.mean[b]
            self.mean[b] = v if torch.isnan(m) else self.decay * m + (1 - self.decay) * v

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weights ``(B,)``; bins not seen yet get the mean of the seen ones."""
        seen = ~torch.isnan(self.mean)
        if not seen.any():
            return torch.ones(t.shape)
        mean = torch.where(seen, self.mean, self.mean[seen].mean())
        inv = 1.0 / mean
        return (inv / inv.mean())[self.bin(t)]

    def state_dict(self) -> dict:
        return {"mean": self.mean.clone(), "bins": self.bins, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.bins, self.decay, self.mean = state["bins"], state["decay"], state["mean"].clone()


def _sample_mse(
    pred: torch.Tensor, target: torch.Tensor, single: torch.Tensor | None, mask: torch.Tensor | None
) -> torch.Tensor:
    """Per-sample MSE ``(B,)`` of ``pred`` against ``target`` (both ``(B, C, H, W)``); the samples flagged in
    ``single`` ``(B,)`` take the mean over their object's latent cells ``mask`` ``(B, 1, H, W)`` instead: the scale
    of a whole-image sample."""
    err = (pred - target) ** 2
    mse = err.mean(dim=(1, 2, 3))
    if single is not None:
        cells = mask.sum(dim=(1, 2, 3)).clamp(min=1) * err.shape[1]
        mse = torch.where(single, (err * mask).sum(dim=(1, 2, 3)) / cells, mse)
    return mse


def stage_unet(args, run_dir: Path, log: Logger) -> None:
    from diffusers import DDPMScheduler

    ckpt = run_dir / "unet.pt"
    device = torch.device(args.device)
    unet = make_unet(args.unet_arch)
    ema = make_unet(args.unet_arch).requires_grad_(False)
    if args.unet_init and not ckpt.exists():
        # warm start from another run's EMA weights: every parameter whose name and shape match
        init = _unet_init_state(args.unet_init)
        own = unet.state_dict()
        same = {k: v for k, v in init.items() if k in own and own[k].shape == v.shape}
        unet.load_state_dict(same, strict=False)
        log(stage="unet", init=str(args.unet_init), loaded=len(same), fresh=len(own) - len(same))
    ema.load_state_dict(unet.state_dict())
    unet.to(device)
    ema.to(device)
    patterns = [v for v in args.unet_train.split(",") if v.strip()]
    for name, p in unet.named_parameters():
        p.requires_grad_(not patterns or any(v in name for v in patterns))
    trained = [p for p in unet.parameters() if p.requires_grad]
    if not trained:
        raise SystemExit(
            f"--unet-train {args.unet_train!r} names no UNet parameter (e.g. 'attn2.to_k,attn2.to_v')"
        )
    opt = torch.optim.AdamW(trained, lr=args.unet_lr, weight_decay=1e-2)
    levels = NoiseLevelWeights() if args.unet_weighting == "noise-level" else None
    step, spent = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False, map_location="cpu")
        if state.get("arch", "attn-32-16-8") != args.unet_arch:
            raise SystemExit(f"{ckpt} holds a {state.get('arch', 'attn-32-16-8')} UNet, not {args.unet_arch}")
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step, spent = state["step"], state.get("spent", 0.0)
        if state.get("weighting", "uniform") != args.unet_weighting:
            raise SystemExit(f"{ckpt} was trained with --unet-weighting {state.get('weighting', 'uniform')}")
        if levels is not None:
            levels.load_state_dict(state["levels"])
        if state.get("done") and (step >= args.unet_steps or spent >= args.unet_minutes * 60.0):
            return  # finished within this budget; a larger --unet-steps / --unet-minutes resumes it
    teacher = None
    if args.unet_target == "teacher":
        if not args.unet_init:
            raise SystemExit("--unet-target teacher needs --unet-init: the teacher is that folder's UNet")
        teacher = make_unet(args.unet_arch).requires_grad_(False)
        teacher.load_state_dict(_unet_init_state(args.unet_init))  # strict: the teacher is the whole UNet
        teacher.to(device).eval()
    tokenizer, text = load_text_encoder(run_dir)
    pool = torch.load(run_dir / "pool.pt", weights_only=False)
    latents, ids, labels = pool["latents"], pool["ids"], pool.get("labels")
    del pool
    empty_ids = tokenizer([""], padding="max_length", max_length=MAX_LEN, return_tensors="pt").input_ids
    with torch.no_grad():
        cond = torch.cat([text(ids[i : i + 512]).last_hidden_state.half() for i in range(0, len(ids), 512)])
        empty = text(empty_ids).last_hidden_state
    compound = compound_conditioning(tokenizer, text, ids) if args.compound_prob > 0 else None
    singles = single_index = None
    if args.single_prob > 0:
        if labels is None:
            raise SystemExit(f"{run_dir / 'pool.pt'} has no object labels: delete it to rebuild the pool")
        singles, single_index = single_object_conditioning(tokenizer, text, ids)
    contrast = contrast_index = contrast_truth = None
    if args.contrast_weight > 0:
        if labels is None:
            raise SystemExit(f"{run_dir / 'pool.pt'} has no object labels: delete it to rebuild the pool")
        contrast, contrast_index, contrast_truth = slot_contrast_conditioning(
            tokenizer, text, ids, tuple(args.contrast_swap.split(","))
        )
        contrast = contrast.to(device)
    eot_recorder = None
    if (
        args.eot_weight > 0
        or args.group_weight > 0
        or args.coherence_weight > 0
        or args.separation_weight > 0
    ):
        if labels is None:
            raise SystemExit(f"{run_dir / 'pool.pt'} has no object labels: delete it to rebuild the pool")
        # the localization pass (pipeline.py): clean latent, t = 0, empty prompt; the [EOT] map exactly as
        # localization reads it, and every self-attention layer with its graph
        eot_factor = nearest_factor(unet_cross_attention_factors(unet), LocalizationConfig.eot_factor)
        eot_recorder = AttentionRecorder(
            (LATENT, LATENT),
            record_self=args.group_weight > 0 or args.coherence_weight > 0 or args.separation_weight > 0,
            self_with_grad=True,
            cross_token_indices=[find_eot_index(empty_ids[0], tokenizer.eos_token_id)]
            if args.eot_weight > 0
            else None,
            cross_factors=[eot_factor],
            cross_with_grad=True,
        )
    noise_sched = DDPMScheduler.from_config(make_scheduler().config)
    acp = noise_sched.alphas_cumprod.to(device)
    # the pool moves to the device once; random draws stay on the CPU generator (same run on any device)
    latents, cond, empty = latents.to(device), cond.to(device), empty.to(device)
    if compound is not None:
        compound = compound.to(device)
    if singles is not None:
        singles = singles.to(device)
    n = latents.shape[0]
    g = torch.Generator().manual_seed(args.seed + 2 + step)
    diag_seeds = list(range(100, 100 + args.diag_scenes))
    cond_seeds = list(range(200, 216))  # single-object scenes for the shape-word gain
    budget = args.unet_minutes * 60.0
    if args.unet_until:  # wall-clock deadline "HH:MM" (UTC, today): stop then whatever the step count
        hh, mm = (int(v) for v in args.unet_until.split(":"))
        now = time.gmtime()
        left = (hh * 3600 + mm * 60) - (now.tm_hour * 3600 + now.tm_min * 60 + now.tm_sec)
        budget = min(budget, spent + max(0.0, left))
    t_start = time.time() - spent
    unet.train()
    last_ckpt = time.time()

    def checkpoint(done: bool = False) -> None:
        save_ckpt(
            ckpt,
            unet=unet.state_dict(),
            ema=ema.state_dict(),
            opt=opt.state_dict(),
            step=step,
            spent=time.time() - t_start,
            arch=args.unet_arch,
            weighting=args.unet_weighting,
            **({"levels": levels.state_dict()} if levels is not None else {}),
            **({"done": True} if done else {}),
        )

    def diagnose(model) -> dict:
        """The attention diagnostics and the shape-word gain of ``model`` (on the CPU, the pipeline's device)."""
        if device.type != "cpu":
            copy = make_unet(args.unet_arch).requires_grad_(False)
            copy.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
            model = copy
        pipe = assemble_pipeline(run_dir, model.eval())
        d = attention_diagnostics(pipe, diag_seeds, rim=args.rim)
        gain = conditioning_gain(pipe, cond_seeds, rim=args.rim)
        d["shape_gain"] = {t: v["wrong shape"] for t, v in gain.items()}
        return d

    snapshots = {int(v) for v in args.snapshot_steps.split(",") if v.strip()}

    def snapshot() -> None:
        """The EMA UNet as a diffusers folder, ``<run-dir>/snapshots/step<N>``."""
        folder = run_dir / "snapshots" / f"step{step}"
        ema.save_pretrained(folder)
        log(stage="unet", step=step, snapshot=str(folder))

    losses, eot_losses, group_losses, coherence_losses, separation_losses = [], [], [], [], []
    contrast_losses, contrast_hits, distill_losses = [], [], []
    while step < args.unet_steps and time.time() - t_start < budget:
        idx = torch.randint(0, n, (args.unet_batch,), generator=g)
        z0 = latents[idx.to(device)].float()
        flip = (torch.rand(args.unet_batch, generator=g) < 0.5).to(device)
        z0 = _flipped(z0, flip)
        c = cond[idx.to(device)].float()
        drop = (torch.rand(args.unet_batch, generator=g) < 0.1).to(device)
        if compound is not None:  # the learning-prompt form of the caption (its own draw: old runs unchanged)
            pick = (torch.rand(args.unet_batch, generator=g) < args.compound_prob).to(device)
            c = torch.where(pick[:, None, None], compound[idx.to(device)].float(), c)
        c = torch.where(drop[:, None, None], empty.expand_as(c), c)
        single = object_mask = None
        if singles is not None:
            # the single-concept learning form: one object's slot, its loss masked to that object (own draws)
            k, object_mask = _pick_objects(single_index[idx], _flipped(labels[idx], flip.cpu()), g)
            single = (torch.rand(args.unet_batch, generator=g) < args.single_prob) & ~drop.cpu()
            single = (single & (object_mask.sum((1, 2, 3)) > 0)).to(device)
            object_mask = object_mask.to(device)
            rows = single_index[idx, k].clamp(min=0).to(device)
            c = torch.where(single[:, None, None], singles[rows].float(), c)
        t_cpu = torch.randint(0, 1000, (args.unet_batch,), generator=g)
        t = t_cpu.to(device)
        eps = torch.randn(z0.shape, generator=g).to(device)
        zt = _noised(acp, z0, t, eps)
        lr = args.unet_lr * min(1.0, (step + 1) / 200)
        for grp in opt.param_groups:
            grp["lr"] = lr
        pred = unet(zt, t, encoder_hidden_states=c).sample
        if teacher is None:
            mse = noise_mse = _sample_mse(pred, eps, single, object_mask)  # (B,)
        else:  # the starting model's prediction for the same input is the target
            with torch.no_grad():
                taught = teacher(zt, t, encoder_hidden_states=c).sample
                noise_mse = _sample_mse(pred, eps, single, object_mask)
            mse = _sample_mse(pred, taught, single, object_mask)
            distill_losses.append(mse.mean().item())
        if levels is None:
            loss = mse.mean()
        else:
            # the per-level statistics of whole images against the noise, whatever the target: with a teacher
            # each sample keeps the weight plain training gives it (its expected gradient, less the noise's)
            whole = ~single.cpu() if single is not None else torch.ones(args.unet_batch, dtype=torch.bool)
            levels.update(t_cpu[whole], noise_mse[whole.to(device)])
            loss = (levels.weights(t_cpu).to(device) * mse).mean()
        if eot_recorder is not None:
            # clean latents, t = 0, the empty prompt: the localization pass (its own draws, after the above)
            idx_e = torch.randint(0, n, (args.eot_batch,), generator=g)
            flip_e = torch.rand(args.eot_batch, generator=g) < 0.5
            z_e = latents[idx_e.to(device)].float()
            z_e = _flipped(z_e, flip_e.to(device))
            lab_e = _flipped(labels[idx_e], flip_e).to(device)
            eot_recorder.reset()
            with capture_attention(unet, eot_recorder):
                t0_e = torch.zeros(args.eot_batch, dtype=torch.long, device=device)
                unet(z_e, t0_e, encoder_hidden_states=empty.expand(args.eot_batch, -1, -1))
            if args.eot_weight > 0:
                eot_loss = eot_objectness_loss(eot_recorder.cross_attention(eot_factor)[:, 0], lab_e)
                loss = loss + args.eot_weight * eot_loss
                eot_losses.append(eot_loss.item())
            maps = list(eot_recorder.self_attention_maps().values())
            if args.group_weight > 0:
                group_loss = self_attention_grouping_loss(maps, lab_e, args.group_target)
                loss = loss + args.group_weight * group_loss
                group_losses.append(group_loss.item())
            if args.coherence_weight > 0 or args.separation_weight > 0:
                aggregated = aggregate_self_attention(maps, LATENT)
            if args.coherence_weight > 0:
                coherence = self_attention_coherence_loss(
                    aggregated, lab_e, args.coherence_distance, background=not args.coherence_objects_only
                )
                loss = loss + args.coherence_weight * coherence
                coherence_losses.append(coherence.item())
            if args.separation_weight > 0:
                separation = self_attention_separation_loss(aggregated, lab_e, args.separation_margin)
                loss = loss + args.separation_weight * separation
                separation_losses.append(separation.item())
            eot_recorder.reset()
        if contrast is not None:
            # one object of each of a few scenes, denoised under its own slot and under the slots of the
            # other shapes (same colour and texture, same noisy latent): rank its own shape first (own draws)
            b = args.contrast_batch
            idx_c = torch.randint(0, n, (b,), generator=g)
            flip_c = torch.rand(b, generator=g) < 0.5
            k_c, mask_c = _pick_objects(contrast_index[idx_c], _flipped(labels[idx_c], flip_c), g)
            mask_c = mask_c.to(device)
            rows_c = contrast_index[idx_c, k_c]
            z_c = _flipped(latents[idx_c.to(device)].float(), flip_c.to(device))
            t_c = torch.randint(0, 1000, (b,), generator=g).to(device)
            eps_c = torch.randn(z_c.shape, generator=g).to(device)
            zt_c = _noised(acp, z_c, t_c, eps_c)
            m = contrast.shape[1]
            states_c = contrast[rows_c.to(device)].float()  # (b, m, 77, d)
            truth_c = contrast_truth[rows_c].to(device)
            with torch.set_grad_enabled(not args.contrast_own_only):
                pred_c = unet(
                    zt_c.repeat_interleave(m, 0),
                    t_c.repeat_interleave(m, 0),
                    encoder_hidden_states=states_c.flatten(0, 1),
                ).sample.view(b, m, *zt_c.shape[1:])
            if args.contrast_own_only:
                # the others' errors are constants: the graph (and the backward pass) holds b samples only
                own = torch.arange(b, device=device)
                pred_c = pred_c.index_put(
                    (own, truth_c), unet(zt_c, t_c, encoder_hidden_states=states_c[own, truth_c]).sample
                )
            contrast_loss, hit = slot_contrast_loss(
                pred_c,
                eps_c,
                mask_c,
                truth_c,
                args.contrast_temperature,
                args.contrast_margin,
                args.contrast_own_only,
            )
            loss = loss + args.contrast_weight * contrast_loss
            contrast_losses.append(contrast_loss.item())
            contrast_hits.append(hit.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1 - decay)
        losses.append(noise_mse.mean().item())  # plain MSE, comparable across weightings and targets
        if step % args.unet_log_every == 0:
            log(
                stage="unet",
                step=step,
                loss=round(float(np.mean(losses)), 5),
                lr=lr,
                min=round((time.time() - t_start) / 60, 2),
                **({"eot_loss": round(float(np.mean(eot_losses)), 4)} if eot_losses else {}),
                **({"group_loss": round(float(np.mean(group_losses)), 4)} if group_losses else {}),
                **(
                    {"coherence_loss": round(float(np.mean(coherence_losses)), 4)} if coherence_losses else {}
                ),
                **(
                    {"separation_loss": round(float(np.mean(separation_losses)), 4)}
                    if separation_losses
                    else {}
                ),
                **(
                    {
                        "contrast_loss": round(float(np.mean(contrast_losses)), 4),
                        "contrast_top1": round(float(np.mean(contrast_hits)), 3),
                    }
                    if contrast_losses
                    else {}
                ),
                **({"distill_loss": round(float(np.mean(distill_losses)), 6)} if distill_losses else {}),
            )
            losses, eot_losses, group_losses, coherence_losses, separation_losses = [], [], [], [], []
            contrast_losses, contrast_hits, distill_losses = [], [], []
        if args.diag_every and step % args.diag_every == 0:
            log(stage="unet", step=step, diag=diagnose(ema))
        if step in snapshots:
            snapshot()
        if time.time() - last_ckpt > 300:
            checkpoint()
            last_ckpt = time.time()
    if snapshots and step not in snapshots:  # the last step too, when a cap ends the run elsewhere
        snapshot()
    diag = {"diag": diagnose(ema)} if args.diag_every else {}
    log(stage="unet", step=step, **diag, done=True, min=round((time.time() - t_start) / 60, 2))
    checkpoint(done=True)


def word_row_ids(tokenizer, words) -> torch.Tensor:
    """(n,) long: the input-embedding row of each toy word (each is one token of the toy tokenizer)."""
    found = []
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1 or word not in WORDS:
            raise ValueError(f"{word!r} is not a word of the toy vocabulary {WORDS}")
        found.append(ids[0])
    return torch.tensor(found, dtype=torch.long)


def stage_rows(args, run_dir: Path, log: Logger) -> None:
    """Fine-tune the input embedding rows of ``--rows-words`` alone (UNet and every other weight frozen).

    On the eleventh model a heart's pixels are explained better by the one-slot prompt "colour + circle" than
    by "colour + heart" (docs/toyworld.md, eleventh model, items 4 and 6): the heart's word row is the
    weakest shape row. Fine-tuning the UNet to rank the right slot first moved the other objects' colours
    (thirteenth to sixteenth runs). Here only the listed words' rows move, so every prompt without those words
    is drawn exactly as before. Per step, ``--rows-batch`` objects (half of them, in expectation, objects
    named by one of the words) are denoised under their own slot and the slots of the other shapes (the
    candidates of ``slot_contrast_loss``, cross-entropy), and the scenes under their own captions (plain MSE,
    so that the words keep drawing their objects in captions); gradients reach the rows through the frozen
    text encoder. Writes ``rows.pt`` (the rows, which ``load_text_encoder`` then applies, and so ``export``).

    It ranks the heart's slot first (docs/toyworld.md, "Seventeenth run") but cannot change an extraction: a
    learned token never reads a word row, only the function (text-encoder layers and UNet) the rows are read
    by, which this stage leaves as it was. Kept as the record of that result and for slot or caption probes.
    """
    from diffusers import DDPMScheduler

    out = run_dir / "rows.pt"
    if out.exists():
        return
    words = [w.strip() for w in args.rows_words.split(",") if w.strip()]
    tokenizer, text = load_text_encoder(run_dir, rows=False)
    row_ids = word_row_ids(tokenizer, words)
    unet = make_unet(args.unet_arch)
    unet.load_state_dict(_unet_init_state(args.unet_init))
    unet.eval().requires_grad_(False)
    pool = torch.load(run_dir / "pool.pt", weights_only=False)
    latents, ids, labels = pool["latents"], pool["ids"], pool["labels"]
    del pool
    per_caption, keys = _distinct_objects(tokenizer, ids)
    objects = [(n, k) for n, slots in enumerate(per_caption) for k in range(len(slots))]
    named = [(n, k) for n, k in objects if set(keys[per_caption[n][k]]) & set(words)]
    if not named:
        raise SystemExit(f"no object of the pool is named by {words}")
    candidates = [contrast_candidates(key) for key in keys]
    word_ids = {w: tokenizer(w, add_special_tokens=False).input_ids[0] for w in WORDS}
    base = text.get_input_embeddings().weight.detach().clone()
    rows = nn.Parameter(base[row_ids].clone())
    opt = torch.optim.Adam([rows], lr=args.rows_lr)
    acp = DDPMScheduler.from_config(make_scheduler().config).alphas_cumprod
    g = torch.Generator().manual_seed(args.seed + 3)
    original = text.get_input_embeddings()
    m = len(SHAPES)
    t_start = time.time()
    history: dict[str, list[float]] = {"contrast": [], "top1": [], "top1_named": [], "caption": []}
    for step in range(1, args.rows_steps + 1):
        b = args.rows_batch
        use_named = torch.rand(b, generator=g) < 0.5
        pick = []
        for from_named in use_named.tolist():
            source = named if from_named else objects
            pick.append(source[int(torch.randint(0, len(source), (1,), generator=g))])
        scene = torch.tensor([n for n, _ in pick])
        k = torch.tensor([k for _, k in pick])
        flip = torch.rand(b, generator=g) < 0.5
        mask = object_latent_masks(_flipped(labels[scene], flip), k)
        z0 = _flipped(latents[scene].float(), flip)
        t = torch.randint(0, 1000, (b,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        zt = _noised(acp, z0, t, eps)
        obj_keys = [per_caption[n][kk] for n, kk in pick]
        truth = torch.tensor([SHAPES.index(keys[s][-1]) for s in obj_keys])
        table = base.index_put((row_ids,), rows)  # the vocabulary with the trained rows, with autograd
        phrases = [c for s in obj_keys for c in candidates[s]]
        slot_rows = torch.stack([table[[word_ids[w] for w in phrase]].sum(0) for phrase in phrases])
        seqs = _slot_sequences(tokenizer, [[i] for i in range(len(phrases))], base.shape[0], ids.shape[1])
        text.set_input_embeddings(_RowsEmbedding(torch.cat([table, slot_rows])))
        try:
            states = text(seqs).last_hidden_state
            caption_states = text(ids[scene]).last_hidden_state
        finally:
            text.set_input_embeddings(original)
        pred = unet(
            zt.repeat_interleave(m, 0), t.repeat_interleave(m, 0), encoder_hidden_states=states
        ).sample.view(b, m, *zt.shape[1:])
        contrast, top1 = slot_contrast_loss(pred, eps, mask, truth, args.contrast_temperature)
        caption = F.mse_loss(unet(zt, t, encoder_hidden_states=caption_states).sample, eps)
        loss = args.rows_contrast_weight * contrast + caption
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hits = (pred.detach() - eps[:, None]).pow(2).mul(mask[:, None]).sum((2, 3, 4)).argmin(1) == truth
        history["contrast"].append(contrast.item())
        history["top1"].append(top1.item())
        history["top1_named"] += hits[use_named].float().tolist()
        history["caption"].append(caption.item())
        if step % args.rows_log_every == 0 or step == args.rows_steps:
            log(
                stage="rows",
                step=step,
                **{key: round(float(np.mean(v)), 4) for key, v in history.items() if v},
                row_norms=[round(float(r), 4) for r in rows.detach().norm(dim=1)],
                moved=[round(float(d), 4) for d in (rows.detach() - base[row_ids]).norm(dim=1)],
                min=round((time.time() - t_start) / 60, 2),
            )
            history = {key: [] for key in history}
            (run_dir / "snapshots").mkdir(exist_ok=True)
            save_ckpt(run_dir / "snapshots" / f"rows_step{step}.pt", words=words, rows=rows.detach().clone())
    save_ckpt(out, words=words, rows=rows.detach().clone(), steps=args.rows_steps, done=True)
    log(stage="rows", done=True, words=words, min=round((time.time() - t_start) / 60, 2))


class _RowsEmbedding(nn.Module):
    """An input-embedding lookup in a matrix that carries autograd (the trained rows, appended slots)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.table = weight

    @property
    def weight(self) -> torch.Tensor:
        return self.table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.table)


def load_unet_checkpoint(path: str | Path, which: str = "ema"):
    """The UNet of a ``unet.pt`` training checkpoint (``which``: "ema" or "unet" weights), in eval mode."""
    state = torch.load(path, weights_only=False, map_location="cpu")
    unet = make_unet(state.get("arch", "attn-32-16-8"))
    unet.load_state_dict(state[which])
    return unet.eval()


def export(run_dir: Path, out: Path, which: str = "ema") -> None:
    """Write the diffusers folder (float32 safetensors, ~11 MB) from the run's checkpoints.

    float32 rather than fp16: ``from_pretrained`` without ``dtype`` then gives every component the same dtype
    (transformers loads the text encoder in float32, diffusers keeps fp16 weights as fp16: a mixed pipeline
    fails on the first matmul), and fp16 brings nothing on a CPU.
    """
    pipe = assemble_pipeline(run_dir, load_unet_checkpoint(run_dir / "unet.pt", which))
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
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


def plot_log(run_dir: Path, out: Path) -> None:
    """Loss curves of the stages (from log.jsonl) as one PNG, drawn with PIL (no matplotlib needed)."""
    from PIL import Image, ImageDraw

    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    panels = []
    for stage, key in (("vae", "loss"), ("clip", "loss"), ("unet", "loss")):
        pts = [(r["step"], r[key]) for r in records if r.get("stage") == stage and key in r and "step" in r]
        if pts:
            pts = sorted(dict(pts).items())  # a resumed stage repeats steps: keep the last value of each
            panels.append((f"{stage} {key}", pts))
    diag = [(r["step"], r["diag"]) for r in records if r.get("stage") == "unet" and "diag" in r]
    if diag:
        diag = sorted(dict(diag).items())
        panels.append(
            ("unet: EOT obj/bg ratio (mean, 8 scenes)", [(s, d["eot_ratio_mean"]) for s, d in diag])
        )
        panels.append(("unet: k-means (K+1) mIoU, 8 scenes", [(s, d["kmeans_miou"]) for s, d in diag]))
        gain = [(s, d["shape_gain"]["750"]) for s, d in diag if "750" in d.get("shape_gain", {})]
        if gain:  # logged from the third run on (JSON turns the timestep keys into strings)
            panels.append(("unet: shape-word gain at t=750", gain))
    w, h, pad = 420, 260, 40
    img = Image.new("RGB", (w * len(panels), h), "white")
    draw = ImageDraw.Draw(img)
    for k, (title, pts) in enumerate(panels):
        x0 = k * w
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        log_y = "loss" in title and min(ys) > 0
        ty = [math.log10(y) for y in ys] if log_y else ys
        lo, hi = min(ty), max(ty)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        x_lo, x_span = min(xs), max(max(xs) - min(xs), 1)

        def sx(v: float, x0: int = x0, x_lo: float = x_lo, x_span: float = x_span) -> float:
            return x0 + pad + (v - x_lo) / x_span * (w - 2 * pad)

        def sy(v: float, lo: float = lo, hi: float = hi) -> float:
            return h - pad - (v - lo) / (hi - lo) * (h - 2 * pad)

        draw.rectangle([x0 + pad, pad, x0 + w - pad, h - pad], outline="black")
        if len(pts) > 1:
            draw.line([(sx(a), sy(b)) for a, b in zip(xs, ty, strict=True)], fill="blue", width=2)
        for a, b in zip(xs, ty, strict=True):
            draw.ellipse([sx(a) - 2, sy(b) - 2, sx(a) + 2, sy(b) + 2], fill="blue")
        draw.text((x0 + pad, 10), title + (" (log10)" if log_y else ""), fill="black")
        draw.text((x0 + 2, pad - 5), f"{(10**hi if log_y else hi):.3g}", fill="black")
        draw.text((x0 + 2, h - pad - 5), f"{(10**lo if log_y else lo):.3g}", fill="black")
        draw.text((x0 + pad, h - pad + 5), f"step {min(xs)}", fill="black")
        draw.text((x0 + w - pad - 60, h - pad + 5), f"{max(xs)}", fill="black")
        if "ratio" in title and lo < 1 < hi:
            draw.line([(x0 + pad, sy(1.0)), (x0 + w - pad, sy(1.0))], fill="red")
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default=".toyworld-runs/main")
    p.add_argument("--stages", default="vae,pool,clip,unet,export")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--rim",
        type=int,
        default=RIM_WIDTH,
        help="render_scene's rim: dark object outlines this many pixels wide (0: the second world)",
    )
    p.add_argument(
        "--stripe-shade",
        type=float,
        default=STRIPE_SHADE,
        help="render_scene's stripe_shade: striped objects' dark bands as a share of their colour",
    )
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--pool", type=int, default=30000)
    p.add_argument(
        "--pool-workers", type=int, default=1, help="processes that render and encode the pool (same pool)"
    )
    p.add_argument("--clip-steps", type=int, default=1200)
    p.add_argument("--clip-batch", type=int, default=128)
    p.add_argument("--clip-lr", type=float, default=1e-3)
    p.add_argument("--unet-steps", type=int, default=100000)
    p.add_argument("--unet-minutes", type=float, default=75.0, help="wall-clock budget of the UNet stage")
    p.add_argument("--unet-until", default=None, help="stop the UNet stage at this UTC time, HH:MM")
    p.add_argument("--unet-batch", type=int, default=24)
    p.add_argument(
        "--unet-target",
        choices=["noise", "teacher"],
        default="noise",
        help="the denoising loss's target: the noise (plain training), or the --unet-init UNet's prediction for "
        "the same noisy latent, timestep and prompt (a frozen teacher; logged as distill_loss; 'loss' stays the "
        "plain MSE against the noise)",
    )
    p.add_argument(
        "--unet-train",
        default="",
        help="comma-separated substrings of the UNet parameter names to train (e.g. 'attn2.to_k,attn2.to_v': the "
        "cross-attention's reading of the prompt); the rest stays frozen (default: all)",
    )
    p.add_argument("--unet-log-every", type=int, default=50, help="UNet stage: steps per log line (means)")
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--unet-arch", default="attn-32-16-8", choices=UNET_ARCHS)
    p.add_argument(
        "--unet-init",
        default=None,
        help="warm-start the UNet from this unet.pt (its EMA weights) or exported diffusers folder",
    )
    p.add_argument(
        "--from-model",
        default=None,
        help="seed the run's vae/clip stages from this exported folder (e.g. the shipped toyworld model)",
    )
    p.add_argument("--device", default="cpu", help="device of the UNet stage (cpu, cuda)")
    p.add_argument(
        "--unet-weighting",
        default="uniform",
        choices=["uniform", "noise-level"],
        help="loss weighting over timesteps: plain MSE, or each noise level normalised to the same share",
    )
    p.add_argument(
        "--eot-weight",
        type=float,
        default=0.0,
        help="weight of the [EOT] objectness loss (eot_objectness_loss) on a clean-latent, t = 0, empty-prompt "
        "pass per step (0: off; needs a pool with labels)",
    )
    p.add_argument("--eot-batch", type=int, default=8, help="scenes per step of that pass")
    p.add_argument(
        "--group-weight",
        type=float,
        default=0.0,
        help="weight of the self-attention grouping loss (self_attention_grouping_loss) on the same t = 0 "
        "empty-prompt pass (0: off; needs a pool with labels)",
    )
    p.add_argument(
        "--coherence-weight",
        type=float,
        default=0.0,
        help="weight of the self-attention coherence loss (self_attention_coherence_loss) on the same pass, "
        "on the method's aggregated self-attention (0: off)",
    )
    p.add_argument("--coherence-objects-only", action="store_true", help="do not score the background's rows")
    p.add_argument(
        "--separation-weight",
        type=float,
        default=0.0,
        help="weight of the self-attention separation loss (self_attention_separation_loss): different objects' "
        "mean rows apart (0: off)",
    )
    p.add_argument(
        "--separation-margin",
        type=float,
        default=1.0,
        help="wanted symmetric KL between two objects' mean rows",
    )
    p.add_argument(
        "--coherence-distance", type=float, default=0.05, help="allowed symmetric KL to the object's mean row"
    )
    p.add_argument(
        "--group-target",
        type=float,
        default=0.8,
        help="share of each cell's self-attention wanted on its own object (or on the background)",
    )
    p.add_argument(
        "--single-prob",
        type=float,
        default=0.0,
        help='share of captions given as the method\'s single-concept learning prompt "a photo of <x_k>" for '
        "one object k of the scene, with the loss masked to that object's latent cells "
        "(single_object_conditioning; needs a pool with labels)",
    )
    p.add_argument(
        "--contrast-weight",
        type=float,
        default=0.0,
        help="weight of the slot-contrast loss (slot_contrast_loss): an object's own slot must explain its "
        "masked pixels better than its contrast candidates (--contrast-swap; needs a pool with labels)",
    )
    p.add_argument(
        "--contrast-swap",
        default="shape",
        choices=["shape", "shape,colour"],
        help="the contrast's candidates: the object with every other shape, and also with every other colour",
    )
    p.add_argument("--contrast-batch", type=int, default=4, help="objects per step of the slot-contrast loss")
    p.add_argument(
        "--contrast-temperature",
        type=float,
        default=1.0,
        help="the slot-contrast logits are minus the summed squared error inside the mask over this",
    )
    p.add_argument(
        "--contrast-margin",
        type=float,
        default=None,
        help="a hinge instead of the cross-entropy: zero once every other slot's masked error is at least "
        "exp(MARGIN) times the own slot's (slot_contrast_loss)",
    )
    p.add_argument(
        "--contrast-own-only",
        action="store_true",
        help="the other slots' masked errors are constants: the slot contrast only lowers the own slot's error "
        "(slot_contrast_loss(own_only=True); the other candidates are denoised without a graph)",
    )
    p.add_argument(
        "--rows-words",
        default="heart",
        help="stage 'rows': the words whose input embedding rows are fine-tuned (comma-separated toy words)",
    )
    p.add_argument("--rows-steps", type=int, default=300, help="stage 'rows': optimiser steps")
    p.add_argument("--rows-batch", type=int, default=4, help="stage 'rows': objects per step")
    p.add_argument("--rows-lr", type=float, default=5e-4, help="stage 'rows': Adam learning rate")
    p.add_argument(
        "--rows-log-every",
        type=int,
        default=25,
        help="stage 'rows': steps between log lines and row snapshots",
    )
    p.add_argument(
        "--rows-contrast-weight",
        type=float,
        default=0.1,
        help="stage 'rows': weight of the slot contrast against the captions' plain MSE",
    )
    p.add_argument(
        "--compound-prob",
        type=float,
        default=0.0,
        help="share of captions given in the learning-prompt form, one summed-embedding slot per object "
        "(compound_conditioning)",
    )
    p.add_argument(
        "--snapshot-steps",
        default="",
        help="comma-separated steps at which the EMA UNet is also saved, as a diffusers folder "
        "<run-dir>/snapshots/step<N>",
    )
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--diag-every", type=int, default=500, help="steps between diagnostics (0: none)")
    p.add_argument("--diag-scenes", type=int, default=8)
    p.add_argument("--out", default=None, help="export the diffusers folder here")
    p.add_argument("--plot", default=None, help="with stage 'plot': write the loss curves PNG here")
    p.add_argument("--export-weights", default="ema", choices=["ema", "unet"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = Logger(run_dir)
    log(event="start", args=vars(args))
    if args.from_model:
        seed_from_model(run_dir, Path(args.from_model), log)
    stages = args.stages.split(",")
    for name in stages:
        if name == "vae":
            stage_vae(args, run_dir, log)
        elif name == "pool":
            stage_pool(args, run_dir, log)
        elif name == "clip":
            stage_clip(args, run_dir, log)
        elif name == "unet":
            stage_unet(args, run_dir, log)
        elif name == "rows":
            stage_rows(args, run_dir, log)
        elif name == "export":
            if args.out:
                export(run_dir, Path(args.out), args.export_weights)
                log(stage="export", out=args.out)
        elif name == "plot":
            plot_log(run_dir, Path(args.plot or run_dir / "loss.png"))
        else:
            raise SystemExit(f"unknown stage {name}")
    log(event="end")


if __name__ == "__main__":
    main()
