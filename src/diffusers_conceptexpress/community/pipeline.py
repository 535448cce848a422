"""ConceptExpress as a diffusers community pipeline: the file (or its folder) to pass as ``custom_pipeline``.

    from diffusers import DiffusionPipeline
    import diffusers_conceptexpress

    pipe = DiffusionPipeline.from_pretrained(
        "path/or/id/of/an/sd/model",
        custom_pipeline=diffusers_conceptexpress.community_pipeline_path(),  # this file, or its folder
        trust_remote_code=True,
    )

The pipeline lives in the installed package (``pip install diffusers-conceptexpress``); this file only
re-exports it, so that diffusers finds exactly one pipeline class here. ``save_pretrained`` writes a copy of it
next to ``model_index.json``. Absolute imports only: diffusers copies the file into its module cache.
"""

try:
    from diffusers_conceptexpress.pipeline import ConceptExpressPipeline
except ImportError as err:  # pragma: no cover - exercised only without the package
    raise ImportError(
        "This custom pipeline needs the package diffusers-conceptexpress: pip install diffusers-conceptexpress"
    ) from err

__all__ = ["ConceptExpressPipeline"]
