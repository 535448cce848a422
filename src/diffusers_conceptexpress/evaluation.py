"""Evaluation: the paper's concept metrics (SIM^I, SIM^C, ACC^1, ACC^3) and mask metrics against ground truth.

The authors released no evaluation code; this module implements the protocol of the paper
(docs/evaluation.md, 'Concept metrics'):

- **SIM^I** (identity): cosine similarity, under an image encoder, between images generated from
  ``"a photo of <c_k>"`` and the source image *masked to concept k*; mean over the samples of a concept, then
  over concepts.
- **SIM^C** (composition): cosine similarity between images generated from the joint prompt
  ``"a photo of <c_1> and ... and <c_K>"`` and the whole source image; mean over samples, then over images.
- **ACC^1 / ACC^3**: each single-concept generation is classified among ALL concepts of the evaluated set
  (every concept of every image) by its nearest masked-source embedding; the share whose own concept is the
  nearest (top-1) or among the three nearest (top-3).

Image encoders are pluggable (:class:`ImageEncoder`): CLIP image features (:class:`CLIPImageEncoder`), DINO
CLS features (:class:`DINOImageEncoder`), both through transformers classes with the model id (or model
object) the user passes, and the toy world's own encoder (:class:`ToyImageEncoder`).

Masked-source policy (:class:`MaskedSourcePolicy`, documented in docs/evaluation.md): pixels outside the
concept's mask are filled with a constant grey (127, 127, 127); the result is cropped to the mask's bounding
box enlarged by ``margin`` (10% of the box side on each side) and made square (the box is grown around its
centre, the part outside the image is filled with the same grey), so the concept fills the encoder's view as a
generated "a photo of <c_k>" does. The encoder then applies its own resize.

Mask metrics (:func:`mask_metrics`): ground-truth objects and predicted masks are matched one-to-one by the
Hungarian algorithm on IoU; mIoU is the sum of matched IoUs divided by the number of ground-truth objects (a
missed object counts 0, extra predictions cost nothing here); precision and recall count matches with IoU of
at least ``iou_threshold`` (0.5); the count error is ``#predicted - #ground truth``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .masks import as_bool_mask

__all__ = [
    "CLIPImageEncoder",
    "ConceptMetrics",
    "ConceptSet",
    "DINOImageEncoder",
    "ImageEncoder",
    "MaskMetrics",
    "MaskedSourcePolicy",
    "ToyImageEncoder",
    "composition_similarity",
    "concept_accuracy",
    "concept_prompts",
    "evaluate_concepts",
    "generate_samples",
    "identity_similarity",
    "make_encoder",
    "mask_metrics",
    "masked_source",
    "read_samples",
    "sample_grid",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- masked source
@dataclass
class MaskedSourcePolicy:
    """How the source image is masked to one concept before encoding.

    Attributes:
        fill: RGB (0-255) of the pixels outside the mask.
        crop: crop to the mask's bounding box (made square, enlarged by ``margin``); False keeps the full frame.
        margin: extra border on each side, as a fraction of the box's longer side.
    """

    fill: tuple[int, int, int] = (127, 127, 127)
    crop: bool = True
    margin: float = 0.1


def masked_source(image: PIL.Image.Image, mask, policy: MaskedSourcePolicy | None = None) -> PIL.Image.Image:
    """The source ``image`` masked to one concept (see :class:`MaskedSourcePolicy`).

    Args:
        image: the source image (any PIL mode; converted to RGB).
        mask: the concept's mask at the image size, as :func:`~diffusers_conceptexpress.masks.as_bool_mask`
            accepts (PIL "L"/"1", > 127 = inside; a (H, W) bool or 0/1 array or tensor).
    Returns:
        an RGB image: square when ``policy.crop``, else the image size.
    Raises:
        ValueError: if the mask is empty or not of the image's size.
    """
    policy = policy or MaskedSourcePolicy()
    rgb = np.asarray(image.convert("RGB")).copy()
    m = as_bool_mask(mask, image.size)
    if not m.any():
        raise ValueError("the mask is empty: there is nothing to mask the source image to.")
    rgb[~m] = policy.fill
    out = PIL.Image.fromarray(rgb)
    if not policy.crop:
        return out
    ys, xs = np.nonzero(m)
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    side = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) * (1 + 2 * policy.margin)
    half = max(side / 2, 1.0)
    box = (round(cx - half), round(cy - half), round(cx + half), round(cy + half))
    canvas = PIL.Image.new("RGB", (box[2] - box[0], box[3] - box[1]), tuple(policy.fill))
    canvas.paste(out, (-box[0], -box[1]))
    return canvas


# ----------------------------------------------------------------------------- encoders
@runtime_checkable
class ImageEncoder(Protocol):
    """Maps images to L2-normalised embeddings: ``encoder(images) -> (N, D)`` float32 tensor."""

    name: str

    def __call__(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor: ...


def _pixels(images, size: int, mean, std, device) -> torch.Tensor:
    """Resize (shorter side), centre-crop to ``size`` and normalise: (N, 3, size, size)."""
    out = []
    for im in images:
        im = im.convert("RGB")
        scale = size / min(im.size)
        w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
        im = im.resize((w, h), PIL.Image.Resampling.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        out.append(np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return x.to(device)


class _TransformersEncoder:
    """Shared logic of the transformers-based encoders: model loading, preprocessing, batching."""

    name = "transformers"
    default_mean: tuple = CLIP_MEAN
    default_std: tuple = CLIP_STD

    def __init__(
        self, model, processor=None, *, device: str | torch.device | None = None, batch_size: int = 32
    ):
        if isinstance(model, str):
            model, processor = self._load(model, processor)
        self.model = model.eval()
        self.processor = processor
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        self.batch_size = batch_size

    def _load(self, model_id: str, processor):
        raise NotImplementedError

    def _image_size(self) -> int:
        size = getattr(self.model.config, "image_size", None)
        if size is None and hasattr(self.model.config, "vision_config"):
            size = self.model.config.vision_config.image_size
        return int(size if not isinstance(size, (tuple, list)) else size[0])

    def _inputs(self, images) -> torch.Tensor:
        if self.processor is not None:
            return self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")[
                "pixel_values"
            ].to(self.device)
        return _pixels(images, self._image_size(), self.default_mean, self.default_std, self.device)

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        images = list(images)
        if not images:
            raise ValueError("no images to encode.")
        dtype = next(self.model.parameters()).dtype
        feats = [
            self._features(self._inputs(images[i : i + self.batch_size]).to(dtype)).float()
            for i in range(0, len(images), self.batch_size)
        ]
        return F.normalize(torch.cat(feats).cpu(), dim=-1)


class CLIPImageEncoder(_TransformersEncoder):
    """CLIP image features (the projected ``image_embeds``), L2-normalised.

    Args:
        model: a model id / local folder (loaded with ``CLIPVisionModelWithProjection`` and its image
            processor), or a loaded ``CLIPVisionModelWithProjection`` / ``CLIPModel``.
        processor: an image processor; None with a model object = resize the shorter side to the model's
            ``image_size``, centre crop, CLIP mean/std.
        device: where to run (default: where the model is).
    """

    name = "clip"

    def _load(self, model_id, processor):
        from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

        return CLIPVisionModelWithProjection.from_pretrained(
            model_id
        ), processor or AutoImageProcessor.from_pretrained(model_id)

    def _features(self, pixel_values):
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=pixel_values)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        return self.model(pixel_values=pixel_values).image_embeds


class DINOImageEncoder(_TransformersEncoder):
    """DINO CLS features (``last_hidden_state[:, 0]``), L2-normalised.

    Args:
        model: a model id / local folder (``AutoModel``: ``facebook/dino-vits16`` (ViT) or ``facebook/dinov2-*``),
            or a loaded ``ViTModel`` / ``Dinov2Model``.
        processor: an image processor; None with a model object = resize, centre crop, ImageNet mean/std.
    """

    name = "dino"
    default_mean = IMAGENET_MEAN
    default_std = IMAGENET_STD

    def _load(self, model_id, processor):
        from transformers import AutoImageProcessor, AutoModel

        return AutoModel.from_pretrained(model_id), processor or AutoImageProcessor.from_pretrained(model_id)

    def _features(self, pixel_values):
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]


class ToyImageEncoder:
    """The toy world's own encoder: the pooled features of the shipped toy classifier (128-d), L2-normalised.

    Images are resized to 64x64 (the toy image size). The features are what the classifier's shape, colour and
    texture heads read, so they separate exactly the attributes the toy world varies.
    """

    name = "toy"

    def __init__(self) -> None:
        from .toyworld.classify import load_classifier

        self.model = load_classifier()

    @torch.no_grad()
    def __call__(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        from .toyworld.classify import _to_tensor

        images = list(images)
        if not images:
            raise ValueError("no images to encode.")
        feats = []
        for i in range(0, len(images), 256):
            h = self.model.features(_to_tensor(images[i : i + 256]))
            feats.append(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))
        return F.normalize(torch.cat(feats), dim=-1)


# Names of make_encoder; the first is the default of `conceptexpress evaluate --encoder`.
ENCODERS = ("clip", "dino", "toy")


def make_encoder(kind: str, model: str | None = None, *, device: str | None = None) -> ImageEncoder:
    """An encoder by name: "clip" or "dino" (``model`` = model id or folder, required) or "toy"."""
    if kind not in ENCODERS:
        raise ValueError(f"Unknown encoder {kind!r}; choose one of {ENCODERS}.")
    if kind == "toy":
        return ToyImageEncoder()
    if not model:
        example = "openai/clip-vit-base-patch32" if kind == "clip" else "facebook/dino-vits16"
        raise ValueError(f"The {kind} encoder needs a model id or folder, e.g. --model {example}.")
    cls = CLIPImageEncoder if kind == "clip" else DINOImageEncoder
    return cls(model, device=device)


# ----------------------------------------------------------------------------- concept metrics
def identity_similarity(generated: Sequence[torch.Tensor], references: torch.Tensor) -> torch.Tensor:
    """SIM^I per concept.

    Args:
        generated: one (n_k, D) tensor of L2-normalised embeddings of concept k's generations per concept.
        references: (K, D) L2-normalised embeddings of the masked sources, row k = concept k.
    Returns:
        (K,) mean cosine similarity of each concept's generations to its own masked source.
    """
    if len(generated) != references.shape[0]:
        raise ValueError(f"{len(generated)} generation sets for {references.shape[0]} references.")
    return torch.stack([(g @ references[k]).mean() for k, g in enumerate(generated)])


def composition_similarity(generated: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """SIM^C of one image: mean cosine of the (m, D) joint-prompt generations to the (D,) whole-source embedding."""
    return (generated @ source).mean()


def concept_accuracy(
    generated: Sequence[torch.Tensor], references: torch.Tensor, topk: Sequence[int] = (1, 3)
) -> dict[int, float]:
    """ACC^k: each generation of concept i is ranked against ALL ``references`` (K, D) by cosine similarity.

    Args:
        generated: per concept i, (n_i, D) embeddings of its generations (concept i's reference is row i).
        references: (K, D) masked-source embeddings of every concept of the evaluated set.
    Returns:
        {k: share of generations whose own reference is among the k most similar}, for each k in ``topk``.
    """
    hits = {k: 0 for k in topk}
    total = 0
    for i, g in enumerate(generated):
        sims = g @ references.T  # (n_i, K)
        own = sims[:, i : i + 1]
        rank = (sims > own).sum(1)  # number of references strictly closer than the right one
        for k in topk:
            hits[k] += int((rank < k).sum())
        total += g.shape[0]
    if total == 0:
        raise ValueError("no generated images to classify.")
    return {k: hits[k] / total for k in topk}


@dataclass
class ConceptSet:
    """The images of one evaluated extraction.

    Attributes:
        source: the source image.
        masks: the K concept masks at the source size (PIL "L" or (H, W) arrays).
        single: per concept, its generations from "a photo of <c_k>".
        joint: generations from the joint prompt (may be empty for K = 1).
        name: a label for reports.
    """

    source: PIL.Image.Image
    masks: list
    single: list[list[PIL.Image.Image]]
    joint: list[PIL.Image.Image] = field(default_factory=list)
    name: str = ""


@dataclass
class ConceptMetrics:
    """SIM^I, SIM^C, ACC^1, ACC^3 (all in [0, 1] except the similarities, in [-1, 1]) and per-set details."""

    encoder: str
    sim_i: float
    sim_c: float | None
    acc1: float
    acc3: float
    num_concepts: int
    num_images: int
    per_set: list[dict]

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_concepts(
    sets: Sequence[ConceptSet], encoder: ImageEncoder, *, policy: MaskedSourcePolicy | None = None
) -> ConceptMetrics:
    """The paper's metrics over a set of extractions (ACC ranks among ALL concepts of all ``sets``).

    SIM^I is averaged over all concepts, SIM^C over the sets that have joint generations (None if none has).
    """
    if not sets:
        raise ValueError("no extractions to evaluate.")
    refs, gens, owners = [], [], []
    per_set = []
    sim_c = []
    for j, s in enumerate(sets):
        if len(s.masks) != len(s.single):
            raise ValueError(f"set {s.name or j}: {len(s.masks)} masks but {len(s.single)} generation lists.")
        ref = encoder([masked_source(s.source, m, policy) for m in s.masks])
        g = [encoder(images) for images in s.single]
        sims = identity_similarity(g, ref)
        entry = {"name": s.name, "num_concepts": len(s.masks), "sim_i": [round(float(v), 4) for v in sims]}
        if s.joint:
            value = float(composition_similarity(encoder(s.joint), encoder([s.source])[0]))
            entry["sim_c"] = round(value, 4)
            sim_c.append(value)
        refs.append(ref)
        gens += g
        owners += [j] * len(g)
        per_set.append(entry)
    references = torch.cat(refs)
    acc = concept_accuracy(gens, references)
    return ConceptMetrics(
        encoder=getattr(encoder, "name", type(encoder).__name__),
        sim_i=float(identity_similarity(gens, references).mean()),
        sim_c=float(np.mean(sim_c)) if sim_c else None,
        acc1=acc[1],
        acc3=acc[3],
        num_concepts=len(gens),
        num_images=len(sets),
        per_set=per_set,
    )


def concept_prompts(tokens: Sequence[str], concepts=None) -> list[str]:
    """The prompt of every concept alone, then the joint prompt of all of them (K >= 2).

    The template and the joint separator are the run's, read from ``<concepts>/concepts.json`` (a concept
    directory); without ``concepts``, or when the file does not record them, LearningConfig's defaults:
    "a photo of <c_k>" and "a photo of <c_1> and ... and <c_K>".
    """
    from .export import prompt_format

    template, separator = prompt_format(concepts)
    prompts = [template.format(t) for t in tokens]
    if len(tokens) > 1:
        prompts.append(template.format(separator.join(tokens)))
    return prompts


def generate_samples(
    pipe,
    tokens: Sequence[str],
    folder,
    *,
    samples: int,
    seed: int,
    steps: int,
    guidance: float,
    concepts=None,
) -> list[str]:
    """Generate the evaluation images of one extraction into ``folder`` (its tokens loaded in ``pipe``).

    Writes ``concept_<k>_<i>.png`` (k = 1..K) and ``joint_<i>.png`` for i < ``samples``; image i of every prompt
    uses the seed ``seed + i``. Returns the prompts (see :func:`concept_prompts`, which reads the run's prompt
    template from the concept directory ``concepts`` when given); read back with :func:`read_samples`.
    """
    from pathlib import Path

    prompts = concept_prompts(tokens, concepts)
    for p_i, prompt in enumerate(prompts):
        images = pipe(
            prompt,
            num_images_per_prompt=samples,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(seed + i) for i in range(samples)],
        ).images
        name = f"concept_{p_i + 1}" if p_i < len(tokens) else "joint"
        for i, im in enumerate(images):
            im.save(Path(folder) / f"{name}_{i}.png")
    return prompts


def sample_grid(
    pipe,
    tokens: list[str],
    *,
    seed: int,
    steps: int,
    guidance: float,
    extra_prompts: tuple[str, ...] = (),
    concepts: Path | None = None,
) -> tuple:
    """Images of every concept alone, of the joint prompt and of ``extra_prompts``, as a captioned grid.

    The prompts use the run's template, read from the concept directory ``concepts`` when given.
    """
    from .visualize import image_grid

    prompts = concept_prompts(tokens, concepts)
    prompts += list(extra_prompts)
    images = [
        pipe(
            p,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
        for p in prompts
    ]
    return image_grid(images, prompts), prompts


def read_samples(folder, name: str, count: int) -> list[PIL.Image.Image]:
    """Load ``<folder>/<name>_<i>.png`` for i < ``count`` (the layout of cached generations) as RGB images."""
    from pathlib import Path

    return [PIL.Image.open(Path(folder) / f"{name}_{i}.png").convert("RGB") for i in range(count)]


# ----------------------------------------------------------------------------- mask metrics
@dataclass
class MaskMetrics:
    """Mask quality of one image against its ground truth.

    Attributes:
        miou: sum of Hungarian-matched IoUs / number of ground-truth objects (missed objects count 0).
        precision: matches with IoU >= threshold / number of predicted masks (1.0 when nothing is predicted
            and nothing is there).
        recall: matches with IoU >= threshold / number of ground-truth objects.
        count_error: number predicted - number of ground-truth objects.
        matches: (ground-truth index, predicted index, IoU) of the Hungarian matching.
    """

    miou: float
    precision: float
    recall: float
    count_error: int
    matches: list[tuple[int, int, float]]

    def to_dict(self) -> dict:
        return asdict(self)


def iou_matrix(ground_truth: Sequence, predicted: Sequence) -> np.ndarray:
    """(G, P) IoU between binary masks of one image, of the same size, each as
    :func:`~diffusers_conceptexpress.masks.as_bool_mask` accepts (bool arrays, tensors, PIL masks)."""
    gt = [as_bool_mask(m, name=f"Ground-truth mask {i}") for i, m in enumerate(ground_truth)]
    pr = [as_bool_mask(m, name=f"Predicted mask {i}") for i, m in enumerate(predicted)]
    out = np.zeros((len(gt), len(pr)))
    for i, g in enumerate(gt):
        for j, p in enumerate(pr):
            if g.shape != p.shape:
                raise ValueError(f"mask shapes differ: ground truth {g.shape}, prediction {p.shape}.")
            union = np.logical_or(g, p).sum()
            out[i, j] = np.logical_and(g, p).sum() / union if union else 0.0
    return out


def mask_metrics(ground_truth: Sequence, predicted: Sequence, *, iou_threshold: float = 0.5) -> MaskMetrics:
    """Hungarian-matched mIoU, precision, recall and count error of ``predicted`` against ``ground_truth``."""
    from scipy.optimize import linear_sum_assignment

    iou = iou_matrix(ground_truth, predicted)
    n_gt, n_pred = iou.shape
    matches = []
    if n_gt and n_pred:
        rows, cols = linear_sum_assignment(-iou)
        matches = [(int(r), int(c), float(iou[r, c])) for r, c in zip(rows, cols, strict=True)]
    good = sum(v >= iou_threshold for _, _, v in matches)
    return MaskMetrics(
        miou=sum(v for _, _, v in matches) / n_gt if n_gt else float(n_pred == 0),
        precision=good / n_pred if n_pred else float(n_gt == 0),
        recall=good / n_gt if n_gt else 1.0,
        count_error=n_pred - n_gt,
        matches=matches,
    )
