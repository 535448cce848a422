"""The benchmark scripts' helpers (``benchmarks/``): records, claims, tables."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark_scripts import load_benchmark
from diffusers_conceptexpress.toyworld.scenes import RIM_WIDTH, STRIPE_SHADE

ROOT = Path(__file__).resolve().parents[1]


def _record(folder, seed: int, payload: bytes) -> None:
    folder.mkdir(parents=True)
    (folder / "masks.npz").write_bytes(payload)
    (folder / "samples_ddim50-cfg7.5-n4-seed0.png").write_bytes(payload[::-1])
    (folder / "result.json").write_text(json.dumps({"seed": seed}))


def test_records_pack_into_one_reproducible_zip_and_unpack_to_the_same_bytes(tmp_path):
    bench = load_benchmark("toyworld")
    records = tmp_path / "abc123"
    variant = "fast, GT masks"
    _record(records / "fast_GT-masks" / "20000", 20000, b"first")
    _record(records / "fast_GT-masks" / "20001", 20001, b"second scene")
    (records / "fast_GT-masks" / "20002").mkdir()  # an unfinished record (no result.json): not packed
    (records / "fast_GT-masks" / "20002" / "masks.npz").write_bytes(b"half")
    archive = bench.pack_records(records, variant)
    assert archive == records / "fast_GT-masks.zip"
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == [
            f"{seed}/{name}"
            for seed in (20000, 20001)
            for name in ("masks.npz", "result.json", "samples_ddim50-cfg7.5-n4-seed0.png")
        ]
    first = archive.read_bytes()
    assert bench.pack_records(records, variant).read_bytes() == first  # same records, same bytes
    assert bench.pack_records(records, "faithful, GT masks") is None  # nothing recorded

    clone = tmp_path / "clone" / "abc123"
    clone.mkdir(parents=True)
    (clone / "fast_GT-masks.zip").write_bytes(first)
    assert bench.unpack_records(clone, variant) == 2
    for seed in ("20000", "20001"):
        for f in (records / "fast_GT-masks" / seed).iterdir():
            assert (clone / "fast_GT-masks" / seed / f.name).read_bytes() == f.read_bytes()
    assert not (clone / "fast_GT-masks" / "20002").exists()
    assert bench.unpack_records(clone, variant) == 0  # complete records are left alone
    (clone / "fast_GT-masks" / "20001" / "result.json").unlink()  # a half record: replaced from the zip
    assert bench.unpack_records(clone, variant) == 1
    assert json.loads((clone / "fast_GT-masks" / "20001" / "result.json").read_text()) == {"seed": 20001}
    assert not list((clone / "fast_GT-masks").glob(".*"))  # no temporary folder left behind


def test_unpack_records_leaves_a_record_that_another_process_unpacked_first(tmp_path, monkeypatch):
    """Workers started together unpack the same archive: the one whose rename comes second keeps the first's."""
    bench = load_benchmark("toyworld")
    records = tmp_path / "abc123"
    _record(records / "fast_GT-masks" / "20000", 20000, b"first")
    archive = bench.pack_records(records, "fast, GT masks")
    clone = tmp_path / "clone" / "abc123"
    clone.mkdir(parents=True)
    (clone / "fast_GT-masks.zip").write_bytes(archive.read_bytes())
    real_replace = os.replace

    def another_process_first(src, dst):
        _record(Path(dst), 20000, b"other")  # the other worker's rename lands between our check and ours
        real_replace(src, dst)  # a folder onto a non-empty folder: OSError

    monkeypatch.setattr(bench.os, "replace", another_process_first)
    assert bench.unpack_records(clone, "fast, GT masks") == 0
    assert (clone / "fast_GT-masks" / "20000" / "masks.npz").read_bytes() == b"other"
    assert not list((clone / "fast_GT-masks").glob(".*"))  # our temporary folder is gone


@pytest.mark.parametrize("variant", ["fast, our masks", "faithful, GT masks"])
def test_committed_records_of_the_shipped_model_are_complete_archives(variant):
    bench = load_benchmark("toyworld")
    archive = bench._archive_path(ROOT / bench.RECORDS / "af8cbffd8300", variant)
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
    seeds = {n.split("/")[0] for n in names}
    assert seeds == {str(20_000 + i) for i in range(50)}
    assert all(f"{s}/result.json" in names and f"{s}/masks.npz" in names for s in seeds)


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
