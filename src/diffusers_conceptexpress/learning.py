"""Concept learning (docs/design.md, 'Learning'): one token embedding per concept, with split-and-merge.

Only new token embeddings train; UNet, VAE and text encoder stay frozen (and unmodified, see
:mod:`~diffusers_conceptexpress.tokens`). The clean image latent and its horizontal flip are encoded ONCE by
the caller and passed in.

Split phase (``split_steps``, authors: 100): every concept has ``tokens_per_concept`` (5) tokens, trained on
"a photo of <token>" with the concept's mask, plus a supervised contrastive loss on the raw token embeddings
(labels = concepts). Merge: each concept's embedding becomes the mean of its split tokens. Merged phase: the
K tokens train on their single prompts and, with ``joint_prompt``, on "a photo of <c_1> and ... <c_K>" with
the union mask.

Loss of a prompt: masked diffusion loss + ``attention_weight`` x Sinkhorn distance between every concept
token's cross-attention map (at the factor-``attention_factor`` layers) and the concept's soft feature map,
+ (split phase) ``contrastive_weight`` x SupCon.

Schedules:

- ``"faithful"``: the authors': every prompt gets its own forward, backward and optimiser step, so a run does
  ``split_steps * T * K + (num_train_steps - split_steps) * (K + 1)`` updates (T = tokens per concept).
- ``"fast"`` (default): all prompts of a step in ONE batched UNet call and one optimiser step per step
  (``num_train_steps`` updates, the same UNet samples as faithful); ``max_batch_size`` splits the batch into
  micro-batches with gradient accumulation when memory is short.
- ``"turbo"``: batched like "fast", with its own defaults (:data:`SCHEDULE_DEFAULTS`): fewer steps at a higher
  learning rate, ONE split token per concept per split step (the tokens take turns; SupCon still sees them
  all) and timesteps stratified over the prompts of a step. At most 1/6 of the authors' UNet samples.

``num_train_steps``, ``split_steps``, ``learning_rate``, ``split_tokens_per_step`` and ``timestep_sampling``
left at None take the schedule's default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from .attention import (
    AttentionRecorder,
    capture_attention,
    grid_at_factor,
    nearest_factor,
    unet_cross_attention_factors,
)
from .conditioning import SDConditioning, TextConditioning
from .losses import diffusion_target, grid_cost, masked_diffusion_loss, sinkhorn_distance, supcon_loss
from .tokens import TrainableTokens, base_vocabulary_size, default_init_ids

__all__ = [
    "JOINT_SEPARATOR",
    "LORA_PROMPTS",
    "MIXED_PRECISION",
    "PROMPT_TEMPLATE",
    "SCHEDULES",
    "SCHEDULE_DEFAULTS",
    "TIMESTEP_SAMPLING",
    "LearnedConcepts",
    "LearningConfig",
    "learn_concepts",
]

SCHEDULES = ("fast", "faithful", "turbo")
TIMESTEP_SAMPLING = ("uniform", "stratified")
_AUTHORS = {
    "num_train_steps": 500,
    "split_steps": 100,
    "learning_rate": 5e-4,
    "split_tokens_per_step": None,  # None: every split token at every split step
    "timestep_sampling": "uniform",
}
#: What a :class:`LearningConfig` field left at None becomes, per schedule ("fast" and "faithful": the authors').
SCHEDULE_DEFAULTS: dict[str, dict] = {
    "fast": dict(_AUTHORS),
    "faithful": dict(_AUTHORS),
    "turbo": {
        "num_train_steps": 150,
        "split_steps": 30,
        "learning_rate": 2e-3,
        "split_tokens_per_step": 1,
        "timestep_sampling": "stratified",
    },
}
MIXED_PRECISION = ("no", "fp16", "bf16")
#: Default training prompt ("{}" is replaced by the token(s)) and separator of the tokens in the joint prompt.
PROMPT_TEMPLATE = "a photo of {}"
JOINT_SEPARATOR = " and "
#: Prompt sampling of the LoRA phase (:mod:`~diffusers_conceptexpress.lora`).
LORA_PROMPTS = ("union", "joint")


@dataclass
class LearningConfig:
    """Options of concept learning; defaults are the ConceptExpress authors'.

    Attributes:
        num_train_steps: training steps (None: the schedule's, 500; "turbo": 150).
        schedule: "fast" (batched, default), "faithful" (one optimiser step per prompt, the authors') or
            "turbo" (batched, fewer samples; see :data:`SCHEDULE_DEFAULTS`).
        split_steps: steps of the split phase (None: the schedule's, 100; "turbo": 30); the merge happens
            after them.
        tokens_per_concept: split tokens per concept (5); 1 disables split-and-merge.
        split_tokens_per_step: split tokens of each concept trained at a split step, taking turns (None: the
            schedule's; all of them, "turbo": 1).
        timestep_sampling: "uniform" (each prompt's t ~ U[0, T), the authors') or "stratified" (the prompts of
            a UNet call, i.e. of a step unless ``max_batch_size`` splits it, share out [0, T) in equal
            strata, one t in each, in random order); None: the schedule's ("turbo": stratified).
        learning_rate, adam_betas, weight_decay, max_grad_norm: AdamW on the embedding matrix, constant lr
            (None: the schedule's, 5e-4, "turbo": 2e-3; (0.9, 0.999), 1e-2, 1.0).
        contrastive_weight, contrastive_temperature: SupCon in the split phase (1e-3, 0.07).
        attention_weight: weight of the attention alignment loss (1e-5).
        sinkhorn_reg, sinkhorn_iters: entropic OT regularisation and log-domain iterations (1e-3, 200).
        attention_factor: downsampling factor of the cross-attention layers aligned (4: 16x16 at 512 px);
            the nearest factor with cross-attention is used if the UNet has none there.
        flip_probability: horizontal flip of latent, masks and maps per step (0.5).
        joint_prompt: train the joint prompt in the merged phase (True).
        prompt_template: "{}" is replaced by the token(s) ("a photo of {}").
        joint_separator: between tokens in the joint prompt (" and ").
        mixed_precision: "no", "fp16" or "bf16" autocast for the frozen models (embeddings stay fp32).
        max_batch_size: "fast" and "turbo": micro-batch size (None: all prompts of a step at once).
        init_offset: split token i starts from vocabulary row ``vocab_size - init_offset + i`` (100), with
            ``vocab_size`` the ORIGINAL vocabulary (tokens loaded by textual inversion do not count).
        lora_rank: rank of the LoRA phase's adapter on the UNet's attention projections (None: no LoRA phase,
            the method as published; see :mod:`~diffusers_conceptexpress.lora` and docs/design.md).
        lora_alpha: the adapter's ``lora_alpha`` (None: equal to the rank, scale 1).
        lora_steps, lora_learning_rate, lora_token_learning_rate: steps of the LoRA phase (200) and AdamW
            learning rates of the adapter (1e-3) and of the concept tokens in it (1e-4; 0: tokens frozen);
            chosen on the toy world's tuning scenes (docs/design.md, 'LoRA phase').
        lora_prompts: "union" (each concept alone + one random subset of 2..K concepts per step) or "joint"
            (each alone + all K, the token phase's prompts).
    """

    num_train_steps: int | None = None
    schedule: str = "fast"
    split_steps: int | None = None
    tokens_per_concept: int = 5
    split_tokens_per_step: int | None = None
    timestep_sampling: str | None = None
    learning_rate: float | None = None
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    contrastive_weight: float = 1e-3
    contrastive_temperature: float = 0.07
    attention_weight: float = 1e-5
    sinkhorn_reg: float = 1e-3
    sinkhorn_iters: int = 200
    attention_factor: int = 4
    flip_probability: float = 0.5
    joint_prompt: bool = True
    prompt_template: str = PROMPT_TEMPLATE
    joint_separator: str = JOINT_SEPARATOR
    mixed_precision: str = "no"
    max_batch_size: int | None = None
    init_offset: int = 100
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_steps: int = 200
    lora_learning_rate: float = 1e-3
    lora_token_learning_rate: float = 1e-4
    lora_prompts: str = "union"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Unknown schedule {self.schedule!r}; choose one of {SCHEDULES}.")
        for name, value in SCHEDULE_DEFAULTS[self.schedule].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.split_tokens_per_step is None:
            self.split_tokens_per_step = self.tokens_per_concept
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(
                f"Unknown timestep_sampling {self.timestep_sampling!r}; choose one of {TIMESTEP_SAMPLING}."
            )
        if not 1 <= self.split_tokens_per_step <= max(1, self.tokens_per_concept):
            raise ValueError(
                f"split_tokens_per_step must be between 1 and tokens_per_concept ({self.tokens_per_concept}), "
                f"got {self.split_tokens_per_step}."
            )
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"Unknown mixed_precision {self.mixed_precision!r}; choose one of {MIXED_PRECISION}."
            )
        if self.num_train_steps < 1:
            raise ValueError(f"num_train_steps must be >= 1, got {self.num_train_steps}.")
        if self.split_steps < 0 or self.tokens_per_concept < 1:
            raise ValueError("split_steps must be >= 0 and tokens_per_concept >= 1.")
        if "{}" not in self.prompt_template:
            raise ValueError(
                f'prompt_template must contain "{{}}" for the tokens, got {self.prompt_template!r}.'
            )
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 or None, got {self.max_batch_size}.")
        self._check_lora()

    def _check_lora(self) -> None:
        rank = self.lora_rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"lora_rank must be a positive integer or None (no LoRA phase), got {rank!r}.")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0 or None (= lora_rank), got {self.lora_alpha!r}.")
        if self.lora_steps < 1 or not self.lora_learning_rate > 0 or self.lora_token_learning_rate < 0:
            raise ValueError(
                "lora_steps must be >= 1, lora_learning_rate > 0 and lora_token_learning_rate >= 0; got "
                f"{self.lora_steps}, {self.lora_learning_rate}, {self.lora_token_learning_rate}."
            )
        if self.lora_prompts not in LORA_PROMPTS:
            raise ValueError(f"Unknown lora_prompts {self.lora_prompts!r}; choose one of {LORA_PROMPTS}.")

    def to_dict(self) -> dict:
        """Plain-JSON view of the options."""
        d = asdict(self)
        d["adam_betas"] = list(d["adam_betas"])
        return d

    def num_updates(self, num_concepts: int) -> int:
        """Optimiser updates of a run with ``num_concepts`` concepts under this schedule."""
        return len(_plan(self, num_concepts)[0])

    def num_unet_samples(self, num_concepts: int) -> int:
        """UNet sample-passes (forward + backward of one latent) of a run."""
        return sum(len(prompts) for prompts in _plan(self, num_concepts)[0])


@dataclass
class LearnedConcepts:
    """Result of :func:`learn_concepts`.

    Attributes:
        embeddings: (K, D) float32 learned embeddings, one per concept (CPU); for a conditioning with several
            text encoders (SDXL) a dict of them by file key (``{"clip_l": (K, 768), "clip_g": (K, 1280)}``).
        initial_embeddings: (K, D) (or the same dict) the mean of each concept's initial split embeddings (the
            merge of the untrained tokens), for comparison.
        num_updates: optimiser steps taken.
        num_unet_samples: UNet sample-passes (one latent forward + backward each).
        history: per training step, a dict of mean losses ("loss", "diffusion", "attention", "contrastive").
    """

    embeddings: torch.Tensor | dict[str, torch.Tensor]
    initial_embeddings: torch.Tensor | dict[str, torch.Tensor]
    num_updates: int
    num_unet_samples: int
    history: list[dict] = field(default_factory=list)


# A prompt is a list of (concept index, token name) pairs; a step is a list of updates, each a list of prompts.
_Prompt = list[tuple[int, str]]


def _split_names(num_concepts: int, tokens_per_concept: int) -> list[list[str]]:
    return [[f"<cxtrain{k}x{j}>" for j in range(tokens_per_concept)] for k in range(num_concepts)]


def _plan(config: LearningConfig, num_concepts: int) -> tuple[list[list[_Prompt]], list[int]]:
    """Every optimiser update of a run as its list of prompts, and the training step each belongs to."""
    t, m = config.tokens_per_concept, config.split_tokens_per_step
    names = _split_names(num_concepts, t)
    merged = [[(k, names[k][0])] for k in range(num_concepts)]
    if config.joint_prompt:  # the authors train it for K = 1 too (then it repeats the single prompt)
        merged.append([(k, names[k][0]) for k in range(num_concepts)])
    updates, steps = [], []
    for step in range(config.num_train_steps):
        if step < config.split_steps and t > 1:  # m of each concept's split tokens, taking turns
            turn = [(step * m + i) % t for i in range(m)]
            prompts = [[(k, names[k][j])] for k in range(num_concepts) for j in sorted(turn)]
        else:
            prompts = merged
        if config.schedule == "faithful":
            updates += [[p] for p in prompts]
            steps += [step] * len(prompts)
        else:
            updates.append(list(prompts))
            steps.append(step)
    return updates, steps


def _pool_maps(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(K, h, w) soft maps -> (K, gh * gw) distributions on the attention grid (area pooling)."""
    pooled = F.adaptive_avg_pool2d(maps[None].float(), grid)[0].reshape(maps.shape[0], -1)
    return pooled / pooled.sum(-1, keepdim=True).clamp_min(1e-12)


def _autocast(device: torch.device, mode: str):
    if mode == "no":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if mode == "fp16" else torch.bfloat16)


class _Trainer:
    """State of one learning run (kept small: the public entry point is :func:`learn_concepts`)."""

    def __init__(self, conditioning, unet, scheduler, latents, masks, features, config, tokens, generator):
        self.conditioning, self.unet, self.config = conditioning, unet, config
        self.token_sets: list[TrainableTokens] = tokens  # one per (tokenizer, text encoder) pair
        self.tokens = tokens[0]
        self.generator = generator
        self.noise_scheduler = DDPMScheduler.from_config(scheduler.config)
        latents = latents.detach()
        self.device = latents.device
        h, w = latents.shape[-2:]
        self.latent_size = (h, w)
        self.factor = nearest_factor(unet_cross_attention_factors(unet), config.attention_factor)
        self.grid = grid_at_factor((h, w), self.factor)
        self.cost = grid_cost(*self.grid, device=self.device)
        m = masks.to(self.device).float()
        f = features.to(self.device).float()
        # index 0: as is, 1: horizontally flipped (the encoded flipped image when given, else the flipped latent)
        self.latents = [latents[:1], latents[1:2] if latents.shape[0] > 1 else latents[:1].flip(-1)]
        self.masks = [m, m.flip(-1)]
        self.targets = [_pool_maps(f, self.grid), _pool_maps(f.flip(-1), self.grid)]

    def prompt_loss(self, prompts: Sequence[_Prompt], flip: int) -> tuple[torch.Tensor, dict]:
        """Diffusion + attention loss of a batch of prompts (one UNet call); mean over prompts."""
        cfg, tt = self.config, self.tokens
        texts = [cfg.prompt_template.format(cfg.joint_separator.join(n for _, n in p)) for p in prompts]
        all_ids = [s.encode_ids(texts).to(self.device) for s in self.token_sets]
        ids = all_ids[0]
        rows = {n: int(r) for n, r in zip(tt.names, tt.token_ids, strict=True)}
        positions = [[int((ids[b] == rows[n]).nonzero()[0]) for _, n in p] for b, p in enumerate(prompts)]
        record = sorted({pos for ps in positions for pos in ps})
        b = len(prompts)
        lat = self.latents[flip].expand(b, -1, -1, -1)
        noise = randn_tensor(lat.shape, generator=self.generator, device=self.device, dtype=lat.dtype)
        high = self.noise_scheduler.config.num_train_timesteps
        if cfg.timestep_sampling == "stratified":  # one t in each of b equal strata of [0, high), shuffled
            strata = torch.randperm(b, generator=self.generator) + torch.rand(b, generator=self.generator)
            t = (strata * high / b).long().clamp_max(high - 1).to(self.device)
        else:
            t = torch.randint(0, high, (b,), generator=self.generator).to(self.device)
        noisy = self.noise_scheduler.add_noise(lat, noise, t)
        recorder = AttentionRecorder(
            self.latent_size,
            record_self=False,
            cross_token_indices=record,
            cross_factors=[self.factor],
            cross_with_grad=True,
        )
        with _autocast(self.device, cfg.mixed_precision):
            conditioning = self.conditioning.encode(all_ids, self.unet.dtype)
            with capture_attention(self.unet, recorder):
                pred = self.unet(noisy, t, **conditioning).sample
        target = diffusion_target(self.noise_scheduler, lat, noise, t)
        mask = torch.stack([self.masks[flip][[k for k, _ in p]].amax(0) for p in prompts])[:, None]
        diffusion = masked_diffusion_loss(pred.float(), target.float(), mask)
        maps = recorder.cross_attention(self.factor).flatten(2)  # (B, len(record), gh * gw)
        a, tgt, owner = [], [], []
        for i, p in enumerate(prompts):
            for (k, _), pos in zip(p, positions[i], strict=True):
                a.append(maps[i, record.index(pos)])
                tgt.append(self.targets[flip][k])
                owner.append(i)
        # the authors' order: target first, attention second (gradient = the attention's dual potential)
        dist = sinkhorn_distance(
            torch.stack(tgt), torch.stack(a), self.cost, reg=cfg.sinkhorn_reg, num_iters=cfg.sinkhorn_iters
        )
        owner_t = torch.tensor(owner, device=dist.device)
        per_prompt = torch.zeros(b, device=dist.device).index_add(0, owner_t, dist)
        per_prompt = per_prompt / torch.bincount(owner_t, minlength=b).clamp_min(1)
        attention = per_prompt.mean()
        loss = diffusion + cfg.attention_weight * attention
        return loss, {"diffusion": float(diffusion.detach()), "attention": float(attention.detach())}

    def contrastive_loss(self, split_names: list[list[str]]) -> torch.Tensor:
        """SupCon on the split tokens' raw embeddings; with several text encoders, on each token's rows of all
        of them concatenated (one feature vector per token)."""
        flat = [n for names in split_names for n in names]
        labels = torch.tensor([k for k, names in enumerate(split_names) for _ in names], device=self.device)
        rows = [s.rows(flat) for s in self.token_sets]
        features = rows[0] if len(rows) == 1 else torch.cat([r.to(rows[0].device) for r in rows], dim=-1)
        return supcon_loss(features, labels, self.config.contrastive_temperature)


def learn_concepts(
    *,
    tokenizer=None,
    text_encoder: torch.nn.Module | None = None,
    unet: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,
    masks: torch.Tensor,
    features: torch.Tensor,
    config: LearningConfig | None = None,
    generator: torch.Generator | None = None,
    progress: Callable[[int], object] | None = None,
    callback: Callable[[int, int, dict], None] | None = None,
    conditioning: TextConditioning | None = None,
) -> LearnedConcepts:
    """Learn one embedding per concept.

    Args:
        tokenizer, text_encoder, unet, scheduler: the frozen SD components (left unmodified).
        latents: (1, C, h, w) clean scaled latent of the image, encoded once; or (2, C, h, w) with the latent
            of the horizontally flipped image second (otherwise the latent itself is flipped).
        masks: (K, h, w) bool concept masks on the latent grid.
        features: (K, h, w) non-negative soft maps of the concepts (e.g. localization features; for
            user masks, the normalised masks).
        config: :class:`LearningConfig`.
        generator: seeds noise, timesteps and flips: same seed, same embeddings.
        progress: called with the number of finished training steps' increment (e.g. a tqdm ``update``).
        callback: ``callback(step, num_train_steps, logs)`` after every training step.
        conditioning: how prompts become UNet inputs (:mod:`~diffusers_conceptexpress.conditioning`); default
            ``SDConditioning(tokenizer, text_encoder)``. With several text encoders (SDXL) each concept is one
            token in EVERY tokenizer, its rows trained together.
    Returns:
        :class:`LearnedConcepts`.
    """
    config = config or LearningConfig()
    conditioning = _conditioning_of(conditioning, tokenizer, text_encoder, "learn_concepts")
    k = masks.shape[0]
    if k < 1:
        raise ValueError("Concept learning needs at least one mask.")
    if (
        latents.shape[0] not in (1, 2)
        or masks.shape[1:] != latents.shape[-2:]
        or features.shape != masks.shape
    ):
        raise ValueError(
            f"latents (1 or 2, C, h, w), masks (K, h, w) and features (K, h, w) must agree; got "
            f"{tuple(latents.shape)}, {tuple(masks.shape)}, {tuple(features.shape)}."
        )
    split_names = _split_names(k, config.tokens_per_concept)
    flat_names = [n for names in split_names for n in names]
    pairs = list(zip(conditioning.tokenizers, conditioning.text_encoders, strict=True))
    updates, steps = _plan(config, k)
    frozen = [*conditioning.text_encoders, unet]
    requires_grad = _freeze(frozen)
    history: list[dict] = []
    samples = num_updates = 0
    try:
        with ExitStack() as stack:
            token_sets = []
            for tok, encoder in pairs:
                # rows of the original vocabulary: tokens loaded earlier (textual inversion) never shift them
                init_ids = default_init_ids(
                    base_vocabulary_size(tok, encoder), len(flat_names), config.init_offset
                )
                token_sets.append(stack.enter_context(TrainableTokens(tok, encoder, flat_names, init_ids)))
            initial = [
                s.rows().detach().reshape(k, config.tokens_per_concept, -1).mean(1).float().cpu()
                for s in token_sets
            ]
            trainer = _Trainer(
                conditioning, unet, scheduler, latents, masks, features, config, token_sets, generator
            )
            optimizer = torch.optim.AdamW(
                [s.weight for s in token_sets],
                lr=config.learning_rate,
                betas=config.adam_betas,
                weight_decay=config.weight_decay,
            )
            merged = False
            flip = 0
            logs: dict = {}
            for u, (prompts, step) in enumerate(zip(updates, steps, strict=True)):
                first_of_step = u == 0 or steps[u - 1] != step
                if first_of_step:
                    if step >= config.split_steps and not merged:
                        _merge(token_sets, split_names)
                        merged = True
                    flip = int(float(torch.rand(1, generator=generator)) < config.flip_probability)
                    logs = {"loss": 0.0, "diffusion": 0.0, "attention": 0.0, "contrastive": 0.0, "prompts": 0}
                samples += _update(trainer, optimizer, prompts, flip, split_names, merged, logs)
                num_updates += 1
                last_of_step = u == len(updates) - 1 or steps[u + 1] != step
                if last_of_step:
                    _finish_step(logs, history, progress, callback, step, config.num_train_steps)
            if not merged:
                _merge(token_sets, split_names)
            learned = [
                torch.stack([s.rows([names[0]])[0] for names in split_names]).detach().float().cpu()
                for s in token_sets
            ]
    finally:
        _restore_grad(frozen, requires_grad)
    return LearnedConcepts(
        _by_key(conditioning, learned), _by_key(conditioning, initial), num_updates, samples, history
    )


def _conditioning_of(conditioning, tokenizer, text_encoder, caller: str) -> TextConditioning:
    """``conditioning``, or SD's of ``tokenizer`` + ``text_encoder`` when it is None."""
    if conditioning is not None:
        return conditioning
    if tokenizer is None or text_encoder is None:
        raise TypeError(f"{caller} needs tokenizer and text_encoder, or a conditioning.")
    return SDConditioning(tokenizer, text_encoder)


def _freeze(modules: Sequence[torch.nn.Module]) -> list[dict[str, bool]]:
    """Switch ``requires_grad`` off for every parameter of ``modules``; returns the flags as they were."""
    saved = [{n: p.requires_grad for n, p in m.named_parameters()} for m in modules]
    for module in modules:
        module.requires_grad_(False)
    return saved


def _restore_grad(modules: Sequence[torch.nn.Module], saved: list[dict[str, bool]]) -> None:
    """Put back the flags :func:`_freeze` returned (parameters added since then: off)."""
    for module, flags in zip(modules, saved, strict=True):
        for name, param in module.named_parameters():
            param.requires_grad_(flags.get(name, False))


def _finish_step(logs: dict, history: list[dict], progress, callback, step: int, total: int) -> None:
    """A finished training step: its mean losses (``logs`` summed over its prompts) appended to ``history``,
    then ``progress(1)`` and ``callback(step, total, entry)``."""
    n = max(1, logs.pop("prompts"))
    entry = {key: value / n for key, value in logs.items()}
    history.append(entry)
    if progress is not None:
        progress(1)
    if callback is not None:
        callback(step, total, entry)


def _by_key(conditioning: TextConditioning, values: list[torch.Tensor]):
    """One tensor per text encoder -> the tensor (one encoder) or a dict by file key (several)."""
    if conditioning.keys is None:
        return values[0]
    return dict(zip(conditioning.keys, values, strict=True))


def _merge(token_sets: list[TrainableTokens], split_names: list[list[str]]) -> None:
    """Split-and-merge: each concept's first split token takes the mean of its split tokens (in every
    text encoder)."""
    with torch.no_grad():
        for tokens in token_sets:
            for names in split_names:
                mean = tokens.rows(names).mean(0)
                tokens.weight[tokens.token_ids[tokens.names.index(names[0])]] = mean


def _update(trainer: _Trainer, optimizer, prompts, flip, split_names, merged, logs) -> int:
    """One optimiser update over ``prompts`` (micro-batched unless faithful); returns the UNet samples used."""
    cfg = trainer.config
    optimizer.zero_grad(set_to_none=True)
    size = len(prompts) if cfg.max_batch_size is None else cfg.max_batch_size
    total = 0.0
    for start in range(0, len(prompts), size):
        chunk = prompts[start : start + size]
        loss, parts = trainer.prompt_loss(chunk, flip)
        (loss * len(chunk) / len(prompts)).backward()
        total += float(loss.detach()) * len(chunk)
        logs["diffusion"] += parts["diffusion"] * len(chunk)
        logs["attention"] += parts["attention"] * len(chunk)
    if not merged and cfg.tokens_per_concept > 1:
        contrastive = trainer.contrastive_loss(split_names)
        (cfg.contrastive_weight * contrastive).backward()
        logs["contrastive"] += float(contrastive.detach()) * len(prompts)
        total += cfg.contrastive_weight * float(contrastive.detach()) * len(prompts)
    logs["loss"] += total
    logs["prompts"] += len(prompts)
    # every trained parameter (the token matrix; and the adapter in the LoRA phase), clipped together
    torch.nn.utils.clip_grad_norm_(
        [p for g in optimizer.param_groups for p in g["params"]], cfg.max_grad_norm
    )
    optimizer.step()
    for tokens in trainer.token_sets:
        tokens.restore_original_rows()
    return len(prompts)
