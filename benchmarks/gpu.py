"""Seconds and peak GPU memory of localization and of extraction per schedule, on random-weight SD-sized models.

    python benchmarks/gpu.py [--device cuda] [--families sd21,sdxl] [--dtypes fp16,bf16]
                             [--schedules fast,faithful,turbo] [--measure-steps 3] [--out PATH]
    python benchmarks/gpu.py --device cpu --tiny      # smoke mode: tiny models, 1 step per phase, 2 Sinkhorn
                                                      # iterations (a test runs it)

Families (``--families``):

- ``sd21``: SD-2.1-base-sized ``ConceptExpressPipeline`` at 512 px: the UNet of
  ``benchmarks/localization_memory.py`` (865 M parameters), an OpenCLIP-H-sized text encoder (23 layers,
  1024 wide), SD's VAE; random weights (fixed seed), built on the device; nothing is downloaded.
- ``sdxl``: SDXL-sized at 1024 px (UNet with ``text_time`` conditioning, two text encoders), through
  ``diffusers_conceptexpress.ConceptExpressXLPipeline``; a "not available" row when the package has none.

Per family, dtype and schedule: localization seconds (one ``localize_concepts``), and the extraction of K =
``--concepts`` (3) given masks with the schedule's own defaults. A full extraction (500 steps) would not fit
the 10 minutes this command is allowed, so the extraction runs ``--measure-steps`` steps of each phase (split,
then merged), times every step (the callback synchronises the device), and extrapolates: seconds = overhead
(everything outside the steps) + the schedule's split steps x the mean split step + its merged steps x the
mean merged step (the first step of each phase is left out of the means when there are two or more). The
table says which figures are measured and which extrapolated. Peak memory is
``torch.cuda.max_memory_allocated`` per case (none on a CPU). Random weights give meaningless concepts; only
the time and memory count. Writes JSON to ``--out`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import diffusers_conceptexpress as ce
from diffusers_conceptexpress.learning import SCHEDULES, LearningConfig
from diffusers_conceptexpress.toyworld import model_path
from diffusers_conceptexpress.toyworld.tokenizer import build_tokenizer

FAMILIES = ("sd21", "sdxl")
DTYPES = {"fp32": (torch.float32, "no"), "fp16": (torch.float16, "fp16"), "bf16": (torch.bfloat16, "bf16")}
DEFAULT_OUT = Path("benchmarks/results/gpu.json")
XL_PIPELINE = "ConceptExpressXLPipeline"


def _sd21_unet_config() -> dict:
    sys.path.append(str(Path(__file__).resolve().parent))
    from localization_memory import UNET_CONFIG  # the SD-2.1-base UNet shape, one literal for both scripts

    return dict(UNET_CONFIG)


def _text_config(
    tokenizer, vocab: int, width: int, layers: int, heads: int, act: str, projection: int
) -> CLIPTextConfig:
    """A CLIP text encoder's config with ``vocab`` rows; the special token ids are ``tokenizer``'s."""
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection,
    )


def _vae(tiny: bool, sample_size: int) -> AutoencoderKL:
    channels = (16, 32) if tiny else (128, 256, 512, 512)
    return AutoencoderKL(
        block_out_channels=channels,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        latent_channels=4,
        layers_per_block=1 if tiny else 2,
        norm_num_groups=8 if tiny else 32,
        sample_size=sample_size,
    )


def _scheduler() -> DDIMScheduler:
    """SD's DDIM settings, as the shipped toy model has them (scaled-linear betas, epsilon)."""
    return DDIMScheduler.from_pretrained(model_path(), subfolder="scheduler")


def build_sd21(tiny: bool, workdir: Path) -> tuple[object, int]:
    """A random-weight SD-2.1-base-sized pipeline (tiny: a few MB) and its resolution (512; tiny 32)."""
    tokenizer = build_tokenizer(workdir / "tokenizer")
    if tiny:
        unet = UNet2DConditionModel(
            sample_size=16,
            block_out_channels=(32, 32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4, 8),
            use_linear_projection=True,
            norm_num_groups=8,
        )
        text = CLIPTextModel(_text_config(tokenizer, len(tokenizer), 32, 2, 2, "gelu", 32))
    else:
        unet = UNet2DConditionModel(**_sd21_unet_config())
        text = CLIPTextModel(_text_config(tokenizer, 49408, 1024, 23, 16, "gelu", 512))
    resolution = 32 if tiny else 512
    pipe = ce.ConceptExpressPipeline(
        vae=_vae(tiny, resolution), text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=_scheduler()
    )
    return pipe, resolution


def build_sdxl(tiny: bool, workdir: Path) -> tuple[object, int]:
    """A random-weight SDXL-sized pipeline (tiny: a few MB) and its resolution (1024; tiny 32)."""
    xl = getattr(ce, XL_PIPELINE)
    tokenizer = build_tokenizer(workdir / "tokenizer")
    tokenizer_2 = build_tokenizer(workdir / "tokenizer_2")
    if tiny:
        widths, layers, heads = (32, 64), (1, 2), (2, 4)
        text = CLIPTextModel(_text_config(tokenizer, len(tokenizer), 32, 2, 2, "quick_gelu", 32))
        text_2 = CLIPTextModelWithProjection(
            _text_config(tokenizer_2, len(tokenizer_2), 32, 2, 2, "gelu", 32)
        )
        cross, time_dim = 64, 8
        blocks = ("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")
    else:
        widths, layers, heads = (320, 640, 1280), (1, 2, 10), (5, 10, 20)
        text = CLIPTextModel(_text_config(tokenizer, 49408, 768, 12, 12, "quick_gelu", 768))
        text_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, 49408, 1280, 32, 20, "gelu", 1280))
        cross, time_dim = 2048, 256
        blocks = (
            ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        )
    projection = text_2.config.projection_dim + 6 * time_dim
    unet = UNet2DConditionModel(
        sample_size=16 if tiny else 128,
        block_out_channels=widths,
        layers_per_block=1 if tiny else 2,
        down_block_types=blocks[0],
        up_block_types=blocks[1],
        transformer_layers_per_block=layers,
        attention_head_dim=heads,
        cross_attention_dim=cross,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=projection,
        norm_num_groups=8 if tiny else 32,
    )
    resolution = 32 if tiny else 1024
    pipe = xl(
        vae=_vae(tiny, resolution),
        text_encoder=text,
        text_encoder_2=text_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler(),
    )
    return pipe, resolution


BUILDERS = {"sd21": build_sd21, "sdxl": build_sdxl}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def test_image(resolution: int, concepts: int) -> tuple[PIL.Image.Image, list[np.ndarray]]:
    """A random image and ``concepts`` disjoint vertical-band masks at ``resolution`` (at least 64 px, the
    smallest input the pipeline takes; it resizes to the model's resolution)."""
    resolution = max(resolution, 64)
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8))
    masks = []
    for k in range(concepts):
        m = np.zeros((resolution, resolution), dtype=bool)
        m[
            resolution // 8 : -resolution // 8, k * resolution // concepts : (k + 1) * resolution // concepts
        ] = True
        masks.append(m)
    return image, masks


def time_localization(pipe, image, device: torch.device) -> dict:
    _reset_peak(device)
    _sync(device)
    t0 = time.perf_counter()
    loc = pipe.localize_concepts(image, generator=torch.Generator().manual_seed(0))
    _sync(device)
    return {"seconds": time.perf_counter() - t0, "peak_mib": _peak_mib(device), "concepts": len(loc.masks)}


def time_extraction(
    pipe, image, masks, device, schedule: str, precision: str, measure_steps: int, **options
) -> dict:
    """``measure_steps`` steps of each phase of ``schedule``, timed per step, and the full run extrapolated."""
    full = LearningConfig(schedule=schedule)
    split = min(measure_steps, full.split_steps)
    stamps: list[float] = []

    def on_step(step, total, logs):
        _sync(device)
        stamps.append(time.perf_counter())

    _reset_peak(device)
    _sync(device)
    t0 = time.perf_counter()
    out = pipe.extract_concepts(
        image,
        masks=masks,
        schedule=schedule,
        num_train_steps=split + measure_steps,
        split_steps=split,
        mixed_precision=precision,
        generator=torch.Generator().manual_seed(0),
        callback=on_step,
        load=False,
        **options,
    )
    _sync(device)
    total = time.perf_counter() - t0
    first = stamps[0] - t0  # the first step plus the preparation before it
    steps = np.diff([t0, *stamps])
    split_times, merged_times = steps[:split], steps[split:]

    def mean(x):
        return float(np.mean(x[1:] if len(x) > 1 else x)) if len(x) else 0.0

    step_sum = float(steps.sum())
    overhead = max(0.0, total - step_sum)
    if len(split_times) > 1:  # the first step's warm-up beyond a typical step counts as overhead
        overhead += first - mean(split_times)
    full_seconds = (
        overhead
        + full.split_steps * mean(split_times)
        + (full.num_train_steps - full.split_steps) * mean(merged_times)
    )
    return {
        "measured_steps": len(steps),
        "measured_seconds": total,
        "split_step_seconds": mean(split_times),
        "merged_step_seconds": mean(merged_times),
        "overhead_seconds": overhead,
        "full_steps": full.num_train_steps,
        "full_unet_samples": full.num_unet_samples(len(masks)),
        "extrapolated_seconds": full_seconds,
        "peak_mib": _peak_mib(device),
        "concepts": out.num_concepts,
    }


def run(args) -> dict:
    device = torch.device(args.device)
    smoke = {"sinkhorn_iters": 2} if args.tiny else {}  # smoke mode: the code path, not the figures
    rows = []
    for family in args.families.split(","):
        if family == "sdxl" and not hasattr(ce, XL_PIPELINE):
            line = (
                f"sdxl: not available (diffusers_conceptexpress.{XL_PIPELINE} does not exist in this version)"
            )
            print(line, file=sys.stderr, flush=True)
            rows.append({"family": family, "status": "not available", "note": line})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            with torch.device(device):  # random weights made on the device: seconds, not minutes
                pipe, resolution = BUILDERS[family](args.tiny, Path(tmp))
        pipe.set_progress_bar_config(disable=True)
        image, masks = test_image(resolution, args.concepts)
        for name in args.dtypes.split(","):
            dtype, precision = DTYPES[name]
            pipe.to(device, dtype)
            row = {"family": family, "dtype": name, "resolution": resolution, "status": "measured"}
            try:
                row["localization"] = time_localization(pipe, image, device)
                for schedule in args.schedules.split(","):
                    row[schedule] = time_extraction(
                        pipe, image, masks, device, schedule, precision, args.measure_steps, **smoke
                    )
                    print(f"{family} {name} {schedule}: {row[schedule]}", file=sys.stderr, flush=True)
            except Exception as err:  # a case that fails is a row that says why, not a lost run
                row["status"] = f"failed: {type(err).__name__}: {err}"[:300]
            rows.append(row)
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows}


def markdown(rows: list[dict], schedules: list[str]) -> str:
    head = ["family", "dtype", "localization s (peak MiB)"]
    head += [f"{s}: s for K = 3, extrapolated from measured steps (peak MiB)" for s in schedules]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["status"] != "measured":
            lines.append(f"| {r['family']} | {r.get('dtype', '-')} | {r['status']} |" + " |" * len(schedules))
            continue

        def cell(d):
            peak = "-" if d["peak_mib"] is None else f"{d['peak_mib']:.0f}"
            seconds = d["extrapolated_seconds"] if "extrapolated_seconds" in d else d["seconds"]
            return f"{seconds:.1f} ({peak})"

        cells = [cell(r["localization"]), *(cell(r[s]) for s in schedules)]
        lines.append(f"| {r['family']} | {r['dtype']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models (smoke mode, seconds on a CPU)")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument(
        "--dtypes", default=None, help="of fp32, fp16, bf16 (default: fp16,bf16; fp32 on cpu)"
    )
    parser.add_argument("--schedules", default=",".join(SCHEDULES))
    parser.add_argument("--concepts", type=int, default=3)
    parser.add_argument(
        "--measure-steps", type=int, default=None, help="steps timed per phase (default 3; --tiny: 1)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.measure_steps is None:
        args.measure_steps = 1 if args.tiny else 3
    if args.dtypes is None:
        args.dtypes = "fp32" if args.device == "cpu" else "fp16,bf16"
    bad = [f for f in args.families.split(",") if f not in FAMILIES]
    bad += [d for d in args.dtypes.split(",") if d not in DTYPES]
    bad += [s for s in args.schedules.split(",") if s not in SCHEDULES]
    if bad:
        parser.error(
            f"unknown value(s) {bad}: families {FAMILIES}, dtypes {tuple(DTYPES)}, schedules {SCHEDULES}"
        )
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; pass --device cpu (with --tiny for a smoke run)")
    t0 = time.perf_counter()
    result = run(args)
    result["header"] = {
        "command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else platform.machine(),
        "torch": torch.__version__,
        "tiny": args.tiny,
        "measure_steps": args.measure_steps,
        "seconds": time.perf_counter() - t0,
    }
    print(markdown(result["rows"], args.schedules.split(",")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
