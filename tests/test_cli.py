"""The ``conceptexpress`` command line on a saved tiny pipeline."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from diffusers_conceptexpress import ConceptExpressPipeline
from diffusers_conceptexpress.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, components_factory):
    path = tmp_path_factory.mktemp("model") / "tiny-sd2"
    ConceptExpressPipeline(**components_factory("sd2")).save_pretrained(path)
    return path


@pytest.fixture
def image_path(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "scene.png"
    Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(path)
    return path


def test_localize_writes_masks_overlay_and_json(model_dir, image_path, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["localize", str(image_path), "--model", str(model_dir), "--out", str(out)]) == 0
    summary = json.loads((out / "localization.json").read_text())
    assert summary["concepts"]
    for k, concept in enumerate(summary["concepts"], start=1):
        assert (
            concept["mask"] == f"mask_{k}.png" and concept["name"] == f"concept_{k}"
        )  # as extract names them
        mask = Image.open(out / concept["mask"])
        assert mask.size == (90, 70)
    assert Image.open(out / "overlay.png").size == (90, 70)
    assert (out / "eot_map.png").exists()
    assert "concept(s) found" in capsys.readouterr().out
    # a second run refuses to overwrite, with one line and a non-zero exit
    assert main(["localize", str(image_path), "--model", str(model_dir), "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0]


def test_missing_image_fails_cleanly(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["localize", str(tmp_path / "missing.jpg"), "--model", str(model_dir), "--out", str(out)])
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.jpg" in err[0]
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary leftovers either


def test_failure_during_save_leaves_no_directory(model_dir, image_path, tmp_path, monkeypatch):
    import diffusers_conceptexpress.cli as cli

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cli, "_save_localization", broken)
    out = tmp_path / "out"
    assert main(["localize", str(image_path), "--model", str(model_dir), "--out", str(out)]) != 0
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.png"]


def test_extract_writes_documented_files_and_generate_uses_them(model_dir, image_path, tmp_path, capsys):
    out = tmp_path / "concepts"
    args = ["extract", str(image_path), "--model", str(model_dir), "--out", str(out), "--steps", "2"]
    assert main([*args, "--inference-steps", "2"]) == 0
    index = json.loads((out / "concepts.json").read_text())
    k = len(index["concepts"])
    names = {p.name for p in out.iterdir()}
    assert {"concepts.safetensors", "concepts.json", "overlay.png", "samples.png"} <= names
    assert all(f"concept_{i}.safetensors" in names and f"mask_{i}.png" in names for i in range(1, k + 1))
    grid = Image.open(out / "samples.png")
    assert grid.width == 128 * (k + (1 if k > 1 else 0))  # 32-px samples enlarged x4 for reading
    assert "<ce>_1" in capsys.readouterr().out
    png = tmp_path / "gen.png"
    gen = ["generate", "--concepts", str(out), "--model", str(model_dir), "--prompt", "a photo of <ce>_1"]
    code = main([*gen, "--out", str(png), "--inference-steps", "2"])
    assert code == 0 and Image.open(png).size == (32, 32)


def test_extract_missing_image_and_bad_concepts_dir(model_dir, tmp_path, capsys):
    out = tmp_path / "concepts"
    assert main(["extract", str(tmp_path / "nope.png"), "--model", str(model_dir), "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.png" in err[0] and not out.exists()
    code = main(["generate", "--concepts", str(tmp_path), "--model", str(model_dir), "--prompt", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "concepts.json" in err[0]


def test_demo_runs_offline_on_the_shipped_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "2"]) == 0
    for name in ("scene.png", "samples.png", "overlay_large.png", "prompts.txt"):
        assert (out / name).is_file()
    index = json.loads((out / "concepts" / "concepts.json").read_text())
    assert index["concepts"] and (out / "concepts" / "concepts.safetensors").is_file()
    prompts = (out / "prompts.txt").read_text().splitlines()
    assert prompts[0] == "a photo of <ce>_1" and " and a " in prompts[-1]  # a changed context
    assert str(out / "samples.png") in capsys.readouterr().out


def test_flags_keep_their_defaults_and_take_them_from_the_package():
    from diffusers_conceptexpress.cli import build_parser
    from diffusers_conceptexpress.evaluation import ENCODERS
    from diffusers_conceptexpress.image_io import RESIZE_POLICIES
    from diffusers_conceptexpress.learning import MIXED_PRECISION, SCHEDULES, LearningConfig
    from diffusers_conceptexpress.localization import LOCALIZERS, LocalizationConfig

    parser = build_parser()
    ext = parser.parse_args(["extract", "x.png", "--model", "m", "--out", "o"])
    # no --steps: the schedule's own count (500 for fast and faithful, turbo's fewer)
    assert (ext.steps, ext.schedule, ext.mixed_precision, ext.token_prefix) == (None, "fast", "no", "<ce>")
    assert ext.schedule == LearningConfig().schedule
    assert LearningConfig(num_train_steps=ext.steps).num_train_steps == 500
    assert (ext.inference_steps, ext.guidance) == (50, 7.5)
    loc = parser.parse_args(["localize", "x.png", "--model", "m", "--out", "o"])
    assert (loc.method, loc.resize_policy) == ("conceptexpress", "squash")
    assert loc.method == LocalizationConfig().method
    ev = parser.parse_args(["evaluate", "results"])
    assert ev.encoder == "clip" and ev.encoder in ENCODERS
    assert parser.parse_args(["demo"]).steps == 500
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))

    def choices(command, dest):
        return next(a.choices for a in sub.choices[command]._actions if a.dest == dest)

    assert choices("extract", "schedule") == list(SCHEDULES)
    assert choices("extract", "mixed_precision") == list(MIXED_PRECISION)
    assert choices("localize", "method") == list(LOCALIZERS)
    assert choices("localize", "resize_policy") == list(RESIZE_POLICIES)
    assert choices("evaluate", "encoder") == list(ENCODERS)
