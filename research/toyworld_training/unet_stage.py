"""Stage "unet": the UNet on the frozen text encoder, with the optional objectives of ``losses``.

Epsilon prediction (or a frozen teacher's prediction, ``--unet-target teacher``) on the pool's latents, with
captions in their template form or the method's learning-prompt forms (``conditioning``), EMA weights,
snapshots, periodic checkpoints and diagnostics (``diagnostics``). The attention objectives run on a second
small batch per step: clean latents at t = 0 with the empty prompt, the method's localization pass.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from diffusers_conceptexpress.attention import capture_attention, nearest_factor, unet_cross_attention_factors
from diffusers_conceptexpress.localization import LocalizationConfig, find_eot_index

from .attention import GradAttentionRecorder
from .conditioning import compound_conditioning, single_object_conditioning, slot_contrast_conditioning
from .data import flipped, noised, pick_objects
from .diagnostics import attention_diagnostics, conditioning_gain
from .losses import (
    NoiseLevelWeights,
    aggregate_self_attention,
    eot_objectness_loss,
    sample_mse,
    self_attention_coherence_loss,
    self_attention_grouping_loss,
    self_attention_separation_loss,
    slot_contrast_loss,
)
from .models import (
    LATENT,
    MAX_LEN,
    assemble_pipeline,
    load_text_encoder,
    make_scheduler,
    make_unet,
    unet_init_state,
)
from .runs import Logger, save_ckpt


def stage_unet(args, run_dir: Path, log: Logger) -> None:
    from diffusers import DDPMScheduler

    ckpt = run_dir / "unet.pt"
    device = torch.device(args.device)
    unet = make_unet(args.unet_arch)
    ema = make_unet(args.unet_arch).requires_grad_(False)
    if args.unet_init and not ckpt.exists():
        # warm start from another run's EMA weights: every parameter whose name and shape match
        init = unet_init_state(args.unet_init)
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
        teacher.load_state_dict(unet_init_state(args.unet_init))  # strict: the teacher is the whole UNet
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
        eot_recorder = GradAttentionRecorder(
            (LATENT, LATENT),
            record_self=args.group_weight > 0 or args.coherence_weight > 0 or args.separation_weight > 0,
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
        z0 = flipped(z0, flip)
        c = cond[idx.to(device)].float()
        drop = (torch.rand(args.unet_batch, generator=g) < 0.1).to(device)
        if compound is not None:  # the learning-prompt form of the caption (its own draw: old runs unchanged)
            pick = (torch.rand(args.unet_batch, generator=g) < args.compound_prob).to(device)
            c = torch.where(pick[:, None, None], compound[idx.to(device)].float(), c)
        c = torch.where(drop[:, None, None], empty.expand_as(c), c)
        single = object_mask = None
        if singles is not None:
            # the single-concept learning form: one object's slot, its loss masked to that object (own draws)
            k, object_mask = pick_objects(single_index[idx], flipped(labels[idx], flip.cpu()), g)
            single = (torch.rand(args.unet_batch, generator=g) < args.single_prob) & ~drop.cpu()
            single = (single & (object_mask.sum((1, 2, 3)) > 0)).to(device)
            object_mask = object_mask.to(device)
            rows = single_index[idx, k].clamp(min=0).to(device)
            c = torch.where(single[:, None, None], singles[rows].float(), c)
        t_cpu = torch.randint(0, 1000, (args.unet_batch,), generator=g)
        t = t_cpu.to(device)
        eps = torch.randn(z0.shape, generator=g).to(device)
        zt = noised(acp, z0, t, eps)
        lr = args.unet_lr * min(1.0, (step + 1) / 200)
        for grp in opt.param_groups:
            grp["lr"] = lr
        pred = unet(zt, t, encoder_hidden_states=c).sample
        if teacher is None:
            mse = noise_mse = sample_mse(pred, eps, single, object_mask)  # (B,)
        else:  # the starting model's prediction for the same input is the target
            with torch.no_grad():
                taught = teacher(zt, t, encoder_hidden_states=c).sample
                noise_mse = sample_mse(pred, eps, single, object_mask)
            mse = sample_mse(pred, taught, single, object_mask)
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
            z_e = flipped(z_e, flip_e.to(device))
            lab_e = flipped(labels[idx_e], flip_e).to(device)
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
            k_c, mask_c = pick_objects(contrast_index[idx_c], flipped(labels[idx_c], flip_c), g)
            mask_c = mask_c.to(device)
            rows_c = contrast_index[idx_c, k_c]
            z_c = flipped(latents[idx_c.to(device)].float(), flip_c.to(device))
            t_c = torch.randint(0, 1000, (b,), generator=g).to(device)
            eps_c = torch.randn(z_c.shape, generator=g).to(device)
            zt_c = noised(acp, z_c, t_c, eps_c)
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
