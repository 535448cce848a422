"""The ``conceptexpress`` command line.

    conceptexpress extract IMAGE --model PATH_OR_ID --out DIR [--steps N --schedule fast|faithful|turbo --seed S ...]
    conceptexpress extract IMAGE --model PATH_OR_ID --out DIR --lora-rank 4        # + the LoRA phase (lora.py)
    conceptexpress extract IMAGE [IMAGE ...] (files, folders, globs) --model PATH_OR_ID --out DIR   # DIR/<name>/
    torchrun --nproc_per_node N -m diffusers_conceptexpress extract ...        # the images split between processes
    conceptexpress generate --concepts DIR --model PATH_OR_ID --prompt "a photo of <ce>_1 in the snow"
    conceptexpress localize IMAGE --model PATH_OR_ID --out DIR [--method conceptexpress|finch|kmeans ...]
    conceptexpress evaluate RESULTS_DIR [--encoder clip|dino|toy --model ID] [--samples N --pipeline PATH_OR_ID]
    conceptexpress demo [--out DIR]
    conceptexpress serve [--model PATH_OR_ID] [--host 127.0.0.1] [--port 7860]    (needs the [web] extra)

Errors are one line on stderr and a non-zero exit; a failed run leaves no output directory behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from . import __version__
from .evaluation import ENCODERS, sample_grid
from .image_io import RESIZE_POLICIES
from .learning import MIXED_PRECISION, SCHEDULE_DEFAULTS, SCHEDULES, LearningConfig
from .localization import LOCALIZERS, LocalizationConfig
from .tokens import DEFAULT_TOKEN_PREFIX

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Generation settings of the sample grid, `generate` and `evaluate` unless flags say otherwise.
INFERENCE_STEPS = 50
GUIDANCE = 7.5


def _default(config: type, name: str):
    """The default of option ``name`` of a config dataclass (one source of truth for the flags' defaults)."""
    return next(f.default for f in dataclasses.fields(config) if f.name == name)


def _load_pipeline(model: str, device: str | None, dtype: str):
    """The pipeline class of the model's family (from its ``model_index.json``: SDXL or SD), loaded."""
    from .pipeline import ConceptExpressPipeline
    from .pipeline_mixin import local_model_family
    from .pipeline_xl import ConceptExpressXLPipeline

    cls = ConceptExpressXLPipeline if local_model_family(model) == "sdxl" else ConceptExpressPipeline
    pipe = cls.from_pretrained(model, dtype=DTYPES[dtype])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return pipe.to(device)


def _save_localization(result, image, out: Path) -> None:
    from .export import mask_filename
    from .image_io import load_image
    from .visualize import heatmap, overlay_masks

    source = load_image(image)
    names = [f"concept_{k}" for k in range(1, result.num_concepts + 1)]
    for k, mask in enumerate(result.masks, start=1):
        mask.save(out / mask_filename(k))
    overlay_masks(source, result.masks, names).save(out / "overlay.png")
    heatmap(result.eot_map, source.size).save(out / "eot_map.png")
    summary = {
        "concepts": [
            {"name": n, "mask": mask_filename(k), "eot_score": float(s), "pixels": int(m.sum())}
            for k, (n, s, m) in enumerate(
                zip(names, result.eot_scores, result.latent_masks, strict=True), start=1
            )
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
    _check_new_dir(out, args.overwrite)
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


def _check_new_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"Output directory {str(out)!r} already exists; pass --overwrite or choose another."
        )


def is_many_images(images: list[str], many: bool = False) -> bool:
    """Whether ``conceptexpress extract`` writes the many-images layout (``OUT/<name>/`` per image and
    ``OUT/index.json``): with ``--many``, several arguments, a folder or a glob. ONE image file (or one path
    that does not exist and is no glob, which then fails as before) keeps the single-image layout: the concepts
    folder is ``OUT`` itself."""
    from .batch import _has_magic

    if many or len(images) != 1:
        return True
    path = Path(images[0])
    return path.is_dir() or (not path.is_file() and _has_magic(images[0]))


def _lora_options(args: argparse.Namespace) -> dict:
    """The LoRA phase's options of ``extract`` (none without ``--lora-rank``: runs keep their earlier keys)."""
    options = {
        k: v for k, v in (("lora_rank", args.lora_rank), ("lora_alpha", args.lora_alpha)) if v is not None
    }
    LearningConfig(**options)  # validate before loading any model
    return options


def cmd_extract(args: argparse.Namespace) -> int:
    if is_many_images(args.image, args.many):
        return _extract_many(args)
    import os

    from .batch import extract_to_folder
    from .image_io import load_image

    image = args.image[0]
    load_image(image)  # validate before loading any model
    lora = _lora_options(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "One image cannot be split between processes; run it on one process, or pass --many to write "
            "OUT/<name>/ and OUT/index.json."
        )
    out = Path(args.out)
    _check_new_dir(out, args.overwrite)
    pipe = _load_pipeline(args.model, args.device, args.dtype)
    result = extract_to_folder(
        pipe,
        image,
        out,
        seed=args.seed,
        token_prefix=args.token_prefix,
        samples=args.samples,
        inference_steps=args.inference_steps,
        guidance=args.guidance,
        overwrite=args.overwrite,
        num_train_steps=args.steps,
        schedule=args.schedule,
        mixed_precision=args.mixed_precision,
        **lora,
    )
    print(f"{result.num_concepts} concept(s): {' '.join(result.tokens)}; files in {out}")
    if pipe.family == "sd":
        print(f'Use them: pipe.load_textual_inversion("{out / "concepts.safetensors"}")')
    else:  # SDXL: two standard calls, or one of ours
        print(f'Use them: diffusers_conceptexpress.load_concepts(pipe, "{out}")')
    if result.lora is not None:
        print(f'and their LoRA: pipe.load_lora_weights("{out}")')
    return 0


def _extract_many(args: argparse.Namespace) -> int:
    """``extract`` on many images, on this process's share of them (docs/design.md, 'Many images')."""
    from accelerate import PartialState

    from .batch import extract_images, find_images

    if args.token_prefix != DEFAULT_TOKEN_PREFIX:
        raise ValueError(
            "--token-prefix applies to one image; with many images each image's tokens are named after its "
            "file (dog.jpg -> <dog>_1 ...)."
        )
    find_images(args.image)  # validate before loading any model
    LearningConfig(num_train_steps=args.steps, schedule=args.schedule, mixed_precision=args.mixed_precision)
    lora = _lora_options(args)
    cpu = args.device == "cpu" or (args.device is None and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    if state.num_processes > 1 and args.device not in (None, "cpu", "cuda"):
        raise ValueError(
            f"--device {args.device} with {state.num_processes} processes: each process takes its own device; "
            "leave --device out (or pass cpu)."
        )
    device = state.device if state.num_processes > 1 or args.device is None else torch.device(args.device)
    if device.type == "cpu":  # accelerate says "cpu:0"; moving the weights there copies them, and copies
        device = torch.device("cpu")  # aligned differently change float sums in the last bits
    pipe = _load_pipeline(args.model, str(device), args.dtype)
    result = extract_images(
        pipe,
        args.image,
        args.out,
        seed=args.seed,
        samples=args.samples,
        inference_steps=args.inference_steps,
        guidance=args.guidance,
        overwrite=args.overwrite,
        state=state,
        num_train_steps=args.steps,
        schedule=args.schedule,
        mixed_precision=args.mixed_precision,
        **lora,
    )
    if state.is_main_process:
        resumed = sum(s.resumed for s in result.images)
        print(
            f"{len(result.images)} image(s): {len(result.done)} done ({resumed} already complete, left as they "
            f"were), {len(result.failed)} failed; index in {result.index}"
        )
        for s in result.failed:
            print(f"  failed: {s.image}: {s.error}")
        if result.done:
            print(f"Use them: load_concepts(pipe, {[str(f) for f in result.folders()[:2]]}...)")
    return 1 if result.failed else 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .atomic import atomic_file
    from .export import load_concepts, read_concepts_index

    for directory in args.concepts:
        read_concepts_index(directory)  # validate before loading any model
    pipe = _load_pipeline(args.model, args.device, args.dtype)
    load_concepts(pipe, args.concepts)
    image = pipe(
        args.prompt,
        num_inference_steps=args.inference_steps,
        guidance_scale=args.guidance,
        generator=torch.Generator().manual_seed(args.seed),
    ).images[0]
    out = Path(args.out)
    with atomic_file(out) as handle:
        image.save(handle, format="PNG")
    print(f"Wrote {out}")
    return 0


DEMO_SCENE = 12  # "a photo of a pink cross and a orange circle": 2 objects, both found by the shipped model


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole method on the shipped toy model, offline: scene -> concepts -> files and generations."""
    import PIL.Image

    from .atomic import atomic_directory
    from .pipeline import ConceptExpressPipeline
    from .toyworld import GENERATION_STEPS, GUIDANCE_SCALE, model_path, render_scene

    out = Path(args.out)
    _check_new_dir(out, args.overwrite)
    scene = render_scene(args.scene)
    pipe = ConceptExpressPipeline.from_pretrained(model_path())
    print(f"Scene {args.scene}: {scene.caption} ({len(scene.objects)} object(s)); extracting concepts ...")
    result = pipe.extract_concepts(
        scene.image, num_train_steps=args.steps, generator=torch.Generator().manual_seed(args.seed)
    )
    present = {(o["color"], o["shape"]) for o in scene.objects}
    other = next(
        f"a {c} {s}"
        for c in ("blue", "red", "green", "yellow")
        for s in ("star", "circle")
        if (c, s) not in present
    )
    context = f"a photo of {result.tokens[0]} and {other}"
    with atomic_directory(out, overwrite=args.overwrite) as tmp:
        scene.image.save(tmp / "scene.png")
        result.save(tmp / "concepts", overwrite=True)
        grid, prompts = sample_grid(
            pipe,
            result.tokens,
            seed=args.seed,
            steps=GENERATION_STEPS,
            guidance=GUIDANCE_SCALE,
            extra_prompts=(context,),
            concepts=tmp / "concepts",
        )
        grid.save(tmp / "samples.png")
        overlay = PIL.Image.open(tmp / "concepts" / "overlay.png")
        if overlay.width < 256:  # the toy images are 64 px: also write an enlarged copy to look at
            overlay.resize((256, 256 * overlay.height // overlay.width), PIL.Image.Resampling.NEAREST).save(
                tmp / "overlay_large.png"
            )
        (tmp / "prompts.txt").write_text("\n".join(prompts) + "\n")
    print(f"{result.num_concepts} concept(s): {' '.join(result.tokens)}")
    print(f"  source scene     {out / 'scene.png'}")
    print(f"  masks + overlay  {out / 'concepts' / 'overlay.png'} (enlarged: {out / 'overlay_large.png'})")
    print(
        f"  concept files    {out / 'concepts' / 'concepts.safetensors'} (+ concept_k.safetensors, concepts.json)"
    )
    print(f"  generations      {out / 'samples.png'} (prompts in {out / 'prompts.txt'})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The web demo (Gradio) until interrupted; with no --model, on the shipped toy model (offline)."""
    from .web import require_gradio, serve

    require_gradio()  # a clear message before any model is loaded
    serve(args.model, args.host, args.port, device=args.device, dtype=args.dtype)
    return 0


def concept_dirs(results: Path) -> list[Path]:
    """``results`` itself if it is a concept directory, else its sub-directories that are (sorted by name)."""
    if (results / "concepts.json").is_file():
        return [results]
    if not results.is_dir():
        raise FileNotFoundError(f"Results directory {str(results)!r} does not exist.")
    found = sorted(d for d in results.iterdir() if (d / "concepts.json").is_file())
    if not found:
        raise FileNotFoundError(
            f"No concept directory (with concepts.json) in {str(results)!r}: pass the --out folder of "
            "`conceptexpress extract`, or a folder of them."
        )
    for d in found:
        if not (d / "source.png").is_file():
            raise FileNotFoundError(
                f"{str(d)!r} has no source.png (written by extract since version 0.1.0 of this package); "
                "copy the source image there as source.png."
            )
    return found


def evaluation_samples(
    pipe, directory: Path, *, samples: int, seed: int, steps: int, guidance: float
) -> tuple[list[list], list]:
    """Generations of a concept directory for evaluation, cached in ``<directory>/evaluation_samples/``.

    ``samples`` images of "a photo of <c_k>" per concept (seeds ``seed .. seed + samples - 1``) and as many of
    the joint prompt (K >= 2), with the prompt template the concepts were learned with. The cache is reused
    when its settings match, else regenerated (atomically).
    """

    from .atomic import atomic_directory
    from .evaluation import generate_samples, read_samples
    from .export import load_concepts, prompt_format, read_concepts_index

    cache = directory / "evaluation_samples"
    settings = {"samples": samples, "seed": seed, "steps": steps, "guidance": guidance}
    template, separator = prompt_format(directory)
    if (template, separator) != prompt_format(None):  # recorded only when not the default, so that caches
        settings.update(prompt_template=template, joint_separator=separator)  # of default runs stay valid
    index = read_concepts_index(directory)
    k = len(index["concepts"])
    meta = cache / "settings.json"
    if not (meta.is_file() and json.loads(meta.read_text()) == settings):
        tokens = load_concepts(pipe, directory)
        try:
            with atomic_directory(cache, overwrite=True) as tmp:
                prompts = generate_samples(
                    pipe,
                    tokens,
                    tmp,
                    samples=samples,
                    seed=seed,
                    steps=steps,
                    guidance=guidance,
                    concepts=directory,
                )
                (tmp / "prompts.txt").write_text("\n".join(prompts) + "\n")
                (tmp / "settings.json").write_text(json.dumps(settings))
        finally:
            pipe.unload_concepts(directory)  # its tokens (from every tokenizer) and LoRA
    single = [read_samples(cache, f"concept_{c + 1}", samples) for c in range(k)]
    return single, (read_samples(cache, "joint", samples) if k > 1 else [])


def cmd_evaluate(args: argparse.Namespace) -> int:
    import PIL.Image

    from .atomic import atomic_file
    from .evaluation import ConceptSet, evaluate_concepts, make_encoder
    from .export import read_concepts_index

    if args.samples < 1:
        raise ValueError(f"--samples must be at least 1, got {args.samples}.")
    results = Path(args.results)
    dirs = concept_dirs(results)  # validate before loading any model
    encoder = make_encoder(args.encoder, args.model, device=args.device)
    pipes: dict[str, object] = {}
    sets = []
    for d in dirs:
        index = read_concepts_index(d)
        base = args.pipeline or index.get("base_model")
        if not base:
            raise ValueError(f"{str(d)!r} does not name its base model; pass --pipeline PATH_OR_ID.")
        if base not in pipes:
            pipes[base] = _load_pipeline(base, args.device, args.dtype)
        single, joint = evaluation_samples(
            pipes[base],
            d,
            samples=args.samples,
            seed=args.seed,
            steps=args.inference_steps,
            guidance=args.guidance,
        )
        masks = [PIL.Image.open(d / c["mask"]) for c in index["concepts"]]
        source = PIL.Image.open(d / (index.get("source") or "source.png")).convert("RGB")
        sets.append(ConceptSet(source=source, masks=masks, single=single, joint=joint, name=d.name))
    metrics = evaluate_concepts(sets, encoder)
    print(f"{'extraction':<28} {'K':>3} {'SIM^I':>7} {'SIM^C':>7}")
    for row in metrics.per_set:
        sim_c = f"{row['sim_c']:7.3f}" if "sim_c" in row else f"{'-':>7}"
        print(
            f"{row['name'][:28]:<28} {row['num_concepts']:>3} {sum(row['sim_i']) / len(row['sim_i']):7.3f} {sim_c}"
        )
    sim_c = f"{metrics.sim_c:.3f}" if metrics.sim_c is not None else "-"
    print(
        f"[{metrics.encoder}] {metrics.num_images} image(s), {metrics.num_concepts} concept(s): "
        f"SIM^I {metrics.sim_i:.3f}  SIM^C {sim_c}  ACC^1 {metrics.acc1:.3f}  ACC^3 {metrics.acc3:.3f}"
    )
    out = Path(args.out) if args.out else results / f"evaluation_{metrics.encoder}.json"
    report = {
        **metrics.to_dict(),
        "encoder_model": args.model,
        "samples": args.samples,
        "seed": args.seed,
        "inference_steps": args.inference_steps,
        "guidance": args.guidance,
        "version": __version__,
    }
    with atomic_file(out, "w") as handle:
        handle.write(json.dumps(report, indent=2))
    print(f"Wrote {out}")
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="diffusers folder or model id of a Stable Diffusion 1.x / 2.x or XL model (the pipeline class follows "
        "its model_index.json)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conceptexpress", description="ConceptExpress for diffusers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    ext = sub.add_parser(
        "extract",
        help="find the concepts of an image (or of many) and learn one token per concept",
        description="One image file: OUT is its concepts folder. Several images, a folder, a glob or --many: "
        "OUT/<name>/ per image (tokens <name>_1 ...) and OUT/index.json; rerunning resumes. Split between "
        "processes under torchrun or accelerate launch (docs/design.md, 'Many images').",
    )
    ext.add_argument("image", nargs="+", help="image files, folders or globs")
    _add_model_args(ext)
    ext.add_argument(
        "--out",
        required=True,
        help="output directory (one image: created, must not exist; many: OUT/<name>/ per image, resumed)",
    )
    ext.add_argument(
        "--many", action="store_true", help="the many-images layout (OUT/<name>/, index.json) for one image"
    )
    steps = {name: d["num_train_steps"] for name, d in SCHEDULE_DEFAULTS.items()}
    ext.add_argument(
        "--steps", type=int, default=None, help=f"training steps (default: the schedule's, {steps})"
    )
    ext.add_argument("--schedule", default=_default(LearningConfig, "schedule"), choices=list(SCHEDULES))
    ext.add_argument(
        "--token-prefix", default=DEFAULT_TOKEN_PREFIX, help="concepts become <prefix>_1 ... <prefix>_K"
    )
    ext.add_argument(
        "--mixed-precision",
        default=_default(LearningConfig, "mixed_precision"),
        choices=list(MIXED_PRECISION),
    )
    ext.add_argument("--lora-rank", type=int, default=None, help="add the LoRA phase at this rank (e.g. 4)")
    ext.add_argument("--lora-alpha", type=float, default=None, help="the LoRA's alpha (default: the rank)")
    ext.add_argument("--no-samples", dest="samples", action="store_false", help="skip the sample grid")
    ext.add_argument(
        "--inference-steps", type=int, default=INFERENCE_STEPS, help="sampling steps of the sample grid"
    )
    ext.add_argument("--guidance", type=float, default=GUIDANCE, help="guidance scale of the sample grid")
    ext.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output directory (many: redo every image)",
    )
    ext.set_defaults(func=cmd_extract)

    demo = sub.add_parser("demo", help="run the whole method offline on the shipped toy model")
    demo.add_argument("--out", default="conceptexpress-demo", help="output directory (default: %(default)s)")
    demo.add_argument("--scene", type=int, default=DEMO_SCENE, help="toy scene number (default: %(default)s)")
    demo.add_argument(
        "--steps", type=int, default=steps["fast"], help="training steps (default: %(default)s)"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    demo.set_defaults(func=cmd_demo)

    srv = sub.add_parser("serve", help='the web demo in a browser (Gradio; pip install ".[web]")')
    srv.add_argument(
        "--model", default=None, help="diffusers folder or model id (default: the shipped toy model, offline)"
    )
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    srv.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    srv.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    srv.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    srv.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="generate an image with extracted concepts")
    gen.add_argument(
        "--concepts",
        required=True,
        nargs="+",
        help="directories written by `conceptexpress extract` (several: e.g. OUT/dog OUT/cat of a many-images run)",
    )
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True, help='e.g. "a photo of <ce>_1 in the snow"')
    gen.add_argument("--out", default="generated.png", help="output PNG file")
    gen.add_argument("--inference-steps", type=int, default=INFERENCE_STEPS)
    gen.add_argument("--guidance", type=float, default=GUIDANCE)
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser(
        "evaluate", help="SIM^I, SIM^C, ACC^1, ACC^3 of extract outputs (the paper's metrics)"
    )
    ev.add_argument("results", help="a directory written by `extract`, or a folder of them")
    ev.add_argument("--encoder", default=ENCODERS[0], choices=list(ENCODERS))
    ev.add_argument(
        "--model",
        default=None,
        help="encoder model id or folder (clip, dino), e.g. openai/clip-vit-base-patch32",
    )
    ev.add_argument(
        "--pipeline", default=None, help="SD model that generates (default: each extraction's base model)"
    )
    ev.add_argument("--samples", type=int, default=8, help="generations per concept and for the joint prompt")
    ev.add_argument("--inference-steps", type=int, default=INFERENCE_STEPS)
    ev.add_argument("--guidance", type=float, default=GUIDANCE)
    ev.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    ev.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ev.add_argument("--seed", type=int, default=0, help="seed of the first sample (then seed + 1, ...)")
    ev.add_argument(
        "--out", default=None, help="JSON report (default: RESULTS_DIR/evaluation_<encoder>.json)"
    )
    ev.set_defaults(func=cmd_evaluate)

    loc = sub.add_parser("localize", help="find the concepts of an image and write their masks")
    loc.add_argument("image", help="image file")
    _add_model_args(loc)
    loc.add_argument("--out", required=True, help="output directory (created; must not exist)")
    loc.add_argument("--method", default=_default(LocalizationConfig, "method"), choices=list(LOCALIZERS))
    loc.add_argument("--num-concepts", type=int, default=None, help="K, for --method kmeans")
    loc.add_argument(
        "--resize-policy",
        default=_default(LocalizationConfig, "resize_policy"),
        choices=list(RESIZE_POLICIES),
    )
    loc.add_argument("--resolution", type=int, default=None, help="model input side in pixels")
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
