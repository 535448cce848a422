"""The ``conceptexpress`` command line.

    conceptexpress localize IMAGE --model PATH_OR_ID --out DIR [--method conceptexpress|finch|kmeans ...]

Errors are one line on stderr and a non-zero exit; a failed run leaves no output directory behind.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import __version__

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _load_pipeline(model: str, device: str | None, dtype: str):
    from .pipeline import ConceptExpressPipeline

    pipe = ConceptExpressPipeline.from_pretrained(model, dtype=DTYPES[dtype])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return pipe.to(device)


def _save_localization(result, image, out: Path) -> None:
    from .image_io import load_image
    from .visualize import heatmap, overlay_masks

    source = load_image(image)
    names = [f"concept_{k}" for k in range(result.num_concepts)]
    for name, mask in zip(names, result.masks, strict=True):
        mask.save(out / f"mask_{name}.png")
    overlay_masks(source, result.masks, names).save(out / "overlay.png")
    heatmap(result.eot_map, source.size).save(out / "eot_map.png")
    summary = {
        "concepts": [
            {"name": n, "mask": f"mask_{n}.png", "eot_score": float(s), "pixels": int(m.sum())}
            for n, s, m in zip(names, result.eot_scores, result.latent_masks, strict=True)
        ],
        "level": result.level,
        "cluster_counts": result.cluster_counts,
        "notes": result.notes,
        "options": result.options,
        "image_size": list(result.resize.original_size),
        "model_size": list(result.resize.model_size),
        "version": __version__,
    }
    (out / "localization.json").write_text(json.dumps(summary, indent=2))


def cmd_localize(args: argparse.Namespace) -> int:
    from .atomic import atomic_directory
    from .image_io import load_image

    load_image(args.image)  # validate before loading any model
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(
            f"Output directory {str(out)!r} already exists; pass --overwrite or choose another."
        )
    options = {"method": args.method, "resize_policy": args.resize_policy}
    if args.num_concepts is not None:
        options["num_concepts"] = args.num_concepts
    if args.resolution is not None:
        options["resolution"] = args.resolution
    pipe = _load_pipeline(args.model, args.device, args.dtype)
    generator = torch.Generator().manual_seed(args.seed)
    result = pipe.localize_concepts(args.image, generator=generator, **options)
    with atomic_directory(out, overwrite=args.overwrite) as tmp:
        _save_localization(result, args.image, tmp)
    print(f"{result.num_concepts} concept(s) found; masks and overlay in {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conceptexpress", description="ConceptExpress for diffusers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    loc = sub.add_parser("localize", help="find the concepts of an image and write their masks")
    loc.add_argument("image", help="image file")
    loc.add_argument(
        "--model", required=True, help="diffusers folder or model id of a Stable Diffusion model"
    )
    loc.add_argument("--out", required=True, help="output directory (created; must not exist)")
    loc.add_argument("--method", default="conceptexpress", choices=["conceptexpress", "finch", "kmeans"])
    loc.add_argument("--num-concepts", type=int, default=None, help="K, for --method kmeans")
    loc.add_argument("--resize-policy", default="squash", choices=["squash", "keep_aspect"])
    loc.add_argument("--resolution", type=int, default=None, help="model input side in pixels")
    loc.add_argument("--seed", type=int, default=0)
    loc.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    loc.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    loc.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    loc.set_defaults(func=cmd_localize)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``conceptexpress`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("conceptexpress: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one clear line, no traceback
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"conceptexpress: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
