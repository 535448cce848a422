"""benchmarks/gpu.py in its smoke mode (``--device cpu --tiny``): every schedule runs and its figures add up."""

from __future__ import annotations

import json

import diffusers_conceptexpress as ce
from benchmark_scripts import load_benchmark
from diffusers_conceptexpress.learning import SCHEDULES, LearningConfig


def test_gpu_benchmark_smoke_mode_on_cpu(tmp_path, capsys):
    gpu = load_benchmark("gpu")
    out = tmp_path / "gpu.json"
    result = gpu.main(["--device", "cpu", "--tiny", "--concepts", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {r["family"]: r for r in result["rows"]}
    sd21 = rows["sd21"]
    assert sd21["status"] == "measured" and sd21["dtype"] == "fp32"
    assert sd21["localization"]["seconds"] > 0
    for schedule in SCHEDULES:
        r = sd21[schedule]
        full = LearningConfig(schedule=schedule)
        assert r["measured_steps"] == 2 and r["concepts"] == 1
        assert (r["full_steps"], r["full_unet_samples"]) == (full.num_train_steps, full.num_unet_samples(1))
        # the extrapolation covers every step of the full schedule
        assert r["extrapolated_seconds"] >= full.num_train_steps * min(
            r["split_step_seconds"], r["merged_step_seconds"]
        )
    table = capsys.readouterr().out
    if hasattr(ce, "ConceptExpressXLPipeline"):
        assert rows["sdxl"]["status"] == "measured", rows["sdxl"]["status"]
    else:  # the SDXL case says why it has no figures
        assert rows["sdxl"]["status"] == "not available"
        assert "| sdxl | - | not available |" in table
