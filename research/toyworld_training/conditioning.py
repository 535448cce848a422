"""Captions in the method's learning-prompt forms, ONE input slot per object, and the toy words' rows.

A template caption ("a photo of a red circle and a blue striped star") names objects; ConceptExpress learns
one token per concept ("a photo of <c_0> and <c_1>"). Here each object's slot is the sum of its words' input
embeddings, appended after the vocabulary:

- :func:`compound_conditioning`: every caption with one slot per object;
- :func:`single_object_conditioning`: the single-concept prompt "a photo of <x_k>" of every object;
- :func:`slot_contrast_conditioning`: that prompt for the object and its :func:`contrast_candidates` (the
  same object with another shape or colour), the candidates of ``losses.slot_contrast_loss``;
- :func:`word_row_ids`: the input-embedding row of each toy word (the "rows" stage trains some of them).
"""

from __future__ import annotations

import torch

from diffusers_conceptexpress.toyworld.scenes import COLORS, SHAPES
from diffusers_conceptexpress.toyworld.tokenizer import WORDS


def object_phrases(caption: str) -> list[list[str]]:
    """The words of each object of a template caption: "a photo of a red circle and a blue striped star" ->
    [["red", "circle"], ["blue", "striped", "star"]]."""
    body = caption.removeprefix("a photo of ")
    return [phrase.removeprefix("a ").split() for phrase in body.split(" and ")]


def distinct_objects(tokenizer, ids: torch.Tensor) -> tuple[list[list[int]], list[tuple[str, ...]]]:
    """Per caption, the index of each of its objects (caption order) among the distinct objects of all
    captions, and those objects' words (("red", "circle"), ("blue", "striped", "star"), ...)."""
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    keys, slot_of, per_caption = [], {}, []
    for row in ids.tolist():
        words = [tokenizer.convert_ids_to_tokens(i).removesuffix("</w>") for i in row if i not in special]
        slots = []
        for phrase in object_phrases(" ".join(words)):
            key = tuple(phrase)
            if key not in slot_of:
                slot_of[key] = len(keys)
                keys.append(key)
            slots.append(slot_of[key])
        per_caption.append(slots)
    return per_caption, keys


def _slot_rows(tokenizer, text, phrases) -> torch.Tensor:
    """(S, d): each phrase's one-slot input embedding, the sum of its word embeddings."""
    table = text.get_input_embeddings()
    return torch.stack(
        [
            table.weight[tokenizer(" ".join(phrase), add_special_tokens=False).input_ids].sum(0)
            for phrase in phrases
        ]
    )


def _object_slots(tokenizer, text, ids: torch.Tensor) -> tuple[list[list[int]], torch.Tensor]:
    """The one-slot form of every object of every caption: per caption, the slot index of each of its objects
    (caption order), and the slots' input embeddings (S, d), each the sum of its object's word embeddings."""
    per_caption, keys = distinct_objects(tokenizer, ids)
    return per_caption, _slot_rows(tokenizer, text, keys)


def _caption_index(per_caption: list[list[int]]) -> torch.Tensor:
    """(N, max objects) long: the distinct-object row of caption n's k-th object, -1 past its last object."""
    index = torch.full((len(per_caption), max(map(len, per_caption))), -1, dtype=torch.long)
    for n, slots in enumerate(per_caption):
        index[n, : len(slots)] = torch.tensor(slots)
    return index


def _encode_with_slots(
    tokenizer, text, slot_lists: list[list[int]], rows: torch.Tensor, length: int, batch: int
):
    """Text-encoder states (N, length, d) float16 of "a photo of <x_a> and <x_b> ..." for each list of slots."""
    table = text.get_input_embeddings()
    new_ids = slot_sequences(tokenizer, slot_lists, table.weight.shape[0], length)
    extended = torch.nn.Embedding.from_pretrained(torch.cat([table.weight, rows]), freeze=True)
    text.set_input_embeddings(extended)
    try:
        return torch.cat(
            [text(new_ids[i : i + batch]).last_hidden_state.half() for i in range(0, len(new_ids), batch)]
        )
    finally:
        text.set_input_embeddings(table)


def slot_sequences(tokenizer, slot_lists: list[list[int]], vocab: int, length: int) -> torch.Tensor:
    """(N, length) token ids of "a photo of <x_a> and <x_b> ...": slot s is the id ``vocab + s``, a row
    appended after the vocabulary's."""
    head = tokenizer("a photo of", add_special_tokens=False).input_ids
    joiner = tokenizer("and", add_special_tokens=False).input_ids
    seqs = []
    for slots in slot_lists:
        seq = list(head)
        for k, slot in enumerate(slots):
            seq += ([] if k == 0 else joiner) + [vocab + slot]
        seq = [tokenizer.bos_token_id, *seq, tokenizer.eos_token_id]
        seqs.append(seq + [tokenizer.pad_token_id] * (length - len(seq)))
    return torch.tensor(seqs)


@torch.no_grad()
def compound_conditioning(tokenizer, text, ids: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Text-encoder states of the learning-prompt form of every caption: ONE input slot per object.

    "a photo of a red circle and a blue star" becomes "a photo of <x_0> and <x_1>", where the input
    embedding of ``<x_i>`` is the sum of its object's word embeddings (red + circle, blue + striped + star):
    the structure of ConceptExpress's prompts ("a photo of <c_0> and <c_1>"), in which one learned token
    stands for a whole object, as one word ("dog") does in Stable Diffusion's captions.

    Args:
        ids: (N, 77) token ids of template captions (padded).

    Returns:
        (N, 77, d) float16 last hidden states.
    """
    per_caption, rows = _object_slots(tokenizer, text, ids)
    return _encode_with_slots(tokenizer, text, per_caption, rows, ids.shape[1], batch)


@torch.no_grad()
def single_object_conditioning(tokenizer, text, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The method's single-concept learning prompt for every object of every caption: "a photo of <x_k>".

    The prompt depends only on the object's words, so it is encoded once per distinct object (at most
    colours x shapes x [striped]).

    Args:
        ids: (N, 77) token ids of template captions (padded).

    Returns:
        states: (S, 77, d) float16 last hidden states, one per distinct object;
        index: (N, max objects) long, the row of ``states`` of caption n's k-th object (caption order, the
        order of the scene's masks and labels k + 1), -1 where caption n has fewer objects.
    """
    per_caption, rows = _object_slots(tokenizer, text, ids)
    states = _encode_with_slots(tokenizer, text, [[s] for s in range(rows.shape[0])], rows, ids.shape[1], 512)
    return states, _caption_index(per_caption)


CONTRAST_SWAPS = ("shape", "colour")


def contrast_candidates(words: tuple[str, ...], swap: tuple[str, ...] = ("shape",)) -> list[tuple[str, ...]]:
    """An object's words with its shape, or its colour, replaced by every other one: the candidates of
    ``slot_contrast_loss``.

    The own object comes at the position of its shape among ``SHAPES`` (the first ``len(SHAPES)`` candidates
    are the object's colour and texture with every shape, in that order); with "colour" in ``swap`` the
    object's shape and texture with every OTHER colour follow, in the order of ``COLORS``. So every object has
    the same number of candidates: 6 for ("shape",), 13 for ("shape", "colour").

    >>> contrast_candidates(("red", "striped", "heart"))[:2]
    [('red', 'striped', 'circle'), ('red', 'striped', 'square')]
    """
    unknown = set(swap) - set(CONTRAST_SWAPS)
    if unknown or "shape" not in swap:
        raise ValueError(f"swap must hold 'shape' and may hold 'colour' (got {swap!r})")
    colour, rest = words[0], words[1:-1]
    found = [(colour, *rest, shape) for shape in SHAPES]
    if "colour" in swap:
        found += [(other, *rest, words[-1]) for other in COLORS if other != colour]
    return found


@torch.no_grad()
def slot_contrast_conditioning(
    tokenizer, text, ids: torch.Tensor, swap: tuple[str, ...] = ("shape",)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The single-concept learning prompt "a photo of <x>" of every object, and of its ``contrast_candidates``
    (the same object with another shape, or another colour): the candidates of ``slot_contrast_loss``.

    Args:
        ids: (N, 77) token ids of template captions (padded).
        swap: ("shape",) or ("shape", "colour"): what the candidates change.

    Returns:
        states: (S, C, 77, d) float16 last hidden states, one row per distinct object, C candidates each;
        index: (N, max objects) long, the row of ``states`` of caption n's k-th object (caption order), -1
        where caption n has fewer objects;
        truth: (S,) long, the position of each object's own slot among its candidates.
    """
    per_caption, keys = distinct_objects(tokenizer, ids)
    phrases = [c for key in keys for c in contrast_candidates(key, swap)]
    rows = _slot_rows(tokenizer, text, phrases)
    states = _encode_with_slots(tokenizer, text, [[s] for s in range(len(phrases))], rows, ids.shape[1], 512)
    truth = torch.tensor([SHAPES.index(key[-1]) for key in keys])
    return states.view(len(keys), -1, *states.shape[1:]), _caption_index(per_caption), truth


def word_row_ids(tokenizer, words) -> torch.Tensor:
    """(n,) long: the input-embedding row of each toy word (each is one token of the toy tokenizer)."""
    found = []
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1 or word not in WORDS:
            raise ValueError(f"{word!r} is not a word of the toy vocabulary {WORDS}")
        found.append(ids[0])
    return torch.tensor(found, dtype=torch.long)
