"""Evaluation metrics on constructed cases with known answers, the encoders, and `conceptexpress evaluate`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from benchmark_scripts import load_benchmark
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
from diffusers_conceptexpress.toyworld.scenes import RIM_WIDTH, STRIPE_SHADE


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


def test_paired_comparison_counts_shared_objects_only():
    paired = load_benchmark("toyworld_paired")

    def summary(rows):
        return {"extraction": {"fast, GT masks": {"per_concept": rows}}}

    def row(seed, concept, target, both):
        return {"seed": seed, "concept": concept, "target": target, "images": 4, "both": both}

    a = summary([row(1, 0, 0, 4), row(1, 1, 1, 2), row(2, 0, 0, 3), row(3, 0, None, 4)])
    # seed 2 only in A: left out; B learned object 2 of seed 1, which A missed (0 there)
    b = summary([row(1, 0, 1, 1), row(1, 1, 0, 4), row(1, 2, 2, 3), row(3, 0, 0, 2)])
    r = paired.compare(a, b)["fast, GT masks"]
    assert (r["scenes"], r["objects"], r["generations"]) == (2, 4, 16)
    assert (r["right_a"], r["right_b"]) == (6, 10)
    assert (r["a_better"], r["b_better"]) == (1, 2)  # object 1 of seed 1; objects 2 of seed 1 and 0 of seed 3
    assert r["objects_rows"][0] == {"seed": 1, "object": 0, "a": 4, "b": 4}


def test_benchmark_world_options_key_the_caches_and_textures_split_the_table(tmp_path):
    bench = load_benchmark("toyworld")
    model = tmp_path / "m"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "w.safetensors").write_bytes(b"weights")
    own = {"rim": RIM_WIDTH, "radius_range": None, "stripe_shade": STRIPE_SHADE}
    # the world's own options keep the fingerprint of the committed records; any other option changes it
    assert bench.model_fingerprint(str(model), own) == bench.model_fingerprint(str(model))
    assert bench.model_fingerprint(str(model), own | {"stripe_shade": 0.55}) != bench.model_fingerprint(
        str(model)
    )
    assert bench.model_fingerprint(str(model), own | {"rim": 0}) != bench.model_fingerprint(str(model))
    # keys are taken against the third world, so records made before a default changed keep theirs: the third
    # world's options hash as "world 3" alone, the fourth (the default since session 14) as its stripe change
    third = own | {"stripe_shade": 0.55}
    assert bench.model_fingerprint(str(model), third) == hashlib.sha256(b"world 3weights").hexdigest()[:12]
    fourth = hashlib.sha256(b"world 3 stripe_shade 0.8weights").hexdigest()[:12]
    assert STRIPE_SHADE == 0.8 and bench.model_fingerprint(str(model)) == fourth
    row = {
        "by_texture": {
            "plain": {"correct": 51, "generations": 68},
            "striped": {"correct": 0, "generations": 0},
        }
    }
    assert bench._by_texture(row) == "75% (68) / -"


def test_benchmark_tables_name_the_classifier_that_read_them():
    import hashlib

    from diffusers_conceptexpress.toyworld.classify import classifier_path

    bench = load_benchmark("toyworld")
    shipped = hashlib.sha256((classifier_path() / "model.safetensors").read_bytes()).hexdigest()[:12]
    assert bench.classifier_fingerprint() == shipped
    header = {"command": "c", "date": "d", "machine": "m", "model": "x", "scenes": 1, "seeds": "1-1"}
    assert f"toy encoder): {shipped};" in bench.markdown({}, header | {"classifier": shipped})
    assert "toy encoder): first;" in bench.markdown({}, header)  # summaries from before the header named it


def test_benchmark_generations_are_cached_per_protocol_and_the_table_names_it(tmp_path):
    import argparse

    bench = load_benchmark("toyworld")
    method = argparse.Namespace(inference_steps=50, guidance=7.5, samples=4, seed=0)
    card = argparse.Namespace(inference_steps=25, guidance=5.0, samples=4, seed=0)
    assert bench.generation_key(method) == "ddim50-cfg7.5-n4-seed0"
    a = bench._samples_dir(tmp_path, "fast, GT masks", 20_000, method)
    b = bench._samples_dir(tmp_path, "fast, GT masks", 20_000, card)
    assert a != b and a.parent.parent.name == "ddim50-cfg7.5-n4-seed0" and a.name == "20000"
    header = {"command": "c", "date": "d", "machine": "m", "model": "x", "scenes": 1, "seeds": "1-1"}
    assert "generations: ddim50-cfg7.5-n4-seed0." in bench.markdown(
        {}, header | {"generation": "ddim50-cfg7.5-n4-seed0"}
    )
    assert "generations: ddim25-cfg5-n4-seed0." in bench.markdown({}, header)  # summaries from before the key


def test_benchmark_counts_generations_right_per_object_shape():
    bench = load_benchmark("toyworld")
    rows = [
        {"texture": "plain", "object_shape": "heart", "images": 4, "both": 1},
        {"texture": "striped", "object_shape": "heart", "images": 4, "both": 2},
        {"texture": "plain", "object_shape": "circle", "images": 4, "both": 4},
        {"texture": None, "object_shape": None, "images": 4, "both": 0},  # mask matched no object
    ]
    by_shape = bench.right_by(rows, "object_shape", ("circle", "heart", "star"))
    assert by_shape == {
        "circle": {"correct": 4, "generations": 4},
        "heart": {"correct": 3, "generations": 8},
        "star": {"correct": 0, "generations": 0},
    }
    assert bench.right_by(rows, "texture", ("plain", "striped"))["plain"] == {"correct": 5, "generations": 8}
    summary = {
        "extraction": {
            "fast, GT masks": {
                "sim_i": 0.9, "sim_c": None, "acc1": 0.5, "acc3": 1.0, "generation_correct": 7 / 12,
                "generations": 12, "seconds": 1.0, "unet_samples": 2.0, "scenes": 1,
                "by_shape": bench.right_by(rows, "object_shape", bench.SHAPES),
            }
        }
    }  # fmt: skip
    header = {"command": "c", "date": "d", "machine": "m", "model": "x", "scenes": 1, "seeds": "1-1"}
    table = bench.markdown(summary, header)
    shape_row = next(
        line for line in table.splitlines() if line.startswith("| fast, GT masks") and "38%" in line
    )
    cells = dict(zip(bench.SHAPES, shape_row.strip("|").split("|")[1:], strict=True))
    assert cells["circle"].strip() == "100% (4)" and cells["heart"].strip() == "38% (8)"
    assert cells["star"].strip() == "-"


def test_benchmark_claims_share_scenes_between_live_processes(tmp_path):
    bench = load_benchmark("toyworld")
    mine = tmp_path / "claims" / "fast_GT-masks" / "20000"
    assert bench.claim(mine) and mine.read_text() == str(os.getpid())
    assert bench.claim(mine)  # this process's own claim stays its own
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        theirs = tmp_path / "claims" / "fast_GT-masks" / "20001"
        theirs.write_text(str(other.pid))
        assert not bench.claim(theirs)  # a live process holds it
        other.kill()
        other.wait()
        assert bench.claim(theirs) and theirs.read_text() == str(os.getpid())  # a dead owner's claim is taken


def test_benchmark_record_sample_grid_round_trips_exactly(tmp_path):
    bench = load_benchmark("toyworld")
    names = bench.sample_names(2)
    assert names == ["concept_1", "concept_2", "joint"] and bench.sample_names(1) == ["concept_1"]
    rng = np.random.default_rng(0)
    pixels = {(n, i): rng.integers(0, 256, (8, 6, 3), dtype=np.uint8) for n in names for i in range(4)}
    for (n, i), a in pixels.items():
        Image.fromarray(a).save(tmp_path / f"{n}_{i}.png")
    bench.pack_samples(tmp_path, names, 4, tmp_path / "record" / "samples.png")
    assert Image.open(tmp_path / "record" / "samples.png").size == (4 * 6, 3 * 8)
    bench.unpack_samples(tmp_path / "record" / "samples.png", names, 4, tmp_path / "back")
    read = bench.read_samples(tmp_path / "back", "concept_2", 4)
    assert all(np.array_equal(np.asarray(im), pixels["concept_2", i]) for i, im in enumerate(read))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "back" / "joint_3.png")), pixels["joint", 3])
    with pytest.raises(ValueError, match="equal tiles"):
        bench.unpack_samples(tmp_path / "record" / "samples.png", names, 5, tmp_path / "bad")


def test_benchmark_colour_errors_count_each_wrong_colour_pair():
    bench = load_benchmark("toyworld")
    rows = [
        {"object_color": "orange", "read_colors": ["yellow", "yellow", "orange", "yellow"]},
        {"object_color": "red", "read_colors": ["orange", "red"]},
        {"object_color": None, "read_colors": ["blue"]},  # mask matched no object: counts nowhere
        {"object_color": "pink"},  # a summary from before read_colors
    ]
    assert bench.colour_errors(rows) == {"orange->yellow": 3, "red->orange": 1}
    assert list(bench.colour_errors(rows)) == ["orange->yellow", "red->orange"]  # most frequent first


def test_benchmark_shape_confusion_counts_what_each_shape_was_drawn_as():
    bench = load_benchmark("toyworld")
    rows = [
        {"object_shape": "heart", "read_shapes": ["circle", "circle", "heart", "square"]},
        {"object_shape": "heart", "read_shapes": ["circle"]},
        {"object_shape": "star", "read_shapes": ["cross", "star"]},
        {"object_shape": None, "read_shapes": ["square"]},  # mask matched no object: counts nowhere
        {"object_shape": "circle"},  # a summary from before read_shapes
    ]
    table = bench.shape_confusion(rows)
    assert table["heart"] == {"circle": 3, "square": 1, "triangle": 0, "star": 0, "cross": 0, "heart": 1}
    assert table["star"]["cross"] == 1 and table["star"]["star"] == 1
    assert sum(sum(row.values()) for row in table.values()) == 7
    summary = {
        "extraction": {
            "fast, GT masks": {
                "sim_i": 0.9, "sim_c": None, "acc1": 0.5, "acc3": 1.0, "generation_correct": 0.25,
                "generations": 8, "seconds": 1.0, "unet_samples": 2.0, "scenes": 1, "shape_confusion": table,
            }
        }
    }  # fmt: skip
    header = {"command": "c", "date": "d", "machine": "m", "model": "x", "scenes": 1, "seeds": "1-1"}
    heart_row = next(
        line for line in bench.markdown(summary, header).splitlines() if line.startswith("| heart")
    )
    assert heart_row.strip("|").split("|")[1:] == [" 3 ", " 1 ", " 0 ", " 0 ", " 0 ", " 1 "]


def test_benchmark_summarises_records_of_a_fingerprint_without_its_weights(tmp_path, monkeypatch, capsys):
    from diffusers_conceptexpress.toyworld import render_scene

    bench = load_benchmark("toyworld")
    (seed, n), *_ = bench.scenes(1, 20_000)
    scene = render_scene(seed, num_objects=n)
    record = tmp_path / "records" / "abc123" / "fast_GT-masks" / str(seed)
    record.mkdir(parents=True)
    (record / "result.json").write_text(
        json.dumps(
            {"seed": seed, "concepts": n, "targets": list(range(n)), "seconds": 1.0, "unet_samples": 7}
        )
    )
    np.savez(record / "masks.npz", *scene.masks)
    names = bench.sample_names(n)
    # concept 1's generations show a lone object of its own shape and colour, concept 2's another shape
    first, second = scene.objects[0], scene.objects[1]

    def lone(wanted):  # the first one-object scene whose object passes ``wanted``, rendered one at a time
        return next(x for x in map(render_scene, range(300), [1] * 300) if wanted(x.objects[0]))

    right = lone(lambda o: (o["shape"], o["color"]) == (first["shape"], first["color"]))
    wrong = lone(lambda o: o["shape"] != second["shape"])
    tiles = {"concept_1": right.image, "concept_2": wrong.image}
    for name in names:
        for i in range(4):
            tiles.get(name, scene.image).save(tmp_path / f"{name}_{i}.png")
    grid = record / "samples_ddim50-cfg7.5-n4-seed0.png"
    bench.pack_samples(tmp_path, names, 4, grid)
    argv = ["toyworld.py", "--records", str(tmp_path / "records"), "--work", str(tmp_path / "work")]
    argv += ["--scenes", "1", "--parts", "extraction", "--variants", "fast_GT-masks", "--summarize-only"]
    out = tmp_path / "summary.json"
    monkeypatch.setattr(sys, "argv", [*argv, "--records-of", "abc123", "--out", str(out)])
    bench.main()
    summary = json.loads(out.read_text())
    assert summary["header"]["model"] == "records of abc123" and summary["header"]["fingerprint"] == "abc123"
    rows = summary["extraction"]["fast, GT masks"]["per_concept"]
    assert [r["both"] for r in rows][:2] == [4, 0] and all(r["images"] == 4 for r in rows)
    # what the weights would be needed for is refused before any work, with the way out in the message
    for extra, message in [
        (["--records-of", "abc123", "--model", "x"], "no --model"),
        (["--records-of", "nothere"], "no records at"),
    ]:
        monkeypatch.setattr(sys, "argv", [*argv, *extra])
        with pytest.raises(SystemExit):
            bench.main()
        assert message in capsys.readouterr().err
    grid.unlink()
    monkeypatch.setattr(sys, "argv", [*argv, "--records-of", "abc123"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "have no samples_ddim50-cfg7.5-n4-seed0.png" in capsys.readouterr().err
