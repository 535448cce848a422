"""ConceptExpressPipeline on tiny SD 1.x / 2.x / 2.x-v pipelines: loading, conversion, localization, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from diffusers_conceptexpress import ConceptExpressPipeline, ImageInputError


def make_image(mode="RGB", size=(96, 80), seed=0):
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "RGBA":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.fromarray(rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8)))
        return rgba
    return rgb.convert(mode) if mode != "P" else rgb.convert("P", palette=Image.Palette.ADAPTIVE)


def unet_probe(pipe):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([5]), encoder_hidden_states=ctx).sample


@pytest.mark.parametrize(
    ("mode", "size"), [("RGB", (64, 64)), ("RGBA", (120, 72)), ("L", (80, 96)), ("P", (64, 100))]
)
def test_localize_end_to_end(tiny_pipe, mode, size):
    types_before = {k: type(v) for k, v in tiny_pipe.unet.attn_processors.items()}
    out_before = unet_probe(tiny_pipe)
    result = tiny_pipe.localize_concepts(make_image(mode, size))
    k = result.num_concepts
    assert k >= 1
    assert len(result.masks) == k
    assert all(m.size == size and m.mode == "L" for m in result.masks)
    assert result.latent_masks.dtype == torch.bool and result.latent_masks.shape == (k, 16, 16)
    assert (result.latent_masks.sum(0) <= 1).all()  # disjoint
    masks = np.stack([np.asarray(m) > 0 for m in result.masks])
    assert (masks.sum(0) <= 1).all()
    assert result.features.shape == (k, 16, 16)
    torch.testing.assert_close(result.features.sum((1, 2)), torch.ones(k))
    assert result.eot_scores.shape == (k,)
    assert result.cluster_counts and result.level is not None
    assert result.resize.original_size == size and result.resize.model_size == (32, 32)
    assert {k: type(v) for k, v in tiny_pipe.unet.attn_processors.items()} == types_before
    assert (unet_probe(tiny_pipe) - out_before).abs().max() < 1e-5


def test_return_attention_gives_the_clustered_matrix(tiny_pipe):
    from diffusers_conceptexpress.clustering import cluster_means

    img = make_image()
    assert tiny_pipe.localize_concepts(img).attention is None  # not kept by default (64 MiB for SD)
    result = tiny_pipe.localize_concepts(img, return_attention=True, post_clustering=False)
    att = result.attention
    assert att.shape == (256, 256) and (att >= 0).all()
    torch.testing.assert_close(att.sum(1), torch.ones(256))
    # it is the matrix that was clustered: without the merge, the features are the kept candidates' mean rows
    labels = result.details.candidate_labels.flatten()
    means = cluster_means(att, labels)[result.details.kept]
    means = means / means.sum(1, keepdim=True)
    assert result.num_concepts == means.shape[0] >= 1
    for f in result.features.flatten(1):
        assert min(float((f - g).abs().max()) for g in means) < 1e-6


def test_keep_aspect_gives_non_square_latent(components_factory):
    pipe = ConceptExpressPipeline(**components_factory("sd1"))
    result = pipe.localize_concepts(make_image("RGB", (128, 64)), resize_policy="keep_aspect")
    h, w = result.latent_masks.shape[1:]
    assert w == 2 * h
    assert result.masks[0].size == (128, 64)


def test_localizers_and_determinism(components_factory):
    pipe = ConceptExpressPipeline(**components_factory("sd2"))
    img = make_image()
    km = [
        pipe.localize_concepts(
            img, method="kmeans", num_concepts=3, generator=torch.Generator().manual_seed(3)
        )
        for _ in range(2)
    ]
    assert km[0].num_concepts == 3 and torch.equal(km[0].latent_masks, km[1].latent_masks)
    plain = pipe.localize_concepts(img, method="finch")
    assert plain.latent_masks.sum(0).eq(1).all()
    a, b = pipe.localize_concepts(img), pipe.localize_concepts(img)
    assert torch.equal(a.latent_masks, b.latent_masks)
    sampled = [
        pipe.localize_concepts(img, latent_sampling="sample", generator=torch.Generator().manual_seed(1))
        for _ in range(2)
    ]
    assert torch.equal(sampled[0].latent_masks, sampled[1].latent_masks)


def test_save_and_from_pretrained(tmp_path, components_factory):
    pipe = ConceptExpressPipeline(**components_factory("sd2-v"))
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = ConceptExpressPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded, ConceptExpressPipeline)
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert loaded.unet.config.upcast_attention
    img = make_image()
    assert torch.equal(pipe.localize_concepts(img).latent_masks, loaded.localize_concepts(img).latent_masks)
    half = ConceptExpressPipeline.from_pretrained(tmp_path / "pipe", dtype=torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16 and half.text_encoder.dtype == torch.bfloat16
    # the folder names its class through its pipeline.py, so the stock SD class asks for trust_remote_code ...
    with pytest.raises(ValueError, match="trust_remote_code"):
        StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    # ... and a folder saved without that entry is a plain SD folder that the stock pipeline loads as is
    pipe.save_pretrained(tmp_path / "plain", pipeline_code=False)
    assert not (tmp_path / "plain" / "pipeline.py").exists()
    sd = StableDiffusionPipeline.from_pretrained(tmp_path / "plain")
    assert type(sd) is StableDiffusionPipeline and sd.safety_checker is None
    assert isinstance(ConceptExpressPipeline.from_pretrained(tmp_path / "plain"), ConceptExpressPipeline)


def test_from_pipe_keeps_dtype_and_shares_modules(components_factory):
    sd = StableDiffusionPipeline(
        **components_factory("sd1"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(dtype=torch.bfloat16)
    ce = ConceptExpressPipeline.from_pipe(sd)
    assert ce.unet is sd.unet and ce.vae is sd.vae and ce.text_encoder is sd.text_encoder
    assert ce.unet.dtype == torch.bfloat16 and ce.vae.dtype == torch.bfloat16
    result = ce.localize_concepts(make_image())
    assert result.num_concepts >= 1
    ce32 = ConceptExpressPipeline.from_pipe(sd, dtype=torch.float32)
    assert ce32.unet.dtype == torch.float32
    back = StableDiffusionPipeline.from_pipe(
        ce32, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    images = back("a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


@pytest.fixture
def vae_calls(tiny_pipe):
    calls = []
    handle = tiny_pipe.vae.register_forward_pre_hook(lambda *a: calls.append(1))
    handle_enc = tiny_pipe.vae.encoder.register_forward_pre_hook(lambda *a: calls.append(1))
    yield calls
    handle.remove()
    handle_enc.remove()


@pytest.mark.parametrize("kind", ["sd1"], indirect=True)
def test_bad_inputs_fail_before_model_work(tiny_pipe, vae_calls, tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match=r"nope\.png"):
        tiny_pipe.localize_concepts(str(missing))
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ImageInputError, match=r"notes\.txt"):
        tiny_pipe.localize_concepts(text)
    with pytest.raises(ImageInputError, match="63"):
        tiny_pipe.localize_concepts(Image.new("RGB", (63, 100)))
    with pytest.raises(TypeError, match="float"):
        tiny_pipe.localize_concepts(3.5)
    with pytest.raises(TypeError, match="num_clusters"):
        tiny_pipe.localize_concepts(make_image(), num_clusters=3)
    with pytest.raises(ValueError, match="num_concepts"):
        tiny_pipe.localize_concepts(make_image(), method="kmeans")
    with pytest.raises(ValueError, match="multiple of 8"):
        tiny_pipe.localize_concepts(make_image(), resolution=30)
    assert vae_calls == []


@pytest.mark.parametrize("kind", ["sd1"], indirect=True)
def test_image_decoded_once_and_vae_encodes_counted(tiny_pipe, tmp_path, monkeypatch):
    import diffusers_conceptexpress.image_io as image_io

    path = tmp_path / "scene.png"
    make_image().save(path)
    decodes, encodes = [], []  # one entry per image decode; per VAE encode call, its batch size
    decode, encode = image_io._pil_to_rgb, tiny_pipe.vae.encode
    monkeypatch.setattr(image_io, "_pil_to_rgb", lambda *a, **k: decodes.append(1) or decode(*a, **k))
    monkeypatch.setattr(
        tiny_pipe.vae, "encode", lambda x, *a, **k: encodes.append(len(x)) or encode(x, *a, **k)
    )
    tiny_pipe.localize_concepts(path)
    assert len(decodes) == 1 and encodes == [1]
    options = dict(num_train_steps=1, split_steps=0, sinkhorn_iters=1, load=False)
    decodes.clear(), encodes.clear()
    tiny_pipe.extract_concepts(path, **options)
    # decoded once; 2 encodes of one image each: the image (localization and learning), then its flip
    assert len(decodes) == 1 and encodes == [1, 1]
    decodes.clear(), encodes.clear()
    mask = np.zeros((80, 96), bool)
    mask[10:50, 20:70] = True
    tiny_pipe.extract_concepts(path, masks=[mask], **options)
    assert len(decodes) == 1 and encodes == [2]  # user masks: no localization pass, image and flip at once


@pytest.mark.parametrize("kind", ["sd1"], indirect=True)
def test_nth_extraction_of_one_pipeline_equals_its_first(tiny_pipe):
    """Loaded concepts grow the vocabulary; the initialisation rows come from the original one, so an image
    extracted again by the same pipeline object (after its own and other tokens were loaded) is identical."""
    from diffusers_conceptexpress.tokens import base_vocabulary_size

    tiny_pipe.set_progress_bar_config(disable=True)
    img = make_image()
    base = base_vocabulary_size(tiny_pipe.tokenizer, tiny_pipe.text_encoder)
    options = dict(num_train_steps=3, split_steps=1, tokens_per_concept=2, sinkhorn_iters=5)
    runs = []
    for prefix in ("<a>", "<b>", "<a>"):  # loaded each time: <a>, then <a> and <b>, then <a> replaced
        out = tiny_pipe.extract_concepts(
            img, generator=torch.Generator().manual_seed(0), token_prefix=prefix, **options
        )
        runs.append(out)
    k = runs[0].num_concepts
    assert len(tiny_pipe.tokenizer) == base + 2 * (k + 1)  # the vocabulary did grow
    assert base_vocabulary_size(tiny_pipe.tokenizer, tiny_pipe.text_encoder) == base
    for later in runs[1:]:
        assert torch.equal(later.learning.initial_embeddings, runs[0].learning.initial_embeddings)
        assert torch.equal(later.embeddings, runs[0].embeddings)
        assert torch.equal(later.localization.latent_masks, runs[0].localization.latent_masks)
        assert all(
            np.array_equal(np.asarray(m), np.asarray(n))
            for m, n in zip(later.localization.masks, runs[0].localization.masks, strict=True)
        )
