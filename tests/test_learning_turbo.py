"""The "turbo" schedule: its pass budget, its plan, its stratified timesteps, and its defaults per schedule."""

from __future__ import annotations

import pytest
import torch

from diffusers_conceptexpress import ConceptExpressPipeline
from diffusers_conceptexpress.learning import SCHEDULE_DEFAULTS, SCHEDULES, LearningConfig, _plan
from test_learning import StepCounter, run


def authors_samples(k: int) -> int:
    """The authors' code: 100 x 5K + 400 x (K + 1) passes, each a batch of 2 with one half discarded."""
    return 2 * (100 * 5 * k + 400 * (k + 1))


@pytest.mark.parametrize("k", range(1, 11))
def test_turbo_does_at_most_a_sixth_of_the_authors_unet_samples(k):
    assert LearningConfig(schedule="turbo").num_unet_samples(k) * 6 <= authors_samples(k)


def test_fast_and_faithful_plans_are_the_authors_and_turbo_takes_turns_on_split_tokens():
    for schedule in ("fast", "faithful"):
        updates, _ = _plan(LearningConfig(schedule=schedule), 2)
        split = [p for u in updates[: (1 if schedule == "fast" else 10)] for p in u]
        assert [n for p in split for _, n in p] == [f"<cxtrain{k}x{j}>" for k in range(2) for j in range(5)]
    config = LearningConfig(schedule="turbo")
    updates, steps = _plan(config, 3)
    assert len(updates) == config.num_train_steps == 150 and steps == list(range(150))
    # split steps: one token per concept, the five taking turns; then the 3 single prompts and the joint one
    for step in range(config.split_steps):
        assert updates[step] == [[(k, f"<cxtrain{k}x{step % 5}>")] for k in range(3)]
    assert all(len(u) == 4 and len(u[-1]) == 3 for u in updates[config.split_steps :])


def test_schedule_defaults_fill_only_what_is_left_out():
    fast, turbo = LearningConfig(), LearningConfig(schedule="turbo")
    assert (fast.num_train_steps, fast.split_steps, fast.learning_rate) == (500, 100, 5e-4)
    assert (fast.split_tokens_per_step, fast.timestep_sampling) == (5, "uniform")
    for name, value in SCHEDULE_DEFAULTS["turbo"].items():
        assert getattr(turbo, name) == value
    mine = LearningConfig(schedule="turbo", num_train_steps=40, learning_rate=1e-3, split_tokens_per_step=2)
    assert (mine.num_train_steps, mine.learning_rate, mine.split_tokens_per_step) == (40, 1e-3, 2)
    assert mine.split_steps == 30 and "turbo" in SCHEDULES
    with pytest.raises(ValueError, match="split_tokens_per_step"):
        LearningConfig(split_tokens_per_step=6)
    with pytest.raises(ValueError, match="timestep_sampling"):
        LearningConfig(timestep_sampling="sorted")


def test_turbo_counts_match_real_steps_and_timesteps_are_stratified(components_factory):
    pipe = ConceptExpressPipeline(**components_factory("sd2"))
    calls = []

    def record(module, args, kwargs):
        calls.append((args[1] if len(args) > 1 else kwargs["timestep"]).flatten().tolist())

    config = LearningConfig(schedule="turbo", num_train_steps=6, split_steps=2, sinkhorn_iters=2)
    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with StepCounter() as steps:
            result = run(pipe, config)  # K = 2
    finally:
        handle.remove()
    assert steps.count == result.num_updates == config.num_updates(2) == 6
    assert result.num_unet_samples == config.num_unet_samples(2) == 2 * 2 + 4 * 3 == sum(map(len, calls))
    high = pipe.scheduler.config.num_train_timesteps
    for ts in calls:  # one timestep in each of len(ts) equal strata of [0, high)
        assert sorted(t * len(ts) // high for t in ts) == list(range(len(ts)))
    assert [h["contrastive"] > 0 for h in result.history] == [True] * 2 + [False] * 4
    again = run(pipe, config)
    assert torch.equal(again.embeddings, result.embeddings)  # seeded


def test_turbo_through_extract_concepts(components_factory):
    pipe = ConceptExpressPipeline(**components_factory("sd1"))
    from PIL import Image

    image = Image.new("RGB", (64, 64), "white")
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[8:40, 8:40] = True
    out = pipe.extract_concepts(
        image, masks=[mask], schedule="turbo", num_train_steps=3, split_steps=1, sinkhorn_iters=1, load=False
    )
    learning = out.parameters["learning"]
    assert (learning["schedule"], learning["num_train_steps"], learning["learning_rate"]) == (
        "turbo",
        3,
        2e-3,
    )
    assert out.learning.num_unet_samples == 1 + 2 * 2
