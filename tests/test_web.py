"""The web demo's parts that need no browser and no Gradio: per-session folders and their cleanup, the prompt
check, the model work on a shared pipeline (no token leaks between sessions, a zip the stock loader reads),
and the `serve` command without the [web] extra. The page itself is tested in test_web_browser.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from diffusers_conceptexpress import ConceptExpressOutput, ConceptExpressPipeline, ImageInputError
from diffusers_conceptexpress.cli import build_parser, main
from diffusers_conceptexpress.outputs import ConceptLocalization
from diffusers_conceptexpress.visualize import enlarged
from diffusers_conceptexpress.web import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    ZIP_FOLDER,
    ConceptExpressDemo,
    SessionFolders,
    check_prompt,
)


# ------------------------------------------------------------------------------------- session folders
def test_session_folders_are_separate_and_inside_the_root(tmp_path):
    sessions = SessionFolders(tmp_path / "root" / "sessions", ttl=60)
    a, b = sessions.folder("abc123"), sessions.folder("XyZ_-9")
    assert a != b and a.parent == b.parent == sessions.root and a.is_dir() and b.is_dir()
    assert sessions.sessions() == ["XyZ_-9", "abc123"]
    for bad in ("../evil", "a/b", "", ".", "..", "x" * 65, "a b", None):
        with pytest.raises(ValueError, match="Invalid session id"):
            sessions.folder(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]  # nothing created beside the root
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["sessions"]
    assert sessions.sessions() == ["XyZ_-9", "abc123"]


def test_sweep_removes_idle_folders_but_never_a_running_job(tmp_path):
    sessions = SessionFolders(tmp_path, ttl=100)
    now = time.time()
    for name in ("idle", "busy", "fresh"):
        (sessions.folder(name) / "file.txt").write_text(name)
    with sessions.active("busy") as busy:
        for name in ("idle", "busy"):  # both last active 200 s ago
            os.utime(sessions.path(name), (now - 200, now - 200))
        assert sessions.sweep(now) == ["idle"]
        assert sessions.remove("busy") is False and busy.is_dir()  # a closing tab waits for its job
    assert sessions.sessions() == ["busy", "fresh"]  # the job's end counts as activity
    assert sessions.sweep(now + 50) == []
    assert sessions.sweep(now + 101 + 5) == ["busy", "fresh"]
    assert sessions.sessions() == [] and sessions.root.is_dir()
    assert sessions.remove("gone") is False
    with pytest.raises(ValueError):
        SessionFolders(tmp_path, ttl=0)


def test_remove_deletes_the_session_folder(tmp_path):
    sessions = SessionFolders(tmp_path, ttl=100)
    (sessions.folder("tab1") / "concepts").mkdir()
    sessions.folder("tab2")
    assert sessions.remove("tab1") is True
    assert sessions.sessions() == ["tab2"]


# ------------------------------------------------------------------------------------------ the prompt
def concepts_of(k: int, dim: int = 4, prefix: str = "<ce>") -> ConceptExpressOutput:
    masks = torch.zeros(k, 4, 4, dtype=torch.bool)
    localization = ConceptLocalization(
        masks=[Image.new("L", (4, 4))] * k,
        latent_masks=masks,
        features=masks.float(),
        eot_scores=torch.ones(k),
    )
    tokens = [f"{prefix}_{i}" for i in range(1, k + 1)]
    return ConceptExpressOutput(tokens, torch.zeros(k, dim), localization, token_prefix=prefix)


def test_check_prompt_knows_the_sessions_tokens():
    two = concepts_of(2)
    assert check_prompt("  a photo of <ce>_1 and <ce>_2 ", two) == "a photo of <ce>_1 and <ce>_2"
    assert check_prompt("a photo of <ce> on the beach", two) == "a photo of <ce> on the beach"
    assert check_prompt("a photo of a red star", None) == "a photo of a red star"
    with pytest.raises(
        ValueError, match=r"Unknown token\(s\) <ce>_3: this session's concepts are <ce>_1, <ce>_2"
    ):
        check_prompt("a photo of <ce>_3", two)
    with pytest.raises(ValueError, match="no concepts were extracted yet"):
        check_prompt("a photo of <ce>_1", None)
    with pytest.raises(ValueError, match="empty"):
        check_prompt("   ", two)
    other = concepts_of(1, prefix="<dog>")
    assert check_prompt("a photo of <dog>_1", other)
    with pytest.raises(ValueError, match="<dog>_2"):
        check_prompt("<dog>_1 and <dog>_2", other)


def test_enlarged_keeps_pixels_sharp():
    small = Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3))
    big = enlarged(small, 256)
    assert big.size == (256, 256)
    assert np.array_equal(np.asarray(big)[::4, ::4], np.asarray(small))  # nearest neighbour, factor 4
    assert enlarged(big, 256) is big
    assert enlarged(Image.new("RGB", (100, 50)), 256).size == (600, 300)  # smallest integer factor


# --------------------------------------------------------------------------- model work, shared pipeline
def scene(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (72, 96, 3), dtype=np.uint8))


FAST = {"split_steps": 1, "sinkhorn_iters": 5}  # tiny models: a short run of every phase


@pytest.fixture(scope="module")
def shared(tmp_path_factory, components_factory):
    """A saved tiny SD 2 model, the demo's engine on it, and the concepts of two sessions' images."""
    root = tmp_path_factory.mktemp("web")
    pipe = ConceptExpressPipeline(**components_factory("sd2"))
    pipe.save_pretrained(root / "model", pipeline_code=False)  # a plain SD folder, for the stock loader
    pipe.set_progress_bar_config(disable=True)
    engine = ConceptExpressDemo(pipe, inference_steps=2, guidance=3.0)
    vocabulary = len(pipe.tokenizer)
    steps = []
    first = engine.extract(
        scene(0), steps=3, schedule="fast", seed=0, callback=lambda *a: steps.append(a[:2]), **FAST
    )
    second = engine.extract(scene(1), steps=3, schedule="fast", seed=0, **FAST)
    return root, engine, vocabulary, first, second, steps


def test_extract_reports_every_step_and_leaves_the_shared_pipeline_without_tokens(shared):
    _, engine, vocabulary, first, second, steps = shared
    assert steps == [(0, 3), (1, 3), (2, 3)]
    assert len(engine.pipe.tokenizer) == vocabulary  # load=False: no session's tokens in the shared model
    assert not torch.equal(first.embeddings[0], second.embeddings[0])


def test_generation_uses_the_sessions_own_tokens_only(shared):
    root, engine, vocabulary, first, second, _ = shared
    prompt = "a photo of <ce>_1"
    mine = np.asarray(engine.generate(first, prompt, seed=3))
    theirs = np.asarray(engine.generate(second, prompt, seed=3))
    assert len(engine.pipe.tokenizer) == vocabulary  # unloaded after each generation
    # the same as a stock pipeline that loads the session's own saved file
    sd = StableDiffusionPipeline.from_pretrained(
        root / "model", safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    sd.set_progress_bar_config(disable=True)
    first.save(str(root / "first"))
    sd.load_textual_inversion(str(root / "first" / "concepts.safetensors"))
    expected = sd(
        prompt, num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(3)
    )
    assert np.array_equal(mine, np.asarray(expected.images[0]))
    assert not np.array_equal(mine, theirs)
    assert np.array_equal(np.asarray(engine.generate(first, prompt, seed=3)), mine)  # nothing left behind
    with pytest.raises(ValueError, match="Unknown token"):
        engine.generate(first, f"a photo of <ce>_{first.num_concepts + 1}")
    assert len(engine.pipe.tokenizer) == vocabulary


def test_cards_and_zip(shared, tmp_path):
    root, engine, vocabulary, first, _, _ = shared
    progress = []
    archive = engine.export(first, tmp_path)
    cards = engine.cards(first, tmp_path / ZIP_FOLDER, progress=lambda k, n: progress.append((k, n)))
    k = first.num_concepts
    assert [c.token for c in cards] == first.tokens and progress == [(i, k) for i in range(1, k + 1)]
    assert [c.prompt for c in cards] == [f"a photo of {t}" for t in first.tokens]
    # shown enlarged: the 32-px samples x 8, the masks at the 96 x 72 image size x 4
    assert all(c.sample.size == (256, 256) and c.mask.size == (384, 288) for c in cards)
    assert [
        np.array_equal(np.asarray(c.mask)[::4, ::4], np.asarray(m))
        for c, m in zip(cards, first.localization.masks, strict=True)
    ] == [True] * k
    assert len(engine.pipe.tokenizer) == vocabulary
    assert archive == tmp_path / "conceptexpress-concepts.zip"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conceptexpress-concepts.zip", "concepts"]
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        z.extractall(unpacked)
    assert all(n.startswith("concepts/") for n in names) and "concepts/concepts.safetensors" in names
    sd = StableDiffusionPipeline.from_pretrained(
        root / "model", safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    sd.load_textual_inversion(str(unpacked / "concepts" / "concepts.safetensors"))
    assert all(t in sd.tokenizer.get_vocab() for t in first.tokens)


def test_read_image_gives_the_packages_error_with_the_files_own_name(tmp_path):
    text = tmp_path / "upload-123" / "notes.txt"
    text.parent.mkdir()
    text.write_text("not an image")
    with pytest.raises(ImageInputError, match=r"'notes\.txt' is not a readable image file") as err:
        ConceptExpressDemo.read_image(text)
    assert str(tmp_path) not in str(err.value)  # no server path in the page
    small = tmp_path / "small.png"
    Image.new("RGB", (32, 32)).save(small)
    with pytest.raises(ImageInputError, match="Image is too small: 32x32"):
        ConceptExpressDemo.read_image(small)
    good = tmp_path / "good.png"
    Image.new("RGBA", (64, 80)).save(good)
    assert ConceptExpressDemo.read_image(good).mode == "RGB"


# ------------------------------------------------------------------------------- serve without gradio
def test_serve_defaults():
    args = build_parser().parse_args(["serve"])
    assert (
        (args.model, args.host, args.port) == (None, DEFAULT_HOST, DEFAULT_PORT) == (None, "127.0.0.1", 7860)
    )


def test_serve_without_gradio_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` fails as when it is not installed
    assert main(["serve", "--port", "7999"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install "diffusers-conceptexpress[web]"' in err[0]


def test_the_package_imports_no_gradio():
    code = "import sys, diffusers_conceptexpress.web, diffusers_conceptexpress.cli; print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
