"""Standard textual-inversion files for learned concepts, written atomically.

Layout of a saved concept directory (K concepts, token prefix ``<p>``, default ``<ce>``):

- ``concepts.safetensors``: ONE key ``<p>`` holding a ``[K + 1, D]`` tensor. diffusers'
  ``load_textual_inversion`` turns it into the tokens ``<p>, <p>_1, ..., <p>_K``; ``<p>_k`` is concept k
  (1-based) and uses exactly one embedding row in a prompt. Row 0 (token ``<p>``) is the mean of the
  concepts: writing ``<p>`` alone expands to ``<p> <p>_1 ... <p>_K``, i.e. all concepts at once.
- ``concept_<k>.safetensors``: one single-key file per concept, key ``<p>_k`` and a ``[1, D]`` tensor; it
  loads alone with the stock loader (same token string as above) and in A1111-style tools (which name the
  token after the file).
- ``concepts.json``: the index (tokens, files, masks, scores, base model, parameters, version).
- ``mask_<k>.png``: each concept's mask at the original image size; ``source.png``: the source image (RGB,
  original size; what ``conceptexpress evaluate`` compares generations with); ``overlay.png``: the image with
  the coloured masks and token names.

Every safetensors header carries the token(s) and the base model as metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import PIL.Image
import torch
from safetensors.torch import save_file

from .atomic import atomic_directory
from .tokens import concept_token_names

__all__ = ["FORMAT_VERSION", "load_concepts", "read_concepts_index", "save_concepts"]

FORMAT_VERSION = 1


def save_concepts(
    directory: str | os.PathLike,
    embeddings: torch.Tensor,
    *,
    masks: Sequence[PIL.Image.Image],
    image: PIL.Image.Image | None = None,
    scores: Sequence[float] | None = None,
    base_model: str = "",
    parameters: dict | None = None,
    token_prefix: str = "<ce>",
    version: str = "",
    overwrite: bool = False,
) -> Path:
    """Write a concept directory (see the module docstring) atomically.

    Everything is written into a temporary sibling directory that replaces ``directory`` only once complete;
    on any error nothing is left behind.

    Args:
        directory: where to write; must not exist unless ``overwrite`` (an existing EMPTY directory is fine).
        embeddings: (K, D) learned embeddings.
        masks: K masks (PIL "L"/"1") at the original image size.
        image: the source image, saved as ``source.png`` and drawn in the overlay picture (optional).
        scores: K salience scores (e.g. EOT scores), stored in the index.
        base_model: name or path of the base model, stored in the index and the file headers.
        parameters: options of the run, stored in the index (JSON-serialisable).
        token_prefix: lower-case prefix of the tokens (default ``<ce>``).
    Returns:
        The directory path.
    """
    from . import __version__
    from .visualize import overlay_masks

    emb = embeddings.detach().float().cpu().contiguous()
    if emb.ndim != 2 or emb.shape[0] < 1:
        raise ValueError(f"embeddings must be (K, D) with K >= 1, got {tuple(emb.shape)}.")
    k, dim = emb.shape
    if len(masks) != k:
        raise ValueError(f"Got {len(masks)} masks for {k} embeddings.")
    tokens = concept_token_names(token_prefix, k)
    directory = Path(directory)
    if directory.is_dir() and not any(directory.iterdir()):
        overwrite = True
    meta = {"base_model": str(base_model), "generator": f"diffusers-conceptexpress {version or __version__}"}
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        joint = torch.cat([emb.mean(0, keepdim=True), emb], dim=0).contiguous()
        save_file(
            {token_prefix: joint},
            tmp / "concepts.safetensors",
            metadata={**meta, "token": token_prefix, "tokens": json.dumps(tokens)},
        )
        entries = []
        for i, token in enumerate(tokens):
            file = f"concept_{i + 1}.safetensors"
            save_file({token: emb[i : i + 1].clone()}, tmp / file, metadata={**meta, "token": token})
            mask_file = f"mask_{i + 1}.png"
            masks[i].convert("L").save(tmp / mask_file)
            entry = {"token": token, "file": file, "mask": mask_file}
            entry["score"] = None if scores is None or scores[i] is None else float(scores[i])
            entries.append(entry)
        if image is not None:
            image.convert("RGB").save(tmp / "source.png")
            overlay_masks(image, masks, tokens).save(tmp / "overlay.png")
        index = {
            "concepts": entries,
            "all_concepts_token": token_prefix,
            "file": "concepts.safetensors",
            "source": "source.png" if image is not None else None,
            "base_model": str(base_model),
            "embedding_dim": dim,
            "parameters": parameters or {},
            "version": version or __version__,
            "format_version": FORMAT_VERSION,
        }
        (tmp / "concepts.json").write_text(json.dumps(index, indent=2))
    return directory


def read_concepts_index(directory: str | os.PathLike) -> dict:
    """The parsed ``concepts.json`` of a concept directory, with a clear error when it is not one."""
    path = Path(directory) / "concepts.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(directory)!r} is not a concept directory (no concepts.json); pass the folder written by "
            "extract_concepts(...).save() or `conceptexpress extract`."
        )
    return json.loads(path.read_text())


def load_concepts(pipe, directory: str | os.PathLike) -> list[str]:
    """Load saved concepts into ANY SD pipeline with ``load_textual_inversion`` (SD 1.x / 2.x).

    One call of the stock loader on ``concepts.safetensors``. Returns the prompt tokens, concept by concept.
    """
    index = read_concepts_index(directory)
    pipe.load_textual_inversion(str(Path(directory) / index["file"]))
    return [c["token"] for c in index["concepts"]]
