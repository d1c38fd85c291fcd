"""Foreground blending of neuron visualisations (docs/architecture.md §4.3).

The paper's neuron script keeps the foreground of each item's unoptimised sample during the
first 30 % of the DDIM steps, so that the optimisation changes the object's surroundings and
details rather than replacing it. Per item b:

    1. the plain chain from z_T,b (no deltas), storing the latents entering each step
       (templates z_i,b) and the cross-attention maps of the first half of the steps;
    2. the foreground mask m_b: the maps of the class words' tokens, averaged and squashed as
       for counterfactuals (`digin.core.counterfactual.attention.attention_map`,
       `foreground_masks`);
    3. during the optimisation, at steps i/T < fraction: z ← m_b · z_i,b + (1 − m_b) · z
       (`digin.core.guidance.Blend`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from digin.core.counterfactual.attention import (
    CrossAttentionControl,
    attention_map,
    controlled_cross_attention,
    foreground_masks,
    token_span,
)
from digin.core.diffusion import TextEmbeddings
from digin.core.guidance import Blend, DenoisingLoop, steps_before

MASK_STEPS = 0.5  # maps of the first half of the steps, as the counterfactual's mask
MASK_CUTOFF = 0.3  # m ← sqrt(clamp((m − c)/(1 − c))), as the counterfactual's mask


def class_tokens(tokenizer, template: str, prompt: str) -> tuple[int, int]:
    """Token positions [first, stop) of the class words in `prompt`, the prompt template
    `template` with its '{class}' replaced by a class name (the first occurrence's words)."""
    count = template.count("{class}")
    if count == 0:
        raise ValueError(
            f"the prompt {template!r} has no '{{class}}'; foreground blending needs the class "
            "words' cross-attention"
        )
    start = template.index("{class}")
    name_length = (len(prompt) - len(template) + count * len("{class}")) // count
    return token_span(tokenizer, prompt, (start, start + name_length))


def _item(x: TextEmbeddings, b: int) -> TextEmbeddings:
    return TextEmbeddings(x.hidden[b : b + 1], None if x.pooled is None else x.pooled[b : b + 1])


@torch.no_grad()
def foreground_blend(
    loop: DenoisingLoop,
    z_T: Tensor,
    cond: TextEmbeddings,
    tokens: list[tuple[int, int]],
    fraction: float,
) -> Blend:
    """The blend that keeps each item's unoptimised foreground at steps i/T < fraction: z_T
    (B, c, h, w), cond the B prompts, tokens[b] the class words' token positions of prompt b.
    Runs one plain chain per item (batch 1: the maps are stored from one image)."""
    model, steps = loop.model, loop.config.ddim_steps
    mask_steps = math.ceil(MASK_STEPS * steps)
    latent_side = z_T.shape[-1]
    side = loop.resolution
    templates, masks = [], []
    for b in range(z_T.shape[0]):
        control = CrossAttentionControl()
        z, zs, x0 = z_T[b : b + 1], [], None
        with controlled_cross_attention(model.unet, control):
            control.store(mask_steps)
            for i in range(steps):
                control.step = i
                zs.append(z)
                u = loop.uncond_at(i)
                text = TextEmbeddings.cat([_item(u, b), _item(cond, b)])
                z, x0 = loop.step(z, i, text, loop.time_ids(1), x0 if loop.dpm else None)
        attention = attention_map(control, tokens[b], mask_steps, latent_side)
        mask, _ = foreground_masks(attention, latent_side=latent_side, pixel_side=side,
                                   cutoff=MASK_CUTOFF)  # fmt: skip
        templates.append(torch.stack(zs))  # (T, 1, c, h, w)
        masks.append(mask)
    kept = steps_before(fraction, steps)
    return Blend.make(torch.cat(templates, dim=1), torch.cat(masks), [kept] * z_T.shape[0])
