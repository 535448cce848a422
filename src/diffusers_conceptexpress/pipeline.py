"""``ConceptExpressPipeline``: unsupervised concept extraction from one image with a Stable Diffusion model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import logging
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from .conditioning import SDConditioning
from .pipeline_mixin import ConceptExpressMixin

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


class ConceptExpressPipeline(ConceptExpressMixin, StableDiffusionPipeline):
    r"""ConceptExpress (Hao et al., ECCV 2024) on a Stable Diffusion model (SD 1.x, SD 2.x, v-prediction); for
    SDXL see :class:`~diffusers_conceptexpress.ConceptExpressXLPipeline` (the method's code is shared:
    :class:`~diffusers_conceptexpress.pipeline_mixin.ConceptExpressMixin`).

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
        work needs none; generation then behaves as ``StableDiffusionPipeline`` without one). An SDXL folder
        fails with one line naming :class:`~diffusers_conceptexpress.ConceptExpressXLPipeline`, before loading.
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

    # ------------------------------------------------------------ conditioning
    def _conditioning(self, image_size: tuple[int, int]) -> SDConditioning:
        """SD's conditioning: the text encoder's last hidden state (``image_size`` is not used)."""
        return SDConditioning(self.tokenizer, self.text_encoder)

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
