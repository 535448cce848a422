"""The method's pipeline code shared by every model family (:class:`ConceptExpressMixin`).

:class:`~diffusers_conceptexpress.ConceptExpressPipeline` (SD 1.x / 2.x) and
:class:`~diffusers_conceptexpress.ConceptExpressXLPipeline` (SDXL) are diffusers' own pipelines plus this mixin.
A family tells the mixin only its text conditioning (:meth:`ConceptExpressMixin._conditioning`, see
:mod:`~diffusers_conceptexpress.conditioning`) and the names of its text modules; localization, learning, the
model-state checks and loading are the same code for both.
"""

from __future__ import annotations

import functools
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.utils import logging

from .attention import (
    AttentionRecorder,
    capture_attention,
    grid_at_factor,
    nearest_factor,
    unet_attention_factors,
)
from .conditioning import TextConditioning
from .export import joint_embeddings, read_concepts, read_lora_settings
from .image_io import ImageInput, ResizeRecord, load_and_prepare_image, mask_to_original, prepare_image
from .learning import LearningConfig, learn_concepts
from .localization import LocalizationConfig, find_eot_index, localize
from .lora import ConceptLora, load_concept_lora, lora_adapter_name, train_lora, unload_concept_lora
from .masks import masks_to_latent_grid, on_grid
from .outputs import ConceptExpressOutput, ConceptLocalization
from .tokens import DEFAULT_TOKEN_PREFIX, concept_token_names

logger = logging.get_logger(__name__)

__all__ = ["ConceptExpressMixin", "local_model_family", "model_family"]

#: model families by the text modules of their model_index.json
FAMILIES = {"sd": "Stable Diffusion 1.x / 2.x", "sdxl": "Stable Diffusion XL"}


def model_family(model_index: dict) -> str:
    """The family of a pipeline's ``model_index.json`` (or components dict): "sdxl" with a ``text_encoder_2``,
    else "sd"."""
    return "sdxl" if model_index.get("text_encoder_2") not in (None, [None, None]) else "sd"


def local_model_family(path) -> str | None:
    """:func:`model_family` of a model folder, or of a Hub id whose ``model_index.json`` is in the local cache
    (nothing is downloaded); None when neither has the file."""
    index = Path(str(path)) / "model_index.json"
    if not index.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(path), "model_index.json")
        except Exception:  # not a valid repository id
            return None
        if not isinstance(cached, str):
            return None
        index = Path(cached)
    return model_family(json.loads(index.read_text(encoding="utf-8")))


def _runs_the_method(training: bool):
    """Decorate ``localize_concepts`` (``training=False``) and ``extract_concepts``:
    clear errors for model states the method cannot run in, FreeU off during the work, and offloaded models put
    back after it (as diffusers' ``__call__`` does with ``maybe_free_model_hooks``)."""

    def decorate(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            self._check_model_state(training)
            try:
                with self._freeu_off():
                    return method(self, *args, **kwargs)
            finally:
                self.maybe_free_model_hooks()

        return run

    return decorate


class ConceptExpressMixin:
    """Localization, learning and loading of concepts on a diffusers text-to-image pipeline.

    Mixed into a diffusers pipeline class, which sets the class attributes below and implements
    :meth:`_conditioning`.

    Attributes:
        family: "sd" or "sdxl".
        _text_encoder_names, _tokenizer_names: the pipeline's text modules, in the conditioning's order.
        _embedding_keys: file keys of the text encoders' rows (None: one encoder, rows under the token).
    """

    family: str = "sd"
    _text_encoder_names: tuple[str, ...] = ("text_encoder",)
    _tokenizer_names: tuple[str, ...] = ("tokenizer",)
    _embedding_keys: tuple[str, ...] | None = None

    def _conditioning(self, image_size: tuple[int, int]) -> TextConditioning:
        """The family's text conditioning for a model input of ``image_size`` (height, width) pixels."""
        raise NotImplementedError

    @classmethod
    def _check_family(cls, source, family: str | None) -> None:
        """One clear line, before loading anything, when a model of the other family is given."""
        if family is None or family == cls.family:
            return
        other = "ConceptExpressXLPipeline" if family == "sdxl" else "ConceptExpressPipeline"
        raise ValueError(
            f"{source} is a {FAMILIES[family]} model, not a {FAMILIES[cls.family]} model: load it with "
            f"{other} (the CLI picks the class from model_index.json)."
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """``DiffusionPipeline.from_pretrained``, after checking (on a local folder or a cached Hub id, before
        anything is loaded) that the model is of this class's family."""
        cls._check_family(pretrained_model_name_or_path, local_model_family(pretrained_model_name_or_path))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """``DiffusionPipeline.from_pipe`` for a pipeline of this class's family, sharing its modules; unlike
        diffusers' method (which casts to float32 unless told otherwise) the modules keep their dtype unless
        ``dtype=`` is passed."""
        cls._check_family(type(pipeline).__name__, model_family(pipeline.components))
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            kwargs["dtype"] = pipeline.dtype
        return super().from_pipe(pipeline, **kwargs)

    def localization_grid(self, latent_size: tuple[int, int]) -> tuple[int, int]:
        """The grid the self-attention is aggregated and clustered on: the UNet's finest attention grid.

        SD: the latent grid (64x64 at 512 px); SDXL: half of it (64x64 at 1024 px), as its first block has no
        attention (docs/design.md, 'SDXL').
        """
        return grid_at_factor(latent_size, min(unet_attention_factors(self.unet)))

    # ------------------------------------------------------------------ helpers
    @property
    def default_resolution(self) -> int:
        """Model input side in pixels: the UNet's ``sample_size`` x the VAE factor (512 for SD 2.1-base)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (VAE factor x the UNet's total downsampling): 64 for SD."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.down_block_types) - 1)

    def encode_pixels(
        self, pixels: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Encode (B, 3, H, W) pixels in [-1, 1] to scaled latents (B, C, H / f, W / f).

        ``sample=False`` takes the posterior mean (deterministic); ``sample=True`` draws with ``generator``.
        """
        dist = self._posterior(pixels)
        return self._scaled(dist.sample(generator=generator) if sample else dist.mean)

    def _posterior(self, pixels: torch.Tensor):
        """The VAE's latent distribution of (B, 3, H, W) pixels in [-1, 1] (one encode)."""
        return self.vae.encode(pixels.to(device=self._execution_device, dtype=self.vae.dtype)).latent_dist

    def _scaled(self, latents: torch.Tensor) -> torch.Tensor:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    # ------------------------------------------------------------ model state
    def _check_model_state(self, training: bool) -> None:
        """Fail with a clear message, before any model work, where localization (or learning) cannot run."""
        if getattr(self.unet.config, "encoder_hid_dim_type", None) == "ip_image_proj":
            raise RuntimeError(
                "An IP-Adapter is loaded: its UNet needs image embeddings at every call, and the method runs the "
                "UNet on the image alone. Call pipe.unload_ip_adapter() before localize_concepts / "
                "extract_concepts, and load_ip_adapter(...) again after to generate with it."
            )
        group_offload = getattr(self, "_maybe_raise_error_if_group_offload_active", None)  # diffusers >= 0.33
        if training and group_offload is not None and group_offload(raise_error=False):
            raise RuntimeError(
                "Group offloading (enable_group_offload) is not supported by extract_concepts: concept learning "
                "trains an embedding installed in the text encoder, which group offloading's hooks do not move. "
                "Use enable_model_cpu_offload() instead (localize_concepts works with any offloading)."
            )

    @contextmanager
    def _freeu_off(self):
        """FreeU (a sampling-time re-weighting of the UNet's up blocks) off inside the block, as it was after.

        Localization and learning use the plain UNet, whose attention the method's constants were set on; a
        pipeline with ``enable_freeu(...)`` still generates with FreeU.
        """
        keys = ("s1", "s2", "b1", "b2")
        saved = [{k: getattr(block, k, None) for k in keys} for block in self.unet.up_blocks]
        self.unet.disable_freeu()
        try:
            yield
        finally:
            for block, values in zip(self.unet.up_blocks, saved, strict=True):
                for k, v in values.items():
                    if v is not None:
                        setattr(block, k, v)

    @contextmanager
    def _offloading_suspended(self, *resident: str):
        """Accelerate's offloading hooks off inside the block, the ``resident`` modules on the execution device
        and the others on the CPU; the same offloading (model or sequential) is enabled again after.

        diffusers' own pattern for changing modules of an offloaded pipeline (``load_lora_weights``); nothing
        happens without offloading.
        """
        device = self._execution_device
        flags = self._optionally_disable_offloading(self)  # removes the hooks (diffusers' LoRA loader helper)
        model_offload, sequential = flags[0], flags[1]
        if not (model_offload or sequential):
            yield
            return
        for name, module in self.components.items():
            if isinstance(module, torch.nn.Module):
                module.to(device if name in resident else "cpu")
        try:
            yield
        finally:
            if model_offload:
                self.enable_model_cpu_offload(device=device)
            else:
                self.enable_sequential_cpu_offload(device=device)

    def _check_resolution(self, resolution: int) -> None:
        if resolution % self.size_multiple:
            raise ValueError(
                f"resolution={resolution} is not a multiple of {self.size_multiple} (VAE factor x UNet "
                f"downsampling); use e.g. {self.default_resolution}."
            )

    def _split_options(self, options: dict) -> tuple[LocalizationConfig, LearningConfig]:
        loc_fields = set(LocalizationConfig.__dataclass_fields__)
        learn_fields = set(LearningConfig.__dataclass_fields__)
        unknown = sorted(set(options) - loc_fields - learn_fields)
        if unknown:
            raise TypeError(
                f"Unknown option(s) {unknown}. Localization options: {sorted(loc_fields)}; learning options: "
                f"{sorted(learn_fields)}."
            )
        loc = LocalizationConfig(**{k: v for k, v in options.items() if k in loc_fields})
        learn = LearningConfig(**{k: v for k, v in options.items() if k in learn_fields})
        return loc, learn

    # ------------------------------------------------------------- localization
    @_runs_the_method(training=False)
    @torch.no_grad()
    def localize_concepts(
        self,
        image: ImageInput,
        *,
        generator: torch.Generator | None = None,
        return_attention: bool = False,
        **options,
    ) -> ConceptLocalization:
        r"""Find the concepts of ``image``: one UNet pass, then clustering (docs/design.md, 'Localization').

        Args:
            image: a path, PIL image (any mode; EXIF orientation applied), numpy array (H, W[, C]) or torch
                tensor (C, H, W) in [0, 1]. At least 64 px on each side.
            generator: seeds the random parts ("kmeans" initialisation, ``latent_sampling="sample"``).
            return_attention: also return the aggregated self-attention that was clustered (``attention``
                of the result: (h*w, h*w) float on the localization grid, 64 MiB at SD's 64 x 64 latent
                grid and at SDXL's 64 x 64 attention grid); off by default.
            **options: fields of :class:`~diffusers_conceptexpress.LocalizationConfig`, e.g.
                ``method="finch"``, ``method="kmeans", num_concepts=3``, ``resize_policy="keep_aspect"``.

        Returns:
            :class:`~diffusers_conceptexpress.ConceptLocalization` with K masks at the original image size.

        Raises:
            TypeError: unknown option or unsupported image type. ValueError / ImageInputError: a bad option
                value or a bad image (FileNotFoundError for a missing file). All raised before model work.
        """
        try:
            config = LocalizationConfig(**options)
        except TypeError as err:
            raise TypeError(
                f"{err}. Valid options of localize_concepts: {sorted(LocalizationConfig.__dataclass_fields__)}."
            ) from None
        resolution = config.resolution or self.default_resolution
        self._check_resolution(resolution)
        pixels, record = prepare_image(
            image, resolution, multiple=self.size_multiple, policy=config.resize_policy
        )
        return self._localize(pixels, record, config, resolution, generator, return_attention)

    @torch.no_grad()
    def _localize(
        self,
        pixels: torch.Tensor,
        record: ResizeRecord,
        config: LocalizationConfig,
        resolution: int,
        generator: torch.Generator | None,
        return_attention: bool = False,
        posterior=None,
    ) -> ConceptLocalization:
        """:meth:`localize_concepts` on a prepared image (``pixels``, ``record`` from ``prepare_image``;
        ``posterior``: its VAE distribution when already encoded)."""
        dist = posterior if posterior is not None else self._posterior(pixels)
        sample = config.latent_sampling == "sample"
        latents = self._scaled(dist.sample(generator=generator) if sample else dist.mean)
        latents = latents.to(self.unet.dtype)
        h, w = latents.shape[-2:]
        conditioning = self._conditioning((h * self.vae_scale_factor, w * self.vae_scale_factor))
        ids = conditioning.tokenize([""], self._execution_device)
        eot_index = find_eot_index(ids[0][0], conditioning.eos_token_id)
        grid = self.localization_grid((h, w))

        recorder = AttentionRecorder(
            (h, w),
            self_weighting=config.self_attention_weighting,
            self_factors=config.self_attention_factors,
            cross_token_indices=[eot_index],
            chunk_bytes=config.chunk_bytes,
            grid=grid,
        )
        timestep = torch.tensor([config.timestep], device=latents.device)
        unet_inputs = conditioning.encode(ids, self.unet.dtype)
        with capture_attention(self.unet, recorder):
            self.unet(latents, timestep, **unet_inputs)
        attention = recorder.self_attention(release=True)[0]
        notes = []
        eot_factor = nearest_factor(recorder.cross_attention_factors(), config.eot_factor)
        if eot_factor != config.eot_factor:
            notes.append(
                f"The UNet has no cross-attention at downsampling factor {config.eot_factor} (outside the mid "
                f"block); used the [EOT] map at factor {eot_factor}."
            )
        eot_map = recorder.cross_attention(eot_factor)[0, 0]
        recorder.reset()

        result = localize(attention, grid, eot_map, config, generator=generator)
        attention = attention.float().cpu() if return_attention else None
        notes += result.notes
        for note in notes:
            logger.info(note)
        return ConceptLocalization(
            masks=[mask_to_original(m, record) for m in result.masks.cpu()],
            latent_masks=result.masks.cpu(),
            features=result.features.cpu(),
            eot_scores=result.scores.cpu(),
            level=result.level,
            cluster_counts=result.cluster_counts,
            eot_map=eot_map.float().cpu(),
            details=result,
            resize=record,
            notes=notes,
            options={**config.to_dict(), "resolution": resolution, "eot_factor_used": eot_factor}
            | ({} if grid == (h, w) else {"grid": list(grid)}),
            attention=attention,
        )

    # ---------------------------------------------------------------- learning
    @_runs_the_method(training=True)
    def extract_concepts(
        self,
        image: ImageInput,
        *,
        num_train_steps: int | None = None,
        schedule: str = "fast",
        generator: torch.Generator | None = None,
        callback=None,
        masks=None,
        token_prefix: str = DEFAULT_TOKEN_PREFIX,
        load: bool = True,
        **options,
    ) -> ConceptExpressOutput:
        r"""Find the concepts of ``image`` and learn one token per concept (docs/design.md, 'Localization'
        and 'Learning').

        Args:
            image: as for :meth:`localize_concepts`.
            num_train_steps: training steps (None: the schedule's; authors: 500, "turbo": 150).
            schedule: "fast" (all prompts of a step in one batched UNet call), "faithful" (the authors':
                one optimiser step per prompt) or "turbo" (batched, at most 1/6 of the authors' UNet samples;
                :data:`~diffusers_conceptexpress.learning.SCHEDULE_DEFAULTS`).
            generator: seeds everything random (noise, timesteps, flips): same seed, same embeddings.
            callback: ``callback(step, num_train_steps, logs)`` after every training step.
            masks: optional list of K binary masks at the image size (PIL, numpy or torch, each as
                :func:`~diffusers_conceptexpress.masks.as_bool_mask` reads it), e.g. from SAM or drawn by hand:
                localization is skipped and these masks are used.
            token_prefix: lower-case prefix of the tokens: concepts become ``<prefix>_1 ... <prefix>_K``.
            load: load the learned tokens (and the LoRA, with ``lora_rank``) into this pipeline, so
                ``pipe("a photo of <ce>_1")`` works at once (tokens and LoRA of an earlier extraction with the
                same prefix are replaced; that LoRA is removed before the extraction runs).
            **options: fields of :class:`~diffusers_conceptexpress.LocalizationConfig` and of
                :class:`~diffusers_conceptexpress.LearningConfig`, e.g. ``lora_rank=4`` for the LoRA phase
                (docs/design.md, 'LoRA phase'; off by default).

        Returns:
            :class:`~diffusers_conceptexpress.ConceptExpressOutput`; ``.save(directory)`` writes the files.
        """
        loc_config, learn_config = self._split_options(
            {**options, "num_train_steps": num_train_steps, "schedule": schedule}
        )
        concept_token_names(token_prefix, 1)  # raises early on an unusable prefix
        resolution = loc_config.resolution or self.default_resolution
        self._check_resolution(resolution)
        if load:  # the LoRA this extraction replaces takes no part in it
            unload_concept_lora(self, lora_adapter_name(token_prefix))
        source, pixels, record = load_and_prepare_image(  # the input is decoded once
            image, resolution, multiple=self.size_multiple, policy=loc_config.resize_policy
        )
        posterior = None
        if masks is not None:
            latent_h = record.model_size[1] // self.vae_scale_factor
            latent_w = record.model_size[0] // self.vae_scale_factor
            latent_masks = masks_to_latent_grid(masks, record.original_size, (latent_h, latent_w))
            features = latent_masks.float() / latent_masks.float().sum((1, 2), keepdim=True)
            localization = ConceptLocalization(
                masks=[mask_to_original(m, record) for m in latent_masks],
                latent_masks=latent_masks,
                features=features,
                eot_scores=torch.full((latent_masks.shape[0],), float("nan")),
                resize=record,
                notes=["Masks given by the caller; localization skipped."],
                options={"masks": "user"},
            )
        else:
            posterior = self._posterior(pixels)  # the image, encoded once for localization and learning
            localization = self._localize(
                pixels, record, loc_config, resolution, generator, posterior=posterior
            )

        with torch.no_grad():
            # two images encoded in all: the image and its horizontal flip (the flip augmentation reuses them)
            if posterior is None:  # user masks: no localization pass, one encode of both
                latents = self.encode_pixels(torch.cat([pixels, pixels.flip(-1)]))
            else:  # the image's localization encode is reused; the VAE rounds a batch of one and of two
                # differently, so this changes the embeddings in the last bits against a batch of two
                latents = torch.cat([self._scaled(posterior.mean), self.encode_pixels(pixels.flip(-1))])
            latents = latents.to(self.unet.dtype)
        device = latents.device
        # the text encoder and the UNet run at every step and the text encoder's embedding is swapped for a
        # trainable one: no offloading hooks move them during training (back on after)
        resident = self._offloading_suspended(*self._text_encoder_names, "unet")
        lat_h, lat_w = latents.shape[-2:]
        conditioning = self._conditioning((lat_h * self.vae_scale_factor, lat_w * self.vae_scale_factor))
        train_masks, train_features = on_grid(
            localization.latent_masks, localization.features, (lat_h, lat_w)
        )
        lora_steps = learn_config.lora_steps if learn_config.lora_rank is not None else 0
        with resident, self.progress_bar(total=learn_config.num_train_steps + lora_steps) as bar:
            inputs = {
                "conditioning": conditioning,
                "unet": self.unet,
                "scheduler": self.scheduler,
                "latents": latents,
                "masks": train_masks.to(device),
                "features": train_features.to(device),
                "config": learn_config,
                "generator": generator,
                "progress": bar.update,
                "callback": callback,
            }
            learned = learn_concepts(**inputs)
            lora = None
            if learn_config.lora_rank is not None:  # the identity boost (lora.py), from the tokens learned
                learned, lora = train_lora(**inputs, learned=learned)
        tokens = concept_token_names(token_prefix, localization.num_concepts)
        base_model = str(getattr(self.config, "_name_or_path", "") or "")
        output = ConceptExpressOutput(
            tokens=tokens,
            embeddings=learned.embeddings,
            localization=localization,
            learning=learned,
            token_prefix=token_prefix,
            base_model=base_model,
            parameters={"localization": localization.options, "learning": learn_config.to_dict()},
            image=source,
            lora=lora,
        )
        if load:
            self.load_concepts(output)
        return output

    def load_concepts(self, concepts: ConceptExpressOutput | str) -> list[str]:
        """Load concepts (an :class:`ConceptExpressOutput` or a saved directory) into this pipeline: the tokens
        (in every tokenizer) and, when the concepts have one, their LoRA (as adapter
        ``lora_adapter_name(prefix)``, active together with the adapters active before).

        Tokens (and a LoRA) with the same prefix that are already loaded are replaced. Returns the prompt
        tokens.
        """
        lora: ConceptLora | str | None
        if isinstance(concepts, ConceptExpressOutput):
            prefix, emb, tokens = concepts.token_prefix, concepts.embeddings, list(concepts.tokens)
            lora = concepts.lora
        else:
            prefix, emb, tokens = read_concepts(concepts)
            lora = str(concepts) if read_lora_settings(concepts) is not None else None
        keys = sorted(emb) if isinstance(emb, dict) else None
        if keys != (None if self._embedding_keys is None else sorted(self._embedding_keys)):
            learned_on = "SDXL (clip_l + clip_g)" if keys else "SD 1.x / 2.x (one text encoder)"
            raise ValueError(
                f"These concepts were learned on a {learned_on} model; this is a {FAMILIES[self.family]} "
                "pipeline. Extract them again with this model."
            )
        rows = [emb] if keys is None else [emb[k] for k in self._embedding_keys]
        with self._offloading_suspended():  # diffusers' loader would re-enable offloading on the wrong device
            for tok_name, enc_name, r in zip(
                self._tokenizer_names, self._text_encoder_names, rows, strict=True
            ):
                tokenizer, encoder = getattr(self, tok_name), getattr(self, enc_name)
                existing = [t for t in tokenizer.get_vocab() if t == prefix or t.startswith(prefix + "_")]
                if existing:
                    self.unload_textual_inversion(existing, tokenizer=tokenizer, text_encoder=encoder)
                self.load_textual_inversion(
                    {prefix: joint_embeddings(r).to(encoder.dtype)}, tokenizer=tokenizer, text_encoder=encoder
                )
            unload_concept_lora(self, lora_adapter_name(prefix))
            if lora is not None:
                load_concept_lora(self, lora, lora_adapter_name(prefix))
        return tokens

    def unload_concepts(self, concepts: ConceptExpressOutput | str) -> None:
        """Remove what :meth:`load_concepts` loaded for these concepts (an output or a saved directory): their
        tokens from every tokenizer and text encoder, and their LoRA adapter."""
        if isinstance(concepts, ConceptExpressOutput):
            prefix = concepts.token_prefix
        else:
            prefix = read_concepts(concepts)[0]
        with self._offloading_suspended():
            for tok_name, enc_name in zip(self._tokenizer_names, self._text_encoder_names, strict=True):
                tokenizer, encoder = getattr(self, tok_name), getattr(self, enc_name)
                loaded = [t for t in tokenizer.get_vocab() if t == prefix or t.startswith(prefix + "_")]
                if loaded:
                    self.unload_textual_inversion(loaded, tokenizer=tokenizer, text_encoder=encoder)
            unload_concept_lora(self, lora_adapter_name(prefix))
