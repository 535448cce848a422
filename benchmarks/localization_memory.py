"""Peak memory (RSS) of concept localization versus a plain UNet forward, on CPU.

What is measured, at ``--resolution`` pixels (default 512: latent 4 x 64 x 64), batch 1, float32, CPU,
under ``torch.no_grad()``, on an SD-2.1-base-sized ``UNet2DConditionModel`` with random weights (built from
the config literal :data:`UNET_CONFIG`, fixed torch seed; nothing is downloaded):

(a) ``plain``: ONE UNet forward at timestep 0 with random ``encoder_hidden_states`` (1, 77, 1024) and the
    default attention processors (SDPA).
(b) ``localize``: the same forward inside :func:`~diffusers_conceptexpress.capture_attention` with
    ``AttentionRecorder((h, w), cross_token_indices=[1])`` (defaults otherwise), then aggregation
    (``recorder.self_attention(release=True)[0]`` and the [EOT] map ``recorder.cross_attention(4)[0, 0]``)
    and clustering (``localize(attention, (h, w), eot_map, LocalizationConfig())``), chained as in
    ``ConceptExpressPipeline.localize_concepts``.

How: every case runs in its own fresh subprocess (this script re-invoked with ``sys.executable`` and
``--case``), so one case's allocations never count for the other. In the child the UNet is built, then
``gc.collect()`` runs and the RSS "after build" is read. The peak is reported two ways:

- ``ru_maxrss``: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end of the child, the kernel's exact
  high-water mark of the whole process (so it includes the build; its value right after the build is
  reported too, to show whether the build or the measured phase set it);
- ``sampled``: the largest RSS seen by a psutil thread sampling every 10 ms during the measured phases
  (it can miss spikes shorter than the interval), also broken down per phase: ``forward``,
  ``aggregation`` (normalisation of the self-attention sum + [EOT] map) and ``clustering``.

The parent prints a table and the difference "(b) peak - (a) peak", checks the acceptance criterion
((b) peak at most 300 MiB above (a) peak, on ``ru_maxrss``; on the sampled peak if the build set
``ru_maxrss``) and writes everything as JSON to ``--out``. MiB = 2**20 bytes.

RSS also counts memory that was freed but that the C allocator (glibc malloc) keeps for reuse, so peaks vary
from run to run by a few hundred MiB; run it several times. Setting the environment variable
``MALLOC_MMAP_THRESHOLD_=131072`` (inherited by both cases) makes glibc return every large block on free,
which brings RSS close to the memory actually in use.

SDXL (``--model sdxl``, default resolution 1024: latent 4 x 128 x 128): an SDXL-base-sized UNet
(:data:`SDXL_UNET_CONFIG`, 2.6 G parameters, ~9.6 GiB in float32), ``encoder_hidden_states`` (1, 77, 2048) and
the added conditioning (``text_embeds`` (1, 1280), ``time_ids`` (1, 6)). The recorder aggregates on the UNet's
finest attention grid (``grid=``, 64 x 64 at 1024 px) and clustering runs there, as in
``ConceptExpressXLPipeline``. ``--dtype bfloat16`` builds the UNet in bfloat16 (half the RAM; the recorder's
running sum stays float32).

Usage::

    python benchmarks/localization_memory.py [--model sd|sdxl] [--resolution 512] [--threads N] [--out PATH]

Needs ``psutil``. Needs about 5 GB of RAM per case at 512 px (the UNet alone is ~3.3 GiB in float32);
the two cases run one after the other, never at the same time.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import psutil

MIB = 2**20
CRITERION_MIB = 300.0
EOT_FACTOR = 4
DEFAULT_OUT = Path("benchmarks/results/localization_memory.json")

# SD 2.1-base UNet shape (diffusers' "attention_head_dim" is the head COUNT per block for SD 2.x).
UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
}
TEXT_LEN = 77

# SDXL-base UNet shape (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json).
SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
MODELS = {"sd": (UNET_CONFIG, 512), "sdxl": (SDXL_UNET_CONFIG, 1024)}

CASES = {
    "plain": "(a) plain UNet forward (SDPA)",
    "localize": "(b) capture + aggregation + clustering",
}


# --------------------------------------------------------------------------------------------- child side
def _maxrss_mib() -> float:
    """``ru_maxrss`` of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class RssSampler(threading.Thread):
    """Background thread sampling this process's RSS every ``interval`` seconds, peak kept per phase."""

    def __init__(self, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self._proc = psutil.Process()
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self.phase: str | None = None
        self.peaks: dict[str, int] = {}
        self.starts: dict[str, int] = {}
        self.samples = 0

    def sample(self) -> int:
        rss = self._proc.memory_info().rss
        with self._lock:
            self.samples += 1
            if self.phase is not None:
                self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
        return rss

    def enter(self, phase: str | None) -> None:
        """Close the current phase (one last sample) and open ``phase`` (one first sample)."""
        self.sample()
        with self._lock:
            self.phase = phase
        rss = self.sample()
        if phase is not None:
            self.starts[phase] = rss

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self.enter(None)
        self._halt.set()
        self.join()


def run_case(
    case: str,
    resolution: int,
    threads: int | None,
    chunk_bytes: int | None = None,
    model: str = "sd",
    dtype: str = "float32",
) -> dict:
    """Measure one case in THIS process and return the numbers (MiB, seconds)."""
    import torch
    from diffusers import UNet2DConditionModel

    from diffusers_conceptexpress import AttentionRecorder, LocalizationConfig, capture_attention, localize
    from diffusers_conceptexpress.attention import grid_at_factor, unet_attention_factors

    config = MODELS[model][0]
    torch_dtype = getattr(torch, dtype)

    if threads is not None:
        torch.set_num_threads(threads)
    lat = resolution // 8
    proc = psutil.Process()

    torch.manual_seed(0)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel(**config).eval().to(torch_dtype)
    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, config["in_channels"], lat, lat, generator=gen).to(torch_dtype)
    text = torch.randn(1, TEXT_LEN, config["cross_attention_dim"], generator=gen).to(torch_dtype)
    inputs: dict = {"encoder_hidden_states": text}
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, generator=gen).to(torch_dtype),
            "time_ids": torch.tensor(
                [[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch_dtype
            ),
        }
    grid = grid_at_factor((lat, lat), min(unet_attention_factors(unet)))
    timestep = torch.tensor([0])
    gc.collect()
    rss_build = proc.memory_info().rss / MIB
    maxrss_build = _maxrss_mib()

    sampler = RssSampler(0.01)
    sampler.start()
    seconds: dict[str, float] = {}
    extra: dict = {}
    with torch.no_grad():
        sampler.enter("forward")
        t0 = time.perf_counter()
        if case == "plain":
            unet(latents, timestep, **inputs)
            seconds["forward"] = time.perf_counter() - t0
        else:
            recorder = AttentionRecorder(
                (lat, lat),
                cross_token_indices=[1],
                grid=grid,
                **({} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}),
            )
            with capture_attention(unet, recorder):
                unet(latents, timestep, **inputs)
            seconds["forward"] = time.perf_counter() - t0

            sampler.enter("aggregation")
            t0 = time.perf_counter()
            attention = recorder.self_attention(release=True)[0]
            eot_map = recorder.cross_attention(EOT_FACTOR)[0, 0]
            recorder.reset()
            seconds["aggregation"] = time.perf_counter() - t0

            sampler.enter("clustering")
            t0 = time.perf_counter()
            result = localize(attention, grid, eot_map, LocalizationConfig())
            seconds["clustering"] = time.perf_counter() - t0
            extra = {
                "attention_shape": list(attention.shape),
                "eot_map_shape": list(eot_map.shape),
                "num_concepts": int(result.masks.shape[0]),
                "cluster_counts": result.cluster_counts,
                "level": result.level,
                "merge_counts": result.merge_counts,
            }
            del attention, result
    sampler.stop()
    maxrss = _maxrss_mib()
    sampled = max(sampler.peaks.values()) / MIB

    phases = {
        name: {
            "seconds": round(seconds[name], 3),
            "rss_start_mib": round(sampler.starts[name] / MIB, 1),
            "sampled_peak_mib": round(sampler.peaks[name] / MIB, 1),
            "sampled_peak_above_build_mib": round(sampler.peaks[name] / MIB - rss_build, 1),
        }
        for name in seconds
    }
    return {
        "case": case,
        "description": CASES[case],
        "model": model,
        "dtype": dtype,
        "resolution": resolution,
        "latent": [1, config["in_channels"], lat, lat],
        "aggregation_grid": list(grid),
        "torch_threads": torch.get_num_threads(),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "build_seconds": round(build_s, 2),
        "rss_after_build_mib": round(rss_build, 1),
        "ru_maxrss_after_build_mib": round(maxrss_build, 1),
        "ru_maxrss_mib": round(maxrss, 1),
        "ru_maxrss_above_build_mib": round(maxrss - rss_build, 1),
        "ru_maxrss_set_by_build": maxrss <= maxrss_build,
        "sampled_peak_mib": round(sampled, 1),
        "sampled_peak_above_build_mib": round(sampled - rss_build, 1),
        "rss_samples": sampler.samples,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "phases": phases,
        **extra,
    }


# -------------------------------------------------------------------------------------------- parent side
def chunk_kwargs(args: argparse.Namespace) -> dict:
    """Recorder keyword arguments for --chunk-mib (none: the library default)."""
    return {} if args.chunk_mib is None else {"chunk_bytes": int(args.chunk_mib * 2**20)}


def spawn_case(case: str, args: argparse.Namespace) -> dict:
    """Run one case in a fresh interpreter; its JSON is the last line of its stdout."""
    cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--resolution", str(args.resolution)]
    cmd += ["--model", args.model, "--dtype", args.dtype]
    if args.chunk_mib is not None:
        cmd += ["--chunk-mib", str(args.chunk_mib)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    print(f"running {CASES[case]} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"case {case!r} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows: list[list[str]], header: list[str]) -> str:
    """A Markdown table (also readable in a terminal)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def report(results: dict[str, dict]) -> tuple[str, dict]:
    """The printed report and the summary (differences, criterion)."""
    a, b = results["plain"], results["localize"]
    rows = []
    for r in (a, b):
        secs = r["seconds"]
        post = secs.get("aggregation", 0.0) + secs.get("clustering", 0.0)
        rows.append(
            [
                r["description"],
                f"{r['rss_after_build_mib']:.0f}",
                f"{r['ru_maxrss_mib']:.0f}",
                f"{r['sampled_peak_mib']:.0f}",
                f"{r['ru_maxrss_above_build_mib']:.0f}",
                f"{r['sampled_peak_above_build_mib']:.0f}",
                f"{secs['forward']:.1f}",
                f"{post:.1f}" if "aggregation" in secs else "-",
            ]
        )
    main = _table(
        rows,
        [
            "case",
            "RSS after build (MiB)",
            "peak RSS, ru_maxrss (MiB)",
            "peak RSS, sampled (MiB)",
            "ru_maxrss - after build (MiB)",
            "sampled - after build (MiB)",
            "forward (s)",
            "aggregation + clustering (s)",
        ],
    )
    phase_rows = [
        [
            r["description"][:3],
            name,
            f"{p['seconds']:.2f}",
            f"{p['rss_start_mib']:.0f}",
            f"{p['sampled_peak_mib']:.0f}",
            f"{p['sampled_peak_above_build_mib']:.0f}",
        ]
        for r in (a, b)
        for name, p in r["phases"].items()
    ]
    phases = _table(
        phase_rows,
        ["case", "phase", "seconds", "RSS at start (MiB)", "sampled peak (MiB)", "peak - after build (MiB)"],
    )
    diff_max = b["ru_maxrss_mib"] - a["ru_maxrss_mib"]
    diff_sampled = b["sampled_peak_mib"] - a["sampled_peak_mib"]
    diff_above = b["ru_maxrss_above_build_mib"] - a["ru_maxrss_above_build_mib"]
    dominant = max(b["phases"], key=lambda n: b["phases"][n]["sampled_peak_mib"])
    build_set = [r["case"] for r in (a, b) if r["ru_maxrss_set_by_build"]]
    # ru_maxrss is exact; the sampled peak can miss short spikes, so it only decides when the build set
    # ru_maxrss (then ru_maxrss says nothing about the measured phases).
    judged_on = "sampled" if build_set else "ru_maxrss"
    passed = (diff_sampled if build_set else diff_max) <= CRITERION_MIB
    summary = {
        "b_minus_a_ru_maxrss_mib": round(diff_max, 1),
        "b_minus_a_sampled_peak_mib": round(diff_sampled, 1),
        "b_minus_a_above_build_ru_maxrss_mib": round(diff_above, 1),
        "criterion": f"(b) peak - (a) peak <= {CRITERION_MIB:.0f} MiB",
        "criterion_judged_on": judged_on,
        "criterion_passed": passed,
        "dominant_phase_of_b": dominant,
        "ru_maxrss_set_by_build_in": build_set,
    }
    lines = [
        main,
        "",
        "Per phase (sampled every 10 ms):",
        phases,
        "",
        f"(b) peak - (a) peak: {diff_max:+.0f} MiB (ru_maxrss), {diff_sampled:+.0f} MiB (sampled); "
        f"peak above after-build RSS, (b) - (a): {diff_above:+.0f} MiB",
        f"criterion {summary['criterion']}, judged on {judged_on}: {'PASS' if passed else 'FAIL'}; "
        f"(b)'s highest phase: {dominant} ({b['phases'][dominant]['sampled_peak_mib']:.0f} MiB sampled)",
    ]
    if build_set:
        lines.append(
            f"note: in {build_set} ru_maxrss was already reached during the build, so it says nothing "
            "about the measured phases there; use the sampled peak."
        )
    if "num_concepts" in b:
        lines.append(
            f"(b) localization: attention {b['attention_shape']}, EOT map {b['eot_map_shape']}, FINCH levels "
            f"{b['cluster_counts']} (level {b['level']}), {b['num_concepts']} concept(s) (random weights)."
        )
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", choices=sorted(MODELS), default="sd", help="UNet shape: SD 2.1-base or SDXL-base"
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="image side in pixels (default 512 for sd, 1024 for sdxl)",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads in each case (default: torch's)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"JSON output (default {DEFAULT_OUT}, _sdxl for sdxl)"
    )
    parser.add_argument(
        "--chunk-mib",
        type=float,
        default=None,
        help="AttentionRecorder chunk_bytes in MiB (default: the library's)",
    )
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)  # internal: child mode
    args = parser.parse_args(argv)
    if args.resolution is None:
        args.resolution = MODELS[args.model][1]
    if args.out is None:
        args.out = (
            DEFAULT_OUT
            if args.model == "sd"
            else DEFAULT_OUT.with_name(f"localization_memory_{args.model}.json")
        )
    if args.resolution <= 0 or args.resolution % 64:
        parser.error(
            f"--resolution must be a positive multiple of 64 (VAE 8 x UNet 8), got {args.resolution}"
        )

    if args.case is not None:
        print(
            json.dumps(
                run_case(
                    args.case,
                    args.resolution,
                    args.threads,
                    chunk_kwargs(args).get("chunk_bytes"),
                    model=args.model,
                    dtype=args.dtype,
                )
            ),
            flush=True,
        )
        return

    results = {case: spawn_case(case, args) for case in CASES}  # one after the other, never in parallel
    text, summary = report(results)
    print(text)
    payload = {
        "benchmark": "localization_memory",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "memory_total_mib": round(psutil.virtual_memory().total / MIB),
            "python": platform.python_version(),
            "torch": metadata.version("torch"),
            "diffusers": metadata.version("diffusers"),
        },
        "model": args.model,
        "dtype": args.dtype,
        "unet_config": MODELS[args.model][0],
        "resolution": args.resolution,
        "threads_requested": args.threads,
        "mib": MIB,
        "cases": results,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
