"""Test helper: the masked diffusion loss of learned embeddings on fixed noise (moved out of the package,
where only the tests used it)."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from diffusers_conceptexpress.learning import PROMPT_TEMPLATE
from diffusers_conceptexpress.losses import diffusion_target, masked_diffusion_loss
from diffusers_conceptexpress.tokens import TrainableTokens


@torch.no_grad()
def evaluate_masked_loss(
    *,
    tokenizer,
    text_encoder: torch.nn.Module,
    unet: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,
    masks: torch.Tensor,
    embeddings: torch.Tensor,
    noises: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_template: str = PROMPT_TEMPLATE,
) -> torch.Tensor:
    """Masked diffusion loss of each concept's single prompt on FIXED noises and timesteps.

    Args:
        latents: (1, C, h, w); masks: (K, h, w); embeddings: (K, D) one per concept.
        noises: (N, C, h, w) and timesteps: (N,) shared by all concepts.
    Returns:
        (K,) mean loss over the N noise draws, per concept.
    """
    k = embeddings.shape[0]
    names = [f"<cxeval{i}>" for i in range(k)]
    noise_scheduler = DDPMScheduler.from_config(scheduler.config)
    n = noises.shape[0]
    lat = latents.expand(n, -1, -1, -1)
    noisy = noise_scheduler.add_noise(lat, noises, timesteps)
    target = diffusion_target(noise_scheduler, lat, noises, timesteps)
    out = []
    with TrainableTokens(tokenizer, text_encoder, names, [0] * k) as tokens:
        tokens.weight.data[tokens.token_ids] = embeddings.to(tokens.weight)
        for i, name in enumerate(names):
            ids = tokens.encode_ids([prompt_template.format(name)]).to(latents.device)
            context = text_encoder(ids)[0].to(unet.dtype)
            pred = unet(noisy, timesteps, encoder_hidden_states=context.expand(n, -1, -1)).sample
            mask = masks[i].float()[None, None].expand(n, 1, -1, -1)
            out.append(masked_diffusion_loss(pred.float(), target.float(), mask))
    return torch.stack(out)
