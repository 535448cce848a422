"""Toy world: scenes, tokenizer, classifier and the shipped model (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmark_scripts import load_benchmark
from diffusers_conceptexpress.toyworld import (
    COLORS,
    PALETTE,
    SHAPES,
    WORDS,
    classify,
    model_path,
    render_scene,
)
from diffusers_conceptexpress.toyworld.classify import classifier_path, train_classifier
from diffusers_conceptexpress.toyworld.scenes import STRIPE_SHADE, shape_mask


# ------------------------------------------------------------------------------ scenes
def test_scene_is_deterministic_per_seed():
    a, b = render_scene(123), render_scene(123)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.caption == b.caption and a.objects == b.objects
    assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks, strict=True))
    c = render_scene(124)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def _nearest_palette(rgb: np.ndarray) -> str:
    return min(PALETTE, key=lambda name: float(np.sum((np.array(PALETTE[name]) - rgb) ** 2)))


@pytest.mark.parametrize("seed", range(0, 60, 3))
def test_masks_are_disjoint_nonempty_and_match_colours(seed):
    scene = render_scene(seed)
    assert scene.image.mode == "RGB" and scene.image.size == (64, 64)
    assert 1 <= len(scene.masks) == len(scene.objects) <= 3
    total = np.zeros((64, 64), dtype=int)
    pixels = np.asarray(scene.image).astype(float)
    for mask, obj in zip(scene.masks, scene.objects, strict=True):
        assert mask.dtype == bool and mask.shape == (64, 64)
        assert mask.sum() >= 30
        total += mask
        inside = pixels[mask]
        bright = inside[inside.sum(1) >= np.percentile(inside.sum(1), 75)]  # not the rim nor dark stripes
        assert _nearest_palette(bright.mean(0)) == obj["color"]
        assert obj["shape"] in SHAPES and obj["color"] in COLORS
        phrase = f"{obj['color']} {'striped ' if obj['texture'] == 'striped' else ''}{obj['shape']}"
        assert phrase in scene.caption
    assert total.max() <= 1  # disjoint
    assert scene.caption.startswith("a photo of a ")


def test_rim_darkens_the_inside_of_each_outline_and_changes_nothing_else():
    plain, rimmed = render_scene(20_001, num_objects=3, rim=0), render_scene(20_001, num_objects=3)
    assert plain.objects == rimmed.objects
    assert all(np.array_equal(a, b) for a, b in zip(plain.masks, rimmed.masks, strict=True))
    a, b = np.asarray(plain.image).astype(float), np.asarray(rimmed.image).astype(float)
    changed = np.abs(a - b).sum(-1) > 0
    assert not changed[~np.any(plain.masks, axis=0)].any()  # the background is untouched
    for mask, obj in zip(plain.masks, plain.objects, strict=True):
        full = shape_mask(obj["shape"], *obj["center"], obj["size"], obj["angle"])
        # 2 px along the object's own outline (not along an occluder's edge) are darker; its core is not
        padded = np.pad(full, 2, mode="edge")  # the canvas edge is not an outline
        inner = np.all([padded[dy : dy + 64, dx : dx + 64] for dy in range(5) for dx in range(5)], axis=0)
        rim, core = mask & ~inner, mask & inner
        assert rim.sum() > 50 and core.sum() > 50
        assert np.array_equal(changed[mask], rim[mask])
        ratio = b[rim].sum(-1).mean() / a[rim].sum(-1).mean()
        assert 0.25 < ratio < 0.45  # RIM_SHADE = 0.35 of the colour, plus pixel noise


def test_keep_replaces_the_other_objects_by_the_scenes_background():
    full = render_scene(20_001, num_objects=3)
    empty = render_scene(20_001, num_objects=3, keep=[])
    one = render_scene(20_001, num_objects=3, keep=[1])
    assert one.objects == full.objects and one.caption == full.caption
    assert all(np.array_equal(a, b) for a, b in zip(one.masks, full.masks, strict=True))
    f, e, o = (np.asarray(s.image).astype(int) for s in (full, empty, one))
    anywhere = np.any(full.masks, axis=0)
    assert np.array_equal(e[~anywhere], f[~anywhere])  # the background itself is untouched
    for k, mask in enumerate(full.masks):
        assert np.abs(e[mask] - f[mask]).sum(-1).mean() > 30  # an object's pixels became background
        assert np.array_equal(o[mask], (f if k == 1 else e)[mask])  # kept: its pixels; others: background
    assert np.array_equal(np.asarray(render_scene(20_001, num_objects=3, keep=[0, 1, 2]).image), f)


def test_scene_variety_same_colour_textures_backgrounds():
    scenes = [render_scene(s) for s in range(200)]
    same_colour = [
        s for s in scenes if len(s.objects) > 1 and len({o["color"] for o in s.objects}) < len(s.objects)
    ]
    assert same_colour
    for s in same_colour:
        pairs = [(o["color"], o["shape"]) for o in s.objects]
        assert len(set(pairs)) == len(pairs)  # same colour means a different shape
    assert {o["texture"] for s in scenes for o in s.objects} == {"plain", "striped"}
    assert len({s.background["kind"] for s in scenes}) == 4
    assert {len(render_scene(s, num_objects=3).masks) for s in range(5)} == {3}


# ---------------------------------------------------------------------------- tokenizer
def test_tokenizer_maps_every_toy_word_to_one_id():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(model_path(), subfolder="tokenizer")
    vocab_size = json.loads((Path(model_path()) / "text_encoder" / "config.json").read_text())["vocab_size"]
    ids = set()
    for word in WORDS:
        word_ids = tok(word, add_special_tokens=False).input_ids
        assert len(word_ids) == 1, (word, word_ids)
        ids.add(word_ids[0])
    assert len(ids) == len(WORDS)
    caption = render_scene(7).caption
    full = tok(caption, padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(full) == 77 and max(full) < vocab_size
    assert len(tok(caption).input_ids) == len(caption.split()) + 2


# --------------------------------------------------------------------------- classifier
@pytest.mark.parametrize("stripe_shade", [0.55, STRIPE_SHADE])
def test_classify_accuracy_on_fresh_renders(stripe_shade):
    # the third world's stripes (0.55) and the fourth world's lighter ones (0.8): one classifier reads both
    scenes = [render_scene(s, num_objects=1, stripe_shade=stripe_shade) for s in range(7_000_000, 7_000_400)]
    preds = classify([s.image for s in scenes])
    truth = [s.objects[0] for s in scenes]
    both = np.mean(
        [p["shape"] == t["shape"] and p["color"] == t["color"] for p, t in zip(preds, truth, strict=True)]
    )
    texture = np.mean([p["texture"] == t["texture"] for p, t in zip(preds, truth, strict=True)])
    assert {t["texture"] for t in truth} == {"plain", "striped"}
    assert both >= 0.98, both
    assert texture >= 0.97, texture  # measured: 0.995 (0.55) and 0.9825 (0.8)
    assert classify([s.image for s in scenes[:8]], classifier_path()) == preds[:8]  # the same folder, given
    assert classify([]) == []


def test_classifier_training_rejects_bad_shades():
    with pytest.raises(ValueError, match="stripe_shades"):
        train_classifier(steps=1, stripe_shades=())
    with pytest.raises(ValueError, match="stripe_shades"):
        train_classifier(steps=1, stripe_shades=(0.0,))


# ---------------------------------------------------------------------- shipped model
def test_shipped_model_is_small_safetensors_and_sd_shaped():
    root = Path(model_path())
    files = [p for p in root.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".ckpt", ".pth"}]
    for sub in ("unet", "vae", "text_encoder"):
        assert list((root / sub).glob("*.safetensors"))
    unet = json.loads((root / "unet" / "config.json").read_text())
    vae = json.loads((root / "vae" / "config.json").read_text())
    assert unet["sample_size"] == 32  # the latent side: 64-px images, x2 VAE
    assert len(unet["down_block_types"]) == 3  # levels 32, 16, 8; none at 4x4
    assert unet["down_block_types"][-1] == "DownBlock2D"  # attention blocks at 32 and 16, mid block at 8
    assert vae["scaling_factor"] != 0.18215


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    yield
    mp.undo()


def test_stable_diffusion_pipeline_loads_offline_and_generates(offline):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model_path(), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a photo of a red circle",
        num_inference_steps=4,
        guidance_scale=5.0,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    )
    image = out.images[0]
    assert isinstance(image, Image.Image) and image.size == (64, 64)
    assert np.asarray(image).std() > 1.0


def test_conceptexpress_pipeline_loads_offline_and_localizes(offline):
    from diffusers_conceptexpress import ConceptExpressPipeline

    pipe = ConceptExpressPipeline.from_pretrained(model_path())
    assert pipe.default_resolution == 64
    scene = render_scene(10_000, num_objects=2)
    result = pipe.localize_concepts(scene.image)
    assert result.masks and all(m.size == (64, 64) for m in result.masks)
    # SD's layout one level down: the lowest attention-block level (16x16, factor 2) plays the part of SD's
    # 16x16 (factor 4) layers, and the method's nearest-factor rule picks it, with a note
    assert result.eot_map.shape == (16, 16)
    assert result.options["eot_factor_used"] == 2
    assert any("factor 4" in note for note in result.notes)
    km = pipe.localize_concepts(scene.image, method="kmeans", num_concepts=3)
    assert len(km.masks) == 3


@pytest.mark.parametrize(
    ("arch", "factors", "heads_at_32"),
    [("attn-32-16-8", [1, 2, 4], 1), ("attn-32-16", [1, 2], 2)],
)
def test_toy_unet_architectures(arch, factors, heads_at_32):
    from diffusers_conceptexpress.attention import unet_cross_attention_factors
    from diffusers_conceptexpress.toyworld.train import make_unet

    unet = make_unet(arch)
    assert unet.config.sample_size == 32
    assert unet_cross_attention_factors(unet) == factors
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == heads_at_32
    assert unet.mid_block.attentions  # both keep SD's mid-block attention (at 8x8)
    with pytest.raises(ValueError, match="unknown UNet architecture"):
        make_unet("attn-64")


def test_noise_level_weights_equalise_each_bins_share():
    from diffusers_conceptexpress.toyworld.train import NoiseLevelWeights

    levels = NoiseLevelWeights(bins=4, num_timesteps=100, decay=0.5)
    t = torch.tensor([0, 30, 60, 99])
    assert torch.equal(levels.bin(t), torch.tensor([0, 1, 2, 3]))
    assert torch.equal(levels.weights(t), torch.ones(4))  # nothing seen yet: plain MSE
    mse = torch.tensor([0.4, 0.1, 0.02, 0.005])  # low noise is hard, high noise easy
    for _ in range(3):
        levels.update(t, mse)
    w = levels.weights(t)
    share = w * mse
    assert torch.allclose(share, share[0].expand(4))  # every noise level weighs the same
    assert w.mean().item() == pytest.approx(1.0)  # plain MSE's scale
    assert w[3] > w[0]  # the high-noise steps gain
    levels.update(torch.tensor([10]), torch.tensor([0.2]))  # running mean: 0.5 * 0.4 + 0.5 * 0.2
    assert levels.mean[0].item() == pytest.approx(0.3)
    fresh = NoiseLevelWeights(bins=4, num_timesteps=100, decay=0.5)
    fresh.load_state_dict(levels.state_dict())
    assert torch.equal(fresh.weights(t), levels.weights(t))
    fresh.update(torch.tensor([99]), torch.tensor([0.0]))  # a copy, not a view of the original's state
    assert not torch.equal(fresh.mean, levels.mean)


def test_shipped_model_uses_the_colour_word_conditioning_gain(offline):
    # the shipped model draws the right colour (95%): a wrong colour word or the empty prompt must raise the
    # epsilon MSE at high noise, where the colour of the object is decided; the true caption is the baseline
    from diffusers_conceptexpress import ConceptExpressPipeline
    from diffusers_conceptexpress.toyworld.train import conditioning_gain

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
    from safetensors.torch import load_file

    from diffusers_conceptexpress.toyworld.train import main

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


def test_interpolated_unet_lies_on_the_line_between_the_two_and_the_rest_is_the_base(tmp_path, offline):
    from safetensors.torch import load_file, save_file

    from diffusers_conceptexpress import ConceptExpressPipeline

    script = load_benchmark("interpolate_unet", folder="scripts")
    shipped = Path(model_path())
    base = load_file(shipped / "unet" / script.WEIGHTS)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = {k: v + 1.0 for k, v in base.items()}  # every weight moved by exactly 1
    save_file(other, other_dir / script.WEIGHTS)

    def run(alpha, out):
        script.main(
            ["--base", str(shipped), "--other", str(other_dir), "--alpha", str(alpha), "--out", str(out)]
        )

    for alpha in (0.0, 0.25, 1.0):
        out = tmp_path / f"a{alpha}"
        run(alpha, out)
        mixed = load_file(out / "unet" / script.WEIGHTS)
        assert mixed.keys() == base.keys()
        assert all(torch.allclose(mixed[k], base[k] + alpha, atol=1e-6) for k in base), alpha
        for part in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
            assert (out / part).read_bytes() == (shipped / part).read_bytes()
    # alpha 0 writes the base's weights bit for bit, and the result loads as a pipeline
    assert (tmp_path / "a0.0/unet" / script.WEIGHTS).read_bytes() == (
        shipped / "unet" / script.WEIGHTS
    ).read_bytes()
    ConceptExpressPipeline.from_pretrained(tmp_path / "a0.25")
    with pytest.raises(SystemExit):  # the output folder exists
        run(0.5, out)
    with pytest.raises(SystemExit):  # alpha outside [0, 1]
        run(1.5, tmp_path / "x")
    save_file({k: v for k, v in list(other.items())[1:]}, other_dir / script.WEIGHTS)
    with pytest.raises(ValueError, match="do not share their weight names"):
        run(0.5, tmp_path / "y")
    assert not (tmp_path / "y").exists()  # nothing half-written


def test_rows_stage_moves_only_the_named_words_rows_and_export_carries_them(tmp_path, offline):
    # the rows stage fine-tunes the heart's input row alone: every prompt without "heart" encodes as before
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffusers_conceptexpress.toyworld.train import main, word_row_ids

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


def test_single_object_conditioning_is_the_one_concept_learning_prompt(offline):
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffusers_conceptexpress.toyworld.train import compound_conditioning, single_object_conditioning

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
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffusers_conceptexpress.toyworld.train import (
        contrast_candidates,
        single_object_conditioning,
        slot_contrast_conditioning,
    )

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


def test_slot_contrast_loss_ranks_the_candidate_with_the_lowest_masked_error():
    from diffusers_conceptexpress.toyworld.train import slot_contrast_loss

    g = torch.Generator().manual_seed(0)
    eps = torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1
    pred = eps[:, None].repeat(1, 3, 1, 1, 1) + 0.5  # every candidate off by 0.5 everywhere ...
    pred[0, 2] = eps[0]  # ... but scene 0's candidate 2 is exact
    pred[1, 0, :, 2:6, 2:6] = eps[1, :, 2:6, 2:6]  # and scene 1's candidate 0 is exact INSIDE the mask only
    loss, top1 = slot_contrast_loss(pred, eps, mask, torch.tensor([2, 0]))
    assert top1.item() == 1.0
    # the others' summed squared error inside the 4x4x4 mask is 64 x 0.25 = 16: logits (16 apart) -> ~e^-16
    assert loss.item() < 1e-6
    loss, top1 = slot_contrast_loss(pred, eps, mask, torch.tensor([1, 1]))
    assert top1.item() == 0.0 and loss.item() > 15.0
    # outside the mask nothing counts: scene 1's candidate 0, off by 0.5 there, scores as scene 0's exact one
    # (both 0 against 16 for the others: logits 1 apart at temperature 16)
    loss, _ = slot_contrast_loss(pred, eps, mask, torch.tensor([2, 0]), temperature=16.0)
    assert abs(loss.item() - float(torch.log(1 + 2 * torch.exp(torch.tensor(-1.0))))) < 1e-5


def test_slot_contrast_hinge_is_zero_past_the_margin_and_the_error_ratio_short_of_it():
    from diffusers_conceptexpress.toyworld.train import slot_contrast_loss

    eps = torch.zeros(1, 4, 4, 4)
    mask = torch.ones(1, 1, 4, 4)
    # candidates off by 0.1, 0.2 and 0.4 everywhere: summed squared errors 0.64, 2.56, 10.24 (ratios 4 and 16)
    pred = torch.stack([torch.full((4, 4, 4), v) for v in (0.1, 0.2, 0.4)])[None].requires_grad_()
    # own slot 0 leads the next (slot 1) by log 4 = 1.386: past a margin of 1, so zero and no gradient
    loss, top1 = slot_contrast_loss(pred, eps, mask, torch.tensor([0]), margin=1.0)
    assert loss.item() == 0.0 and top1.item() == 1.0
    loss.backward()
    assert pred.grad.abs().sum().item() == 0.0
    # short of a margin of 2: 2 - log 4
    loss, _ = slot_contrast_loss(pred, eps, mask, torch.tensor([0]), margin=2.0)
    assert abs(loss.item() - (2.0 - float(np.log(4.0)))) < 1e-5
    # own slot 2 trails the best other (slot 0) by log 16: margin + log 16
    loss, top1 = slot_contrast_loss(pred, eps, mask, torch.tensor([2]), margin=1.0)
    assert abs(loss.item() - (1.0 + float(np.log(16.0)))) < 1e-5 and top1.item() == 0.0


def test_slot_contrast_own_only_has_the_same_value_and_moves_only_the_own_slot():
    from diffusers_conceptexpress.toyworld.train import slot_contrast_loss

    eps = torch.zeros(1, 4, 4, 4)
    mask = torch.ones(1, 1, 4, 4)
    pred = torch.stack([torch.full((4, 4, 4), v) for v in (0.1, 0.2, 0.4)])[None].requires_grad_()
    for margin in (None, 1.0):
        full, _ = slot_contrast_loss(pred, eps, mask, torch.tensor([2]), margin=margin)
        (grad_full,) = torch.autograd.grad(full, pred)
        own, _ = slot_contrast_loss(pred, eps, mask, torch.tensor([2]), margin=margin, own_only=True)
        (grad_own,) = torch.autograd.grad(own, pred)
        assert abs(own.item() - full.item()) < 1e-6
        # the full loss also pushes the best other slot (0) away; own-only leaves every other slot alone
        assert grad_full[0, 0].abs().sum() > 0 and grad_own[0, :2].abs().sum().item() == 0.0
        # and pulls the own slot (0.4, above eps = 0) down exactly as the full loss does
        assert torch.allclose(grad_own[0, 2], grad_full[0, 2]) and (grad_own[0, 2] > 0).all()


def test_object_latent_masks_put_an_object_on_the_latent_grid_as_the_method_does():
    from diffusers_conceptexpress.masks import masks_to_latent_grid
    from diffusers_conceptexpress.toyworld.train import object_latent_masks, scene_batch

    seeds = [5, 6, 7]
    _, _, labels = scene_batch(seeds, labels=True)
    objects = torch.tensor([0, 1, 0])
    got = object_latent_masks(labels, objects)
    assert got.shape == (3, 1, 32, 32) and set(got.unique().tolist()) <= {0.0, 1.0}
    for b, seed in enumerate(seeds):
        scene = render_scene(seed)
        want = masks_to_latent_grid([scene.masks[int(objects[b])]], (64, 64), (32, 32))[0]
        assert torch.equal(got[b, 0].bool(), want)


def test_pool_workers_build_the_same_pool_and_snapshots_hold_the_ema(tmp_path, offline):
    from diffusers import UNet2DConditionModel

    from diffusers_conceptexpress.toyworld.train import load_unet_checkpoint, main

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


def test_object_sizes_follow_the_world_and_the_first_world_stays_reproducible():
    import hashlib

    from diffusers_conceptexpress.toyworld.scenes import CROWDED_RADIUS, MULTI_RADIUS, SINGLE_RADIUS

    for k, (lo, hi) in ((1, SINGLE_RADIUS), (2, MULTI_RADIUS), (3, MULTI_RADIUS), (4, CROWDED_RADIUS)):
        for seed in range(20):
            assert all(lo <= o["size"] <= hi for o in render_scene(seed, num_objects=k).objects)
    # the first world's 2-3-object scenes (radius 10-15 px), pixel for pixel (SHA-256 of the image bytes,
    # taken with the renderer before the world changed)
    first = render_scene(20_001, num_objects=3, radius_range=(10.0, 15.0), rim=0)
    assert hashlib.sha256(np.asarray(first.image).tobytes()).hexdigest()[:16] == "5332136c6404bf57"
    assert all(10.0 <= o["size"] <= 15.0 for o in first.objects)
    # the second world (no rims), likewise
    second = render_scene(20_001, num_objects=3, rim=0)
    assert hashlib.sha256(np.asarray(second.image).tobytes()).hexdigest()[:16] == "14f4441d37f9d07f"
    # the third world (rims, stripes at 55% of the colour): two striped objects and a plain one
    third = render_scene(20_005, num_objects=3, stripe_shade=0.55)
    assert hashlib.sha256(np.asarray(third.image).tobytes()).hexdigest()[:16] == "67796a1a677dd9da"
    # the fourth world, the default since session 14: the same scene with the stripes at 80% of the colour
    fourth = render_scene(20_005, num_objects=3)
    assert hashlib.sha256(np.asarray(fourth.image).tobytes()).hexdigest()[:16] == "295882b448559c1e"


def test_stripe_shade_changes_only_the_dark_bands_of_striped_objects():
    dark, light = (
        render_scene(20_005, num_objects=3, stripe_shade=0.55),
        render_scene(20_005, num_objects=3, stripe_shade=0.8),
    )
    assert dark.objects == light.objects and [o["texture"] for o in dark.objects] == [
        "striped",
        "striped",
        "plain",
    ]
    a, b = np.asarray(dark.image).astype(int), np.asarray(light.image).astype(int)
    changed = (a != b).any(-1)
    striped = dark.masks[0] | dark.masks[1]
    assert changed.sum() > 100 and not changed[~striped].any()  # background and the plain object untouched
    assert (b[changed].sum(-1) > a[changed].sum(-1)).all()  # the bands got lighter


# ------------------------------------------------------------------ trainer: the fifth model's additions
def test_eot_objectness_loss_known_answers():
    from diffusers_conceptexpress.toyworld.train import eot_objectness_loss

    labels = torch.zeros(1, 8, 8, dtype=torch.uint8)
    labels[0, :4, :4] = 1  # object 1: the top-left quarter (a 2x2 block of the 4x4 map)
    labels[0, 4:, 4:] = 2  # object 2: the bottom-right quarter
    on_objects = torch.zeros(1, 4, 4)
    on_objects[0, :2, :2] = on_objects[0, 2:, 2:] = 1.0
    # objects hold all the mass: ratio 2 each (= the target, and 0.9 / coverage 0.5 = 1.8 caps it below 2),
    # and the background cells are at 0 < 0.5 x the mean: nothing to pull
    assert eot_objectness_loss(on_objects, labels).item() == pytest.approx(0.0, abs=1e-6)
    # a flat map: every ratio is 1 -> log(1.8) per object; every background cell is at 1 x the mean -> 0.5
    flat = torch.ones(1, 4, 4, requires_grad=True)
    loss = eot_objectness_loss(flat, labels)
    assert loss.item() == pytest.approx(np.log(1.8) + 0.5, rel=1e-5)
    loss.backward()
    assert flat.grad[0, 0, 0] < 0 < flat.grad[0, 0, 3]  # raise the objects, lower the background
    # only object 1 lit: object 2 (ratio 0) costs the clamped log, object 1 is fine
    one = torch.zeros(1, 4, 4)
    one[0, :2, :2] = 1.0
    assert eot_objectness_loss(one, labels).item() > eot_objectness_loss(on_objects, labels).item() + 1.0


def test_self_attention_grouping_loss_known_answers():
    from diffusers_conceptexpress.toyworld.train import self_attention_grouping_loss

    labels = torch.zeros(1, 8, 8, dtype=torch.uint8)
    labels[0, :4, :4] = 1  # the object: the top-left 2x2 cells of a 4x4 grid; 12 background cells
    obj = torch.zeros(16, dtype=torch.bool)
    obj[[0, 1, 4, 5]] = True
    grouped = torch.zeros(1, 16, 16)
    grouped[0][obj[:, None] & obj[None]] = 1 / 4  # object rows spread over the object
    grouped[0][~obj[:, None] & ~obj[None]] = 1 / 12  # background rows over the background
    assert self_attention_grouping_loss([grouped], labels).item() == pytest.approx(0.0, abs=1e-7)
    # uniform rows: object cells put 4/16 on the object (0.8 - 0.25 short), background cells 12/16 (0.05 short)
    uniform = torch.full((1, 16, 16), 1 / 16, requires_grad=True)
    loss = self_attention_grouping_loss([uniform], labels)
    assert loss.item() == pytest.approx((4 * 0.55 + 12 * 0.05) / 16, rel=1e-5)
    loss.backward()
    # more of an object row on the object lowers the loss; more of it on the background raises nothing
    assert uniform.grad[0, 0, 5] < 0 and uniform.grad[0, 0, 15] == 0
    # 2x2 grid, object = half of the top-left cell: that mixed cell is not scored; the 3 background cells
    # put 1/4 x (0.5 + 1 + 1 + 1) = 0.875 of their rows on the background (keys count by covered share)
    coarse = torch.full((1, 4, 4), 1 / 4)
    labels_half = torch.zeros(1, 8, 8, dtype=torch.uint8)
    labels_half[0, :2, :4] = 1
    assert self_attention_grouping_loss([coarse], labels_half).item() == pytest.approx(0.0, abs=1e-7)
    got = self_attention_grouping_loss([coarse], labels_half, target=0.9).item()
    assert got == pytest.approx(0.9 - 0.875, rel=1e-5)
    # layers are averaged
    both = self_attention_grouping_loss([grouped, uniform.detach()], labels).item()
    assert both == pytest.approx(loss.item() / 2, rel=1e-5)


def test_self_attention_coherence_loss_known_answers():
    from diffusers_conceptexpress.toyworld.train import self_attention_coherence_loss

    labels = torch.zeros(1, 8, 8, dtype=torch.uint8)
    labels[0, :4, :4] = 1  # the object: cells 0, 1, 4, 5 of a 4x4 grid
    obj = [0, 1, 4, 5]
    same = torch.full((1, 16, 16), 1 / 16)
    assert self_attention_coherence_loss(same, labels, 0.0).item() == pytest.approx(0.0, abs=1e-7)
    # two object rows peaked on different halves of a 2-cell support, two uniform over it: the mean row is
    # uniform over the 2 cells; each peaked row (0.9 / 0.1) is at symKL 0.5 * (0.4 ln 1.8 - 0.4 ln 0.2) from it
    rows = torch.full((1, 16, 16), 1 / 16)
    for i, (a, b) in zip(obj, [(0.9, 0.1), (0.1, 0.9), (0.5, 0.5), (0.5, 0.5)], strict=True):
        rows[0, i] = 0.0
        rows[0, i, 0], rows[0, i, 1] = a, b
    kl = 0.5 * (0.4 * np.log(1.8) - 0.4 * np.log(0.2))
    rows.requires_grad_(True)
    loss = self_attention_coherence_loss(rows, labels, 0.0, background=False)
    assert loss.item() == pytest.approx(2 * kl / 4, rel=1e-4)
    # the 12 uniform background rows equal their mean row: scored, they add 0 over 16 cells
    with_bg = self_attention_coherence_loss(rows.detach(), labels, 0.0).item()
    assert with_bg == pytest.approx(2 * kl / 16, rel=1e-4)
    loss.backward()
    assert rows.grad[0, 0, 0] > 0 > rows.grad[0, 0, 1]  # the peaked row is pulled towards the mean
    assert self_attention_coherence_loss(rows.detach(), labels, kl + 1e-3).item() == pytest.approx(
        0.0, abs=1e-7
    )


def test_self_attention_separation_loss_known_answers():
    from diffusers_conceptexpress.toyworld.train import self_attention_separation_loss

    labels = torch.zeros(2, 8, 8, dtype=torch.uint8)
    labels[:, :4, :4] = 1  # object 1: cells 0, 1, 4, 5 of a 4x4 grid
    labels[:, 4:, 4:] = 2  # object 2: cells 10, 11, 14, 15
    labels[1, 4:, 4:] = 0  # the second scene has one object: no pair
    same = torch.full((2, 16, 16), 1 / 16)
    # alike objects: symKL 0, the full margin
    assert self_attention_separation_loss(same, labels, 0.7).item() == pytest.approx(0.7, rel=1e-6)
    # object 1's rows on cell 0 (0.9) and cell 1 (0.1), object 2's the other way round: their means are at
    # symKL 0.5 * (0.8 ln 9 + 0.8 ln 9) = 0.8 ln 9
    rows = same.clone()
    for cells, (a, b) in (([0, 1, 4, 5], (0.9, 0.1)), ([10, 11, 14, 15], (0.1, 0.9))):
        rows[0, cells] = 0.0
        rows[0, cells, 0], rows[0, cells, 1] = a, b
    dist = 0.8 * np.log(9)
    rows.requires_grad_(True)
    loss = self_attention_separation_loss(rows, labels, dist + 0.5)
    assert loss.item() == pytest.approx(0.5, rel=1e-4)
    loss.backward()
    assert rows.grad[0, 0, 0] < 0 < rows.grad[0, 0, 1]  # object 1 is pushed further onto cell 0
    assert self_attention_separation_loss(rows.detach(), labels, dist - 0.1).item() == 0.0


def test_differentiable_aggregation_equals_the_recorders(offline):
    from diffusers_conceptexpress import ConceptExpressPipeline
    from diffusers_conceptexpress.attention import AttentionRecorder, capture_attention
    from diffusers_conceptexpress.toyworld.train import aggregate_self_attention

    pipe = ConceptExpressPipeline.from_pretrained(model_path())
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = pipe.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        empty = pipe.text_encoder(ids)[0].expand(2, -1, -1)
        grad_rec, plain = AttentionRecorder((32, 32), self_with_grad=True), AttentionRecorder((32, 32))
        for rec in (grad_rec, plain):
            with capture_attention(pipe.unet, rec):
                pipe.unet(z, torch.zeros(2, dtype=torch.long), encoder_hidden_states=empty)
    got = aggregate_self_attention(list(grad_rec.self_attention_maps().values()), 32)
    torch.testing.assert_close(got, plain.self_attention(), atol=1e-7, rtol=1e-5)


def test_pool_labels_mark_each_objects_visible_pixels():
    from diffusers_conceptexpress.toyworld.train import scene_batch

    x, captions, labels = scene_batch([5, 6], labels=True)
    assert x.shape == (2, 3, 64, 64) and labels.shape == (2, 64, 64) and labels.dtype == torch.uint8
    for b, seed in enumerate([5, 6]):
        scene = render_scene(seed)
        assert captions[b] == scene.caption
        for i, mask in enumerate(scene.masks):
            assert np.array_equal(labels[b].numpy() == i + 1, mask)
        assert (labels[b] == 0).numpy().tolist() == (~np.any(scene.masks, axis=0)).tolist()


def test_compound_conditioning_is_the_learning_prompt_with_summed_word_embeddings(offline):
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffusers_conceptexpress.toyworld.train import compound_conditioning, object_phrases

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


def test_training_batches_render_the_asked_stripes():
    from diffusers_conceptexpress.toyworld.scenes import STRIPE_SHADE
    from diffusers_conceptexpress.toyworld.train import scene_batch

    seeds = range(8)
    assert any(o["texture"] == "striped" for s in seeds for o in render_scene(s).objects)
    default, caps = scene_batch(seeds)
    same, _ = scene_batch(seeds, stripe_shade=STRIPE_SHADE)
    dark, dark_caps = scene_batch(seeds, stripe_shade=STRIPE_SHADE - 0.25)  # the third world's 0.55
    assert torch.equal(default, same) and caps == dark_caps
    assert not torch.equal(default, dark) and (dark <= default).all()  # only the dark bands change, darker


def test_teacher_target_and_trained_parameters(tmp_path, offline):
    # --unet-target teacher: the frozen --unet-init UNet's prediction is the target, so the first step's
    # student IS the teacher (distill_loss 0) while the plain loss against the noise is not 0; the noise-level
    # weights come from the noise's MSE (a per-level mean of 0 would make them NaN)
    from safetensors.torch import load_file

    from diffusers_conceptexpress.toyworld.train import main

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


def test_the_shipped_unet_rebuilds_bit_for_bit_from_the_eleventh_unet_and_the_trial_snapshot(tmp_path):
    # docs/toyworld.md, "Twentieth run": the shipped UNet is the WiSE-FT mix (alpha 0.5) of the eleventh model's
    # UNet and the shape-contrast trial's step-386 EMA snapshot, both committed under benchmarks/results
    import shutil

    script = load_benchmark("interpolate_unet", folder="scripts")
    bench = load_benchmark("toyworld")
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    trial = results / "toyworld_wise_trial"
    eleventh = tmp_path / "v11"
    shutil.copytree(model_path(), eleventh)
    shutil.copy(trial / "v11_unet" / script.WEIGHTS, eleventh / "unet" / script.WEIGHTS)
    assert bench.model_fingerprint(str(eleventh)) == "887f090a733d"  # the eleventh model's records' key
    out = tmp_path / "v13_a50"
    other = trial / "v13_rerun_step386"
    script.main(["--base", str(eleventh), "--other", str(other), "--alpha", "0.5", "--out", str(out)])
    shipped = Path(model_path()) / "unet" / script.WEIGHTS
    assert (out / "unet" / script.WEIGHTS).read_bytes() == shipped.read_bytes()
    fingerprint = bench.model_fingerprint(str(model_path()))
    assert fingerprint == "af8cbffd8300"
    assert (results / "toyworld_extraction" / fingerprint).is_dir()
