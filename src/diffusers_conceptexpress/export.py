"""Standard textual-inversion files for learned concepts, written atomically.

Layout of a saved concept directory (K concepts, token prefix ``<p>``, default ``<ce>``):

- ``concepts.safetensors``: ONE key ``<p>`` holding a ``[K + 1, D]`` tensor. diffusers'
  ``load_textual_inversion`` turns it into the tokens ``<p>, <p>_1, ..., <p>_K``; ``<p>_k`` is concept k
  (1-based) and uses exactly one embedding row in a prompt. Row 0 (token ``<p>``) is the mean of the
  concepts: writing ``<p>`` alone expands to ``<p> <p>_1 ... <p>_K``, i.e. all concepts at once.
- ``concept_<k>.safetensors``: one single-key file per concept, key ``<p>_k`` and a ``[1, D]`` tensor; it
  loads alone with the stock loader (same token string as above) and in A1111-style tools (which name the
  token after the file).
- ``concepts.json``: the index (tokens, files, masks, scores, base model, parameters, version; ``lora``: the
  LoRA's file, rank, alpha and target modules, or null).
- ``pytorch_lora_weights.safetensors`` (only with the LoRA phase, ``lora_rank``): the UNet LoRA in diffusers'
  format with its adapter metadata, written by diffusers' ``save_lora_weights``; a stock pipeline loads it
  with ``load_lora_weights(directory)``.
- ``mask_<k>.png`` (:func:`mask_filename`, k = 1..K): each concept's mask at the original image size;
  ``source.png``: the source image (RGB, original size; what ``conceptexpress evaluate`` compares generations
  with); ``overlay.png``: the image with the coloured masks and token names.

Every safetensors header carries the token(s) and the base model as metadata.

SDXL (two text encoders; ``concepts.json`` says ``"model_family": "sdxl"``): every file holds the two keys of
the ecosystem's SDXL convention instead of the token, ``clip_l`` (text_encoder / tokenizer, D = 768) and
``clip_g`` (text_encoder_2 / tokenizer_2, D = 1280): ``concepts.safetensors`` = ``{"clip_l": [K + 1, 768],
"clip_g": [K + 1, 1280]}`` (row 0 the joint row, as for SD) and ``concept_<k>.safetensors`` = ``{"clip_l":
[1, 768], "clip_g": [1, 1280]}`` (A1111 and ComfyUI read these keys and name the token after the file).
diffusers loads them with two ``load_textual_inversion`` calls (see :func:`load_concepts`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import PIL.Image
import torch
from safetensors.torch import save

from .atomic import atomic_directory
from .learning import JOINT_SEPARATOR, PROMPT_TEMPLATE
from .tokens import DEFAULT_TOKEN_PREFIX, concept_token_names

__all__ = [
    "FORMAT_VERSION",
    "SDXL_KEYS",
    "concepts_family",
    "joint_embeddings",
    "load_concepts",
    "mask_filename",
    "prompt_format",
    "read_concepts",
    "read_concepts_index",
    "read_lora_settings",
    "save_concepts",
]

FORMAT_VERSION = 1
#: file keys of SDXL's two text encoders, in the pipeline's order (text_encoder, text_encoder_2)
SDXL_KEYS = ("clip_l", "clip_g")


def mask_filename(k: int) -> str:
    """File name of concept ``k``'s mask (1-based, like the tokens ``<p>_k``): ``mask_<k>.png``.

    Used by every writer of masks (:func:`save_concepts`, ``conceptexpress localize``, the examples).
    """
    return f"mask_{k}.png"


def joint_embeddings(embeddings: torch.Tensor) -> torch.Tensor:
    """The ``[K + 1, D]`` tensor stored under ``<p>``: the mean of the K concepts (token ``<p>``), then the
    concepts (``<p>_1 ... <p>_K``)."""
    return torch.cat([embeddings.mean(0, keepdim=True), embeddings], dim=0).contiguous()


def save_concepts(
    directory: str | os.PathLike,
    embeddings: torch.Tensor | dict[str, torch.Tensor],
    *,
    masks: Sequence[PIL.Image.Image],
    image: PIL.Image.Image | None = None,
    scores: Sequence[float] | None = None,
    base_model: str = "",
    parameters: dict | None = None,
    token_prefix: str = DEFAULT_TOKEN_PREFIX,
    version: str = "",
    overwrite: bool = False,
    lora=None,
) -> Path:
    """Write a concept directory (see the module docstring) atomically.

    Everything is written into a temporary sibling directory that replaces ``directory`` only once complete;
    on any error nothing is left behind.

    Args:
        directory: where to write; must not exist unless ``overwrite`` (an existing EMPTY directory is fine).
        embeddings: (K, D) learned embeddings; for SDXL ``{"clip_l": (K, 768), "clip_g": (K, 1280)}``.
        masks: K masks (PIL "L"/"1") at the original image size.
        image: the source image, saved as ``source.png`` and drawn in the overlay picture (optional).
        scores: K salience scores (e.g. EOT scores), stored in the index.
        base_model: name or path of the base model, stored in the index and the file headers.
        parameters: options of the run, stored in the index (JSON-serialisable).
        token_prefix: lower-case prefix of the tokens (default ``<ce>``).
        lora: a :class:`~diffusers_conceptexpress.lora.ConceptLora` to write next to the tokens (optional).
    Returns:
        The directory path.
    """
    from . import __version__
    from .visualize import overlay_masks

    by_key = embeddings if isinstance(embeddings, dict) else {None: embeddings}
    if isinstance(embeddings, dict) and sorted(embeddings) != sorted(SDXL_KEYS):
        raise ValueError(
            f"SDXL embeddings must be a dict with the keys {SDXL_KEYS}, got {sorted(embeddings)}."
        )
    by_key = {key: e.detach().float().cpu().contiguous() for key, e in by_key.items()}
    for e in by_key.values():
        if e.ndim != 2 or e.shape[0] < 1:
            raise ValueError(f"embeddings must be (K, D) with K >= 1, got {tuple(e.shape)}.")
    if len({e.shape[0] for e in by_key.values()}) != 1:
        raise ValueError("The text encoders' embeddings have different numbers of concepts.")
    emb = next(iter(by_key.values()))
    k, dim = emb.shape
    sdxl = isinstance(embeddings, dict)
    if len(masks) != k:
        raise ValueError(f"Got {len(masks)} masks for {k} embeddings.")
    tokens = concept_token_names(token_prefix, k)
    directory = Path(directory)
    if directory.is_dir() and not any(directory.iterdir()):
        overwrite = True
    meta = {"base_model": str(base_model), "generator": f"diffusers-conceptexpress {version or __version__}"}
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        # safetensors' save_file creates owner-only (0600) files; written as bytes, a file gets the
        # permissions of any ordinary write (docs/design.md, "Files")
        joint = {key: joint_embeddings(e) for key, e in by_key.items()}
        (tmp / "concepts.safetensors").write_bytes(
            save(
                joint if sdxl else {token_prefix: joint[None]},
                metadata={**meta, "token": token_prefix, "tokens": json.dumps(tokens)},
            )
        )
        entries = []
        for i, token in enumerate(tokens):
            file = f"concept_{i + 1}.safetensors"
            rows = {key if sdxl else token: e[i : i + 1].clone() for key, e in by_key.items()}
            (tmp / file).write_bytes(save(rows, metadata={**meta, "token": token}))
            mask_file = mask_filename(i + 1)
            masks[i].convert("L").save(tmp / mask_file)
            entry = {"token": token, "file": file, "mask": mask_file}
            entry["score"] = None if scores is None or scores[i] is None else float(scores[i])
            entries.append(entry)
        if lora is not None:
            from .lora import save_concept_lora

            save_concept_lora(tmp, lora)
        if image is not None:
            image.convert("RGB").save(tmp / "source.png")
            overlay_masks(image, masks, tokens).save(tmp / "overlay.png")
        index = {
            "concepts": entries,
            "all_concepts_token": token_prefix,
            "file": "concepts.safetensors",
            "source": "source.png" if image is not None else None,
            "base_model": str(base_model),
            "model_family": "sdxl" if sdxl else "sd",
            "embedding_dim": {key: int(e.shape[1]) for key, e in by_key.items()} if sdxl else dim,
            "parameters": parameters or {},
            "lora": lora.settings() if lora is not None else None,
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


def read_concepts(
    directory: str | os.PathLike,
) -> tuple[str, torch.Tensor | dict[str, torch.Tensor], list[str]]:
    """The concepts saved in ``directory``: ``(prefix, embeddings, tokens)``.

    ``prefix`` is the token of all concepts (``<ce>``), ``embeddings`` the (K, D) concept rows of
    ``concepts.safetensors`` (without the mean row; for SDXL a dict ``{"clip_l": ..., "clip_g": ...}`` of
    them), ``tokens`` the K prompt tokens in order.
    """
    from safetensors.torch import load_file

    index = read_concepts_index(directory)
    prefix = index["all_concepts_token"]
    state = load_file(str(Path(directory) / index["file"]))
    tokens = [c["token"] for c in index["concepts"]]
    if concepts_family(index) == "sdxl":
        return prefix, {key: state[key][1:] for key in SDXL_KEYS}, tokens
    return prefix, state[prefix][1:], tokens


def concepts_family(index: dict) -> str:
    """Model family ("sd" or "sdxl") of a parsed ``concepts.json`` (folders written before SDXL: "sd")."""
    return index.get("model_family", "sd")


def read_lora_settings(directory: str | os.PathLike) -> dict | None:
    """The LoRA entry of a concept directory's ``concepts.json`` (file, rank, alpha, target modules), or None
    when the concepts have no LoRA (or the file is missing)."""
    settings = read_concepts_index(directory).get("lora")
    if not settings or not (Path(directory) / settings["file"]).is_file():
        return None
    return settings


def prompt_format(directory: str | os.PathLike | None) -> tuple[str, str]:
    """``(prompt_template, joint_separator)`` the concepts in ``directory`` were learned with.

    Read from the learning parameters that ``concepts.json`` records; the defaults of
    :class:`~diffusers_conceptexpress.LearningConfig` (``"a photo of {}"``, ``" and "``) when ``directory`` is
    None or the file does not record them.
    """
    learning = {}
    if directory is not None:
        learning = (read_concepts_index(directory).get("parameters") or {}).get("learning") or {}
    return learning.get("prompt_template", PROMPT_TEMPLATE), learning.get("joint_separator", JOINT_SEPARATOR)


def load_concepts(pipe, directory: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Load saved concepts into ANY stock SD (1.x / 2.x) or SDXL pipeline with ``load_textual_inversion``, and
    their LoRA (``pytorch_lora_weights.safetensors``) with ``load_lora_weights`` when they have one.

    ``directory`` is one concepts folder or a list of them (e.g. the folders of a many-images run, whose
    tokens are named after the images: ``load_concepts(pipe, ["out/dog", "out/cat"])``, then
    "a photo of <dog>_1 next to <cat>_2"). SD: one call of the stock loader on their ``concepts.safetensors``.
    SDXL (a pipeline with ``text_encoder_2``): the two standard calls per folder, ``clip_l`` into
    ``text_encoder`` / ``tokenizer`` and ``clip_g`` into ``text_encoder_2`` / ``tokenizer_2``, both under the
    folder's token. Returns the prompt tokens, folder by folder and concept by concept.

    Raises:
        ValueError: two folders use the same token, a token is already loaded in ``pipe``, or the concepts
            were learned on the other model family (nothing is loaded then).
    """
    from safetensors.torch import load_file

    directories = [directory] if isinstance(directory, str | os.PathLike) else list(directory)
    if not directories:
        raise ValueError("No concepts folder given.")
    pipe_family = "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"
    files, tokens, prefixes = [], [], []
    owner: dict[str, str] = {}
    vocab = pipe.tokenizer.get_vocab()
    for d in directories:
        index = read_concepts_index(d)
        family = concepts_family(index)
        if family != pipe_family:
            names = {"sd": "SD 1.x / 2.x", "sdxl": "SDXL"}
            raise ValueError(
                f"The concepts in {str(d)!r} were learned on an {names[family]} model; this is an "
                f"{names[pipe_family]} pipeline. Extract them again with a model of this family."
            )
        concept_tokens = [c["token"] for c in index["concepts"]]
        for token in [index["all_concepts_token"], *concept_tokens]:
            if token in owner:
                raise ValueError(
                    f"Token {token!r} of {str(d)!r} is also a token of {owner[token]!r}; concepts loaded "
                    "together need different token prefixes (a many-images run names them after the images)."
                )
            if token in vocab:
                raise ValueError(
                    f"Token {token!r} of {str(d)!r} is already loaded in the pipeline; unload it first "
                    "(pipe.unload_textual_inversion)."
                )
            owner[token] = str(d)
        files.append(str(Path(d) / index["file"]))
        prefixes.append(index["all_concepts_token"])
        tokens += concept_tokens
    if pipe_family == "sd":
        pipe.load_textual_inversion(files if len(files) > 1 else files[0])
    else:
        for file, prefix in zip(files, prefixes, strict=True):
            state = load_file(file)
            pipe.load_textual_inversion(
                state["clip_l"], token=prefix, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
            )
            pipe.load_textual_inversion(
                state["clip_g"], token=prefix, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
            )
    for d, prefix in zip(directories, prefixes, strict=True):  # each LoRA as its own adapter, all active
        if read_lora_settings(d) is not None:
            from .lora import load_concept_lora, lora_adapter_name

            load_concept_lora(pipe, d, lora_adapter_name(prefix))
    return tokens
