"""The benchmark scripts' helpers (``benchmarks/``): records, claims, tables."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from benchmark_scripts import load_benchmark

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


@pytest.mark.parametrize("variant", ["fast, our masks", "faithful, GT masks"])
def test_committed_records_of_the_shipped_model_are_complete_archives(variant):
    bench = load_benchmark("toyworld")
    archive = bench._archive_path(ROOT / bench.RECORDS / "af8cbffd8300", variant)
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
    seeds = {n.split("/")[0] for n in names}
    assert seeds == {str(20_000 + i) for i in range(50)}
    assert all(f"{s}/result.json" in names and f"{s}/masks.npz" in names for s in seeds)
