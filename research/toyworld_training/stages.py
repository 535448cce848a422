"""The stages before the UNet: the VAE, the pool of encoded scenes, and the text encoder's contrastive
pretraining against a small image encoder. Each resumes from its checkpoint in the run folder."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffusers_conceptexpress.toyworld.scenes import IMAGE_SIZE
from diffusers_conceptexpress.toyworld.tokenizer import build_tokenizer

from .data import SEED_OFFSET_TRAIN, pool_batches, scene_batch
from .models import TEXT_DIM, ImageEncoder, make_text_encoder, make_vae
from .runs import Logger, save_ckpt


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
                ex.submit(pool_batches, run_dir, part, args.pool, args.rim, 1, args.stripe_shade)
                for part in parts
            ]
            batches = [batch for job in jobs for batch in job.result()]
    else:
        batches = pool_batches(run_dir, starts, args.pool, args.rim, args.threads, args.stripe_shade)
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
