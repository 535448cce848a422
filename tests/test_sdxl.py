"""ConceptExpressXLPipeline on a tiny SDXL pipeline (tests/tiny_models.py: SDXL's structure, built offline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from diffusers_conceptexpress import ConceptExpressPipeline, ConceptExpressXLPipeline, load_concepts
from diffusers_conceptexpress.cli import main
from diffusers_conceptexpress.conditioning import SDXLConditioning
from diffusers_conceptexpress.tokens import TrainableTokens
from tiny_models import tiny_components, tiny_sdxl_components

FAST = {"num_train_steps": 2, "split_steps": 1, "tokens_per_concept": 2, "sinkhorn_iters": 20}


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    """A tiny SDXL model folder (plain SDXL model_index.json) and the tokenizers' build folder."""
    root = tmp_path_factory.mktemp("sdxl")
    ConceptExpressXLPipeline(**tiny_sdxl_components(root / "build")).save_pretrained(root / "model")
    return root / "model"


@pytest.fixture
def xl_pipe(xl_dir):
    return ConceptExpressXLPipeline.from_pretrained(xl_dir)


def make_image(mode: str = "RGB", size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    """A picture with two flat shapes on a background (``size`` = (width, height))."""
    w, h = size
    rng = np.random.default_rng(seed)
    arr = np.zeros((h, w, 3), np.uint8) + np.array([30, 90, 40], np.uint8)
    arr[h // 6 : h // 2, w // 6 : w // 2] = (220, 40, 40)
    arr[h // 2 :, w // 2 :] = (40, 40, 220)
    arr = np.clip(arr + rng.integers(0, 20, arr.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(arr)
    if mode == "RGBA":
        alpha = np.full((h, w), 255, np.uint8)
        alpha[: h // 8] = 0
        image = image.convert("RGBA")
        image.putalpha(Image.fromarray(alpha))
    return image


CASES = [("RGB", (64, 64), {}), ("RGBA", (64, 64), {}), ("RGB", (96, 64), {"resize_policy": "keep_aspect"})]


def processor_types(pipe):
    return {k: type(v) for k, v in pipe.unet.attn_processors.items()}


@pytest.mark.parametrize(("mode", "size", "options"), CASES)
def test_localize(xl_pipe, mode, size, options):
    before = processor_types(xl_pipe)
    image = make_image(mode, size)
    loc = xl_pipe.localize_concepts(image, **options)
    assert processor_types(xl_pipe) == before
    assert loc.num_concepts >= 1
    assert all(m.size == size for m in loc.masks)
    latent = (loc.resize.model_size[1] // 2, loc.resize.model_size[0] // 2)  # VAE factor 2
    grid = (latent[0] // 2, latent[1] // 2)  # SDXL: no attention on the latent grid; the finest is half
    assert tuple(loc.latent_masks.shape[1:]) == grid and loc.options["grid"] == list(grid)
    assert int(loc.latent_masks.sum(0).max()) == 1  # disjoint
    assert tuple(loc.eot_map.shape) == (latent[0] // 4, latent[1] // 4)  # factor 4, the 2-layer blocks


def vocabulary_rows(pipe):
    return [
        enc.get_input_embeddings().weight.detach().clone() for enc in (pipe.text_encoder, pipe.text_encoder_2)
    ]


@pytest.mark.parametrize(("mode", "size", "options"), CASES)
def test_extract(xl_pipe, mode, size, options):
    rows = vocabulary_rows(xl_pipe)
    sizes = (len(xl_pipe.tokenizer), len(xl_pipe.tokenizer_2))
    before = processor_types(xl_pipe)
    grads = [p.requires_grad for m in (xl_pipe.text_encoder, xl_pipe.text_encoder_2) for p in m.parameters()]
    steps = []
    out = xl_pipe.extract_concepts(
        make_image(mode, size),
        generator=torch.Generator().manual_seed(0),
        callback=lambda step, total, logs: steps.append((step, total)),
        load=False,
        **FAST,
        **options,
    )
    k = out.num_concepts
    assert set(out.embeddings) == {"clip_l", "clip_g"}
    assert out.embeddings["clip_l"].shape == (k, 24) and out.embeddings["clip_g"].shape == (k, 40)
    assert steps == [(0, 2), (1, 2)]
    assert processor_types(xl_pipe) == before
    assert (len(xl_pipe.tokenizer), len(xl_pipe.tokenizer_2)) == sizes
    for old, new in zip(rows, vocabulary_rows(xl_pipe), strict=True):
        assert torch.equal(old, new)  # bit-identical, same number of rows
    assert grads == [
        p.requires_grad for m in (xl_pipe.text_encoder, xl_pipe.text_encoder_2) for p in m.parameters()
    ]


def test_same_seed_same_embeddings(xl_pipe):
    image = make_image()
    a, b = (
        xl_pipe.extract_concepts(image, generator=torch.Generator().manual_seed(3), load=False, **FAST)
        for _ in range(2)
    )
    assert all(torch.equal(a.embeddings[key], b.embeddings[key]) for key in ("clip_l", "clip_g"))


@pytest.fixture(scope="module")
def saved(xl_dir, tmp_path_factory):
    """An extraction with K >= 2 concepts (kmeans), loaded into its pipeline and saved."""
    pipe = ConceptExpressXLPipeline.from_pretrained(xl_dir)
    out = pipe.extract_concepts(
        make_image(), generator=torch.Generator().manual_seed(0), method="kmeans", num_concepts=2, **FAST
    )
    folder = tmp_path_factory.mktemp("concepts") / "out"
    out.save(folder)
    return out, folder, pipe


def test_files_follow_the_sdxl_convention(saved):
    out, folder, _ = saved
    index = json.loads((folder / "concepts.json").read_text())
    assert index["model_family"] == "sdxl" and index["embedding_dim"] == {"clip_l": 24, "clip_g": 40}
    joint = load_file(folder / "concepts.safetensors")
    assert set(joint) == {"clip_l", "clip_g"}
    assert joint["clip_l"].shape == (3, 24) and joint["clip_g"].shape == (3, 40)
    for key in ("clip_l", "clip_g"):
        assert torch.equal(joint[key][1:], out.embeddings[key])
        assert torch.allclose(joint[key][0], out.embeddings[key].mean(0))
    for k in (1, 2):
        single = load_file(folder / f"concept_{k}.safetensors")
        assert set(single) == {"clip_l", "clip_g"}
        assert single["clip_l"].shape == (1, 24) and single["clip_g"].shape == (1, 40)
        assert torch.equal(single["clip_g"][0], out.embeddings["clip_g"][k - 1])


def stock_pipe(xl_dir):
    return StableDiffusionXLPipeline.from_pretrained(xl_dir)


def assert_one_new_row(pipe, token, rows, sizes):
    """``token`` is exactly one new entry of each tokenizer, its embedding row equal to ``rows[key]``."""
    pairs = [(pipe.tokenizer, pipe.text_encoder, "clip_l"), (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")]
    for (tok, enc, key), size in zip(pairs, sizes, strict=True):
        ids = tok(token, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] >= size
        assert torch.equal(enc.get_input_embeddings().weight[ids[0]].detach(), rows[key])


def test_stock_pipeline_loads_a_concept_file_with_the_two_standard_calls(saved, xl_dir):
    _, folder, _ = saved
    pipe = stock_pipe(xl_dir)
    sizes = (len(pipe.tokenizer), len(pipe.tokenizer_2))
    state = load_file(folder / "concept_1.safetensors")
    pipe.load_textual_inversion(
        state["clip_l"], token="<ce>_1", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        state["clip_g"], token="<ce>_1", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2)) == (sizes[0] + 1, sizes[1] + 1)
    assert_one_new_row(pipe, "<ce>_1", {k: v[0] for k, v in state.items()}, sizes)
    image = pipe("a photo of <ce>_1", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_load_concepts_into_a_stock_pipeline(saved, xl_dir):
    out, folder, _ = saved
    pipe = stock_pipe(xl_dir)
    sizes = (len(pipe.tokenizer), len(pipe.tokenizer_2))
    assert load_concepts(pipe, folder) == ["<ce>_1", "<ce>_2"]
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2)) == (
        sizes[0] + 3,
        sizes[1] + 3,
    )  # <ce>, <ce>_1, <ce>_2
    for k, token in enumerate(out.tokens):
        assert_one_new_row(pipe, token, {key: e[k] for key, e in out.embeddings.items()}, sizes)
    image = pipe("a photo of <ce>_2 and <ce>_1", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_extraction_loads_into_its_pipeline_and_generates(saved):
    out, _, pipe = saved
    for k, token in enumerate(out.tokens):
        ids = [tok.convert_tokens_to_ids(token) for tok in (pipe.tokenizer, pipe.tokenizer_2)]
        assert torch.equal(
            pipe.text_encoder.get_input_embeddings().weight[ids[0]], out.embeddings["clip_l"][k]
        )
        assert torch.equal(
            pipe.text_encoder_2.get_input_embeddings().weight[ids[1]], out.embeddings["clip_g"][k]
        )
    pipe.load_concepts(out)  # again: the same prefix is replaced, not added twice
    assert sum(t.startswith("<ce>") for t in pipe.tokenizer_2.get_vocab()) == 3
    images = pipe("a photo of <ce>_1", num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 64, 64)


def test_pooled_embedding_comes_from_the_eot_position(xl_dir):
    """SDXL's pooled ``text_embeds`` with an added token (the highest id): ours at [EOT], not at argmax."""
    pipe = ConceptExpressXLPipeline.from_pretrained(xl_dir)
    assert pipe.text_encoder_2.config.eos_token_id == 2  # SDXL's config: transformers pools at argmax(ids)
    with (
        TrainableTokens(pipe.tokenizer, pipe.text_encoder, ["<cxa>"], [5]) as t1,
        TrainableTokens(pipe.tokenizer_2, pipe.text_encoder_2, ["<cxa>"], [5]) as t2,
    ):
        cond = SDXLConditioning(
            pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2, (64, 64)
        )
        ids = [t.encode_ids(["a photo of <cxa>"]) for t in (t1, t2)]  # what training encodes
        pooled = cond.encode(ids, torch.float32)["added_cond_kwargs"]["text_embeds"]
        out = pipe.text_encoder_2(ids[1])
        token_pos = int((ids[1][0] == t2.token_ids[0]).nonzero()[0])
        eot = int((ids[1][0] == pipe.tokenizer_2.eos_token_id).nonzero()[0])
        assert int(ids[1][0].argmax()) == token_pos != eot  # the stock pooling position is the new token
        at_eot = pipe.text_encoder_2.text_projection(out.last_hidden_state[0, eot])
        assert torch.allclose(pooled[0], at_eot, atol=1e-6)
        assert not torch.allclose(pooled[0], out.text_embeds[0], atol=1e-3)  # argmax pooling differs


def test_generation_pools_at_eot_where_the_stock_pipeline_pools_at_the_token(saved, xl_dir):
    _, folder, pipe = saved
    stock = stock_pipe(xl_dir)
    load_concepts(stock, folder)
    kwargs = {"device": "cpu", "num_images_per_prompt": 2, "do_classifier_free_guidance": True}
    prompt = "a photo of <ce>_1"
    ours = pipe.encode_prompt(prompt, **kwargs)
    theirs = stock.encode_prompt(prompt, **kwargs)
    assert torch.equal(ours[0], theirs[0])  # hidden states: the same
    assert ours[2].shape == theirs[2].shape == (2, 16)
    assert not torch.allclose(ours[2], theirs[2], atol=1e-3)  # stock: pooled at <ce>_1 (argmax of the ids)
    ids = pipe.tokenizer_2(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    eot = int((ids[0] == pipe.tokenizer_2.eos_token_id).nonzero()[0])
    last = pipe.text_encoder_2(ids).last_hidden_state
    assert torch.allclose(ours[2][0], pipe.text_encoder_2.text_projection(last[0, eot]), atol=1e-6)
    # a prompt without added tokens: both pool at [EOT] (the highest id then)
    plain = [p.encode_prompt("a photo of a cat", **kwargs)[2] for p in (pipe, stock)]
    assert torch.allclose(plain[0], plain[1], atol=1e-6)


def test_from_pipe_shares_modules_and_keeps_dtype(xl_dir):
    stock = StableDiffusionXLPipeline.from_pretrained(xl_dir, dtype=torch.bfloat16)
    pipe = ConceptExpressXLPipeline.from_pipe(stock)
    assert pipe.unet is stock.unet and pipe.text_encoder_2 is stock.text_encoder_2
    assert pipe.dtype == torch.bfloat16


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    StableDiffusionPipeline(
        **tiny_components("sd2", root / "build"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(root / "model")
    return root / "model"


def one_line(err: Exception) -> str:
    text = str(err)
    assert "\n" not in text
    return text


def test_wrong_family_fails_with_one_line_before_loading(sd_dir, xl_dir, tmp_path):
    for cls, folder, other in (
        (ConceptExpressXLPipeline, sd_dir, "ConceptExpressPipeline"),
        (ConceptExpressPipeline, xl_dir, "ConceptExpressXLPipeline"),
    ):
        index_only = tmp_path / folder.name / cls.__name__  # no weights: any loading would fail differently
        index_only.mkdir(parents=True)
        (index_only / "model_index.json").write_text((folder / "model_index.json").read_text())
        with pytest.raises(ValueError) as err:
            cls.from_pretrained(index_only)
        assert other in one_line(err.value)
    with pytest.raises(ValueError) as err:
        ConceptExpressXLPipeline.from_pipe(StableDiffusionPipeline.from_pretrained(sd_dir))
    assert "ConceptExpressPipeline" in one_line(err.value)
    with pytest.raises(ValueError) as err:
        ConceptExpressPipeline.from_pipe(stock_pipe(xl_dir))
    assert "ConceptExpressXLPipeline" in one_line(err.value)


def test_concepts_of_the_other_family_are_refused(saved, sd_dir):
    _, folder, _ = saved
    sd = StableDiffusionPipeline.from_pretrained(sd_dir)
    with pytest.raises(ValueError) as err:
        load_concepts(sd, folder)
    assert "SDXL" in one_line(err.value)
    assert not any(t.startswith("<ce>") for t in sd.tokenizer.get_vocab())


def test_saved_folder_is_a_plain_sdxl_folder(xl_dir):
    index = json.loads((xl_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert isinstance(stock_pipe(xl_dir), StableDiffusionXLPipeline)


def test_cli_picks_the_xl_pipeline(xl_dir, tmp_path, capsys):
    image = tmp_path / "scene.png"
    make_image(size=(80, 64)).save(image)
    out = tmp_path / "loc"
    assert main(["localize", str(image), "--model", str(xl_dir), "--out", str(out)]) == 0
    summary = json.loads((out / "localization.json").read_text())
    assert summary["concepts"] and Image.open(out / "mask_1.png").size == (80, 64)
    concepts = tmp_path / "concepts"
    args = [
        "extract",
        str(image),
        "--model",
        str(xl_dir),
        "--out",
        str(concepts),
        "--steps",
        "1",
        "--inference-steps",
        "1",
    ]
    assert main(args) == 0  # with the sample grid: the tokens are loaded for it, then unloaded
    assert json.loads((concepts / "concepts.json").read_text())["model_family"] == "sdxl"
    assert (concepts / "samples.png").exists()
    assert "load_concepts" in capsys.readouterr().out
    picture = tmp_path / "gen.png"
    cmd = ["generate", "--prompt", "a photo of <ce>_1", "--model", str(xl_dir), "--concepts", str(concepts)]
    assert main([*cmd, "--out", str(picture), "--inference-steps", "2"]) == 0
    assert Image.open(picture).size == (64, 64)


def test_user_masks_skip_localization(xl_pipe):
    image = make_image(size=(96, 64))
    left = np.zeros((64, 96), bool)
    left[:, :40] = True
    out = xl_pipe.extract_concepts(
        image, masks=[left, ~left], generator=torch.Generator().manual_seed(0), load=False, **FAST
    )
    assert out.tokens == ["<ce>_1", "<ce>_2"] and out.embeddings["clip_g"].shape == (2, 40)
    assert tuple(out.localization.latent_masks.shape[1:]) == (32, 32)  # the latent grid (squash to 64 px)


def test_model_cpu_offload_gives_the_same_concepts(xl_dir):
    reference = ConceptExpressXLPipeline.from_pretrained(xl_dir)
    pipe = ConceptExpressXLPipeline.from_pretrained(xl_dir)
    pipe.enable_model_cpu_offload(device="cpu")  # accelerate's hooks, executing on this machine's CPU
    ours, theirs = (
        p.extract_concepts(make_image(), generator=torch.Generator().manual_seed(0), **FAST)
        for p in (pipe, reference)
    )
    assert all(torch.equal(ours.embeddings[k], theirs.embeddings[k]) for k in ("clip_l", "clip_g"))
    assert hasattr(pipe.text_encoder_2, "_hf_hook") and hasattr(pipe.unet, "_hf_hook")
    args = {"num_inference_steps": 2, "output_type": "np", "generator": torch.Generator().manual_seed(0)}
    image = pipe("a photo of <ce>_1", **args).images
    args["generator"] = torch.Generator().manual_seed(0)
    # not bit-equal: a stock StableDiffusionXLPipeline loaded from a folder differs by ~1e-6 under offloading too
    np.testing.assert_allclose(image, reference("a photo of <ce>_1", **args).images, atol=1e-5, rtol=0)


def test_folder_with_sample_grid_leaves_no_token_in_either_tokenizer(xl_pipe, tmp_path):
    from diffusers_conceptexpress.batch import extract_to_folder

    sizes = (len(xl_pipe.tokenizer), len(xl_pipe.tokenizer_2))
    out = extract_to_folder(
        xl_pipe, make_image(), tmp_path / "c", seed=0, samples=True, inference_steps=1, guidance=2.0, **FAST
    )
    assert (tmp_path / "c" / "samples.png").exists() and out.num_concepts >= 1
    assert (len(xl_pipe.tokenizer), len(xl_pipe.tokenizer_2)) == sizes


def _unet_probe(pipe):
    """The SDXL UNet's output on a fixed input (text_time added conditioning included)."""
    cfg = pipe.unet.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    pooled = torch.randn(
        1, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim, generator=g
    )
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500]), encoder_hidden_states=ctx, added_cond_kwargs=added).sample


def test_lora_phase_round_trip_into_a_stock_pipeline(xl_pipe, xl_dir, tmp_path):
    """The LoRA phase on SDXL (issue 41): the tokens of both encoders train with the adapter; a stock
    StableDiffusionXLPipeline given the folder by load_concepts has the same UNet (lora_alpha != rank kept), and
    unloading gives the base UNet bit for bit."""
    base = _unet_probe(xl_pipe)
    out = xl_pipe.extract_concepts(
        make_image(),
        generator=torch.Generator().manual_seed(0),
        method="kmeans",
        num_concepts=2,
        lora_rank=2,
        lora_alpha=4,
        lora_steps=2,
        lora_learning_rate=1e-2,
        **FAST,
    )
    assert out.lora is not None and out.learning.num_updates == FAST["num_train_steps"] + 2
    assert sorted(out.lora.token_embeddings) == ["clip_g", "clip_l"]
    adapted = _unet_probe(xl_pipe)
    assert not torch.allclose(adapted, base)
    out.save(tmp_path / "c")
    stock = stock_pipe(xl_dir)
    sizes = (len(stock.tokenizer), len(stock.tokenizer_2))
    assert torch.equal(_unet_probe(stock), base)
    assert load_concepts(stock, tmp_path / "c") == out.tokens
    assert next(iter(stock.unet.peft_config.values())).lora_alpha == 4
    assert torch.equal(_unet_probe(stock), adapted)
    for k, token in enumerate(out.tokens):
        assert_one_new_row(stock, token, {key: e[k] for key, e in out.embeddings.items()}, sizes)
    image = stock("a photo of <ce>_1", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    stock.unload_lora_weights()
    assert torch.equal(_unet_probe(stock), base)
    xl_pipe.unload_concepts(out)
    assert torch.equal(_unet_probe(xl_pipe), base)
    assert "<ce>_1" not in xl_pipe.tokenizer.get_vocab() and "<ce>_1" not in xl_pipe.tokenizer_2.get_vocab()
