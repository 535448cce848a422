"""The community-pipeline entry: ``pipeline.py`` here is what ``custom_pipeline=`` points at (see
:func:`diffusers_conceptexpress.community_pipeline_path`)."""
