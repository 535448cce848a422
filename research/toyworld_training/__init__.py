"""Train the toy-world text-to-image model (``diffusers_conceptexpress.toyworld``) from scratch, in stages.

The command (from the repository root) is ``python -m research.toyworld_training`` (``--help`` lists the
stages and options); the modules, one idea each:

- ``cli``: the command line; runs the stages named by ``--stages`` in order;
- ``models``: the architectures (VAE, CLIP text encoder, UNet, scheduler), a run's checkpoints as modules,
  seeding a run from an exported folder, export to a diffusers folder;
- ``data``: rendered scene batches, the pool of encoded scenes, per-step draws (flips, noise, one object);
- ``conditioning``: captions in the method's learning-prompt forms (one input slot per object);
- ``losses``: the objectives beyond the denoising loss (slot contrast, [EOT] objectness, self-attention
  grouping, coherence and separation) and the per-noise-level weighting;
- ``attention``: :class:`~research.toyworld_training.attention.GradAttentionRecorder`, self-attention maps
  with their autograd graph;
- ``stages`` (vae, pool, clip), ``unet_stage`` (unet), ``rows`` (rows): the training stages;
- ``diagnostics``: what a run logs besides its loss, and the picture of its log;
- ``runs``: a run folder's log and checkpoint files;
- ``interpolate_unet``: a model whose UNet is the weight interpolation of two UNets (WiSE-FT), how the shipped
  UNet was made (``research/recipes/rebuild_shipped_unet.sh``);
- ``classifier``: training of the toy-world classifier (``python -m research.toyworld_training.classifier``).
"""
