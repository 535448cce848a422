"""Helpers of benchmarks/toyworld_lora.py (the LoRA phase's toy benchmark), on known answers."""

from __future__ import annotations

import argparse

import PIL.Image

from benchmark_scripts import load_benchmark
from diffusers_conceptexpress.toyworld import COLORS, SHAPES, render_scene


def test_named_object_reader_finds_objects_of_a_clean_render_and_not_absent_ones():
    bench = load_benchmark("toyworld_lora")
    scene = render_scene(90_000, num_objects=2)
    present = {(o["color"], o["shape"]) for o in scene.objects}
    found = [bench.read_named_object(scene.image, c, s) for c, s in present]
    assert any(found)
    absent = next(c for c in COLORS if c not in {o["color"] for o in scene.objects})
    assert not bench.read_named_object(scene.image, absent, "circle")
    grey = PIL.Image.new("RGB", (64, 64), (127, 127, 127))
    assert not any(bench.read_named_object(grey, c, "circle") for c in COLORS)


def test_composition_pairs_avoid_the_scene_colours_and_follow_the_seed():
    bench = load_benchmark("toyworld_lora")
    scene = render_scene(90_001, num_objects=3)
    pairs = bench.composition_pairs(scene, 7, 3)
    assert pairs == bench.composition_pairs(scene, 7, 3) and len(set(pairs)) == 3
    assert all(c not in {o["color"] for o in scene.objects} and s in SHAPES for c, s in pairs)
    assert len(bench.plain_prompts()) == len(COLORS) * len(SHAPES)


def test_run_key_separates_options_and_generation_protocols():
    bench = load_benchmark("toyworld_lora")
    base = {
        "lora_alpha": None,
        "lora_steps": None,
        "lora_learning_rate": None,
        "lora_token_learning_rate": None,
    }
    args = argparse.Namespace(
        lora_rank=4, lora_prompts=None, inference_steps=50, guidance=7.5, samples=4, seed=0, **base
    )
    other = argparse.Namespace(**{**vars(args), "lora_learning_rate": 1e-3})
    assert bench.run_key(args) != bench.run_key(other)
    assert bench.lora_options(other) == {"lora_rank": 4, "lora_learning_rate": 1e-3}
    assert "ddim50-cfg7.5-n4-seed0" in bench.run_key(args)


def test_plain_misses_are_counted_by_the_shape_asked_for():
    bench = load_benchmark("toyworld_lora")
    plain = [
        {"right": 1, "images": 3, "wrong": ["orange circle -> yellow circle", "pink cross -> pink square"]},
        {"right": 0, "images": 1, "wrong": ["cyan circle -> cyan heart"]},
    ]
    counts = bench.plain_misses_by_shape(plain)
    assert set(counts) == set(SHAPES) and sum(counts.values()) == 3
    assert counts["circle"] == 2 and counts["cross"] == 1 and counts["square"] == 0
