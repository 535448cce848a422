"""Round trip: extract_concepts -> save -> a FRESH stock StableDiffusionPipeline with one stock loader call."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_conceptexpress import ConceptExpressPipeline
from diffusers_conceptexpress.export import (
    joint_embeddings,
    load_concepts,
    mask_filename,
    prompt_format,
    read_concepts,
    read_concepts_index,
    save_concepts,
)


def stock(path):
    return StableDiffusionPipeline.from_pretrained(
        path, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def new_rows(pipe, prompt, vocab_size):
    text = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    return [i for i in pipe.tokenizer(text).input_ids if i >= vocab_size]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, components_factory):
    """For each kind: a saved model folder and the saved concepts of a short extraction."""
    out = {}
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (72, 96, 3), dtype=np.uint8))
    for kind in ("sd1", "sd2", "sd2-v"):
        root = tmp_path_factory.mktemp(kind)
        pipe = ConceptExpressPipeline(**components_factory(kind))
        pipe.save_pretrained(root / "model", pipeline_code=False)  # a plain SD folder, for the stock loader
        original = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
        vocab = len(pipe.tokenizer)
        result = pipe.extract_concepts(
            image,
            num_train_steps=3,
            split_steps=1,
            sinkhorn_iters=5,
            generator=torch.Generator().manual_seed(0),
        )
        result.save(root / "concepts")
        out[kind] = (root, result, original, vocab, pipe)
    return out


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sd2-v"])
def test_round_trip_through_the_stock_loader(extracted, kind):
    root, result, original, vocab, pipe = extracted[kind]
    # extraction left the original vocabulary rows bit-identical (tokens are appended after them)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[:vocab], original)
    sd = stock(root / "model")
    sd.load_textual_inversion(str(root / "concepts" / "concepts.safetensors"))  # ONE stock call
    index = json.loads((root / "concepts" / "concepts.json").read_text())
    weight = sd.text_encoder.get_input_embeddings().weight
    assert [c["token"] for c in index["concepts"]] == result.tokens
    for k, concept in enumerate(index["concepts"]):
        rows = new_rows(sd, f"a photo of {concept['token']}", vocab)
        assert len(rows) == 1, rows  # exactly one new token row
        torch.testing.assert_close(weight[rows[0]], result.embeddings[k], rtol=0, atol=0)
        own = load_file(root / "concepts" / concept["file"])
        assert list(own) == [concept["token"]]
        torch.testing.assert_close(own[concept["token"]][0], result.embeddings[k], rtol=0, atol=0)
        assert Image.open(root / "concepts" / concept["mask"]).size == (96, 72)
    assert torch.equal(weight[:vocab], original)
    joint = " and ".join(result.tokens)
    assert len(new_rows(sd, f"a photo of {joint}", vocab)) == result.num_concepts
    images = sd(
        f"a photo of {result.tokens[0]}", num_inference_steps=2, height=32, width=32, output_type="np"
    )
    assert np.isfinite(images.images).all()


@pytest.mark.parametrize("kind", ["sd1", "sd2-v"])
def test_each_concept_file_loads_alone(extracted, kind):
    root, result, _, vocab, _ = extracted[kind]
    for k in range(result.num_concepts):
        sd = stock(root / "model")
        sd.load_textual_inversion(str(root / "concepts" / f"concept_{k + 1}.safetensors"))
        rows = new_rows(sd, f"a photo of {result.tokens[k]}", vocab)
        assert len(rows) == 1
        torch.testing.assert_close(
            sd.text_encoder.get_input_embeddings().weight[rows[0]], result.embeddings[k]
        )


def test_files_and_metadata(extracted):
    root, result, _, _, _ = extracted["sd2"]
    files = sorted(p.name for p in (root / "concepts").iterdir())
    k = result.num_concepts
    expected = {"concepts.json", "concepts.safetensors", "overlay.png", "source.png"}
    expected |= {f"concept_{i}.safetensors" for i in range(1, k + 1)} | {
        mask_filename(i) for i in range(1, k + 1)
    }
    assert mask_filename(1) == "mask_1.png"  # 1-based like the tokens <ce>_k
    assert set(files) == expected
    with safe_open(root / "concepts" / "concepts.safetensors", "pt") as f:
        meta = f.metadata()
        assert list(f.keys()) == ["<ce>"] and f.get_tensor("<ce>").shape == (k + 1, 32)
    assert meta["token"] == "<ce>" and json.loads(meta["tokens"]) == result.tokens and "base_model" in meta
    index = json.loads((root / "concepts" / "concepts.json").read_text())
    assert index["embedding_dim"] == 32 and index["version"]
    assert index["source"] == "source.png"  # the source image, what `conceptexpress evaluate` compares with
    assert Image.open(root / "concepts" / "source.png").size == result.image.size
    assert index["parameters"]["learning"]["num_train_steps"] == 3


def test_saved_concepts_parse_back(extracted):
    root, result, _, _, _ = extracted["sd2"]
    folder = root / "concepts"
    prefix, embeddings, tokens = read_concepts(folder)
    assert prefix == "<ce>" and tokens == result.tokens
    assert torch.equal(embeddings, result.embeddings)
    stored = load_file(folder / "concepts.safetensors")["<ce>"]
    assert torch.equal(stored, joint_embeddings(result.embeddings))  # the mean row, then the concepts
    assert torch.equal(stored[0], result.embeddings.mean(0))
    index = read_concepts_index(folder)
    assert [c["mask"] for c in index["concepts"]] == [
        mask_filename(k + 1) for k in range(result.num_concepts)
    ]
    assert prompt_format(folder) == ("a photo of {}", " and ")  # recorded by the run
    assert prompt_format(None) == ("a photo of {}", " and ")


def test_load_concepts_helper_and_pipeline_generation(extracted):
    root, result, _, _, pipe = extracted["sd1"]
    sd = stock(root / "model")
    assert load_concepts(sd, root / "concepts") == result.tokens
    # the extracting pipeline itself has the tokens loaded and generates like StableDiffusionPipeline
    out = pipe(
        f"a photo of {result.tokens[-1]}", num_inference_steps=2, height=32, width=32, output_type="np"
    )
    assert out.images.shape == (1, 32, 32, 3)
    # loading the same prefix again replaces the tokens instead of failing
    assert pipe.load_concepts(str(root / "concepts")) == result.tokens


def test_user_masks_skip_localization(components_factory):
    pipe = ConceptExpressPipeline(**components_factory("sd2"))
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    left = np.zeros((64, 64), bool)
    left[:, :32] = True
    result = pipe.extract_concepts(
        image, masks=[left, ~left], num_train_steps=2, split_steps=1, sinkhorn_iters=2, load=False
    )
    assert result.num_concepts == 2
    assert (
        result.localization.latent_masks[0, :, :8].all()
        and not result.localization.latent_masks[0, :, 8:].any()
    )
    with pytest.raises(ValueError, match="image's size"):
        pipe.extract_concepts(image, masks=[np.ones((10, 10), bool)], num_train_steps=1)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import diffusers_conceptexpress.export as export

    calls = []

    def failing_save(tensors, metadata=None):  # the third file's serialisation fails, as a full disk would
        calls.append(tensors)
        if len(calls) == 3:
            raise OSError("disk full")
        from safetensors.torch import save

        return save(tensors, metadata=metadata)

    monkeypatch.setattr(export, "save", failing_save)
    masks = [Image.new("L", (64, 64), 255)] * 3
    with pytest.raises(OSError, match="disk full"):
        save_concepts(tmp_path / "concepts", torch.randn(3, 8), masks=masks)
    assert list(tmp_path.iterdir()) == []


def test_bad_prefix_and_existing_directory(tmp_path):
    masks = [Image.new("L", (64, 64), 255)]
    with pytest.raises(ValueError, match="lower case"):
        save_concepts(tmp_path / "a", torch.randn(1, 8), masks=masks, token_prefix="<CE>")
    save_concepts(tmp_path / "b", torch.randn(1, 8), masks=masks)
    with pytest.raises(FileExistsError):
        save_concepts(tmp_path / "b", torch.randn(1, 8), masks=masks)
