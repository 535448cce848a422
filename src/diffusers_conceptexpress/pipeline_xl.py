"""``ConceptExpressXLPipeline``: unsupervised concept extraction from one image with a Stable Diffusion XL model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .conditioning import SDXLConditioning, eot_positions, pooled_at_eot, tokenize
from .pipeline_mixin import ConceptExpressMixin

__all__ = ["ConceptExpressXLPipeline"]


class ConceptExpressXLPipeline(ConceptExpressMixin, StableDiffusionXLPipeline):
    r"""ConceptExpress (Hao et al., ECCV 2024) on a Stable Diffusion XL model.

    The same method as :class:`~diffusers_conceptexpress.ConceptExpressPipeline` (same options, outputs,
    callbacks and files), on SDXL's conditioning (:class:`~diffusers_conceptexpress.conditioning.SDXLConditioning`):
    each concept is one token in BOTH tokenizers, its two rows (768 for CLIP ViT-L, 1280 for OpenCLIP bigG)
    trained together. It IS a ``StableDiffusionXLPipeline``: ``__call__``, the loaders and the switches are
    diffusers' own, except that the pooled prompt embedding is taken at the real [EOT] position
    (:meth:`encode_prompt`)::

        pipe = ConceptExpressXLPipeline.from_pretrained("path/or/id", dtype=torch.float16)
        pipe = ConceptExpressXLPipeline.from_pipe(sdxl_pipe)  # shares the modules, keeps their dtype
        result = pipe.extract_concepts(image)  # 1024 px by default
        result.save("out")  # concept_k.safetensors = {"clip_l": [1, 768], "clip_g": [1, 1280]}
        pipe("a photo of <ce>_1").images[0]

    Localization aggregates self-attention on SDXL's finest attention grid (64x64 at 1024 px, half the
    latent grid); the [EOT] map and the learning's attention alignment use the 32x32 layers (factor 4, the
    same image fraction as SD's 16x16 at 512 px). See docs/design.md, 'SDXL'.

    Args:
        vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler: SDXL's components.
        image_encoder, feature_extractor: optional, for IP-Adapters.
        force_zeros_for_empty_prompt, add_watermarker: as for ``StableDiffusionXLPipeline`` (the watermarker
            is off by default here: it needs the ``invisible-watermark`` package).
    """

    family = "sdxl"
    _text_encoder_names = ("text_encoder", "text_encoder_2")
    _tokenizer_names = ("tokenizer", "tokenizer_2")
    _embedding_keys = SDXLConditioning.keys

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = False,
    ) -> None:
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )

    def to_json_file(self, json_file_path) -> None:
        """Write the config; ``model_index.json`` names ``StableDiffusionXLPipeline``, so a folder written by
        ``save_pretrained`` is a plain SDXL folder that any SDXL loader (and this class) reads."""
        super().to_json_file(json_file_path)
        path = Path(json_file_path)
        if path.name == self.config_name:
            config = json.loads(path.read_text(encoding="utf-8"))
            config["_class_name"] = StableDiffusionXLPipeline.__name__
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    # ------------------------------------------------------------ conditioning
    def _conditioning(self, image_size: tuple[int, int]) -> SDXLConditioning:
        return SDXLConditioning(
            self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2, image_size
        )

    def pooled_prompt_embeds(self, prompts: list[str]) -> torch.Tensor:
        """``text_embeds`` (B, 1280) of prompts: text_encoder_2's projection at the real [EOT] position.

        Prompts go through ``maybe_convert_prompt`` first (multi-vector textual-inversion tokens such as
        ``<ce>`` expand as in ``encode_prompt``).
        """
        prompts = self.maybe_convert_prompt(list(prompts), self.tokenizer_2)
        ids = tokenize(self.tokenizer_2, prompts).to(self.text_encoder_2.device)
        out = self.text_encoder_2(ids)
        return pooled_at_eot(
            self.text_encoder_2, out.last_hidden_state, eot_positions(ids, self.tokenizer_2.eos_token_id)
        )

    def encode_prompt(
        self,
        prompt,
        prompt_2=None,
        device=None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt=None,
        negative_prompt_2=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        pooled_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
        lora_scale=None,
        clip_skip=None,
    ):
        """``StableDiffusionXLPipeline.encode_prompt`` with the pooled embeddings taken at the [EOT] position.

        The stock method takes text_encoder_2's ``text_embeds``, which transformers pools at
        ``argmax(input_ids)`` for configs with ``eos_token_id == 2`` (SDXL's): with a textual-inversion token
        in the prompt (the highest ids) the stock pipeline pools at that token instead of [EOT]. Here the
        pooled embeddings of prompts (and of negative prompts, unless zeros) are recomputed at [EOT] with
        :meth:`pooled_prompt_embeds`; given ``pooled_prompt_embeds`` are used as they are.
        """
        out = list(
            super().encode_prompt(
                prompt,
                prompt_2=prompt_2,
                device=device,
                num_images_per_prompt=num_images_per_prompt,
                do_classifier_free_guidance=do_classifier_free_guidance,
                negative_prompt=negative_prompt,
                negative_prompt_2=negative_prompt_2,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                lora_scale=lora_scale,
                clip_skip=clip_skip,
            )
        )
        if self.text_encoder_2 is None:
            return tuple(out)
        texts = [prompt] if isinstance(prompt, str) else prompt
        texts_2 = texts if prompt_2 is None else ([prompt_2] if isinstance(prompt_2, str) else prompt_2)
        if texts is not None and pooled_prompt_embeds is None and prompt_embeds is None:
            out[2] = self._repeat_pooled(self.pooled_prompt_embeds(texts_2), num_images_per_prompt, out[2])
        zeros = negative_prompt is None and self.config.force_zeros_for_empty_prompt
        if (
            do_classifier_free_guidance
            and not zeros
            and negative_pooled_prompt_embeds is None
            and negative_prompt_embeds is None
            and texts is not None
        ):
            neg = negative_prompt_2 or negative_prompt or ""
            neg = [neg] * len(texts) if isinstance(neg, str) else neg
            out[3] = self._repeat_pooled(self.pooled_prompt_embeds(neg), num_images_per_prompt, out[3])
        return tuple(out)

    @staticmethod
    def _repeat_pooled(pooled: torch.Tensor, num_images_per_prompt: int, like: torch.Tensor) -> torch.Tensor:
        """(B, P) -> (B * n, P) as the stock method repeats it, on ``like``'s device and dtype."""
        return pooled.repeat_interleave(num_images_per_prompt, dim=0).to(device=like.device, dtype=like.dtype)
