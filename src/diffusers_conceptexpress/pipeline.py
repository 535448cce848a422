"""``ConceptExpressPipeline``: unsupervised concept extraction from one image with a Stable Diffusion model."""

from __future__ import annotations

import functools
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import logging
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from .attention import AttentionRecorder, capture_attention, nearest_factor
from .export import joint_embeddings, read_concepts
from .image_io import ImageInput, ResizeRecord, load_and_prepare_image, mask_to_original, prepare_image
from .learning import LearningConfig, learn_concepts
from .localization import LocalizationConfig, find_eot_index, localize
from .masks import masks_to_latent_grid
from .outputs import ConceptExpressOutput, ConceptLocalization
from .tokens import DEFAULT_TOKEN_PREFIX, concept_token_names

logger = logging.get_logger(__name__)

__all__ = ["ConceptExpressPipeline", "community_pipeline_path"]

# model_index.json of a saved pipeline names the class as [module file, class] (diffusers' remote-code form),
# with the module file written next to it, so that DiffusionPipeline.from_pretrained finds the class
_ENTRY_MODULE = "pipeline"
_ENTRY_CLASS = "ConceptExpressPipeline"


def community_pipeline_path() -> str:
    """Path of the package's community-pipeline file (``community/pipeline.py``).

    Pass it, or its folder, as ``custom_pipeline`` to ``DiffusionPipeline.from_pretrained(...,
    trust_remote_code=True)``; the file only re-exports :class:`ConceptExpressPipeline` from this package.
    """
    return str(Path(__file__).resolve().parent / "community" / f"{_ENTRY_MODULE}.py")


def _runs_the_method(training: bool):
    """Decorate :meth:`ConceptExpressPipeline.localize_concepts` (``training=False``) and ``extract_concepts``:
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


class ConceptExpressPipeline(StableDiffusionPipeline):
    r"""ConceptExpress (Hao et al., ECCV 2024) on a Stable Diffusion model (SD 1.x, SD 2.x, v-prediction).

    Finds the visual concepts of ONE image with no words, no masks and no concept count
    (:meth:`localize_concepts`) and learns one textual-inversion token per concept (:meth:`extract_concepts`).
    It IS a ``StableDiffusionPipeline``: ``__call__``, ``encode_prompt``, the loaders (textual inversion, LoRA,
    IP-Adapter, single file) and the switches (attention and VAE slicing, VAE tiling, FreeU, fused QKV,
    offloading) are diffusers' own. Loads like any SD pipeline::

        pipe = ConceptExpressPipeline.from_pretrained("path/or/id", dtype=torch.float16)
        pipe = ConceptExpressPipeline.from_pipe(sd_pipe)  # shares the modules, keeps their dtype
        pipe = DiffusionPipeline.from_pretrained(
            "path/or/id", custom_pipeline=community_pipeline_path(), trust_remote_code=True
        )

    Args:
        vae: autoencoder between images and latents.
        text_encoder: frozen CLIP text encoder.
        tokenizer: its CLIP tokenizer.
        unet: the denoising UNet.
        scheduler: a scheduler of the base model (its ``prediction_type`` is read, never assumed).
        safety_checker, feature_extractor: optional, as for ``StableDiffusionPipeline`` (None by default:
            ``from_pretrained`` and ``from_pipe`` of this class leave them out unless they are passed).
        image_encoder: optional CLIP vision model for IP-Adapters.
        requires_safety_checker: as for ``StableDiffusionPipeline`` (False by default).
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        requires_safety_checker: bool = False,
    ) -> None:
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )

    # ------------------------------------------------------------- loading, saving
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> ConceptExpressPipeline:
        """``DiffusionPipeline.from_pretrained`` for this class (any SD 1.x / 2.x folder or repository, or a folder
        written by :meth:`save_pretrained`).

        A safety checker in the model is not loaded unless ``safety_checker=`` is passed (the pipeline's own
        work needs none; generation then behaves as ``StableDiffusionPipeline`` without one).
        """
        if "safety_checker" not in kwargs:
            kwargs["safety_checker"] = None
            kwargs.setdefault("feature_extractor", None)
            kwargs.setdefault("requires_safety_checker", False)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs) -> ConceptExpressPipeline:
        """Build from another pipeline (e.g. a ``StableDiffusionPipeline``), sharing its modules.

        Unlike ``DiffusionPipeline.from_pipe``, which casts to float32 unless told otherwise, the modules keep
        the dtype they have (pass ``dtype=`` to change it). As :meth:`from_pretrained`, the source's safety
        checker is not taken over unless ``safety_checker=`` is passed.
        """
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            kwargs["dtype"] = pipeline.dtype
        if "safety_checker" not in kwargs:
            kwargs["safety_checker"] = None
            kwargs.setdefault("feature_extractor", None)
            kwargs.setdefault("requires_safety_checker", False)
        return super().from_pipe(pipeline, **kwargs)

    @classmethod
    def _dict_from_json_file(cls, json_file):
        """Read ``model_index.json``; a saved pipeline's ``[module, class]`` name becomes the class name.

        Loading through this class (or a subclass) never runs the ``pipeline.py`` of a folder: the class is
        already known. Without this, diffusers would resolve the pair to that file and ask for
        ``trust_remote_code`` (both ``from_pretrained`` on a folder and ``download`` from the Hub read the file
        through this method).
        """
        config = super()._dict_from_json_file(json_file)
        name = config.get("_class_name") if isinstance(config, dict) else None
        if isinstance(name, (list, tuple)) and len(name) == 2:
            config["_class_name"] = name[1]
        return config

    def save_pretrained(self, save_directory, *args, pipeline_code: bool = True, **kwargs) -> None:
        """``DiffusionPipeline.save_pretrained``, plus the community entry (``pipeline_code=True``, default).

        The folder then loads with ``ConceptExpressPipeline.from_pretrained(folder)`` and with
        ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``: ``model_index.json`` names the class
        ``["pipeline", "ConceptExpressPipeline"]`` and ``pipeline.py`` (a copy of :func:`community_pipeline_path`,
        which imports the installed package) lies next to it. Other pipeline classes then need
        ``trust_remote_code=True`` as well; ``pipeline_code=False`` writes a plain Stable Diffusion folder instead
        (``StableDiffusionPipeline.from_pretrained`` loads it as is).
        """
        self._write_pipeline_code = pipeline_code
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            del self._write_pipeline_code

    def to_json_file(self, json_file_path) -> None:
        """Write the config; for ``model_index.json`` also the community entry (see :meth:`save_pretrained`).

        ``save_config`` (called by ``save_pretrained``, before any upload to the Hub) writes through this method.
        """
        super().to_json_file(json_file_path)
        path = Path(json_file_path)
        if path.name != self.config_name or not getattr(self, "_write_pipeline_code", True):
            return
        shutil.copyfile(community_pipeline_path(), path.parent / f"{_ENTRY_MODULE}.py")
        config = json.loads(path.read_text(encoding="utf-8"))
        config["_class_name"] = [_ENTRY_MODULE, _ENTRY_CLASS]
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

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

    def encode_prompt_ids(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize (padding to ``model_max_length``) and encode prompts.

        Returns:
            ``(embeddings, input_ids)``: (B, L, D) text-encoder hidden states and (B, L) token ids.
        """
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self._execution_device)
        return self.text_encoder(ids)[0], ids

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
                of the result: (h*w, h*w) float, 64 MiB at SD's 64 x 64 latent grid); off by default.
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
        prompt_embeds, ids = self.encode_prompt_ids([""])
        eot_index = find_eot_index(ids[0], self.tokenizer.eos_token_id)

        recorder = AttentionRecorder(
            (h, w),
            self_weighting=config.self_attention_weighting,
            self_factors=config.self_attention_factors,
            cross_token_indices=[eot_index],
            chunk_bytes=config.chunk_bytes,
        )
        timestep = torch.tensor([config.timestep], device=latents.device)
        with capture_attention(self.unet, recorder):
            self.unet(latents, timestep, encoder_hidden_states=prompt_embeds.to(self.unet.dtype))
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

        result = localize(attention, (h, w), eot_map, config, generator=generator)
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
            options={**config.to_dict(), "resolution": resolution, "eot_factor_used": eot_factor},
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
            load: load the learned tokens into this pipeline, so ``pipe("a photo of <ce>_1")`` works at once
                (tokens of an earlier extraction with the same prefix are replaced).
            **options: fields of :class:`~diffusers_conceptexpress.LocalizationConfig` and of
                :class:`~diffusers_conceptexpress.LearningConfig`.

        Returns:
            :class:`~diffusers_conceptexpress.ConceptExpressOutput`; ``.save(directory)`` writes the files.
        """
        loc_config, learn_config = self._split_options(
            {**options, "num_train_steps": num_train_steps, "schedule": schedule}
        )
        concept_token_names(token_prefix, 1)  # raises early on an unusable prefix
        resolution = loc_config.resolution or self.default_resolution
        self._check_resolution(resolution)
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
        resident = self._offloading_suspended("text_encoder", "unet")
        with resident, self.progress_bar(total=learn_config.num_train_steps) as bar:
            learned = learn_concepts(
                tokenizer=self.tokenizer,
                text_encoder=self.text_encoder,
                unet=self.unet,
                scheduler=self.scheduler,
                latents=latents,
                masks=localization.latent_masks.to(device),
                features=localization.features.to(device),
                config=learn_config,
                generator=generator,
                progress=bar.update,
                callback=callback,
            )
        tokens = concept_token_names(token_prefix, learned.embeddings.shape[0])
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
        )
        if load:
            self.load_concepts(output)
        return output

    def load_concepts(self, concepts: ConceptExpressOutput | str) -> list[str]:
        """Load concepts (an :class:`ConceptExpressOutput` or a saved directory) into this pipeline.

        Tokens with the same prefix that are already loaded are replaced. Returns the prompt tokens.
        """
        if isinstance(concepts, ConceptExpressOutput):
            prefix, emb, tokens = concepts.token_prefix, concepts.embeddings, list(concepts.tokens)
        else:
            prefix, emb, tokens = read_concepts(concepts)
        existing = [t for t in self.tokenizer.get_vocab() if t == prefix or t.startswith(prefix + "_")]
        with self._offloading_suspended():  # diffusers' loader would re-enable offloading on the wrong device
            if existing:
                self.unload_textual_inversion(existing)
            self.load_textual_inversion({prefix: joint_embeddings(emb).to(self.text_encoder.dtype)})
        return tokens
