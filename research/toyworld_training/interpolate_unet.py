"""A toy model whose UNet is a weight interpolation of two UNets of the same architecture (WiSE-FT).

    python -m research.toyworld_training.interpolate_unet --base MODEL_DIR --other UNET_DIR --alpha 0.5 \
        --out OUT_DIR

writes a copy of the ``--base`` model folder whose UNet weights are ``(1 - alpha) * base + alpha * other``
(``alpha`` 0 gives the base, 1 the other). The two UNets must share every weight name and shape: ``--other``
is meant to be a fine-tune of ``--base`` (a trial's EMA snapshot), so both lie in one basin and the straight
line between them stays a working model (Wortsman et al., "Robust fine-tuning of zero-shot models", 2022).
Sessions 25-26 (docs/toyworld.md, "Twentieth run") use it to keep the eleventh model's colours while taking
part of the shape-contrast trial's shapes: the shipped UNet mixes the eleventh model's UNet
(``research/rebuild/v11_unet``) and that trial's step-386 snapshot (``research/rebuild/v13_rerun_step386``)
at alpha 0.5, which ``research/recipes/rebuild_shipped_unet.sh`` rebuilds bit for bit (a test checks it too).
It also runs as a script: ``python research/toyworld_training/interpolate_unet.py``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from diffusers_conceptexpress.atomic import atomic_directory, atomic_file

WEIGHTS = "diffusion_pytorch_model.safetensors"


def interpolate(base: dict[str, torch.Tensor], other: dict[str, torch.Tensor], alpha: float) -> dict:
    """``(1 - alpha) * base + alpha * other`` for every weight; raises ValueError on mismatched UNets."""
    if set(base) != set(other):
        missing = sorted(set(base) ^ set(other))[:5]
        raise ValueError(
            f"the two UNets do not share their weight names (e.g. {missing}); same architecture?"
        )
    out = {}
    for name, a in base.items():
        b = other[name]
        if a.shape != b.shape:
            raise ValueError(f"weight {name!r} has shape {tuple(a.shape)} and {tuple(b.shape)}")
        out[name] = torch.lerp(a.float(), b.float(), alpha).to(a.dtype).contiguous()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base", type=Path, required=True, help="model folder (model_index.json, unet/, ...)"
    )
    parser.add_argument("--other", type=Path, required=True, help="UNet folder (config.json + weights)")
    parser.add_argument("--alpha", type=float, required=True, help="share of --other, in [0, 1]")
    parser.add_argument("--out", type=Path, required=True, help="new model folder (must not exist)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha must lie in [0, 1], got {args.alpha}")
    if args.out.exists():
        parser.error(f"--out {args.out} exists; choose a new folder")
    for path in (args.base / "unet" / WEIGHTS, args.other / WEIGHTS):
        if not path.is_file():
            parser.error(f"no UNet weights at {path}")
    weights = interpolate(
        load_file(args.base / "unet" / WEIGHTS), load_file(args.other / WEIGHTS), args.alpha
    )
    with atomic_directory(args.out) as tmp:
        shutil.copytree(args.base, tmp, dirs_exist_ok=True)
        with atomic_file(tmp / "unet" / WEIGHTS) as handle:
            handle.write(save(weights, metadata={"format": "pt"}))
    print(f"wrote {args.out} (alpha {args.alpha} of {args.other})")


if __name__ == "__main__":
    main()
