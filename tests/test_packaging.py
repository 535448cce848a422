"""The wheel holds the package and its shipped weights, and nothing of the research or the benchmark records."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")  # setuptools' build folder, outside the checkout
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out)],
        check=True, cwd=build, env={**os.environ, "PIP_NO_INDEX": "1"},
    )  # fmt: skip
    (found,) = out.glob("diffusers_conceptexpress-*.whl")
    return found


def test_wheel_holds_the_package_and_the_shipped_model_only(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        sources = {n: zf.read(n).decode() for n in names if n.endswith(".py")}
    tops = {n.split("/")[0] for n in names}
    assert tops == {"diffusers_conceptexpress", wheel.name.split("-py3")[0] + ".dist-info"}
    for part in ("unet", "vae", "text_encoder", "classifier"):
        assert any(n.startswith(f"diffusers_conceptexpress/toyworld/model/{part}/") for n in names)
    assert "diffusers_conceptexpress/toyworld/model/model_index.json" in names
    assert "diffusers_conceptexpress/community/pipeline.py" in names  # the custom_pipeline entry
    # no training code of the toy world: its modules build no optimiser (the package's own optimisers are the
    # method's, learning.py, which learns token embeddings, and the optional LoRA phase's, lora.py)
    toyworld = {n: text for n, text in sources.items() if n.startswith("diffusers_conceptexpress/toyworld/")}
    assert "diffusers_conceptexpress/toyworld/scenes.py" in toyworld
    assert [n for n, text in toyworld.items() if "torch.optim" in text] == []
    assert sorted(n for n, text in sources.items() if "torch.optim" in text) == [
        "diffusers_conceptexpress/learning.py",
        "diffusers_conceptexpress/lora.py",
    ]
    assert not [n for n in names if n.endswith((".zip", ".npz", ".jsonl", ".png"))]
