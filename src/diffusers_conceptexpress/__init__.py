"""diffusers-conceptexpress: ConceptExpress (ECCV 2024) as a diffusers pipeline.

Find the visual concepts of one image with a Stable Diffusion (1.x, 2.x or XL) model, with no words, masks or
concept count; ``extract_images`` does it for many images, on one or several processes (accelerate).
"""

from .attention import AttentionRecorder, capture_attention
from .batch import BatchResult, ImageStatus, extract_images
from .clustering import constrained_finch, finch, kmeans
from .export import load_concepts, save_concepts
from .image_io import ImageInputError, load_image, prepare_image
from .learning import LearnedConcepts, LearningConfig, learn_concepts
from .localization import LocalizationConfig, LocalizationResult, localize
from .lora import ConceptLora, train_lora
from .outputs import ConceptExpressOutput, ConceptLocalization
from .pipeline import ConceptExpressPipeline, community_pipeline_path
from .pipeline_xl import ConceptExpressXLPipeline

__version__ = "0.1.0"

__all__ = [
    "AttentionRecorder",
    "BatchResult",
    "ConceptExpressOutput",
    "ConceptExpressPipeline",
    "ConceptExpressXLPipeline",
    "ConceptLocalization",
    "ConceptLora",
    "ImageInputError",
    "ImageStatus",
    "LearnedConcepts",
    "LearningConfig",
    "LocalizationConfig",
    "LocalizationResult",
    "__version__",
    "capture_attention",
    "community_pipeline_path",
    "constrained_finch",
    "extract_images",
    "finch",
    "kmeans",
    "learn_concepts",
    "load_concepts",
    "load_image",
    "localize",
    "prepare_image",
    "save_concepts",
    "train_lora",
]
