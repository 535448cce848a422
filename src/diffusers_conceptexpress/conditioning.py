"""Text conditioning of a model family: what the UNet receives for a prompt (docs/design.md, 'SDXL').

The method (localization, learning) is the same for every family; what differs is how token ids become the
UNet's conditioning. One class per family:

- :class:`SDConditioning` (SD 1.x / 2.x): one tokenizer and text encoder; ``encoder_hidden_states`` = the
  encoder's last hidden state (L, D).
- :class:`SDXLConditioning`: two tokenizers and encoders (CLIP ViT-L, then OpenCLIP ViT-bigG with its
  projection). ``encoder_hidden_states`` = the PENULTIMATE hidden states of both, concatenated (L, 768 + 1280);
  ``added_cond_kwargs`` = ``text_embeds``, text_encoder_2's projected pooled output, and ``time_ids`` =
  (original size, crop top-left (0, 0), target size) from the image size.

Pooling: transformers' CLIP pools at ``argmax(input_ids)`` when the config's ``eos_token_id`` is 2 (the
configs of SDXL checkpoints); a token added by textual inversion has the highest id and would become the
pooled position. :class:`SDXLConditioning` pools at the real [EOT] position
(:func:`~diffusers_conceptexpress.localization.find_eot_index`) whatever the config says.

A conditioning encodes ids from ANY tokenizer whose ids match its encoders (e.g. the private tokenizers of
:class:`~diffusers_conceptexpress.tokens.TrainableTokens`, with the temporary tokens' rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .localization import find_eot_index

__all__ = ["SDConditioning", "SDXLConditioning", "TextConditioning", "pooled_at_eot", "tokenize"]


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids (B, L) of ``prompts``, padded and truncated to the tokenizer's ``model_max_length``."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def eot_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B,) position of the real [EOT] (first eos) of every row of ``input_ids`` (B, L)."""
    return torch.tensor([find_eot_index(row, eos_token_id) for row in input_ids], device=input_ids.device)


def pooled_at_eot(text_encoder: torch.nn.Module, last_hidden_state: torch.Tensor, eot: torch.Tensor):
    """``text_embeds`` (B, P) of a ``CLIPTextModelWithProjection``: its projection of the final (normed) hidden
    state (B, L, D) at the [EOT] positions ``eot`` (B,), not at ``argmax(input_ids)``."""
    rows = torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device)
    return text_encoder.text_projection(last_hidden_state[rows, eot.to(last_hidden_state.device)])


class TextConditioning:
    """Base class: the (tokenizer, text encoder) pairs of a family and how their ids become UNet inputs.

    Attributes:
        family: "sd" or "sdxl" (written into ``concepts.json``).
        tokenizers, text_encoders: the pairs, in order (each concept token is added to every tokenizer).
        keys: file keys of the pairs' embedding rows (``None``: one pair, stored under the token itself).
    """

    family: str = ""
    keys: tuple[str, ...] | None = None

    def __init__(self, tokenizers: Sequence, text_encoders: Sequence[torch.nn.Module]) -> None:
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)

    @property
    def eos_token_id(self) -> int:
        """The [EOT] id of the first tokenizer (its position is the same in every tokenizer of a family)."""
        return int(self.tokenizers[0].eos_token_id)

    def tokenize(
        self, prompts: Sequence[str], device: torch.device | str | None = None
    ) -> list[torch.Tensor]:
        """Ids (B, L) of ``prompts`` for every pair, on ``device``."""
        return [tokenize(tok, prompts).to(device) for tok in self.tokenizers]

    def encode(self, ids: Sequence[torch.Tensor], dtype: torch.dtype) -> dict:
        """UNet keyword arguments for ids (one (B, L) tensor per pair), floats cast to ``dtype``."""
        raise NotImplementedError


class SDConditioning(TextConditioning):
    """SD 1.x / 2.x: ``encoder_hidden_states`` = the text encoder's last hidden state (B, L, D)."""

    family = "sd"

    def __init__(self, tokenizer, text_encoder: torch.nn.Module) -> None:
        super().__init__([tokenizer], [text_encoder])

    def encode(self, ids: Sequence[torch.Tensor], dtype: torch.dtype) -> dict:
        return {"encoder_hidden_states": self.text_encoders[0](ids[0])[0].to(dtype)}


class SDXLConditioning(TextConditioning):
    """SDXL: penultimate hidden states of both encoders concatenated (B, L, D1 + D2), ``text_embeds`` pooled
    at the [EOT] of ``tokenizer_2``'s ids (B, P) and ``time_ids`` (B, 6).

    Args:
        image_size: (height, width) in pixels of the model input: ``time_ids`` = (h, w, 0, 0, h, w), as
            ``StableDiffusionXLPipeline`` builds them for an uncropped image generated at its own size.
    """

    family = "sdxl"
    keys = ("clip_l", "clip_g")

    def __init__(
        self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, image_size: tuple[int, int]
    ) -> None:
        super().__init__([tokenizer, tokenizer_2], [text_encoder, text_encoder_2])
        self.image_size = (int(image_size[0]), int(image_size[1]))

    def encode(self, ids: Sequence[torch.Tensor], dtype: torch.dtype) -> dict:
        hidden = []
        pooled = None
        for i, (encoder, tokens) in enumerate(zip(self.text_encoders, ids, strict=True)):
            out = encoder(tokens, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if i == 1:
                eot = eot_positions(tokens, int(self.tokenizers[1].eos_token_id))
                pooled = pooled_at_eot(encoder, out.last_hidden_state, eot)
        b = ids[0].shape[0]
        h, w = self.image_size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype, device=pooled.device).expand(b, -1)
        return {
            "encoder_hidden_states": torch.cat(hidden, dim=-1).to(dtype),
            "added_cond_kwargs": {"text_embeds": pooled.to(dtype), "time_ids": time_ids},
        }
