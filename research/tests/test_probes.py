"""Helpers of the research probes (research/probes/), on constructed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmark_scripts import load_benchmark
from diffusers_conceptexpress.toyworld import render_scene


def load_probe(name: str):
    """``research/probes/<name>.py`` as a module, imported as when run as a script."""
    return load_benchmark(name, folder="research/probes")


def test_inversion_probe_picks_scenes_by_texture():
    probe = load_probe("toyworld_inversion_probe")
    striped = probe.probe_seeds(30_000, 3, "striped")
    assert len(striped) == 3 and striped == sorted(striped) and striped[0] >= 30_000
    assert all(render_scene(s, num_objects=1).objects[0]["texture"] == "striped" for s in striped)
    assert probe.probe_seeds(30_000, 3) == [30_000, 30_001, 30_002]


def test_alone_benchmark_pairs_each_object_with_its_joint_reading():
    alone = load_probe("toyworld_alone")
    rows = [  # "both" is the share of the object's generations right, as the probe's score writes it
        {"seed": 1, "object": 0, "shape_name": "heart", "both": 0.75},
        {"seed": 1, "object": 1, "shape_name": "circle", "both": 1.0},
        {"seed": 2, "object": 0, "shape_name": "heart", "both": 0.0},
    ]
    joint = {(1, 0): {"both": 1}, (1, 1): {"both": 4}, (2, 0): {"both": 2}}
    table = alone.summarize(rows, joint, samples=4)
    assert table["all"] == {"objects": 3, "generations": 12, "alone": 7, "joint": 7}
    assert table["heart"] == {"objects": 2, "generations": 8, "alone": 3, "joint": 3}
    assert table["circle"]["alone"] == table["circle"]["joint"] == 4
    assert "star" not in table
    assert table["objects better"] == {"alone": 1, "joint": 1}
    # against an earlier run of the script itself (e.g. objects learned in their scenes vs --isolate)
    baseline = alone.as_reading(rows, samples=4)
    assert baseline == {(1, 0): {"both": 3}, (1, 1): {"both": 4}, (2, 0): {"both": 0}}
    isolated = [{**rows[0], "both": 1.0}, rows[1], rows[2]]
    same = alone.summarize(isolated, baseline, samples=4)
    assert same["all"]["alone"] == 8 and same["all"]["joint"] == 7
    assert same["objects better"] == {"alone": 1, "joint": 0}


def test_loss_landscape_margin_adds_only_free_cells_around_each_mask():
    grow = load_probe("toyworld_loss_landscape").loss_masks_with_margin
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 2:4, 1:3] = True
    masks[1, 2:4, 3:5] = True  # touches concept 0 on its right
    assert torch.equal(grow(masks, 0), masks)
    out = grow(masks, 1)
    assert out.shape == masks.shape and bool((out | masks).eq(out).all())  # supersets
    assert not bool(out[0][masks[1]].any()) and not bool(out[1][masks[0]].any())  # never a neighbour's cell
    assert int(out[0].sum()) == 16 - 2  # the 4x4 box around it less the 2 cells of concept 1 in it
    assert bool(out[0, 1, 0]) and bool(out[0, 4, 3]) and not bool(out[0, 5, 1])
    alone = grow(masks[:1], 2)
    assert int(alone.sum()) == 6 * 5  # no other concept: the full Chebyshev band, cut by the left edge
    with pytest.raises(ValueError, match="margin"):
        grow(masks, -1)


def test_alone_grow_learns_from_the_mask_and_its_free_band():
    alone = load_probe("toyworld_alone")
    scene = render_scene(20_005, num_objects=3)
    for k in range(3):
        assert np.array_equal(alone.learning_mask(scene, k, 0), scene.masks[k])
        grown = alone.learning_mask(scene, k, 4)
        others = np.any([m for j, m in enumerate(scene.masks) if j != k], axis=0)
        assert grown.dtype == bool and grown.shape == scene.masks[k].shape
        assert grown[scene.masks[k]].all() and not grown[others].any()
        assert grown.sum() > scene.masks[k].sum()
        ys, xs = np.nonzero(grown & ~scene.masks[k])  # every added pixel lies within 4 px of the object
        yo, xo = np.nonzero(scene.masks[k])
        chebyshev = np.maximum(np.abs(ys[:, None] - yo[None]), np.abs(xs[:, None] - xo[None]))
        assert (chebyshev.min(1) <= 4).all()


def test_composition_probe_draws_fixed_pairs_of_two_colours():
    probe = load_probe("toyworld_composition_base")
    pairs = probe.pairs(30, seed=0)
    assert len(pairs) == 30 and pairs == probe.pairs(30, seed=0) and pairs != probe.pairs(30, seed=1)
    assert all(first[0] != second[0] for first, second in pairs)


def test_lora_tuning_table_sums_each_config_over_the_seeds_asked():
    probe = load_probe("toyworld_lora_tuning")
    n = len(probe.PLAIN_PROMPTS)

    def line(config, seed, alone, lora, plain, seconds):
        return {
            "config": config, "seed": seed, "plain": plain / n, "seconds": seconds,
            "per_concept_tokens": [{"both": alone, "images": 4}], "per_concept_lora": [{"both": lora, "images": 4}],
        }  # fmt: skip

    lines = [line("a", 1, 4, 3, n, 70.0), line("a", 2, 1, 2, n - 1, 90.0), line("b", 1, 4, 4, n, 140.0)]
    lines.append(line("a", 3, 0, 0, 0, 10.0))  # a seed not asked for
    table = probe.summary_table(lines, ["a", "b", "c"], [1, 2]).splitlines()
    assert table[2] == f"| a | 2 | 5/8 | 5/8 | {2 * n - 1}/{2 * n} | 70-90 |"
    assert table[3] == f"| b | 1 | 4/4 | 4/4 | {n}/{n} | 140-140 |"
    assert len(table) == 4  # no row for a config without lines
