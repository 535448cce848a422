"""Stage "rows": fine-tune the input embedding rows of a few toy words alone (everything else frozen)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffusers_conceptexpress.toyworld.scenes import SHAPES
from diffusers_conceptexpress.toyworld.tokenizer import WORDS

from .conditioning import contrast_candidates, distinct_objects, slot_sequences, word_row_ids
from .data import flipped, noised, object_latent_masks
from .losses import slot_contrast_loss
from .models import load_text_encoder, make_scheduler, make_unet, unet_init_state
from .runs import Logger, save_ckpt


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
    unet.load_state_dict(unet_init_state(args.unet_init))
    unet.eval().requires_grad_(False)
    pool = torch.load(run_dir / "pool.pt", weights_only=False)
    latents, ids, labels = pool["latents"], pool["ids"], pool["labels"]
    del pool
    per_caption, keys = distinct_objects(tokenizer, ids)
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
        mask = object_latent_masks(flipped(labels[scene], flip), k)
        z0 = flipped(latents[scene].float(), flip)
        t = torch.randint(0, 1000, (b,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        zt = noised(acp, z0, t, eps)
        obj_keys = [per_caption[n][kk] for n, kk in pick]
        truth = torch.tensor([SHAPES.index(keys[s][-1]) for s in obj_keys])
        table = base.index_put((row_ids,), rows)  # the vocabulary with the trained rows, with autograd
        phrases = [c for s in obj_keys for c in candidates[s]]
        slot_rows = torch.stack([table[[word_ids[w] for w in phrase]].sum(0) for phrase in phrases])
        seqs = slot_sequences(tokenizer, [[i] for i in range(len(phrases))], base.shape[0], ids.shape[1])
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
