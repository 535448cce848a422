"""The toy model's trainer, classifier training and UNet interpolation (research/toyworld_training), offline.

Runs of the trainer start from the shipped model (``--from-model``) with tiny pools and a few steps.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

from benchmark_scripts import load_benchmark
from diffusers_conceptexpress import ConceptExpressPipeline
from diffusers_conceptexpress.attention import (
    AttentionRecorder,
    capture_attention,
    unet_cross_attention_factors,
)
from diffusers_conceptexpress.masks import masks_to_latent_grid
from diffusers_conceptexpress.toyworld import COLORS, SHAPES, model_path, render_scene
from diffusers_conceptexpress.toyworld.scenes import STRIPE_SHADE
from research.toyworld_training import interpolate_unet
from research.toyworld_training.attention import GradAttentionRecorder
from research.toyworld_training.classifier import train_classifier
from research.toyworld_training.cli import main
from research.toyworld_training.conditioning import (
    compound_conditioning,
    contrast_candidates,
    object_phrases,
    single_object_conditioning,
    slot_contrast_conditioning,
    word_row_ids,
)
from research.toyworld_training.data import object_latent_masks, scene_batch
from research.toyworld_training.diagnostics import conditioning_gain
from research.toyworld_training.losses import aggregate_self_attention
from research.toyworld_training.models import load_unet_checkpoint, make_unet

ROOT = Path(__file__).resolve().parents[2]
REBUILD = ROOT / "research" / "rebuild"
WEIGHTS = interpolate_unet.WEIGHTS


def test_the_documented_command_shows_its_help():
    done = subprocess.run(
        [sys.executable, "-m", "research.toyworld_training", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "python -m research.toyworld_training" in done.stdout and "--unet-arch" in done.stdout


def unet_inputs(unet, latent=(16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, *latent, generator=g)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([10]), ctx


def test_self_attention_maps_with_gradient(components_factory):
    unet = components_factory("sd2")["unet"]
    x, t, ctx = unet_inputs(unet)
    x.requires_grad_(True)
    rec = GradAttentionRecorder((16, 16), chunk_bytes=20_000)  # several query chunks
    with capture_attention(unet, rec):
        unet(x, t, encoder_hidden_states=ctx)
    maps = rec.self_attention_maps()
    assert len(maps) == 7  # every self-attention layer, none aggregated
    assert {m.shape[-1] for m in maps.values()} == {256, 64, 16}
    for m in maps.values():
        assert m.shape[1] == m.shape[2] and m.requires_grad
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:2]))
    next(iter(maps.values()))[0, 0, 0].backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="No self-attention"):
        rec.self_attention()
    rec.reset()
    assert rec.self_attention_maps() == {}


@pytest.mark.parametrize(
    ("arch", "factors", "heads_at_32"),
    [("attn-32-16-8", [1, 2, 4], 1), ("attn-32-16", [1, 2], 2)],
)
def test_toy_unet_architectures(arch, factors, heads_at_32):
    unet = make_unet(arch)
    assert unet.config.sample_size == 32
    assert unet_cross_attention_factors(unet) == factors
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == heads_at_32
    assert unet.mid_block.attentions  # both keep SD's mid-block attention (at 8x8)
    with pytest.raises(ValueError, match="unknown UNet architecture"):
        make_unet("attn-64")


def test_classifier_training_rejects_bad_shades():
    with pytest.raises(ValueError, match="stripe_shades"):
        train_classifier(steps=1, stripe_shades=())
    with pytest.raises(ValueError, match="stripe_shades"):
        train_classifier(steps=1, stripe_shades=(0.0,))


def test_shipped_model_uses_the_colour_word_conditioning_gain(offline):
    # the shipped model draws the right colour (95%): a wrong colour word or the empty prompt must raise the
    # epsilon MSE at high noise, where the colour of the object is decided; the true caption is the baseline
    pipe = ConceptExpressPipeline.from_pretrained(model_path())
    gains = conditioning_gain(pipe, range(7_100_000, 7_100_012), timesteps=(850,))
    assert set(gains) == {850}
    row = gains[850]
    assert set(row) == {"true", "wrong shape", "wrong colour", "empty"}
    assert row["true"] > 0
    assert row["wrong colour"] > 0.05
    assert row["empty"] > 0.05


def test_a_run_seeded_from_the_shipped_model_exports_the_same_weights(tmp_path, offline):
    # run directories do not outlive a session: a later session resumes from the shipped folder itself
    shipped = Path(model_path())
    out = tmp_path / "model"
    main(
        ["--run-dir", str(tmp_path / "run"), "--from-model", str(shipped), "--unet-init", str(shipped),
         "--stages", "vae,pool,clip,unet,export", "--pool", "8", "--unet-steps", "0", "--diag-every", "0",
         "--unet-arch", "attn-32-16", "--out", str(out)]
    )  # fmt: skip
    for part in ("vae/diffusion_pytorch_model", "text_encoder/model", "unet/diffusion_pytorch_model"):
        ours, theirs = load_file(out / f"{part}.safetensors"), load_file(shipped / f"{part}.safetensors")
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), part
    for name in ("vocab.json", "merges.txt"):
        assert (out / "tokenizer" / name).read_bytes() == (shipped / "tokenizer" / name).read_bytes()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any(r.get("stage") == "seed" for r in log)
    assert not any(r.get("stage") in ("vae", "clip") and "step" in r for r in log)  # nothing retrained


def test_rows_stage_moves_only_the_named_words_rows_and_export_carries_them(tmp_path, offline):
    # the rows stage fine-tunes the heart's input row alone: every prompt without "heart" encodes as before
    from transformers import CLIPTextModel, CLIPTokenizer

    shipped = Path(model_path())
    out, run = tmp_path / "model", tmp_path / "run"
    main(
        ["--run-dir", str(run), "--from-model", str(shipped), "--unet-init", str(shipped),
         "--stages", "pool,rows", "--pool", "16", "--unet-arch", "attn-32-16", "--rows-steps", "2",
         "--rows-batch", "2", "--rows-log-every", "1", "--rows-lr", "1e-2"]
    )  # fmt: skip
    main(["--run-dir", str(run), "--unet-init", str(shipped), "--stages", "unet,export", "--unet-steps", "0",
          "--diag-every", "0", "--unet-arch", "attn-32-16", "--pool", "16", "--out", str(out)])  # fmt: skip
    tok = CLIPTokenizer.from_pretrained(shipped, subfolder="tokenizer")
    heart = int(word_row_ids(tok, ["heart"])[0])
    key = "embeddings.token_embedding.weight"
    ours, theirs = (
        load_file(out / "text_encoder/model.safetensors"),
        load_file(shipped / "text_encoder/model.safetensors"),
    )
    changed = (ours[key] != theirs[key]).any(dim=1).nonzero()[:, 0].tolist()
    assert changed == [heart]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs if k != key)
    new, old = (
        CLIPTextModel.from_pretrained(out / "text_encoder"),
        CLIPTextModel.from_pretrained(shipped / "text_encoder"),
    )
    ids = tok(
        ["a photo of a red circle", "a photo of a red heart"], padding="max_length", return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        a, b = new(ids).last_hidden_state, old(ids).last_hidden_state
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if r.get("stage") == "rows" and "step" in r]
    assert [r["step"] for r in steps] == [1, 2] and 0 <= steps[-1]["top1"] <= 1
    with pytest.raises(ValueError, match="toy vocabulary"):
        word_row_ids(tok, ["dog"])


def test_pool_workers_build_the_same_pool_and_snapshots_hold_the_ema(tmp_path, offline):
    shipped = str(model_path())
    common = ["--from-model", shipped, "--pool", "260", "--diag-every", "0"]  # 2 batches: 256 + 4 scenes
    main(["--run-dir", str(tmp_path / "one"), "--stages", "pool", *common])
    main(["--run-dir", str(tmp_path / "two"), "--stages", "pool", "--pool-workers", "2", *common])
    one = torch.load(tmp_path / "one" / "pool.pt", weights_only=False)
    two = torch.load(tmp_path / "two" / "pool.pt", weights_only=False)
    assert one.keys() == two.keys() and one["latents"].shape == (260, 4, 32, 32)
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=2e-3, rtol=0)  # fp16 latents; the rest equal
    assert torch.equal(two["labels"], one["labels"]) and torch.equal(two["ids"], one["ids"])
    # a run cut at step 2 saves its requested snapshot and, at the end, its last step: the EMA weights
    # (with single-concept captions, whose loss is masked to one object's latent cells, and the slot
    # contrast in its hinge form over shape and colour candidates, own slot only)
    main(["--run-dir", str(tmp_path / "two"), "--stages", "unet", "--unet-init", shipped, "--unet-arch",
          "attn-32-16", "--unet-steps", "2", "--unet-batch", "2", "--snapshot-steps", "1",
          "--single-prob", "0.5", "--contrast-weight", "0.02", "--contrast-batch", "1", "--contrast-swap",
          "shape,colour", "--contrast-margin", "0.5", "--contrast-own-only", *common])  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "two" / "snapshots").iterdir()) == ["step1", "step2"]
    last = UNet2DConditionModel.from_pretrained(tmp_path / "two" / "snapshots" / "step2")
    ema = load_unet_checkpoint(tmp_path / "two" / "unet.pt", "ema")
    assert all(
        torch.equal(a, b) for a, b in zip(last.state_dict().values(), ema.state_dict().values(), strict=True)
    )
    first = UNet2DConditionModel.from_pretrained(tmp_path / "two" / "snapshots" / "step1")
    assert not all(
        torch.equal(a, b) for a, b in zip(first.state_dict().values(), ema.state_dict().values(), strict=True)
    )


def test_teacher_target_and_trained_parameters(tmp_path, offline):
    # --unet-target teacher: the frozen --unet-init UNet's prediction is the target, so the first step's
    # student IS the teacher (distill_loss 0) while the plain loss against the noise is not 0; the noise-level
    # weights come from the noise's MSE (a per-level mean of 0 would make them NaN)
    shipped = str(model_path())
    run = tmp_path / "run"
    common = ["--run-dir", str(run), "--from-model", shipped, "--pool", "8", "--diag-every", "0", "--unet-arch",
              "attn-32-16", "--unet-batch", "2", "--unet-target", "teacher", "--unet-log-every", "1",
              "--unet-weighting", "noise-level"]  # fmt: skip
    main(["--stages", "pool", *common])
    with pytest.raises(SystemExit, match="needs --unet-init"):
        main(["--stages", "unet", "--unet-steps", "1", *common])
    with pytest.raises(SystemExit, match="names no UNet parameter"):
        main(["--stages", "unet", "--unet-init", shipped, "--unet-train", "attn9", *common])
    # only the cross-attention's key and value projections train, moved by the slot contrast
    main(["--stages", "unet", "--unet-init", shipped, "--unet-steps", "3", "--unet-lr", "1e-1", "--unet-train",
          "attn2.to_k,attn2.to_v", "--snapshot-steps", "3", "--contrast-weight", "1", "--contrast-batch", "1",
          *common])  # fmt: skip
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if r.get("stage") == "unet" and "distill_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert steps[0]["distill_loss"] == 0.0 and steps[0]["loss"] > 1e-3
    assert 0 < steps[-1]["distill_loss"] < steps[-1]["loss"]
    ours = load_file(run / "snapshots" / "step3" / "diffusion_pytorch_model.safetensors")
    theirs = load_file(Path(shipped) / "unet" / "diffusion_pytorch_model.safetensors")
    changed = {k for k in theirs if not torch.equal(ours[k], theirs[k])}
    assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed)


def test_pool_labels_mark_each_objects_visible_pixels():
    x, captions, labels = scene_batch([5, 6], labels=True)
    assert x.shape == (2, 3, 64, 64) and labels.shape == (2, 64, 64) and labels.dtype == torch.uint8
    for b, seed in enumerate([5, 6]):
        scene = render_scene(seed)
        assert captions[b] == scene.caption
        for i, mask in enumerate(scene.masks):
            assert np.array_equal(labels[b].numpy() == i + 1, mask)
        assert (labels[b] == 0).numpy().tolist() == (~np.any(scene.masks, axis=0)).tolist()


def test_training_batches_render_the_asked_stripes():
    seeds = range(8)
    assert any(o["texture"] == "striped" for s in seeds for o in render_scene(s).objects)
    default, caps = scene_batch(seeds)
    same, _ = scene_batch(seeds, stripe_shade=STRIPE_SHADE)
    dark, dark_caps = scene_batch(seeds, stripe_shade=STRIPE_SHADE - 0.25)  # the third world's 0.55
    assert torch.equal(default, same) and caps == dark_caps
    assert not torch.equal(default, dark) and (dark <= default).all()  # only the dark bands change, darker


def test_object_latent_masks_put_an_object_on_the_latent_grid_as_the_method_does():
    seeds = [5, 6, 7]
    _, _, labels = scene_batch(seeds, labels=True)
    objects = torch.tensor([0, 1, 0])
    got = object_latent_masks(labels, objects)
    assert got.shape == (3, 1, 32, 32) and set(got.unique().tolist()) <= {0.0, 1.0}
    for b, seed in enumerate(seeds):
        scene = render_scene(seed)
        want = masks_to_latent_grid([scene.masks[int(objects[b])]], (64, 64), (32, 32))[0]
        assert torch.equal(got[b, 0].bool(), want)


def test_compound_conditioning_is_the_learning_prompt_with_summed_word_embeddings(offline):
    assert object_phrases("a photo of a red circle and a blue striped star") == [
        ["red", "circle"],
        ["blue", "striped", "star"],
    ]
    tok = CLIPTokenizer.from_pretrained(model_path(), subfolder="tokenizer")
    text = CLIPTextModel.from_pretrained(model_path(), subfolder="text_encoder").eval()
    captions = ["a photo of a red circle and a blue striped star", "a photo of a green heart"]
    ids = tok(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    table = text.get_input_embeddings()
    states = compound_conditioning(tok, text, ids)
    assert states.shape == (2, 77, 64) and states.dtype == torch.float16
    assert text.get_input_embeddings() is table and table.weight.shape[0] == len(tok)  # restored
    # the same thing the standard way: two new tokens whose rows are the sums, then "a photo of <a> and <b>"
    words = table.weight.detach().clone()

    def row(*ws):
        return sum(words[tok.convert_tokens_to_ids(f"{w}</w>")] for w in ws)

    tok.add_tokens(["<a>", "<b>"])
    text.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        text.get_input_embeddings().weight[-2] = row("red", "circle")
        text.get_input_embeddings().weight[-1] = row("blue", "striped", "star")
        ref = text(
            tok(
                ["a photo of <a> and <b>"], padding="max_length", max_length=77, return_tensors="pt"
            ).input_ids
        )
    assert torch.allclose(states[0].float(), ref.last_hidden_state[0], atol=2e-3)
    assert not torch.allclose(states[0].float(), states[1].float(), atol=1e-2)


def test_single_object_conditioning_is_the_one_concept_learning_prompt(offline):
    tok = CLIPTokenizer.from_pretrained(model_path(), subfolder="tokenizer")
    text = CLIPTextModel.from_pretrained(model_path(), subfolder="text_encoder").eval()
    captions = [
        "a photo of a red circle and a blue striped star",
        "a photo of a blue striped star",
        "a photo of a green heart and a red circle and a cyan cross",
    ]
    ids = tok(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    states, index = single_object_conditioning(tok, text, ids)
    # four distinct objects, each encoded once; caption order; -1 where a caption has fewer objects
    assert states.shape == (4, 77, 64) and states.dtype == torch.float16
    assert index.tolist() == [[0, 1, -1], [1, -1, -1], [2, 0, 3]]
    # a one-object caption's learning form IS that object's single-concept prompt
    alone = compound_conditioning(tok, text, ids[1:2])
    assert torch.equal(states[1], alone[0])
    assert not torch.allclose(states[0].float(), states[1].float(), atol=1e-2)


def test_slot_contrast_conditioning_swaps_only_the_shape_or_the_colour(offline):
    tok = CLIPTokenizer.from_pretrained(model_path(), subfolder="tokenizer")
    text = CLIPTextModel.from_pretrained(model_path(), subfolder="text_encoder").eval()
    captions = ["a photo of a red heart and a blue striped star", "a photo of a blue striped star"]
    ids = tok(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    states, index, truth = slot_contrast_conditioning(tok, text, ids)
    singles, single_index = single_object_conditioning(tok, text, ids)
    assert states.shape == (2, len(SHAPES), 77, 64) and torch.equal(index, single_index)
    assert truth.tolist() == [SHAPES.index("heart"), SHAPES.index("star")]
    for s in range(2):  # the truth's candidate IS the object's single-concept prompt
        assert torch.equal(states[s, truth[s]], singles[s])
    # the red heart's "circle" candidate is the red circle's own prompt
    red_circle = tok(["a photo of a red circle"], padding="max_length", max_length=77, return_tensors="pt")
    circle, _ = single_object_conditioning(tok, text, red_circle.input_ids)
    assert torch.equal(states[0, SHAPES.index("circle")], circle[0])
    # with the colours: the same first candidates, then the 7 other colours of the same striped star
    both, _, truth_both = slot_contrast_conditioning(tok, text, ids, swap=("shape", "colour"))
    assert both.shape == (2, len(SHAPES) + 7, 77, 64) and torch.equal(truth_both, truth)
    assert torch.equal(both[:, : len(SHAPES)], states)
    star = contrast_candidates(("blue", "striped", "star"), ("shape", "colour"))
    assert star[len(SHAPES) :] == [(c, "striped", "star") for c in COLORS if c != "blue"]
    with pytest.raises(ValueError, match="swap"):
        contrast_candidates(("red", "heart"), ("colour",))


def test_differentiable_aggregation_equals_the_recorders(offline):
    from diffusers_conceptexpress.attention import capture_attention

    pipe = ConceptExpressPipeline.from_pretrained(model_path())
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = pipe.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        empty = pipe.text_encoder(ids)[0].expand(2, -1, -1)
        grad_rec, plain = GradAttentionRecorder((32, 32)), AttentionRecorder((32, 32))
        for rec in (grad_rec, plain):
            with capture_attention(pipe.unet, rec):
                pipe.unet(z, torch.zeros(2, dtype=torch.long), encoder_hidden_states=empty)
    got = aggregate_self_attention(list(grad_rec.self_attention_maps().values()), 32)
    torch.testing.assert_close(got, plain.self_attention(), atol=1e-7, rtol=1e-5)


def test_interpolated_unet_lies_on_the_line_between_the_two_and_the_rest_is_the_base(tmp_path, offline):
    shipped = Path(model_path())
    base = load_file(shipped / "unet" / WEIGHTS)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = {k: v + 1.0 for k, v in base.items()}  # every weight moved by exactly 1
    save_file(other, other_dir / WEIGHTS)

    def run(alpha, out):
        interpolate_unet.main(
            ["--base", str(shipped), "--other", str(other_dir), "--alpha", str(alpha), "--out", str(out)]
        )

    for alpha in (0.0, 0.25, 1.0):
        out = tmp_path / f"a{alpha}"
        run(alpha, out)
        mixed = load_file(out / "unet" / WEIGHTS)
        assert mixed.keys() == base.keys()
        assert all(torch.allclose(mixed[k], base[k] + alpha, atol=1e-6) for k in base), alpha
        for part in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
            assert (out / part).read_bytes() == (shipped / part).read_bytes()
    # alpha 0 writes the base's weights bit for bit, and the result loads as a pipeline
    assert (tmp_path / "a0.0/unet" / WEIGHTS).read_bytes() == (shipped / "unet" / WEIGHTS).read_bytes()
    ConceptExpressPipeline.from_pretrained(tmp_path / "a0.25")
    with pytest.raises(SystemExit):  # the output folder exists
        run(0.5, out)
    with pytest.raises(SystemExit):  # alpha outside [0, 1]
        run(1.5, tmp_path / "x")
    save_file({k: v for k, v in list(other.items())[1:]}, other_dir / WEIGHTS)
    with pytest.raises(ValueError, match="do not share their weight names"):
        run(0.5, tmp_path / "y")
    assert not (tmp_path / "y").exists()  # nothing half-written


def test_the_shipped_unet_rebuilds_bit_for_bit_from_the_eleventh_unet_and_the_trial_snapshot(tmp_path):
    # docs/toyworld.md, "Twentieth run": the shipped UNet is the WiSE-FT mix (alpha 0.5) of the eleventh model's
    # UNet and the shape-contrast trial's step-386 EMA snapshot, both committed under research/rebuild
    # (research/recipes/rebuild_shipped_unet.sh does the same from the command line)
    bench = load_benchmark("toyworld")
    eleventh = tmp_path / "v11"
    shutil.copytree(model_path(), eleventh)
    shutil.copy(REBUILD / "v11_unet" / WEIGHTS, eleventh / "unet" / WEIGHTS)
    assert bench.model_fingerprint(str(eleventh)) == "887f090a733d"  # the eleventh model's records' key
    out = tmp_path / "v13_a50"
    other = REBUILD / "v13_rerun_step386"
    interpolate_unet.main(
        ["--base", str(eleventh), "--other", str(other), "--alpha", "0.5", "--out", str(out)]
    )
    shipped = Path(model_path()) / "unet" / WEIGHTS
    assert (out / "unet" / WEIGHTS).read_bytes() == shipped.read_bytes()
    assert bench.model_fingerprint(str(model_path())) == "af8cbffd8300"  # the shipped model's records' key
