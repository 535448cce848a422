"""Identity boost (docs/design.md, 'LoRA phase'): an optional second phase that trains a peft LoRA adapter on
the UNet's attention projections together with the concept tokens, after the token phase.

The phase acts on the UNet alone (any family whose UNet has diffusers' ``to_q``/``to_k``/``to_v``/``to_out.0``
attention projections) and reuses the token phase's loss (:class:`~diffusers_conceptexpress.learning._Trainer`:
masked diffusion loss + attention alignment). The adapter is trained under a temporary name and removed from
the UNet afterwards: the base UNet is unchanged (bit-identical outputs), and the trained weights travel in
:class:`ConceptLora`, which diffusers' own loader puts back (:func:`load_concept_lora`) and diffusers' own
saver writes (``pytorch_lora_weights.safetensors``, :func:`save_concept_lora`).

Prompts of a step (``lora_prompts``): every concept alone ("a photo of <c_k>") and, with ``"union"``
(default, Break-A-Scene's union sampling), one prompt of a random subset of 2..K concepts in random order
("a photo of <c_j> and <c_i>", mask = the union of theirs); with ``"joint"`` the method's joint prompt of all
concepts instead. One flip decision per step, as in the token phase.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .conditioning import TextConditioning
from .learning import (
    LORA_PROMPTS,
    LearnedConcepts,
    LearningConfig,
    _by_key,
    _conditioning_of,
    _finish_step,
    _freeze,
    _restore_grad,
    _Trainer,
    _update,
)
from .tokens import TrainableTokens

__all__ = [
    "LORA_PROMPTS",
    "LORA_TARGET_MODULES",
    "LORA_WEIGHT_NAME",
    "ConceptLora",
    "load_concept_lora",
    "lora_adapter_name",
    "save_concept_lora",
    "train_lora",
    "unload_concept_lora",
]

#: The attention projections the adapter wraps (every attention layer of a diffusers UNet).
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
#: File name diffusers' ``save_lora_weights`` writes and ``load_lora_weights(dir)`` reads.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_TRAINING_ADAPTER = "conceptexpress_training"


def lora_adapter_name(token_prefix: str) -> str:
    """peft adapter name of a concept set's LoRA: ``conceptexpress_<prefix without symbols>`` ("<ce>" ->
    ``conceptexpress_ce``), so that the LoRAs of different prefixes load side by side."""
    return "conceptexpress_" + (re.sub(r"[^0-9a-zA-Z_]", "", token_prefix) or "concepts")


@dataclass
class ConceptLora:
    """A LoRA of the UNet trained with the concepts.

    Attributes:
        state_dict: diffusers-format LoRA weights of the UNet (keys ``...to_q.lora.down.weight``, without the
            ``unet.`` prefix), float32 on the CPU.
        rank: LoRA rank r.
        alpha: ``lora_alpha`` (the adapter's output is scaled by ``alpha / rank``).
        target_modules: the wrapped projections.
        token_embeddings: (K, D) (SDXL: one per file key) the embeddings the LoRA phase started from (the token phase's result: what the
            extraction without ``lora_rank`` gives), kept for comparison; None when not known (not saved).
    """

    state_dict: dict[str, torch.Tensor]
    rank: int
    alpha: float
    target_modules: tuple[str, ...] = LORA_TARGET_MODULES
    token_embeddings: torch.Tensor | dict[str, torch.Tensor] | None = None

    def peft_config(self):
        """The peft ``LoraConfig`` of the adapter."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=list(self.target_modules),
            init_lora_weights="gaussian",
        )

    def metadata(self) -> dict:
        """Adapter metadata as diffusers stores it next to the weights (peft's config dict): with it a reload
        keeps ``lora_alpha`` even when it differs from the rank."""
        return self.peft_config().to_dict()

    def settings(self) -> dict:
        """The plain-JSON summary ``concepts.json`` records."""
        return {
            "file": LORA_WEIGHT_NAME,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
        }


def _tuner_layers(unet: torch.nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def _active_adapters(unet: torch.nn.Module) -> list[str]:
    """The UNet's active peft adapters (none when no adapter was ever added)."""
    if not getattr(unet, "_hf_peft_config_loaded", False):
        return []
    return list(unet.active_adapters())


def _activate(unet: torch.nn.Module, names: list[str]) -> None:
    """Make exactly ``names`` active on every peft layer, keeping each adapter's weight (scale) and leaving
    every parameter's ``requires_grad`` as it was (peft's ``set_adapter`` would switch it)."""
    grads = {p: p.requires_grad for p in unet.parameters()}
    for layer in _tuner_layers(unet):
        layer.set_adapter(names)
    for p, g in grads.items():
        p.requires_grad_(g)


def _delete_adapter(unet: torch.nn.Module, name: str) -> None:
    if name in (getattr(unet, "peft_config", None) or {}):
        active = [a for a in _active_adapters(unet) if a != name]
        unet.delete_adapters(name)
        if active:
            _activate(unet, active)


def _union_prompts(k: int, names: list[str], sampling: str, generator) -> list[list[tuple[int, str]]]:
    """One step's prompts: every concept alone, then (K >= 2) one union prompt (random subset of 2..K concepts
    in random order for "union", all K in order for "joint")."""
    prompts = [[(i, names[i])] for i in range(k)]
    if k < 2:
        return prompts
    if sampling == "joint":
        return [*prompts, [(i, names[i]) for i in range(k)]]
    size = int(torch.randint(2, k + 1, (1,), generator=generator))
    order = torch.randperm(k, generator=generator)[:size].tolist()
    return [*prompts, [(i, names[i]) for i in order]]


def train_lora(
    *,
    unet: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,
    masks: torch.Tensor,
    features: torch.Tensor,
    learned: LearnedConcepts,
    config: LearningConfig,
    conditioning: TextConditioning | None = None,
    tokenizer=None,
    text_encoder: torch.nn.Module | None = None,
    generator: torch.Generator | None = None,
    progress: Callable[[int], object] | None = None,
    callback: Callable[[int, int, dict], None] | None = None,
) -> tuple[LearnedConcepts, ConceptLora]:
    """The LoRA phase: ``config.lora_steps`` steps training a rank-``config.lora_rank`` adapter on the UNet's
    attention projections and the K concept embeddings together.

    Args:
        unet, scheduler, latents, masks, features, conditioning (or tokenizer + text_encoder): as for
            :func:`~diffusers_conceptexpress.learn_concepts` (latents (1 or 2, C, h, w), masks and features
            (K, h, w) on the latent grid). With several text encoders (SDXL) the concept's rows in every
            encoder train together.
        learned: the token phase's result; its embeddings ((K, D), or one (K, D_i) per file key for SDXL) are
            the starting point.
        config: the run's :class:`~diffusers_conceptexpress.LearningConfig` (``lora_*`` fields; ``lora_rank``
            must be set).
        generator: seeds the adapter's initialisation, noise, timesteps, flips and prompt sampling.
        progress, callback: as for ``learn_concepts``; the callback's step counts on from the token phase's
            (``num_train_steps + i`` of ``num_train_steps + lora_steps``).
    Returns:
        ``(learned, lora)``: ``learned`` with the co-trained embeddings, the counts of both phases and the
        history of both phases; the trained :class:`ConceptLora`. The UNet is left as it was (its adapters,
        their activation and every ``requires_grad`` flag).
    """
    from diffusers.training_utils import cast_training_params
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if config.lora_rank is None:
        raise ValueError("train_lora needs config.lora_rank (the LoRA phase is off when it is None).")
    conditioning = _conditioning_of(conditioning, tokenizer, text_encoder, "train_lora")
    emb = learned.embeddings
    starts = [emb] if conditioning.keys is None else [emb[key] for key in conditioning.keys]
    k = starts[0].shape[0]
    if masks.shape[0] != k:
        raise ValueError(f"Got {masks.shape[0]} masks for {k} learned concepts.")
    alpha = config.lora_alpha if config.lora_alpha is not None else config.lora_rank
    start_copy = [e.detach().float().cpu() for e in starts]
    lora = ConceptLora({}, config.lora_rank, alpha, token_embeddings=_by_key(conditioning, start_copy))
    names = [f"<cxlora{i}>" for i in range(k)]
    frozen = [*conditioning.text_encoders, unet]
    previous = _active_adapters(unet)
    _delete_adapter(unet, _TRAINING_ADAPTER)  # a leftover of an interrupted run
    requires_grad = _freeze(frozen)
    history: list[dict] = []
    try:
        if generator is not None:  # peft draws the initialisation from torch's global generator
            fork = torch.random.fork_rng(devices=[])
            fork.__enter__()
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        try:
            unet.add_adapter(lora.peft_config(), adapter_name=_TRAINING_ADAPTER)
        finally:
            if generator is not None:
                fork.__exit__(None, None, None)
        _activate(unet, [*previous, _TRAINING_ADAPTER])
        params = [p for n, p in unet.named_parameters() if f".{_TRAINING_ADAPTER}." in n]
        for p in params:
            p.requires_grad_(True)
        cast_training_params(unet, dtype=torch.float32)  # trainable (LoRA) parameters in fp32
        with ExitStack() as stack:
            token_sets = []
            pairs = zip(conditioning.tokenizers, conditioning.text_encoders, starts, strict=True)
            for tok, encoder, start in pairs:
                tokens = stack.enter_context(TrainableTokens(tok, encoder, names, [0] * k))
                with torch.no_grad():
                    tokens.weight[tokens.token_ids] = start.to(tokens.weight)
                token_sets.append(tokens)
            trainer = _Trainer(
                conditioning, unet, scheduler, latents, masks, features, config, token_sets, generator
            )
            groups = [{"params": params, "lr": config.lora_learning_rate}]
            if config.lora_token_learning_rate > 0:
                weights = [s.weight for s in token_sets]
                groups.append({"params": weights, "lr": config.lora_token_learning_rate})
            else:  # the tokens stay as the token phase left them
                for s in token_sets:
                    s.weight.requires_grad_(False)
            optimizer = torch.optim.AdamW(groups, betas=config.adam_betas, weight_decay=config.weight_decay)
            samples = 0
            total = config.num_train_steps + config.lora_steps
            for step in range(config.lora_steps):
                flip = int(float(torch.rand(1, generator=generator)) < config.flip_probability)
                prompts = _union_prompts(k, names, config.lora_prompts, generator)
                logs = {"loss": 0.0, "diffusion": 0.0, "attention": 0.0, "contrastive": 0.0, "prompts": 0}
                samples += _update(trainer, optimizer, prompts, flip, [], True, logs)
                _finish_step(logs, history, progress, callback, config.num_train_steps + step, total)
            embeddings = _by_key(conditioning, [s.rows().detach().float().cpu() for s in token_sets])
        state = get_peft_model_state_dict(unet, adapter_name=_TRAINING_ADAPTER)
        lora.state_dict = {
            key: value.detach().float().cpu().contiguous()
            for key, value in convert_state_dict_to_diffusers(state).items()
        }
    finally:
        _delete_adapter(unet, _TRAINING_ADAPTER)
        if previous:
            _activate(unet, previous)
        _restore_grad(frozen, requires_grad)
    result = replace(
        learned,
        embeddings=embeddings,
        num_updates=learned.num_updates + config.lora_steps,
        num_unet_samples=learned.num_unet_samples + samples,
        history=[*learned.history, *history],
    )
    return result, lora


def load_concept_lora(pipe, source: ConceptLora | str | os.PathLike, adapter_name: str) -> None:
    """Load a concept LoRA into ``pipe``'s UNet with diffusers' loader, as ``adapter_name``, active together
    with the adapters that were active before (an adapter of the same name is replaced).

    ``source`` is a :class:`ConceptLora` or a folder holding ``pytorch_lora_weights.safetensors``.
    """
    unet = pipe.unet
    _delete_adapter(unet, adapter_name)
    previous = _active_adapters(unet)
    if isinstance(source, ConceptLora):
        prefix = pipe.unet_name  # the keys and metadata as diffusers reads them from the file: "unet.<key>"
        pipe.load_lora_into_unet(
            {f"{prefix}.{key}": value for key, value in source.state_dict.items()},
            network_alphas=None,
            unet=unet,
            adapter_name=adapter_name,
            metadata={f"{prefix}.{key}": value for key, value in source.metadata().items()},
            _pipeline=pipe,
        )
    else:
        pipe.load_lora_weights(str(source), weight_name=LORA_WEIGHT_NAME, adapter_name=adapter_name)
    _activate(unet, [*previous, adapter_name])


def unload_concept_lora(pipe, adapter_name: str) -> None:
    """Remove a concept LoRA loaded by :func:`load_concept_lora` (nothing happens when it is not loaded)."""
    _delete_adapter(pipe.unet, adapter_name)


def save_concept_lora(directory: str | os.PathLike, lora: ConceptLora) -> Path:
    """Write ``<directory>/pytorch_lora_weights.safetensors`` with diffusers' ``save_lora_weights`` (adapter
    metadata included), with the permissions of an ordinary write (safetensors writes owner-only files)."""
    from diffusers import StableDiffusionPipeline

    from .atomic import _umask

    StableDiffusionPipeline.save_lora_weights(
        str(directory),
        unet_lora_layers=lora.state_dict,
        unet_lora_adapter_metadata=lora.metadata(),
        weight_name=LORA_WEIGHT_NAME,
    )
    path = Path(directory) / LORA_WEIGHT_NAME
    path.chmod(0o666 & ~_umask())
    return path
