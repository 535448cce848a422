"""ConceptExpressPipeline as a diffusers pipeline, tested in the spirit of diffusers' own pipeline tests (written
here, on tiny models, offline): the StableDiffusion call surface with a stock ``StableDiffusionPipeline`` on the
same modules as the control, the method (localization, extraction) under diffusers' switches (offloading,
attention slicing, FreeU, fused QKV, VAE slicing and tiling, IP-Adapter), and the ways in: the community-pipeline
file and folder, and ``save_pretrained`` with both loaders."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler, StableDiffusionPipeline
from diffusers.loaders import (
    FromSingleFileMixin,
    IPAdapterMixin,
    StableDiffusionLoraLoaderMixin,
    TextualInversionLoaderMixin,
)
from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.utils.torch_utils import get_device
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

import diffusers_conceptexpress
from diffusers_conceptexpress import ConceptExpressPipeline, community_pipeline_path

pytestmark = pytest.mark.usefixtures("offline")

FAST = {"num_train_steps": 2, "split_steps": 1, "sinkhorn_iters": 2, "load": False}  # a few seconds each
SD_CALL = (  # StableDiffusionPipeline.__call__'s parameters that the issue lists
    "prompt", "height", "width", "num_inference_steps", "timesteps", "sigmas", "guidance_scale",
    "negative_prompt", "num_images_per_prompt", "eta", "generator", "latents", "prompt_embeds",
    "negative_prompt_embeds", "ip_adapter_image", "ip_adapter_image_embeds", "output_type", "return_dict",
    "cross_attention_kwargs", "guidance_rescale", "clip_skip", "callback_on_step_end",
    "callback_on_step_end_tensor_inputs",
)  # fmt: skip


def make_pipe(components_factory, kind: str = "sd1") -> ConceptExpressPipeline:
    pipe = ConceptExpressPipeline(**components_factory(kind))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_twin(pipe: ConceptExpressPipeline) -> StableDiffusionPipeline:
    """The control: a stock ``StableDiffusionPipeline`` on the SAME module objects."""
    sd = StableDiffusionPipeline(
        **{k: getattr(pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
        safety_checker=None,
        feature_extractor=None,
        image_encoder=pipe.image_encoder,
        requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    return sd


def call_args(seed: int = 0, **overrides) -> dict:
    args = {
        "prompt": "a photo of a cat",
        "num_inference_steps": 2,
        "guidance_scale": 6.0,
        "height": 32,
        "width": 32,
        "generator": torch.Generator().manual_seed(seed),
        "output_type": "np",
    }
    return {**args, **overrides}


def scene(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8))


def same_localization(a, b, atol: float = 0.0) -> None:
    assert torch.equal(a.latent_masks, b.latent_masks)
    torch.testing.assert_close(a.features, b.features, atol=atol, rtol=0)


def extract(pipe, **options):
    return pipe.extract_concepts(scene(), generator=torch.Generator().manual_seed(0), **{**FAST, **options})


# --------------------------------------------------------------------------------------- the call surface
def test_it_is_a_stable_diffusion_pipeline_with_the_full_call_signature(components_factory):
    for base in (
        StableDiffusionPipeline,
        StableDiffusionMixin,
        TextualInversionLoaderMixin,
        StableDiffusionLoraLoaderMixin,
        IPAdapterMixin,
        FromSingleFileMixin,
    ):
        assert issubclass(ConceptExpressPipeline, base)
    ours = inspect.signature(ConceptExpressPipeline.__call__).parameters
    assert list(ours) == list(inspect.signature(StableDiffusionPipeline.__call__).parameters)
    assert set(SD_CALL) <= set(ours)
    assert {"latents", "prompt_embeds", "negative_prompt_embeds"} <= set(
        ConceptExpressPipeline._callback_tensor_inputs
    )
    # the five components alone, as before; the SD pipeline's optional ones are None
    pipe = make_pipe(components_factory)
    assert callable(pipe.encode_prompt)
    assert pipe.safety_checker is None and pipe.feature_extractor is None and pipe.image_encoder is None
    assert pipe.config.requires_safety_checker is False
    assert set(pipe.components) == {
        "vae", "text_encoder", "tokenizer", "unet", "scheduler", "safety_checker", "feature_extractor",
        "image_encoder",
    }  # fmt: skip


VARIANTS = {
    "guided": {},
    "unguided": {"guidance_scale": 1.0},
    "negative prompt, guidance rescale": {"negative_prompt": "a dog", "guidance_rescale": 0.7},
    "eta": {"eta": 0.5},
    "latents": {"latents": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))},
    "two prompts, two images each": {"prompt": ["a photo of a cat", "a red dog"], "num_images_per_prompt": 2},
    "cross attention scale": {"cross_attention_kwargs": {"scale": 0.5}},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_generation_is_stable_diffusions_on_the_same_modules(components_factory, kind, variant):
    pipe = make_pipe(components_factory, kind)
    ours = pipe(**call_args(**VARIANTS[variant])).images
    assert np.array_equal(ours, sd_twin(pipe)(**call_args(**VARIANTS[variant])).images)


def test_clip_skip_is_stable_diffusions(components_factory):
    pipe = make_pipe(components_factory)

    def outcome(p):
        try:
            return p(**call_args(clip_skip=1)).images
        except AttributeError as err:  # diffusers 0.42 reads CLIPTextModel.text_model, gone in transformers 5
            return str(err)

    ours, theirs = outcome(pipe), outcome(sd_twin(pipe))
    assert ours == theirs if isinstance(ours, str) else np.array_equal(ours, theirs)


@pytest.mark.parametrize(
    ("schedule", "steps"), [({"timesteps": [999, 500, 1]}, 3), ({"sigmas": [14.6, 3.0, 0.5]}, 2)]
)
def test_custom_timesteps_and_sigmas(components_factory, schedule, steps):
    pipe = make_pipe(components_factory)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # DDIM takes neither
    ours = pipe(**call_args(num_inference_steps=None, **schedule)).images
    assert pipe.num_timesteps == steps
    assert np.array_equal(ours, sd_twin(pipe)(**call_args(num_inference_steps=None, **schedule)).images)


def test_num_images_per_prompt_batch_versus_single_and_return_dict(components_factory):
    pipe = make_pipe(components_factory)
    for prompt, batch in (("a photo of a cat", 1), (["a photo of a cat", "a red dog"], 2)):
        for n in (1, 2):
            images = pipe(**call_args(prompt=prompt, num_images_per_prompt=n)).images
            assert images.shape == (batch * n, 32, 32, 3)
    # a batch with one generator per image gives what each image gets alone
    prompts = ["a photo of a cat", "a red dog"]
    alone = np.concatenate([pipe(**call_args(seed=s, prompt=p)).images for s, p in enumerate(prompts)])
    gens = [torch.Generator().manual_seed(s) for s in range(2)]
    batched = pipe(**call_args(prompt=prompts, generator=gens)).images
    np.testing.assert_allclose(batched, alone, atol=1e-4, rtol=0)
    # return_dict=False: the tuple (images, nsfw flags)
    out = pipe(**call_args(return_dict=False))
    assert isinstance(out, tuple) and len(out) == 2 and out[1] is None
    assert np.array_equal(out[0], pipe(**call_args()).images)


def test_callback_on_step_end_with_tensor_inputs(components_factory):
    pipe = make_pipe(components_factory)
    seen = []

    def record(p, i, t, tensors):
        assert p is pipe
        seen.append(sorted(tensors))
        return tensors

    pipe(
        **call_args(
            callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"]
        )
    )
    assert seen == [["latents", "prompt_embeds"]] * 2

    def every_input(p, i, t, tensors):
        assert set(tensors) == set(p._callback_tensor_inputs)
        assert tensors["prompt_embeds"].shape[0] == 2  # negative and positive, with guidance
        return tensors

    pipe(
        **call_args(
            callback_on_step_end=every_input, callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs
        )
    )

    def zero_the_last_latents(p, i, t, tensors):
        if i == p.num_timesteps - 1:
            tensors["latents"] = torch.zeros_like(tensors["latents"])
        return tensors

    out = pipe(**call_args(output_type="latent", callback_on_step_end=zero_the_last_latents))
    assert out.images.abs().sum() == 0  # what the callback returns is used

    def raise_guidance(p, i, t, tensors):
        p._guidance_scale += 1.0
        return tensors

    pipe(**call_args(callback_on_step_end=raise_guidance))
    assert pipe.guidance_scale == 6.0 + 2
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(**call_args(callback_on_step_end=record, callback_on_step_end_tensor_inputs=["not_a_tensor"]))
    # extraction reports after every training step: callback(step, num_train_steps, losses)
    calls = []
    extract(pipe, callback=lambda step, total, logs: calls.append((step, total, sorted(logs))))
    assert [c[:2] for c in calls] == [(0, 2), (1, 2)]
    assert {"loss", "diffusion", "attention"} <= set(calls[0][2])


def test_classifier_free_guidance_on_and_off(components_factory):
    pipe = make_pipe(components_factory)
    batches = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        guided = pipe(**call_args(guidance_scale=6.0)).images
        assert batches == [2, 2]
        batches.clear()
        plain = pipe(**call_args(guidance_scale=1.0)).images
        assert batches == [1, 1] and not pipe.do_classifier_free_guidance
        assert np.abs(guided - plain).max() > 1e-3
        # the method never guides: localization is one UNet pass on the one image
        batches.clear()
        pipe.localize_concepts(scene())
        assert batches == [1]
    finally:
        hook.remove()


def test_encode_prompt_in_isolation(components_factory):
    pipe = make_pipe(components_factory)
    cpu = torch.device("cpu")
    embeds, negative = pipe.encode_prompt("a photo of a cat", cpu, 2, True, negative_prompt="a dog")
    assert embeds.shape == negative.shape == (2, 77, 32)
    ids = pipe.tokenizer(
        ["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        assert torch.equal(embeds[0], pipe.text_encoder(ids)[0][0])
    own, _ = pipe.encode_prompt_ids(["a photo of a cat"])  # the method's encoder gives the same encoding
    assert torch.equal(own[0], embeds[0])
    # the embeddings alone drive generation exactly as the strings do
    by_text = pipe(**call_args(negative_prompt="a dog")).images
    by_embeds = pipe(**call_args(prompt=None, prompt_embeds=embeds[:1], negative_prompt_embeds=negative[:1]))
    assert np.array_equal(by_text, by_embeds.images)
    # learned tokens are ordinary textual-inversion tokens for encode_prompt
    out = extract(pipe, load=True)
    row = pipe.tokenizer.convert_tokens_to_ids(out.tokens[0])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[row], out.embeddings[0])
    with_token, _ = pipe.encode_prompt(f"a photo of {out.tokens[0]}", cpu, 1, False)
    assert not torch.equal(with_token, pipe.encode_prompt("a photo of", cpu, 1, False)[0])


# ------------------------------------------------------------------------------------- dtype, device, switches
def test_dtype_and_device_moves(components_factory):
    pipe = make_pipe(components_factory)
    pipe.to(torch.bfloat16)
    assert pipe.dtype == torch.bfloat16
    assert all(m.dtype == torch.bfloat16 for m in (pipe.unet, pipe.vae, pipe.text_encoder))
    result = pipe.localize_concepts(scene())
    assert result.num_concepts >= 1 and result.latent_masks.shape[1:] == (16, 16)
    assert np.isfinite(pipe(**call_args()).images).all()
    before = pipe.text_encoder.get_input_embeddings().weight.clone()
    out = extract(pipe)
    assert out.embeddings.dtype == torch.float32 and torch.isfinite(out.embeddings).all()
    assert pipe.text_encoder.dtype == torch.bfloat16
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, before)
    pipe.to("cpu", torch.float32)
    assert pipe.device.type == "cpu" and pipe._execution_device.type == "cpu" and pipe.dtype == torch.float32
    assert pipe.localize_concepts(scene()).num_concepts >= 1


@pytest.mark.parametrize("kind", ["sd1", "sd2-v"], indirect=True)
def test_attention_slicing_gives_the_same_results(components_factory, kind):
    plain, sliced = make_pipe(components_factory, kind), make_pipe(components_factory, kind)
    sliced.enable_attention_slicing(slice_size=1)
    assert all(isinstance(p, SlicedAttnProcessor) for p in sliced.unet.attn_processors.values())
    np.testing.assert_allclose(sliced(**call_args()).images, plain(**call_args()).images, atol=1e-4, rtol=0)
    same_localization(sliced.localize_concepts(scene()), plain.localize_concepts(scene()), atol=1e-5)
    # the recording processors were put back to the user's sliced ones
    assert all(isinstance(p, SlicedAttnProcessor) for p in sliced.unet.attn_processors.values())
    torch.testing.assert_close(extract(sliced).embeddings, extract(plain).embeddings, atol=1e-5, rtol=0)
    assert all(isinstance(p, SlicedAttnProcessor) for p in sliced.unet.attn_processors.values())
    sliced.disable_attention_slicing()
    assert all(isinstance(p, AttnProcessor2_0) for p in sliced.unet.attn_processors.values())


def test_freeu_fused_qkv_and_vae_switches(components_factory):
    pipe = make_pipe(components_factory)
    image, localization = pipe(**call_args()).images, pipe.localize_concepts(scene())
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
    assert np.abs(pipe(**call_args()).images - image).max() > 1e-4  # FreeU changes generation ...
    same_localization(
        pipe.localize_concepts(scene()), localization
    )  # ... not the method, which runs without it
    assert pipe.unet.up_blocks[0].b1 == 1.5 and pipe.unet.up_blocks[1].s2 == 0.2  # and it is still on
    pipe.disable_freeu()
    assert np.array_equal(pipe(**call_args()).images, image)

    pipe.fuse_qkv_projections()
    np.testing.assert_allclose(pipe(**call_args()).images, image, atol=1e-4, rtol=0)
    same_localization(pipe.localize_concepts(scene()), localization, atol=1e-5)
    pipe.unfuse_qkv_projections()

    pipe.vae.enable_slicing()  # diffusers 0.42 keeps these switches on the VAE only
    pipe.vae.enable_tiling()
    np.testing.assert_allclose(pipe(**call_args()).images, image, atol=1e-4, rtol=0)
    same_localization(pipe.localize_concepts(scene()), localization, atol=1e-5)
    pipe.vae.disable_slicing()
    pipe.vae.disable_tiling()


def test_model_cpu_offload_for_generation_localization_and_extraction(components_factory):
    reference, pipe = make_pipe(components_factory), make_pipe(components_factory)
    if get_device() == "cpu":  # diffusers' own message on a machine without an accelerator
        with pytest.raises(RuntimeError, match="accelerator"):
            pipe.enable_model_cpu_offload()
    pipe.enable_model_cpu_offload(device="cpu")  # accelerate's hooks, executing on this machine's CPU

    def hooked():
        return len(pipe._all_hooks) == 3 and all(
            hasattr(getattr(pipe, m), "_hf_hook") for m in ("text_encoder", "unet", "vae")
        )

    assert hooked() and pipe._execution_device == torch.device("cpu:0")
    same_localization(pipe.localize_concepts(scene()), reference.localize_concepts(scene()))
    assert hooked()
    ours, theirs = extract(pipe, load=True), extract(reference, load=True)
    assert torch.equal(ours.embeddings, theirs.embeddings) and hooked()
    prompt = f"a photo of {ours.tokens[0]}"
    assert np.array_equal(
        pipe(**call_args(prompt=prompt)).images, reference(**call_args(prompt=prompt)).images
    )
    assert hooked()


def test_group_offloading_localizes_and_refuses_extraction_clearly(components_factory):
    reference, pipe = make_pipe(components_factory), make_pipe(components_factory)
    pipe.enable_group_offload(onload_device=torch.device("cpu"), offload_type="leaf_level")
    same_localization(pipe.localize_concepts(scene()), reference.localize_concepts(scene()))
    with pytest.raises(RuntimeError, match="enable_model_cpu_offload"):
        extract(pipe)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_cpu_offload_on_cuda(components_factory, mode):
    reference = make_pipe(components_factory).to("cuda")
    pipe = make_pipe(components_factory)
    getattr(pipe, f"enable_{mode}_cpu_offload")()
    assert pipe._execution_device.type == "cuda"
    same_localization(pipe.localize_concepts(scene()), reference.localize_concepts(scene()), atol=1e-5)
    ours, theirs = extract(pipe, load=True), extract(reference, load=True)
    torch.testing.assert_close(ours.embeddings, theirs.embeddings, atol=1e-4, rtol=0)
    prompt = f"a photo of {ours.tokens[0]}"
    np.testing.assert_allclose(
        pipe(**call_args(prompt=prompt)).images, reference(**call_args(prompt=prompt)).images, atol=1e-3
    )
    assert pipe._execution_device.type == "cuda" and pipe.unet.device.type in ("cpu", "meta")


def tiny_ip_adapter(unet, image_embed_dim: int = 16) -> dict:
    """An IP-Adapter state dict (``image_proj`` + per cross-attention layer ``to_k_ip``/``to_v_ip``) for ``unet``,
    in the layout diffusers' loader reads (keys 1, 3, 5, ... over the cross-attention layers)."""
    g = torch.Generator().manual_seed(0)
    cross = unet.config.cross_attention_dim
    layers, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            shape = unet.get_submodule(name.removesuffix(".processor")).to_k.weight.shape
            layers[f"{key}.to_k_ip.weight"] = torch.randn(shape, generator=g) * 0.1
            layers[f"{key}.to_v_ip.weight"] = torch.randn(shape, generator=g) * 0.1
            key += 2
    proj = {
        "proj.weight": torch.randn(4 * cross, image_embed_dim, generator=g) * 0.1,
        "proj.bias": torch.zeros(4 * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    return {"image_proj": proj, "ip_adapter": layers}


def test_ip_adapter_inputs_and_a_clear_error_for_the_method(components_factory):
    pipe = make_pipe(components_factory)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=4, projection_dim=16,
        )
    ).eval()  # fmt: skip
    pipe.register_modules(image_encoder=encoder, feature_extractor=CLIPImageProcessor(size=32, crop_size=32))
    pipe.unet._load_ip_adapter_weights([tiny_ip_adapter(pipe.unet)])
    sd = sd_twin(pipe)
    sd.register_modules(feature_extractor=pipe.feature_extractor)
    embeds = [torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(1))]  # negative, positive
    ours = pipe(**call_args(ip_adapter_image_embeds=embeds)).images
    assert np.array_equal(ours, sd(**call_args(ip_adapter_image_embeds=embeds)).images)
    assert np.abs(ours - pipe(**call_args(ip_adapter_image_embeds=[embeds[0] * 0])).images).max() > 1e-4
    reference = scene(1).resize((32, 32))  # through the image encoder (StableDiffusionPipeline.encode_image)
    assert np.array_equal(
        pipe(**call_args(ip_adapter_image=reference)).images,
        sd(**call_args(ip_adapter_image=reference)).images,
    )
    for method in (pipe.localize_concepts, lambda image: extract(pipe)):
        with pytest.raises(RuntimeError, match=r"unload_ip_adapter\(\)"):
            method(scene())
    pipe.unload_ip_adapter()
    same_localization(
        pipe.localize_concepts(scene()), make_pipe(components_factory).localize_concepts(scene())
    )


def test_lora_weights_load_and_the_method_runs_on_the_adapted_model(tmp_path, components_factory):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = make_pipe(components_factory)
    targets = ["to_k", "to_q", "to_v", "to_out.0"]
    donor.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=targets))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(donor.unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=layers)
    plain, pipe = make_pipe(components_factory), make_pipe(components_factory)
    pipe.load_lora_weights(tmp_path / "lora")
    ours = pipe(**call_args()).images
    assert np.array_equal(ours, sd_twin(pipe)(**call_args()).images)  # the stock pipeline on the same modules
    assert np.abs(ours - plain(**call_args()).images).max() > 1e-4
    # the method runs on the adapted model (the recording processors call the LoRA layers) and leaves it as it was
    adapted = pipe.localize_concepts(scene())
    assert not torch.equal(adapted.features, plain.localize_concepts(scene()).features)
    lora = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "lora" in n}
    assert lora and extract(pipe).num_concepts >= 1
    assert all(torch.equal(p, lora[n]) for n, p in pipe.unet.named_parameters() if "lora" in n)
    assert np.array_equal(pipe(**call_args()).images, ours)
    pipe.unload_lora_weights()
    same_localization(pipe.localize_concepts(scene()), plain.localize_concepts(scene()))


# ---------------------------------------------------------------------------------------------- ways in
@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """diffusers copies custom-pipeline files into its modules cache and imports them from there: a temporary
    cache, with ``sys.path`` and the imported copies put back afterwards."""
    from diffusers.utils import dynamic_modules_utils

    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield tmp_path / "modules"
    for name in set(sys.modules) - before:
        if name.startswith("diffusers_modules"):
            del sys.modules[name]


def test_community_pipeline_file_and_folder(tmp_path, components_factory, modules_cache):
    reference = make_pipe(components_factory)
    sd_twin(reference).save_pretrained(tmp_path / "sd")  # a stock SD folder
    path = Path(community_pipeline_path())
    assert (
        path.name == "pipeline.py"
        and path.parent == Path(diffusers_conceptexpress.__file__).parent / "community"
    )
    alone = tmp_path / "entry"  # a folder holding nothing but pipeline.py
    alone.mkdir()
    shutil.copy(path, alone / "pipeline.py")
    localization, image = reference.localize_concepts(scene()), reference(**call_args()).images
    for entry in (str(path), str(path.parent), str(alone)):
        pipe = DiffusionPipeline.from_pretrained(
            tmp_path / "sd", custom_pipeline=entry, trust_remote_code=True
        )
        assert type(pipe) is ConceptExpressPipeline  # the installed class itself, not a copy
        assert pipe.safety_checker is None
        pipe.set_progress_bar_config(disable=True)
        # loaded weights equal the saved ones; the CPU kernels may round loaded tensors differently (1e-7)
        same_localization(pipe.localize_concepts(scene()), localization, atol=1e-6)
        np.testing.assert_allclose(pipe(**call_args()).images, image, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(tmp_path / "sd", custom_pipeline=str(path))


def test_save_pretrained_then_both_loaders(tmp_path, components_factory, modules_cache):
    pipe = make_pipe(components_factory, "sd2-v")
    folder = tmp_path / "ce"
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "ConceptExpressPipeline"]
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    assert (folder / "pipeline.py").read_bytes() == Path(community_pipeline_path()).read_bytes()
    ours = ConceptExpressPipeline.from_pretrained(folder)  # no trust_remote_code needed
    generic = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    localization, image = pipe.localize_concepts(scene()), pipe(**call_args()).images
    for loaded in (ours, generic):
        assert type(loaded) is ConceptExpressPipeline
        assert (
            loaded.scheduler.config.prediction_type == "v_prediction" and loaded.unet.config.upcast_attention
        )
        loaded.set_progress_bar_config(disable=True)
        same_localization(loaded.localize_concepts(scene()), localization, atol=1e-6)
        np.testing.assert_allclose(loaded(**call_args()).images, image, atol=1e-5, rtol=0)
    # saved again by a loaded pipeline: the same entry; and the class's own loader never runs the folder's code
    generic.save_pretrained(tmp_path / "again", pipeline_code=True)
    assert json.loads((tmp_path / "again" / "model_index.json").read_text())["_class_name"][0] == "pipeline"
    (folder / "pipeline.py").write_text("raise RuntimeError('this file must not run')\n")
    assert type(ConceptExpressPipeline.from_pretrained(folder)) is ConceptExpressPipeline
    with pytest.raises(RuntimeError, match="must not run"):
        DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)


def test_a_fresh_python_loads_a_saved_folder_with_diffusers_alone(tmp_path, components_factory):
    make_pipe(components_factory).save_pretrained(tmp_path / "ce")
    code = (
        "import sys\n"
        "from diffusers import DiffusionPipeline\n"
        "from PIL import Image\n"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "print(type(pipe).__module__, type(pipe).__name__)\n"
        "print(pipe.localize_concepts(Image.new('RGB', (64, 64), 'red')).num_concepts)\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "ce")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.split("\n")
    assert lines[0] == "diffusers_conceptexpress.pipeline ConceptExpressPipeline" and int(lines[1]) >= 1
