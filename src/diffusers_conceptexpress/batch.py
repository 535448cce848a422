"""Many images: one concepts folder per image, resumable, per-image deterministic, split between processes.

:func:`extract_images` runs :meth:`~diffusers_conceptexpress.ConceptExpressPipeline.extract_concepts` on every
image of a list of files, folders and globs, and writes

- ``OUT/<name>/``: the image's concepts folder, the single-image layout (:mod:`~diffusers_conceptexpress.export`,
  plus ``samples.png`` when ``samples``), written atomically: a process killed mid-image leaves no folder;
- ``OUT/index.json``: every image with its status (``done`` / ``failed`` with the error), tokens, concept count,
  seconds and seed, written by the main process once all processes are finished.

``<name>`` is the file's stem in lower case with every run of other characters than ``a-z0-9`` turned into
``-`` (``My Dog.JPG`` -> ``my-dog``; :func:`image_name`), made unique within the run (``dog``, ``dog-2``, in the
order of the images' paths); the image's tokens are ``<name>, <name>_1 ... <name>_K``.

Determinism: image ``f`` is extracted with the seed :func:`image_seed` ``(seed, f.name)``, so its result depends
only on the image, the options and ``seed``: not on its position in the list, the number of processes, or what
the pipeline extracted before.

Resume: an image whose folder is complete (written by a run with the same seed, options and model, from the
same image bytes) is skipped and left untouched; the others are (re)done. A folder written with other options is
an error (pass ``overwrite=True`` or another ``out``). Leftovers of killed processes (hidden temporary
siblings) are removed.

Processes: with several processes (``accelerate launch``, ``torchrun``; accelerate's ``PartialState``), the
main process decides which images remain, :meth:`PartialState.split_between_processes` gives each process a
contiguous share, each process writes only its own folders, and the main process writes the index from every
process's results (gathered). Several machines need ``OUT`` on a filesystem that all of them see.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import sys
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .atomic import atomic_directory, atomic_file
from .tokens import DEFAULT_TOKEN_PREFIX

__all__ = [
    "IMAGE_SUFFIXES",
    "INDEX_FILE",
    "BatchResult",
    "ImageJob",
    "ImageStatus",
    "extract_images",
    "extract_to_folder",
    "find_images",
    "image_name",
    "image_seed",
    "plan_jobs",
]

#: File suffixes taken from folders and globs (files named explicitly are taken whatever their suffix).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: The run's index, in the output folder.
INDEX_FILE = "index.json"
INDEX_FORMAT_VERSION = 1
# What extract_images controls per image; not accepted among its options.
_PER_IMAGE = ("generator", "token_prefix", "masks", "load", "callback")


@dataclass(frozen=True)
class ImageJob:
    """One image of a run.

    Attributes:
        path: the image file.
        name: its folder under the output directory and the stem of its tokens (``<name>_1`` ...).
        seed: the seed of its extraction (:func:`image_seed` of the run's seed and the file name).
    """

    path: Path
    name: str
    seed: int

    @property
    def token_prefix(self) -> str:
        """The token of all the image's concepts, ``<name>``; concept k is ``<name>_k``."""
        return f"<{self.name}>"


@dataclass
class ImageStatus:
    """One image's line of ``index.json``.

    Attributes:
        image: the image file, as found.
        name: its folder under the output directory (and token stem).
        status: "done" or "failed".
        tokens: the concepts' tokens ``<name>_1 ... <name>_K`` (empty when failed).
        num_concepts: K (0 when failed).
        seconds: time of the extraction (localization and learning; wall clock, s); for a failed image the
            time until the failure.
        seed: the image's seed.
        resumed: True when the folder was already complete and was left untouched.
        error: the reason of a failure ("ImageInputError: ..."), else None.
        process: index of the process that extracted it (None when resumed).
    """

    image: str
    name: str
    status: str
    tokens: list[str] = field(default_factory=list)
    num_concepts: int = 0
    seconds: float | None = None
    seed: int = 0
    resumed: bool = False
    error: str | None = None
    process: int | None = None

    @property
    def token_prefix(self) -> str:
        """The token of all the image's concepts, ``<name>``."""
        return f"<{self.name}>"


@dataclass
class BatchResult:
    """Result of :func:`extract_images` (the same on every process).

    Attributes:
        images: one :class:`ImageStatus` per image, in the order the images were found.
        out: the output directory; ``out / name`` holds an image's concepts.
        index: path of ``index.json``.
    """

    images: list[ImageStatus]
    out: Path
    index: Path

    @property
    def done(self) -> list[ImageStatus]:
        """Images whose concepts folder is complete (extracted now or resumed)."""
        return [s for s in self.images if s.status == "done"]

    @property
    def failed(self) -> list[ImageStatus]:
        """Images that failed (``error`` says why); they have no folder."""
        return [s for s in self.images if s.status == "failed"]

    def folders(self) -> list[Path]:
        """Concepts folders of the done images, e.g. for ``load_concepts(pipe, result.folders())``."""
        return [self.out / s.name for s in self.done]


# ----------------------------------------------------------------------------------------------- planning
def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def find_images(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Image files of files, folders (their files with an :data:`IMAGE_SUFFIXES` suffix, sorted; not
    recursive) and globs (sorted matches with such a suffix; ``**`` recurses), in the order given, each once.

    Raises:
        FileNotFoundError: a file that does not exist, a glob that matches nothing, a folder with no image.
    """
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    found: list[Path] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            found.append(path)

    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise FileNotFoundError(f"No image file ({', '.join(IMAGE_SUFFIXES)}) in folder {text!r}.")
            for p in files:
                add(p)
        elif path.is_file():
            add(path)
        elif _has_magic(text):
            files = sorted(
                Path(p)
                for p in glob.glob(text, recursive=True)
                if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_SUFFIXES
            )
            if not files:
                raise FileNotFoundError(f"No image file matches {text!r}.")
            for p in files:
                add(p)
        else:
            raise FileNotFoundError(f"Image file {text!r} does not exist.")
    if not found:
        raise FileNotFoundError("No image given.")
    return found


def image_name(file_name: str) -> str:
    """The folder and token stem of an image file: its stem in lower case (accents dropped), every run of
    characters other than ``a-z0-9`` turned into ``-``: ``My Dog.JPG`` -> ``my-dog`` (``image`` if empty).

    Lower case because the CLIP tokenizer lower-cases prompts (an upper-case token would never match).
    """
    stem = Path(file_name).stem
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode().lower()
    return re.sub(r"[^a-z0-9]+", "-", ascii_stem).strip("-") or "image"


def image_seed(seed: int, file_name: str) -> int:
    """The seed of one image's extraction: a 63-bit hash of the run's ``seed`` and the image's file name
    (``Path(f).name``), so that it depends on neither the image's position in the list nor the process."""
    digest = hashlib.sha256(f"{int(seed)}/{file_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def plan_jobs(paths: Sequence[Path], seed: int) -> list[ImageJob]:
    """One :class:`ImageJob` per path (same order): names from :func:`image_name`, unique within the run.

    When several images have the same name, the first in the order of their paths keeps it and the others get
    ``-2``, ``-3`` ... (skipping names that another image has on its own), so the names depend on the set of
    images, not on the order they were given in.
    """
    paths = [Path(p) for p in paths]
    bases = {p: image_name(p.name) for p in paths}
    reserved = set(bases.values())
    names: dict[Path, str] = {}
    used: set[str] = set()
    for p in sorted(paths, key=lambda q: str(q.resolve())):
        name = bases[p]
        if name in used:
            k = 2
            while f"{name}-{k}" in reserved or f"{name}-{k}" in used:
                k += 1
            name = f"{name}-{k}"
        names[p] = name
        used.add(name)
    return [ImageJob(path=p, name=names[p], seed=image_seed(seed, p.name)) for p in paths]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _jsonable(value):
    return json.loads(json.dumps(value))


def _complete_status(job: ImageJob, folder: Path, run: dict, samples: bool, overwrite: bool):
    """The :class:`ImageStatus` of a complete folder of this image and run, None when the image must be
    (re)done; raises when the folder was written by something else (unless ``overwrite``)."""
    if overwrite or not folder.exists():
        return None
    try:
        index = json.loads((folder / "concepts.json").read_text())
        record = index["parameters"]["batch"]
    except (OSError, ValueError, KeyError, TypeError):
        raise FileExistsError(
            f"{str(folder)!r} exists and was not written by a many-images run; move it away or pass "
            "--overwrite (overwrite=True)."
        ) from None
    if record.get("run") != run:
        raise ValueError(
            f"{str(folder)!r} was extracted with other options, seed or model than this run; use another "
            "output folder or pass --overwrite (overwrite=True) to redo every image."
        )
    files = [index.get("file"), index.get("source")]
    files += [c.get(k) for c in index.get("concepts", []) for k in ("file", "mask")]
    if samples:
        files.append("samples.png")
    complete = all(f and (folder / f).is_file() for f in files)
    if not complete or record.get("sha256") != _sha256(job.path):  # files removed, or the image changed
        return None
    return ImageStatus(
        image=str(job.path),
        name=job.name,
        status="done",
        tokens=[c["token"] for c in index["concepts"]],
        num_concepts=len(index["concepts"]),
        seconds=record.get("seconds"),
        seed=job.seed,
        resumed=True,
    )


def _remove_leftovers(out: Path, names: Sequence[str]) -> None:
    """Temporary siblings left by killed processes (``.name.*.tmp``, ``.name.old``, the index's)."""
    for name in [*names, INDEX_FILE]:
        for leftover in [*out.glob(f".{glob.escape(name)}.*.tmp"), out / f".{name}.old"]:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            elif leftover.exists():
                leftover.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ one image
def extract_to_folder(
    pipe,
    image,
    folder: str | os.PathLike,
    *,
    seed: int = 0,
    token_prefix: str = DEFAULT_TOKEN_PREFIX,
    samples: bool = False,
    inference_steps: int = 50,
    guidance: float = 7.5,
    overwrite: bool = False,
    record: dict | None = None,
    **options,
):
    """Extract one image's concepts and write its concepts folder atomically (the single-image layout).

    Args:
        pipe: a :class:`~diffusers_conceptexpress.ConceptExpressPipeline`.
        image: as for ``extract_concepts``.
        folder: the concepts folder; must not exist unless ``overwrite`` (an existing empty folder is fine).
        seed: seeds the extraction (``torch.Generator().manual_seed(seed)``) and the sample grid.
        token_prefix: the concepts become ``<prefix>_1 ... <prefix>_K``.
        samples: also write ``samples.png`` (each concept alone and the joint prompt, ``inference_steps``
            steps, guidance ``guidance``; the concepts are loaded into ``pipe`` for it, then unloaded).
        record: stored as ``parameters["batch"]`` of ``concepts.json`` (with ``seconds``, the extraction's time).
        **options: options of ``extract_concepts`` (``num_train_steps``, ``schedule``, config fields).

    Returns:
        The :class:`~diffusers_conceptexpress.ConceptExpressOutput`. The pipeline holds no token of it after.
    """
    from .evaluation import sample_grid

    folder = Path(folder)
    start = time.perf_counter()
    output = pipe.extract_concepts(
        image, generator=torch.Generator().manual_seed(seed), token_prefix=token_prefix, load=False, **options
    )
    if record is not None:
        output.parameters["batch"] = {**record, "seconds": round(time.perf_counter() - start, 3)}
    with atomic_directory(
        folder, overwrite=overwrite or (folder.is_dir() and not any(folder.iterdir()))
    ) as tmp:
        output.save(tmp, overwrite=True)
        if samples:
            pipe.load_concepts(output)
            try:
                grid, _ = sample_grid(
                    pipe, output.tokens, seed=seed, steps=inference_steps, guidance=guidance, concepts=tmp
                )
            finally:
                pipe.unload_concepts(output)  # its tokens and LoRA
            grid.save(tmp / "samples.png")
    return output


# ------------------------------------------------------------------------------------------------ many images
def _state(state, pipe):
    if state is not None:
        return state
    from accelerate import PartialState

    # cpu=True on a CPU pipeline: under `accelerate launch --multi_gpu` on a machine without GPUs a plain
    # PartialState() would make every process believe it is alone (docs/design.md, 'Many images')
    return PartialState(cpu=pipe.device.type == "cpu")


def _error_text(err: BaseException) -> str:
    message = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def extract_images(
    pipe,
    images: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    seed: int = 0,
    samples: bool = True,
    inference_steps: int = 50,
    guidance: float = 7.5,
    overwrite: bool = False,
    state=None,
    progress: bool = True,
    **options,
) -> BatchResult:
    """Extract the concepts of many images, one concepts folder each, on one or several processes.

    See the module docstring for the layout, names, seeds, resume and processes. Call it on EVERY process of
    a distributed run (``accelerate launch`` / ``torchrun``), each with its own pipeline on its device
    (``PartialState().device``); with one process it simply runs everything.

    Args:
        pipe: a :class:`~diffusers_conceptexpress.ConceptExpressPipeline` (reused for every image; an image's
            tokens are not left loaded in it).
        images: files, folders and globs (:func:`find_images`).
        out: the output directory (created); ``out/<name>/`` per image and ``out/index.json``.
        seed: the run's seed; image ``f`` uses :func:`image_seed` ``(seed, f.name)``.
        samples: write each image's ``samples.png`` (``inference_steps`` DDIM steps, guidance ``guidance``).
        overwrite: redo every image (folders are replaced atomically) instead of resuming.
        state: an ``accelerate`` ``PartialState`` (default: the current one, ``cpu=True`` for a CPU pipeline).
        progress: a bar over the images on the main process, plus the pipeline's bar per image.
        **options: options of ``extract_concepts`` (``num_train_steps``, ``schedule``, ``mixed_precision``, any
            field of ``LocalizationConfig`` / ``LearningConfig``), the same for every image.

    Returns:
        :class:`BatchResult` (the same on every process); a failed image is in ``result.failed`` with its error
        and the others are done.

    Raises:
        TypeError / ValueError: bad options; FileNotFoundError: missing images; FileExistsError / ValueError:
        ``out`` holds folders of another run. All before any image is extracted.
    """
    from accelerate.utils import broadcast_object_list, gather_object
    from tqdm.auto import tqdm

    from . import __version__

    bad = sorted(set(options) & set(_PER_IMAGE))
    if bad:
        raise TypeError(f"extract_images sets {bad} per image; remove them from the options.")
    loc, learn = pipe._split_options(options)  # raises on a bad option before anything else
    state = _state(state, pipe)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"Output {str(out)!r} is a file, not a folder.")
    if (out / "concepts.json").is_file():
        raise FileExistsError(
            f"{str(out)!r} is the concepts folder of a single-image run; choose another output folder."
        )
    jobs = plan_jobs(find_images(images), seed)
    run = _jsonable(
        {
            "seed": int(seed),
            "base_model": str(getattr(pipe.config, "_name_or_path", "") or ""),
            "localization": loc.to_dict(),
            "learning": learn.to_dict(),
            "samples": {"inference_steps": inference_steps, "guidance": guidance} if samples else None,
        }
    )

    # the main process alone reads the folders and decides what remains; the others receive its decision
    plan: list = [None]
    if state.is_main_process:
        try:
            found = {j.name: _complete_status(j, out / j.name, run, samples, overwrite) for j in jobs}
            if out.is_dir():
                _remove_leftovers(out, [j.name for j in jobs])
            plan[0] = {"finished": {name: status for name, status in found.items() if status is not None}}
        except Exception as err:  # shared with the other processes, so that all of them stop
            plan[0] = {"error": err}
    broadcast_object_list(plan)
    if "error" in plan[0]:
        raise plan[0]["error"]
    finished: dict[str, ImageStatus] = plan[0]["finished"]
    pending = [j for j in jobs if j.name not in finished]

    main = state.is_main_process
    saved_bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
    per_image_bar = {"leave": False} if main and progress else {"disable": True}
    pipe.set_progress_bar_config(**{**saved_bar_config, **per_image_bar})
    results: list[dict] = []
    try:
        with state.split_between_processes(pending) as mine:
            label = "images" if state.num_processes == 1 else f"images (process 1 of {state.num_processes})"
            bar = tqdm(total=len(mine), desc=label, unit="image", disable=not (progress and main))
            for job in mine:
                start = time.perf_counter()
                entry = ImageStatus(image=str(job.path), name=job.name, status="done", seed=job.seed)
                entry.process = state.process_index
                try:
                    record = {
                        "image": str(job.path.resolve()),
                        "sha256": _sha256(job.path),
                        "seed": job.seed,
                        "run": run,
                    }
                    output = extract_to_folder(
                        pipe,
                        job.path,
                        out / job.name,
                        seed=job.seed,
                        token_prefix=job.token_prefix,
                        samples=samples,
                        inference_steps=inference_steps,
                        guidance=guidance,
                        overwrite=True,  # only images without a complete folder of this run get here
                        record=record,
                        **options,
                    )
                    entry.tokens = list(output.tokens)
                    entry.num_concepts = output.num_concepts
                    entry.seconds = output.parameters["batch"]["seconds"]
                except Exception as err:  # reported, recorded, and the run goes on
                    entry.status, entry.error = "failed", _error_text(err)
                    entry.seconds = round(time.perf_counter() - start, 3)
                    tqdm.write(f"conceptexpress: {job.path}: failed: {entry.error}", file=sys.stderr)
                results.append(asdict(entry))
                bar.update(1)
            bar.close()
    finally:
        pipe.set_progress_bar_config(**saved_bar_config)

    gathered = gather_object(results) if state.num_processes > 1 else results
    by_name = dict(finished)
    by_name.update({d["name"]: ImageStatus(**d) for d in gathered})
    statuses = [by_name[j.name] for j in jobs]
    index_path = out / INDEX_FILE
    if main:
        index = {
            "images": [asdict(s) for s in statuses],
            "done": sum(s.status == "done" for s in statuses),
            "failed": sum(s.status == "failed" for s in statuses),
            "seed": int(seed),
            "base_model": run["base_model"],
            "options": {"localization": run["localization"], "learning": run["learning"]},
            "samples": run["samples"],
            "num_processes": state.num_processes,
            "version": __version__,
            "format_version": INDEX_FORMAT_VERSION,
        }
        with atomic_file(index_path, "w") as handle:
            handle.write(json.dumps(index, indent=2))
    state.wait_for_everyone()  # the index exists on every process's return
    return BatchResult(images=statuses, out=out, index=index_path)
