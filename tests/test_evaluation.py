"""Evaluation metrics on constructed cases with known answers, the encoders, and `conceptexpress evaluate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffusers_conceptexpress.evaluation import (
    CLIPImageEncoder,
    ConceptSet,
    DINOImageEncoder,
    MaskedSourcePolicy,
    ToyImageEncoder,
    composition_similarity,
    concept_accuracy,
    evaluate_concepts,
    identity_similarity,
    make_encoder,
    mask_metrics,
    masked_source,
)
from diffusers_conceptexpress.toyworld import render_scene


def _unit(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ----------------------------------------------------------------------------- concept metrics
def test_identical_embeddings_give_similarity_one_and_accuracy_one():
    refs = _unit(5)
    gens = [refs[k : k + 1].repeat(3, 1) for k in range(5)]
    assert torch.allclose(identity_similarity(gens, refs), torch.ones(5))
    assert concept_accuracy(gens, refs) == {1: 1.0, 3: 1.0}
    assert composition_similarity(refs[:1].repeat(4, 1), refs[0]).item() == pytest.approx(1.0)


def test_known_permutation_gives_expected_accuracy():
    refs = torch.eye(6)  # orthogonal references: the nearest one is unambiguous
    perm = [0, 1, 3, 2, 5, 4]  # concepts 0 and 1 generate themselves, the others a swapped partner
    gens = [refs[p : p + 1] for p in perm]
    acc = concept_accuracy(gens, refs, topk=(1, 3))
    assert acc[1] == pytest.approx(2 / 6)
    # with a little of the right concept mixed in, the right reference is second: inside the top 3
    gens = [F.normalize(refs[p] + 0.5 * refs[i], dim=0)[None] for i, p in enumerate(perm)]
    acc = concept_accuracy(gens, refs, topk=(1, 2, 3))
    assert acc == {1: pytest.approx(2 / 6), 2: 1.0, 3: 1.0}
    sims = identity_similarity(gens, refs)
    assert sims[0].item() == pytest.approx(1.0)
    assert sims[2].item() == pytest.approx(0.5 / np.sqrt(1.25))


def test_identity_similarity_checks_counts():
    with pytest.raises(ValueError, match="2 generation sets for 3"):
        identity_similarity([_unit(1), _unit(1)], _unit(3))


# ----------------------------------------------------------------------------- masked source
def test_masked_source_fills_outside_and_crops_a_square_box():
    img = Image.new("RGB", (40, 30), (10, 200, 30))
    mask = np.zeros((30, 40), dtype=bool)
    mask[5:15, 20:26] = True  # 10 high, 6 wide
    full = masked_source(img, mask, MaskedSourcePolicy(crop=False))
    arr = np.asarray(full)
    assert full.size == (40, 30)
    assert (arr[mask] == (10, 200, 30)).all() and (arr[~mask] == (127, 127, 127)).all()
    crop = masked_source(img, Image.fromarray(mask.astype(np.uint8) * 255), MaskedSourcePolicy(margin=0.1))
    assert crop.size == (12, 12)  # longer side 10, + 10% on each side, square
    c = np.asarray(crop)
    assert (c[6, 6] == (10, 200, 30)).all() and (c[6, 0] == (127, 127, 127)).all()
    with pytest.raises(ValueError, match="empty"):
        masked_source(img, np.zeros((30, 40), dtype=bool))
    with pytest.raises(ValueError, match="is 30x40 but the image is 40x30"):
        masked_source(img, np.zeros((40, 30), dtype=bool))
    with pytest.raises(
        ValueError, match="image's size"
    ):  # PIL masks too: the mask must have the image's size
        masked_source(img, Image.new("L", (20, 15), 255))
    # a tensor mask gives the same picture as the bool array
    assert np.array_equal(
        np.asarray(masked_source(img, torch.from_numpy(mask))), np.asarray(masked_source(img, mask))
    )


# ----------------------------------------------------------------------------- encoders
def _tiny_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=24,
    )  # fmt: skip
    return CLIPVisionModelWithProjection(cfg)


def _tiny_dino(kind: str):
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    torch.manual_seed(0)
    common = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32
    )
    if kind == "vit":
        return ViTModel(ViTConfig(patch_size=8, **common), add_pooling_layer=False)
    return Dinov2Model(Dinov2Config(patch_size=8, **common))


@pytest.mark.parametrize("which", ["clip", "dino-vit", "dinov2", "toy"])
def test_encoders_give_normalised_deterministic_embeddings(which):
    if which == "clip":
        enc, dim = CLIPImageEncoder(_tiny_clip()), 24
    elif which == "toy":
        enc, dim = ToyImageEncoder(), 128
    else:
        enc, dim = DINOImageEncoder(_tiny_dino("vit" if which == "dino-vit" else "v2")), 32
    a, b = render_scene(1).image, render_scene(2).image.resize((50, 80))
    emb = enc([a, b, a])
    assert emb.shape == (3, dim) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(emb[0], emb[2], atol=1e-6)
    assert not torch.allclose(emb[0], emb[1], atol=1e-3)


def test_make_encoder_loads_saved_models_with_their_processors(tmp_path):
    """The user path: a model id or folder, loaded with its own image processor (here saved tiny models)."""
    from transformers import CLIPImageProcessor, ViTImageProcessor

    _tiny_clip().save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip"
    )
    _tiny_dino("vit").save_pretrained(tmp_path / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "dino")
    image = render_scene(1).image
    for kind, dim in (("clip", 24), ("dino", 32)):
        enc = make_encoder(kind, str(tmp_path / kind))
        assert enc.processor is not None and enc.name == kind
        emb = enc([image, image])
        assert emb.shape == (2, dim) and torch.allclose(emb[0], emb[1])


def test_make_encoder_errors():
    with pytest.raises(ValueError, match="needs a model id"):
        make_encoder("clip")
    with pytest.raises(ValueError, match="Unknown encoder"):
        make_encoder("resnet")


def test_evaluate_concepts_with_the_masked_sources_as_generations():
    """Generations equal to the masked sources: SIM^I = 1 and ACC^1 = 1 (distinct objects)."""
    enc = ToyImageEncoder()
    sets = []
    for seed in (10, 11):
        scene = render_scene(seed, num_objects=2)
        single = [[masked_source(scene.image, m)] for m in scene.masks]
        sets.append(ConceptSet(scene.image, scene.masks, single, joint=[scene.image], name=str(seed)))
    metrics = evaluate_concepts(sets, enc)
    assert metrics.num_concepts == 4 and metrics.num_images == 2
    assert metrics.sim_i == pytest.approx(1.0, abs=1e-5)
    assert metrics.sim_c == pytest.approx(1.0, abs=1e-5)
    assert metrics.acc1 == 1.0 and metrics.acc3 == 1.0
    # swapping the generations of the two objects of the first scene costs exactly those two
    sets[0].single = sets[0].single[::-1]
    metrics = evaluate_concepts(sets, enc)
    assert metrics.acc1 == pytest.approx(0.5)
    assert metrics.sim_i < 1.0


# ----------------------------------------------------------------------------- mask metrics
def _box(y0, y1, x0, x1, size=20):
    m = np.zeros((size, size), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def test_mask_metrics_known_answers():
    a, b = _box(0, 10, 0, 10), _box(10, 20, 10, 20)
    perfect = mask_metrics([a, b], [b, a])  # order does not matter
    assert (perfect.miou, perfect.precision, perfect.recall, perfect.count_error) == (1.0, 1.0, 1.0, 0)
    disjoint = mask_metrics([a], [_box(0, 10, 10, 20)])
    assert disjoint.miou == 0.0 and disjoint.recall == 0.0 and disjoint.precision == 0.0
    missed = mask_metrics([a, b], [a])  # one object missed: it counts 0
    assert missed.miou == pytest.approx(0.5) and missed.recall == 0.5 and missed.precision == 1.0
    assert missed.count_error == -1
    half = mask_metrics([a, b], [a, b, _box(0, 10, 10, 20), _box(0, 5, 0, 10)])  # two extra predictions
    assert half.miou == 1.0 and half.precision == 0.5 and half.count_error == 2
    partial = mask_metrics([a], [_box(0, 10, 5, 15)])  # 50 / 150
    assert partial.miou == pytest.approx(1 / 3) and partial.recall == 0.0
    # PIL masks work too
    pil = mask_metrics([a], [Image.fromarray(a.astype(np.uint8) * 255)])
    assert pil.miou == 1.0
    assert mask_metrics([], []).miou == 1.0 and mask_metrics([a], []).miou == 0.0


def test_concept_prompts_use_the_template_recorded_with_the_concepts(tmp_path):
    from diffusers_conceptexpress.evaluation import concept_prompts
    from diffusers_conceptexpress.export import save_concepts

    tokens = ["<ce>_1", "<ce>_2"]
    assert concept_prompts(tokens) == [
        "a photo of <ce>_1",
        "a photo of <ce>_2",
        "a photo of <ce>_1 and <ce>_2",
    ]
    masks = [Image.new("L", (64, 64), 255)] * 2
    learning = {"prompt_template": "a drawing of {} on a table", "joint_separator": ", "}
    save_concepts(tmp_path / "custom", torch.randn(2, 8), masks=masks, parameters={"learning": learning})
    assert concept_prompts(tokens, tmp_path / "custom") == [
        "a drawing of <ce>_1 on a table",
        "a drawing of <ce>_2 on a table",
        "a drawing of <ce>_1, <ce>_2 on a table",
    ]
    save_concepts(tmp_path / "unrecorded", torch.randn(1, 8), masks=masks[:1])  # no parameters: the defaults
    assert concept_prompts(tokens[:1], tmp_path / "unrecorded") == ["a photo of <ce>_1"]


# ----------------------------------------------------------------------------- CLI
def test_cli_evaluate_runs_on_a_test_extraction(tmp_path, components_factory, capsys):
    from diffusers_conceptexpress import ConceptExpressPipeline
    from diffusers_conceptexpress.cli import main

    model = tmp_path / "tiny-sd1"
    ConceptExpressPipeline(**components_factory("sd1")).save_pretrained(model)
    image = tmp_path / "scene.png"
    render_scene(3).image.save(image)
    results = tmp_path / "results"
    args = ["extract", str(image), "--model", str(model), "--out", str(results / "scene3"), "--steps", "2"]
    assert main([*args, "--no-samples"]) == 0
    capsys.readouterr()
    ev = ["evaluate", str(results), "--encoder", "toy", "--samples", "2", "--inference-steps", "2"]
    assert main(ev) == 0
    out = capsys.readouterr().out
    assert "SIM^I" in out and "ACC^1" in out
    report = json.loads((results / "evaluation_toy.json").read_text())
    k = len(json.loads((results / "scene3" / "concepts.json").read_text())["concepts"])
    assert report["num_concepts"] == k and report["num_images"] == 1
    assert 0.0 <= report["acc1"] <= report["acc3"] <= 1.0
    assert -1.0 <= report["sim_i"] <= 1.0
    cached = sorted(p.name for p in (results / "scene3" / "evaluation_samples").glob("concept_*.png"))
    assert len(cached) == 2 * k
    # a second run reuses the cached generations and gives the same numbers
    assert main(ev) == 0
    assert json.loads((results / "evaluation_toy.json").read_text())["sim_i"] == report["sim_i"]
    # a folder without extractions: one clear line, non-zero exit
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", str(tmp_path / "empty"), "--encoder", "toy"]) != 0
    assert "No concept directory" in capsys.readouterr().err
