"""The toy world's word tokenizer: a byte-level CLIP BPE tokenizer in which every given word is ONE token.

:func:`build_tokenizer` writes ``vocab.json`` and ``merges.txt`` (and the ``save_pretrained`` files) and
returns the ``CLIPTokenizer``. With the defaults it rebuilds the shipped tokenizer (``model/tokenizer``) byte
for byte: every toy word (:data:`WORDS`) one id, padding with "!" (id 0) like SD 2.x. The tests' tiny
pipelines build theirs with their own words and padding.

The vocabulary is that of CLIP's byte-level BPE: the 256 byte symbols, the same with the end-of-word mark
``</w>``, one entry per merge, then ``<|startoftext|>`` and ``<|endoftext|>``.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

from .scenes import COLORS, SHAPES, TEXTURES

__all__ = ["WORDS", "build_tokenizer", "word_merges"]

#: every word of the toy vocabulary; the shipped tokenizer maps each to ONE token id
WORDS = ("a", "photo", "of", "and", *SHAPES, *COLORS, *(t for t in TEXTURES if t != "plain"))


def _bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable symbol table of byte-level BPE: printable bytes map to themselves and come first."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE to ``symbols``: merge the lowest-ranked adjacent pair, every occurrence, until none is left."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(itertools.pairwise(symbols))]
        best, i = min(pairs)
        if best == math.inf:
            break
        first, second = symbols[i], symbols[i + 1]
        out, j = [], 0
        while j < len(symbols):
            if j < len(symbols) - 1 and symbols[j] == first and symbols[j + 1] == second:
                out.append(first + second)
                j += 2
            else:
                out.append(symbols[j])
                j += 1
        symbols = out
    return symbols


def word_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """BPE merges that make every word ONE token, found by simulating BPE with the merges so far."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    changed = True
    while changed:
        changed = False
        for word in words:
            symbols = _bpe([*word[:-1], word[-1] + "</w>"], ranks)
            if len(symbols) > 1:
                pair = (symbols[0], symbols[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                changed = True
    return merges


def build_tokenizer(
    directory: str | Path, words: tuple[str, ...] = WORDS, pad: str = "!", max_length: int = 77
):
    """Write a byte-level CLIP BPE tokenizer where every one of ``words`` is one token to ``directory``.

    Args:
        directory: created if missing; receives ``vocab.json``, ``merges.txt`` and the files of
            ``CLIPTokenizer.save_pretrained``.
        words: the whole words (lower case) that get a token each; default the toy vocabulary.
        pad: the padding token: "!" (id 0, SD 2.x) or "<|endoftext|>" (SD 1.x).
        max_length: ``model_max_length``.

    Returns:
        the ``CLIPTokenizer`` (deterministic: the same arguments give the same files).
    """
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    merges = word_merges(words)
    vocab_list = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges)]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    tok = CLIPTokenizer(
        vocab=str(directory / "vocab.json"),
        merges=str(directory / "merges.txt"),
        pad_token=pad,
        model_max_length=max_length,
    )
    tok.save_pretrained(directory)
    return tok
