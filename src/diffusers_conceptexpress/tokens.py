"""New tokens for concept learning: names, initialisation, and a training embedding that leaves the model intact.

During learning the pipeline's tokenizer and text encoder are NOT modified: a private copy of the tokenizer
gets the temporary tokens, and the text encoder temporarily uses a new fp32 embedding matrix = the original
rows + the new rows (:class:`TrainableTokens`). On exit the original embedding module is put back, so every
original row is bit-identical and the vocabulary size is unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEFAULT_TOKEN_PREFIX",
    "TrainableTokens",
    "base_vocabulary_size",
    "concept_token_names",
    "default_init_ids",
    "is_valid_token_prefix",
]

#: Prefix of the learned tokens unless the caller chooses one: concepts become ``<ce>_1 ... <ce>_K``.
DEFAULT_TOKEN_PREFIX = "<ce>"


def is_valid_token_prefix(prefix: str) -> bool:
    """A usable token prefix: lower case (CLIP lower-cases prompts), no spaces, e.g. "<ce>" or "<mydog>"."""
    return bool(prefix) and prefix == prefix.lower() and not any(c.isspace() for c in prefix)


def concept_token_names(prefix: str, count: int) -> list[str]:
    """Prompt tokens of ``count`` concepts as laid out in ``concepts.safetensors``: ``<p>_1 ... <p>_K``.

    diffusers loads a ``[K + 1, D]`` tensor stored under ``<p>`` as the tokens ``<p>, <p>_1, ..., <p>_K``;
    each ``<p>_k`` is one row, usable alone in a prompt.
    """
    if not is_valid_token_prefix(prefix):
        raise ValueError(
            f"Token prefix {prefix!r} must be lower case without spaces (the CLIP tokenizer lower-cases "
            "prompts, so upper-case tokens are silently never matched)."
        )
    return [f"{prefix}_{k}" for k in range(1, count + 1)]


def default_init_ids(vocab_size: int, count: int, offset: int = 100) -> list[int]:
    """The authors' initialisation rows: placeholder i starts from vocabulary row ``vocab_size - offset + i``.

    For CLIP (49408 entries) this is 49308 + i, real-word embeddings from the tail of the vocabulary. Rows
    wrap around when ``count > offset``; the special tokens at the very end are never used.
    """
    start = max(0, vocab_size - offset)
    span = max(1, vocab_size - 2 - start)  # skip <|startoftext|>, <|endoftext|>
    return [start + (i % span) for i in range(count)]


def base_vocabulary_size(tokenizer, text_encoder: nn.Module) -> int:
    """Entries of the ORIGINAL vocabulary: the tokenizer's base vocabulary without added tokens (49408 for
    CLIP), capped by the text encoder's embedding rows.

    Tokens loaded by textual inversion (``load_textual_inversion``, or an earlier extraction loaded into the
    pipeline) are added tokens and grow ``len(tokenizer)`` and the embedding matrix, never this number: so
    initialisation rows taken from the end of the vocabulary (:func:`default_init_ids`) are the same for a
    pipeline's n-th extraction as for its first.
    """
    rows = int(text_encoder.get_input_embeddings().weight.shape[0])
    return min(rows, int(tokenizer.vocab_size))


class _TrainingEmbedding(nn.Module):
    """Embedding lookup in an fp32 matrix whose output is cast to the text encoder's dtype."""

    def __init__(self, weight: nn.Parameter, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = weight
        self.out_dtype = out_dtype

    @property
    def embedding_dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight).to(self.out_dtype)


class TrainableTokens:
    """Temporary tokens with a trainable fp32 embedding, installed on a text encoder inside a ``with`` block.

    Args:
        tokenizer: the pipeline's tokenizer (copied, never modified).
        text_encoder: the pipeline's text encoder (its embedding module is swapped inside the block).
        names: the temporary token strings (lower case, unique, absent from the tokenizer).
        init_ids: for each name, the vocabulary row its embedding starts from.
    Attributes:
        tokenizer: the private tokenizer with ``names`` added.
        token_ids: (n,) embedding rows of the new tokens in the training matrix.
        weight: the trainable (V + n, D) fp32 matrix (only rows ``token_ids`` are allowed to change).
    """

    def __init__(
        self, tokenizer, text_encoder: nn.Module, names: Sequence[str], init_ids: Sequence[int]
    ) -> None:
        if len(set(names)) != len(names):
            raise ValueError("Token names must be unique.")
        vocab = tokenizer.get_vocab()
        clash = [n for n in names if n in vocab]
        if clash:
            raise ValueError(f"Tokens {clash} already exist in the tokenizer; choose another prefix.")
        self.text_encoder = text_encoder
        self.tokenizer = copy.deepcopy(tokenizer)
        first = len(self.tokenizer)
        self.tokenizer.add_tokens(list(names))
        self.names = list(names)
        tok_ids = self.tokenizer.convert_tokens_to_ids(self.names)
        self._original = text_encoder.get_input_embeddings()
        original = self._original.weight.detach()
        self.vocab_rows = original.shape[0]
        # ids the tokenizer gives the new tokens -> rows appended after the original matrix
        self._id_offset = self.vocab_rows - first
        if sorted(tok_ids) != list(range(first, first + len(names))):
            raise RuntimeError("Unexpected token ids for the new tokens.")
        self.token_ids = torch.tensor([i + self._id_offset for i in tok_ids], dtype=torch.long)
        init = original[torch.as_tensor(list(init_ids), dtype=torch.long)].float()
        self.weight = nn.Parameter(torch.cat([original.float(), init], dim=0))
        self._original_rows = original.float().clone()
        self._embedding = _TrainingEmbedding(self.weight, original.dtype)

    def __enter__(self) -> TrainableTokens:
        self.text_encoder.set_input_embeddings(self._embedding)
        return self

    def __exit__(self, *exc) -> None:
        self.text_encoder.set_input_embeddings(self._original)

    def encode_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids (B, L) of prompts, padded to the model length, with new tokens mapped to their rows."""
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return torch.where(ids >= self.vocab_rows - self._id_offset, ids + self._id_offset, ids)

    def restore_original_rows(self) -> None:
        """Undo any change to the original rows (AdamW weight decay moves rows with zero gradient)."""
        with torch.no_grad():
            self.weight[: self.vocab_rows].copy_(self._original_rows.to(self.weight.device))

    def rows(self, names: Sequence[str] | None = None) -> torch.Tensor:
        """Current embeddings (n, D) of the given new tokens (default: all), with autograd."""
        idx = self.token_ids if names is None else self.token_ids[[self.names.index(n) for n in names]]
        return self.weight[idx.to(self.weight.device)]
