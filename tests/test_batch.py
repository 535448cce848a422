"""Many images (batch.py): names, seeds, resume, failures, one pipeline reused, and 2 CPU processes (torchrun).

The extraction tests use the shipped toy model and toy scenes with 1-2 training steps; the 2-process tests run
``python -m torch.distributed.run --standalone --nproc_per_node 2 -m diffusers_conceptexpress extract ...``
(gloo, offline) in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusers_conceptexpress import ConceptExpressPipeline, load_concepts
from diffusers_conceptexpress.batch import (
    extract_images,
    find_images,
    image_name,
    image_seed,
    plan_jobs,
)
from diffusers_conceptexpress.cli import is_many_images, main
from diffusers_conceptexpress.tokens import concept_token_names
from diffusers_conceptexpress.toyworld import model_path, render_scene

SINGLE_IMAGE_FILES = {"concepts.json", "concepts.safetensors", "source.png", "overlay.png"}


def write_scenes(folder: Path, names: list[str], first_seed: int = 100) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        path = folder / name
        render_scene(first_seed + i, num_objects=1 + i % 2).image.save(path)
        paths.append(path)
    return paths


def embeddings(folder: Path) -> torch.Tensor:
    index = json.loads((folder / "concepts.json").read_text())
    return load_file(str(folder / "concepts.safetensors"))[index["all_concepts_token"]]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder``: (bytes, mtime in ns)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------- no model
def test_names_seeds_and_discovery(tmp_path):
    assert image_name("My Dog.JPG") == "my-dog"
    assert image_name("Café au lait (2).png") == "cafe-au-lait-2"
    assert image_name("___.png") == "image" and image_name("a.b.jpg") == "a-b"
    for name in ("my-dog", "cafe-au-lait-2"):
        concept_token_names(f"<{name}>", 2)  # valid (lower case, no spaces)

    a = tmp_path / "a"
    write_scenes(a, ["dog.png", "Dog.jpg", "dog-2.png", "cat.png"])
    (a / "notes.txt").write_text("not an image")
    b = write_scenes(tmp_path / "b", ["dog.png"])[0]
    # folders give their image files sorted; globs their matches; each file once, in the order given
    found = find_images([a, str(tmp_path / "*" / "dog.png"), b])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a/Dog.jpg",
        "a/cat.png",
        "a/dog-2.png",
        "a/dog.png",
        "b/dog.png",
    ]
    jobs = plan_jobs(found, seed=0)
    names = {j.path.relative_to(tmp_path).as_posix(): j.name for j in jobs}
    # unique, in the order of the paths; "dog-2" belongs to dog-2.png, so the clashing dogs skip it
    assert names == {
        "a/Dog.jpg": "dog",
        "a/cat.png": "cat",
        "a/dog-2.png": "dog-2",
        "a/dog.png": "dog-3",
        "b/dog.png": "dog-4",
    }
    assert {j.name: j for j in plan_jobs(found[::-1], seed=0)} == {j.name: j for j in jobs}  # order-free
    # seeds: from the run's seed and the file name only
    assert jobs[1].seed == image_seed(0, "cat.png") == plan_jobs([found[1]], seed=0)[0].seed
    assert image_seed(0, "cat.png") != image_seed(1, "cat.png") != image_seed(1, "dog.png")
    assert image_seed(0, "dog.png") == jobs[3].seed == jobs[4].seed  # same file name, other folder
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        find_images([a / "missing.png"])
    with pytest.raises(FileNotFoundError, match="No image file matches"):
        find_images([str(tmp_path / "*.webp")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No image file"):
        find_images([tmp_path / "empty"])
    # the CLI: one image file keeps the single-image layout; several, a folder, a glob or --many do not
    assert not is_many_images([str(b)]) and not is_many_images([str(tmp_path / "missing.png")])
    assert is_many_images([str(b)], many=True) and is_many_images([str(a)])
    assert is_many_images([str(b), str(a / "cat.png")]) and is_many_images([str(tmp_path / "b" / "*.png")])


# ---------------------------------------------------------------------------------- one process, in-process
@pytest.fixture(scope="module")
def toy_pipe():
    pipe = ConceptExpressPipeline.from_pretrained(model_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, toy_pipe):
    """Three scenes and a corrupt file, extracted once (2 steps, a 1-step sample grid)."""
    root = tmp_path_factory.mktemp("batch")
    images = root / "images"
    write_scenes(images, ["Scene A.png", "b.png", "c.png"])
    (images / "broken.png").write_bytes(b"not a png at all")
    out = root / "out"
    vocab = len(toy_pipe.tokenizer)
    result = extract_images(
        toy_pipe, [images], out, seed=0, num_train_steps=2, inference_steps=1, progress=False
    )
    assert len(toy_pipe.tokenizer) == vocab  # no image's tokens are left in the pipeline
    return images, out, result


def test_many_images_index_layout_and_failed_image(toy_run):
    images, out, result = toy_run
    assert [s.name for s in result.images] == ["scene-a", "b", "broken", "c"]  # folder order, sorted
    assert [s.status for s in result.images] == ["done", "done", "failed", "done"]
    broken = result.failed[0]
    assert broken.image == str(images / "broken.png") and broken.tokens == [] and broken.num_concepts == 0
    assert broken.error.startswith("ImageInputError:") and "not a readable image" in broken.error
    assert not (out / "broken").exists() and hidden(out) == []
    index = json.loads((out / "index.json").read_text())
    assert (index["done"], index["failed"], index["num_processes"]) == (3, 1, 1)
    assert [e["name"] for e in index["images"]] == ["scene-a", "b", "broken", "c"]
    for entry, status in zip(index["images"], result.images, strict=True):
        assert entry["status"] == status.status and entry["tokens"] == status.tokens
        assert entry["seed"] == image_seed(0, Path(entry["image"]).name)
        assert entry["seconds"] > 0 and entry["resumed"] is False
    for status in result.done:
        folder = out / status.name
        k = status.num_concepts
        assert k >= 1 and status.tokens == concept_token_names(f"<{status.name}>", k)
        expected = SINGLE_IMAGE_FILES | {"samples.png"}
        expected |= {f"concept_{i}.safetensors" for i in range(1, k + 1)}
        expected |= {f"mask_{i}.png" for i in range(1, k + 1)}
        assert {p.name for p in folder.iterdir()} == expected  # the single-image layout
        meta = json.loads((folder / "concepts.json").read_text())
        assert meta["all_concepts_token"] == f"<{status.name}>"
        assert meta["parameters"]["batch"]["seed"] == status.seed
        assert embeddings(folder).shape[0] == k + 1


def test_rerun_skips_complete_folders_untouched_and_retries_failures(toy_run, toy_pipe, tmp_path):
    images, out, first = toy_run
    before = {s.name: snapshot(out / s.name) for s in first.done}
    leftover = out / ".c.x1y2.tmp"  # what a process killed while writing c's folder leaves
    leftover.mkdir()
    (leftover / "concepts.json").write_text("{")
    second = extract_images(
        toy_pipe, [images], out, seed=0, num_train_steps=2, inference_steps=1, progress=False
    )
    assert [s.resumed for s in second.images] == [True, True, False, True]
    assert second.failed[0].name == "broken" and second.failed[0].process == 0  # tried again
    assert {s.name: snapshot(out / s.name) for s in second.done} == before  # same bytes, same mtimes
    assert hidden(out) == []
    index = json.loads((out / "index.json").read_text())
    assert [e["resumed"] for e in index["images"]] == [True, True, False, True]
    assert [e["seconds"] for e in index["images"] if e["resumed"]] == [s.seconds for s in first.done]
    # other options into the same folder: refused before any work, nothing touched
    with pytest.raises(ValueError, match="other options"):
        extract_images(toy_pipe, [images], out, seed=0, num_train_steps=3, inference_steps=1, progress=False)
    with pytest.raises(TypeError, match="token_prefix"):
        extract_images(toy_pipe, [images], tmp_path / "x", token_prefix="<a>")
    assert {s.name: snapshot(out / s.name) for s in first.done} == before and not (tmp_path / "x").exists()


def test_result_depends_on_image_options_and_seed_only(toy_run, toy_pipe, tmp_path):
    """Another order, another subset, and a pipeline that extracted other images before: same result as the
    first run; and the same as the single-image API with the image's seed."""
    images, out, _ = toy_run
    reordered = extract_images(
        toy_pipe,
        [images / "c.png", images / "Scene A.png"],
        tmp_path / "out",
        seed=0,
        num_train_steps=2,
        samples=False,
        progress=False,
    )
    assert [s.name for s in reordered.images] == ["c", "scene-a"]
    for s in reordered.images:
        assert torch.equal(embeddings(tmp_path / "out" / s.name), embeddings(out / s.name))
        assert (tmp_path / "out" / s.name / "mask_1.png").read_bytes() == (
            out / s.name / "mask_1.png"
        ).read_bytes()
    direct = toy_pipe.extract_concepts(
        images / "c.png",
        num_train_steps=2,
        generator=torch.Generator().manual_seed(image_seed(0, "c.png")),
        load=False,
    )
    assert torch.equal(direct.embeddings, embeddings(out / "c")[1:])
    another_seed = extract_images(
        toy_pipe,
        [images / "c.png"],
        tmp_path / "s1",
        seed=1,
        num_train_steps=2,
        samples=False,
        progress=False,
    )
    assert not torch.equal(embeddings(tmp_path / "s1" / "c"), embeddings(out / "c"))
    assert another_seed.images[0].seed == image_seed(1, "c.png")


def test_load_concepts_of_several_images_into_one_pipeline(toy_run, tmp_path):
    _, out, _ = toy_run
    pipe = ConceptExpressPipeline.from_pretrained(model_path())
    pipe.set_progress_bar_config(disable=True)
    tokens = load_concepts(pipe, [out / "scene-a", out / "b"])
    assert tokens[0] == "<scene-a>_1" and "<b>_1" in tokens
    prompt = pipe.maybe_convert_prompt("a photo of <scene-a>_1 next to <b>_1", pipe.tokenizer)
    ids = pipe.tokenizer(prompt).input_ids
    rows = pipe.text_encoder.get_input_embeddings().weight
    for token, folder in (("<scene-a>_1", out / "scene-a"), ("<b>_1", out / "b")):
        token_id = pipe.tokenizer.convert_tokens_to_ids(token)
        assert token_id in ids
        assert torch.equal(rows[token_id].float(), embeddings(folder)[1])
    image = pipe("a photo of <scene-a>_1 next to <b>_1", num_inference_steps=1).images[0]
    assert image.size == (64, 64)
    with pytest.raises(ValueError, match="already loaded"):
        load_concepts(pipe, [out / "c", out / "b"])
    assert "<c>" not in pipe.tokenizer.get_vocab()  # nothing loaded when refused
    shutil.copytree(out / "c", tmp_path / "c-copy")
    with pytest.raises(ValueError, match="also a token of"):
        load_concepts(pipe, [out / "c", tmp_path / "c-copy"])
    # the command line takes several folders too
    png = tmp_path / "gen.png"
    argv = ["generate", "--concepts", str(out / "scene-a"), str(out / "b"), "--model", model_path()]
    argv += ["--prompt", "a photo of <scene-a>_1 next to <b>_1", "--out", str(png), "--inference-steps", "1"]
    assert main(argv) == 0 and Image.open(png).size == (64, 64)


def test_cli_many_images_corrupt_file_exit_status_1(tmp_path, capsys):
    scene = write_scenes(tmp_path / "images", ["dog.png"])[0]
    broken = tmp_path / "images" / "cat.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    argv = ["extract", str(scene), str(broken), "--model", model_path(), "--out", str(out), "--steps", "1"]
    assert main([*argv, "--no-samples"]) == 1
    captured = capsys.readouterr()
    assert "cat.png: failed: ImageInputError" in captured.err
    assert "2 image(s): 1 done" in captured.out and "1 failed" in captured.out
    index = json.loads((out / "index.json").read_text())
    assert [(e["name"], e["status"]) for e in index["images"]] == [("dog", "done"), ("cat", "failed")]
    assert "not a readable image" in index["images"][1]["error"]
    assert (out / "dog" / "concepts.safetensors").is_file() and not (out / "cat").exists()
    # --token-prefix names the tokens of ONE image; refused with many, before any model work
    assert main([*argv, "--token-prefix", "<x>"]) == 1
    assert "--token-prefix applies to one image" in capsys.readouterr().err
    # a single-image concepts folder is not a many-images output folder
    assert main(["extract", str(scene), "--many", "--model", model_path(), "--out", str(out / "dog")]) == 1
    assert "single-image run" in capsys.readouterr().err
    # a folder of the image's name that this kind of run did not write is never taken for done or replaced
    (tmp_path / "other" / "dog").mkdir(parents=True)
    (tmp_path / "other" / "dog" / "notes.txt").write_text("mine")
    assert (
        main(["extract", str(scene), "--many", "--model", model_path(), "--out", str(tmp_path / "other")])
        == 1
    )
    assert "not written by a many-images run" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "other" / "dog").iterdir()] == ["notes.txt"]


# ----------------------------------------------------------------------------------- two CPU processes
def _env() -> dict:
    # one thread per process in both runs (torchrun sets 1 too), nothing from the network
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port: no clash with another run on this machine
        "--nproc_per_node",
        "2",
        "-m",
        "diffusers_conceptexpress",
        *args,
    ]


def test_python_m_is_the_command(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "diffusers_conceptexpress", "--version"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    from diffusers_conceptexpress import __version__

    assert done.returncode == 0 and done.stdout.strip() == f"conceptexpress {__version__}"


def test_two_processes_equal_one_process(tmp_path):
    """6 toy scenes: 2 CPU processes (torchrun, gloo) write 6 folders and a complete index, and every image's
    embeddings and masks are bit for bit those of a one-process run of the same command."""
    images = tmp_path / "images"
    write_scenes(images, [f"scene{i}.png" for i in range(6)])
    command = ["extract", str(images), "--model", model_path(), "--steps", "2", "--no-samples", "--seed", "7"]
    assert main([*command, "--out", str(tmp_path / "one")]) == 0  # this process: 1 thread (fixtures.py)
    done = subprocess.run(
        _torchrun(*command, "--out", str(tmp_path / "two")),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "index.json").read_text())
    two = json.loads((tmp_path / "two" / "index.json").read_text())
    assert two["num_processes"] == 2 and two["done"] == 6 and two["failed"] == 0
    assert [e["process"] for e in two["images"]] == [0, 0, 0, 1, 1, 1]  # each wrote its own share
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["index.json"] + [
        f"scene{i}" for i in range(6)
    ]
    for a, b in zip(one["images"], two["images"], strict=True):
        assert (a["name"], a["tokens"], a["seed"]) == (b["name"], b["tokens"], b["seed"])
        first, second = tmp_path / "one" / a["name"], tmp_path / "two" / a["name"]
        assert torch.equal(embeddings(first), embeddings(second))
        for k in range(1, a["num_concepts"] + 1):
            m1, m2 = (np.asarray(Image.open(f / f"mask_{k}.png")) for f in (first, second))
            assert np.array_equal(m1, m2)


def test_killed_process_then_rerun_completes(tmp_path):
    """SIGKILL one of 2 processes once an image is done: no partial folder; the rerun completes and leaves
    the folders finished before the kill untouched."""
    import psutil

    images = tmp_path / "images"
    write_scenes(images, [f"scene{i}.png" for i in range(6)])
    out = tmp_path / "out"
    command = _torchrun("extract", str(images), "--model", model_path(), "--out", str(out), "--steps", "2")
    command += ["--no-samples"]
    log = open(tmp_path / "log.txt", "w")  # noqa: SIM115 (closed below)
    run = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_env())
    try:
        deadline = time.monotonic() + 240
        while not any(p.is_dir() and not p.name.startswith(".") for p in out.glob("*")):
            assert run.poll() is None and time.monotonic() < deadline, "no image finished"
            time.sleep(0.05)
        workers = [
            p
            for p in psutil.Process(run.pid).children(recursive=True)
            if "diffusers_conceptexpress" in p.cmdline()
        ]
        assert len(workers) == 2
        os.kill(workers[-1].pid, signal.SIGKILL)
        assert run.wait(timeout=120) != 0  # torchrun stops the other process and fails
    finally:
        if run.poll() is None:
            run.kill()
        log.close()
    finished = sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert 1 <= len(finished) < 6 and not (out / "index.json").exists()
    for name in finished:  # whatever exists is complete
        assert embeddings(out / name).shape[0] >= 2
    before = {name: snapshot(out / name) for name in finished}

    rerun = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    index = json.loads((out / "index.json").read_text())
    assert index["done"] == 6 and index["failed"] == 0
    assert sorted(e["name"] for e in index["images"] if e["resumed"]) == finished
    assert {name: snapshot(out / name) for name in finished} == before
    assert hidden(out) == []  # no temporary leftovers of the killed process
