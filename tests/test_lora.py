"""The LoRA phase (lora.py): options, the base UNet left unchanged, diffusers' own files and loaders."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from diffusers_conceptexpress import ConceptExpressPipeline, LearningConfig, load_concepts
from diffusers_conceptexpress.cli import main
from diffusers_conceptexpress.lora import LORA_WEIGHT_NAME, lora_adapter_name

OPTIONS = {"num_train_steps": 3, "split_steps": 1, "lora_steps": 3, "lora_learning_rate": 1e-2}


@pytest.fixture
def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def _probe(pipe):
    """The UNet's output on a fixed input (the comparison of every test here)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500]), encoder_hidden_states=ctx).sample


def _stock(components):
    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_bad_lora_rank_fails_before_model_work(bad, components_factory, image):
    with pytest.raises(ValueError, match="lora_rank"):
        LearningConfig(lora_rank=bad)
    pipe = ConceptExpressPipeline(**components_factory("sd1"))
    calls = []
    pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    pipe.vae.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="lora_rank"):
        pipe.extract_concepts(image, lora_rank=bad, **OPTIONS)
    assert calls == []


@pytest.mark.parametrize(
    "options, match",
    [
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_steps": 0}, "lora_steps"),
        ({"lora_prompts": "x"}, "lora_prompts"),
    ],
)
def test_other_bad_lora_options(options, match):
    with pytest.raises(ValueError, match=match):
        LearningConfig(lora_rank=4, **options)


@pytest.mark.parametrize("kind", ["sd1", "sd2-v"])
def test_lora_round_trip_through_stock_loaders(kind, components_factory, image, tmp_path):
    """Extracting pipeline (adapter active) == a stock pipeline with load_textual_inversion + load_lora_weights,
    with lora_alpha != rank; disabled or unloaded adapters give the base UNet bit for bit."""
    pipe = ConceptExpressPipeline(**components_factory(kind))
    pipe.set_progress_bar_config(disable=True)
    base = _probe(pipe)
    out = pipe.extract_concepts(
        image, lora_rank=2, lora_alpha=5, generator=torch.Generator().manual_seed(0), **OPTIONS
    )
    assert out.lora is not None and (out.lora.rank, out.lora.alpha) == (2, 5)
    adapted = _probe(pipe)
    assert not torch.allclose(adapted, base)  # the extracting pipeline generates with the adapter
    assert pipe.unet.active_adapters() == [lora_adapter_name("<ce>")]
    pipe.unet.disable_adapters()
    assert torch.equal(_probe(pipe), base)
    pipe.unet.enable_adapters()
    assert torch.equal(_probe(pipe), adapted)
    assert out.learning.num_updates == 3 + 3 and len(out.learning.history) == 6

    folder = tmp_path / "concepts"
    out.save(folder)
    lora_file = folder / LORA_WEIGHT_NAME
    assert lora_file.is_file() and (lora_file.stat().st_mode & 0o777) == 0o666 & ~_umask()
    index = json.loads((folder / "concepts.json").read_text())
    assert index["lora"]["rank"] == 2 and index["lora"]["alpha"] == 5
    assert index["parameters"]["learning"]["lora_rank"] == 2

    stock = _stock(components_factory(kind))
    assert torch.equal(_probe(stock), base)
    stock.load_textual_inversion(str(folder / "concepts.safetensors"))
    stock.load_lora_weights(str(folder))
    assert next(iter(stock.unet.peft_config.values())).lora_alpha == 5  # the metadata kept alpha != rank
    assert torch.equal(_probe(stock), adapted)
    prompt = "a photo of <ce>_1"
    settings = {"num_inference_steps": 2, "output_type": "np"}
    ours = pipe(prompt, generator=torch.Generator().manual_seed(0), **settings).images
    theirs = stock(prompt, generator=torch.Generator().manual_seed(0), **settings).images
    assert np.array_equal(ours, theirs)
    stock.unload_lora_weights()
    assert torch.equal(_probe(stock), base)

    other = _stock(components_factory(kind))  # the package's loader: tokens and LoRA in one call
    assert load_concepts(other, folder) == out.tokens
    assert torch.equal(_probe(other), adapted)
    pipe.unload_concepts(out)
    assert torch.equal(_probe(pipe), base) and "<ce>_1" not in pipe.tokenizer.get_vocab()
    assert pipe.load_concepts(str(folder)) == out.tokens and torch.equal(_probe(pipe), adapted)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_load_false_leaves_the_unet_and_other_loras_as_they_were(components_factory, image, tmp_path):
    pipe = ConceptExpressPipeline(**components_factory("sd1"))
    pipe.set_progress_bar_config(disable=True)
    # a user's LoRA (the one of a first extraction, under another prefix) stays loaded and active
    first = pipe.extract_concepts(
        image, lora_rank=2, token_prefix="<a>", generator=torch.Generator().manual_seed(0), **OPTIONS
    )
    before = _probe(pipe)
    grads = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    out = pipe.extract_concepts(
        image, lora_rank=4, load=False, generator=torch.Generator().manual_seed(0), **OPTIONS
    )
    assert torch.equal(_probe(pipe), before)
    assert pipe.unet.active_adapters() == [lora_adapter_name("<a>")]
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == grads
    assert out.lora.rank == 4 and first.lora.rank == 2
    pipe.load_concepts(out)  # both LoRAs active together
    assert sorted(pipe.unet.active_adapters()) == sorted(
        [lora_adapter_name("<a>"), lora_adapter_name("<ce>")]
    )
    pipe.unload_concepts(out)
    assert torch.equal(_probe(pipe), before)


def test_same_seed_same_lora(components_factory, image):
    pipe = ConceptExpressPipeline(**components_factory("sd1"))
    pipe.set_progress_bar_config(disable=True)
    runs = [
        pipe.extract_concepts(
            image, lora_rank=2, load=False, generator=torch.Generator().manual_seed(3), **OPTIONS
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0].embeddings, runs[1].embeddings)
    assert all(torch.equal(v, runs[1].lora.state_dict[k]) for k, v in runs[0].lora.state_dict.items())


def test_cli_extract_with_lora_and_generate_picks_it_up(components_factory, tmp_path, capsys, monkeypatch):
    from diffusers_conceptexpress import cli

    flags = cli._lora_options
    monkeypatch.setattr(
        cli, "_lora_options", lambda args: {**flags(args), "lora_steps": 2}
    )  # seconds, not minutes
    model = tmp_path / "model"
    ConceptExpressPipeline(**components_factory("sd2")).save_pretrained(model)
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "concepts"
    args = ["extract", str(image), "--model", str(model), "--out", str(out), "--steps", "2", "--no-samples"]
    assert main([*args, "--lora-rank", "2", "--lora-alpha", "3"]) == 0
    assert (out / LORA_WEIGHT_NAME).is_file()
    assert json.loads((out / "concepts.json").read_text())["lora"]["alpha"] == 3
    assert "load_lora_weights" in capsys.readouterr().out
    gen = ["generate", "--concepts", str(out), "--model", str(model), "--prompt", "a photo of <ce>_1"]
    settings = ["--inference-steps", "2"]
    assert main([*gen, "--out", str(tmp_path / "with.png"), *settings]) == 0
    (out / LORA_WEIGHT_NAME).rename(tmp_path / "aside.safetensors")  # the same concepts, tokens alone
    assert main([*gen, "--out", str(tmp_path / "without.png"), *settings]) == 0
    with_lora, without = (np.asarray(Image.open(tmp_path / f)) for f in ("with.png", "without.png"))
    assert not np.array_equal(with_lora, without)
    bad = tmp_path / "bad"
    capsys.readouterr()
    assert main(["extract", str(image), "--model", str(model), "--out", str(bad), "--lora-rank", "0"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lora_rank" in err[0] and not bad.exists()
