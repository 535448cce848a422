"""Concept learning on tiny SD-shaped pipelines: schedules, update counts, direction of learning, invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_post_hook

from diffusers_conceptexpress import ConceptExpressPipeline, prepare_image
from diffusers_conceptexpress.learning import LearningConfig, learn_concepts
from learning_helpers import evaluate_masked_loss


def two_masks(h=16, w=16):
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, 2:8, 2:8] = True
    masks[1, 9:15, 6:14] = True
    return masks


def setup(pipe):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    pixels, _ = prepare_image(image, 32, multiple=8)
    with torch.no_grad():
        latents = pipe.encode_pixels(pixels)
    masks = two_masks()
    features = masks.float() / masks.float().sum((1, 2), keepdim=True)
    return latents, masks, features


def run(pipe, config, seed=0, masks=None):
    latents, m, features = setup(pipe)
    if masks is not None:
        m, features = masks, masks.float() / masks.float().sum((1, 2), keepdim=True)
    return learn_concepts(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        unet=pipe.unet,
        scheduler=pipe.scheduler,
        latents=latents,
        masks=m,
        features=features,
        config=config,
        generator=torch.Generator().manual_seed(seed),
    )


class StepCounter:
    """Counts real optimiser steps through torch's global step hook."""

    def __enter__(self):
        self.count = 0
        self.handle = register_optimizer_step_post_hook(self._hook)
        return self

    def _hook(self, *args):
        self.count += 1

    def __exit__(self, *exc):
        self.handle.remove()


def test_faithful_update_count_formula():
    config = LearningConfig(schedule="faithful")  # authors' 500 steps, 100 split, 5 tokens per concept
    for k in range(1, 6):
        assert config.num_updates(k) == 100 * 5 * k + 400 * (k + 1)
    assert LearningConfig().num_updates(3) == 500


def test_faithful_updates_counted_short_run(components_factory):
    pipe = ConceptExpressPipeline(**components_factory("sd1"))
    config = LearningConfig(schedule="faithful", num_train_steps=12, split_steps=4, sinkhorn_iters=1)
    with StepCounter() as steps:
        result = run(pipe, config)  # K = 2
    assert steps.count == result.num_updates == 4 * 5 * 2 + 8 * (2 + 1)
    assert result.num_unet_samples == steps.count
    assert len(result.history) == 12


def test_faithful_updates_counted_authors_defaults(components_factory):
    pipe = ConceptExpressPipeline(**components_factory("sd1"))
    one = torch.zeros(1, 16, 16, dtype=torch.bool)
    one[0, 4:12, 4:12] = True
    with StepCounter() as steps:
        result = run(pipe, LearningConfig(schedule="faithful", sinkhorn_iters=1), masks=one)
    assert steps.count == result.num_updates == 100 * 5 * 1 + 400 * (1 + 1)
    assert len(result.history) == 500


def test_fast_schedule_one_update_per_step_same_samples(components_factory):
    pipe = ConceptExpressPipeline(**components_factory("sd2"))
    fast = LearningConfig(num_train_steps=6, split_steps=2)
    faithful = LearningConfig(num_train_steps=6, split_steps=2, schedule="faithful")
    assert fast.num_updates(2) == 6 and faithful.num_updates(2) == 2 * 10 + 4 * 3
    with StepCounter() as steps:
        counted = run(pipe, fast)
    assert steps.count == counted.num_updates == 6
    assert fast.num_unet_samples(2) == faithful.num_unet_samples(2) == 2 * 10 + 4 * 3
    result = counted
    assert result.num_unet_samples == 32
    assert [("contrastive" in h and h["contrastive"] > 0) for h in result.history] == [True] * 2 + [False] * 4


def test_model_left_untouched_and_seeded(components_factory):
    pipe = ConceptExpressPipeline(**components_factory("sd2-v"))
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    vocab = len(pipe.tokenizer)
    emb_module = pipe.text_encoder.get_input_embeddings()
    config = LearningConfig(num_train_steps=3, split_steps=1)
    a = run(pipe, config, seed=1)
    b = run(pipe, config, seed=1)
    assert torch.equal(a.embeddings, b.embeddings)
    assert not torch.equal(a.embeddings, a.initial_embeddings)
    assert pipe.text_encoder.get_input_embeddings() is emb_module
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, before)  # bit-identical
    assert len(pipe.tokenizer) == vocab
    assert all(p.requires_grad for p in pipe.unet.parameters())  # flags restored


@pytest.mark.parametrize("kind", ["sd1", "sd2-v"], indirect=True)
def test_learning_lowers_the_masked_loss_on_fixed_noise(tiny_pipe):
    latents, masks, _ = setup(tiny_pipe)
    config = LearningConfig(num_train_steps=40, split_steps=10, learning_rate=5e-3, sinkhorn_iters=20)
    result = run(tiny_pipe, config)
    g = torch.Generator().manual_seed(123)
    noises = torch.randn(16, *latents.shape[1:], generator=g)
    timesteps = torch.randint(0, 1000, (16,), generator=g)
    common = dict(
        tokenizer=tiny_pipe.tokenizer,
        text_encoder=tiny_pipe.text_encoder,
        unet=tiny_pipe.unet,
        scheduler=tiny_pipe.scheduler,
        latents=latents,
        masks=masks,
        noises=noises,
        timesteps=timesteps,
    )
    before = evaluate_masked_loss(embeddings=result.initial_embeddings, **common)
    after = evaluate_masked_loss(embeddings=result.embeddings, **common)
    assert (after < before).all(), (before, after)


def test_config_validation():
    with pytest.raises(ValueError, match="schedule"):
        LearningConfig(schedule="slow")
    with pytest.raises(ValueError, match="prompt_template"):
        LearningConfig(prompt_template="a photo")
    with pytest.raises(ValueError, match="mixed_precision"):
        LearningConfig(mixed_precision="fp8")
    with pytest.raises(TypeError, match="timestep_range"):  # a research knob, not a product option
        LearningConfig(timestep_range=(500, 1000))


def test_training_timesteps_cover_the_scheduler_range(components_factory):
    pipe = ConceptExpressPipeline(**components_factory("sd2"))
    seen = []

    def record(module, args, kwargs):
        seen.append((args[1] if len(args) > 1 else kwargs["timestep"]).flatten())

    config = LearningConfig(num_train_steps=8, split_steps=2, sinkhorn_iters=2)
    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run(pipe, config)
    finally:
        handle.remove()
    timesteps = torch.cat(seen)
    assert len(timesteps) == config.num_unet_samples(2)
    assert ((timesteps >= 0) & (timesteps < pipe.scheduler.config.num_train_timesteps)).all()
    assert (timesteps < 500).any() and (timesteps >= 500).any()  # the authors' full range [0, 1000)


def test_mixed_precision_and_half_precision_text_encoder(components_factory):
    pipe = ConceptExpressPipeline(**components_factory("sd2"))
    result = run(
        pipe, LearningConfig(num_train_steps=2, split_steps=1, mixed_precision="bf16", sinkhorn_iters=2)
    )
    assert result.embeddings.dtype == torch.float32 and torch.isfinite(result.embeddings).all()
    pipe.text_encoder.to(torch.bfloat16)  # a half-precision text encoder still trains fp32 embeddings
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    result = run(pipe, LearningConfig(num_train_steps=2, split_steps=1, sinkhorn_iters=2))
    assert result.embeddings.dtype == torch.float32 and torch.isfinite(result.embeddings).all()
    assert not torch.equal(result.embeddings, result.initial_embeddings)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, before)
