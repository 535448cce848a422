"""Atomic outputs: complete or absent, never half written, with the permissions of an ordinary write."""

from __future__ import annotations

import os
import stat

import pytest

from diffusers_conceptexpress.atomic import atomic_directory, atomic_file


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_file_appears_complete_with_ordinary_permissions(tmp_path, umask_022):
    target = tmp_path / "sub" / "concepts.safetensors"
    with atomic_file(target, "wb") as handle:
        handle.write(b"abc")
        assert not target.exists()  # nothing at the final path while writing
    assert target.read_bytes() == b"abc"
    assert _mode(target) == 0o644  # what open(..., "wb") gives under umask 022, not mkstemp's 0600
    assert sorted(p.name for p in target.parent.iterdir()) == ["concepts.safetensors"]


def test_interrupted_atomic_file_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "concepts.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_file(target, "w") as handle:
        handle.write("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["concepts.json"]


def test_atomic_directory_refuses_overwrite_replaces_and_survives_errors(tmp_path, umask_022):
    out = tmp_path / "run"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (out / "a.txt").read_text() == "1" and _mode(out) == 0o755
    with pytest.raises(FileExistsError, match="already exists"), atomic_directory(out):
        pytest.fail("the body must not run when the directory exists")
    with pytest.raises(RuntimeError), atomic_directory(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]  # the old run, untouched
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temp or .old leftovers


def test_saved_concepts_get_ordinary_permissions(tmp_path, umask_022):
    import torch
    from PIL import Image

    from diffusers_conceptexpress.export import save_concepts

    masks = [Image.new("L", (8, 8)), Image.new("L", (8, 8), 255)]
    save_concepts(tmp_path / "run", torch.randn(2, 4), masks=masks, base_model="tiny")
    files = sorted((tmp_path / "run").iterdir())
    assert {f.name for f in files} >= {"concepts.safetensors", "concept_1.safetensors", "concepts.json"}
    assert {f.name: _mode(f) for f in files} == {f.name: 0o644 for f in files}  # none owner-only
