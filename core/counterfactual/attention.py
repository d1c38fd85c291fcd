"""Cross-attention control: prompt-to-prompt injection and foreground masks.

See docs/architecture.md §5.5 and §5.6.

Hertz et al., "Prompt-to-Prompt Image Editing with Cross-Attention Control", ICLR 2023, as used
by DiG-IN's official code (`TrackAttentionProcessor`, `p2p_reshape_initial_cross_attention`,
`calculate_xa_foreground_segmentation` without SAM).

While the reconstruction of the inverted image runs, every cross-attention layer stores the
attention probabilities of its conditional half (per step, shape (heads, Q, L): Q query pixels,
L caption tokens). While an edit runs, the layers replace the conditional half of item b's
probabilities by the stored ones at the steps i < inject_until[b], realigned from the caption's
tokens to item b's edited prompt by a token mixing matrix (L, L), the same for every head. The
unconditional half and the self-attention layers are never touched; the latter keep their SDPA
processors, and every processor is restored when the context ends.

The mixing matrix (`prompt_alignment`): tokens before the replaced words keep their position,
tokens after them shift by the difference in length, and the words in between are aligned by
the cosine similarity of their text embeddings (the prompt embedding C that the UNet attends to,
averaged over each word's tokens): as many words on both sides → the one-to-one assignment of
largest total similarity; otherwise each edited word takes a softmax over its similarities to
the caption's words. This is the official `p2p_reshape_initial_cross_attention`
(`utils/cross_attention.py`) with three of its apparent bugs fixed (docs/differences.md §2):

- its softmax runs over cosine *distances*, so the least similar word weighs most; here it runs
  over similarities (softmax(cos) = softmax(−distance): the official temperature 1, sign fixed);
- it stores only the conditional half of the heads and then realigns from `h // 2` on, i.e. only
  the second half of those heads; here the matrix applies to every head;
- it zeroes every token of an edited word but fills only the last one (the loop variable left
  over from the zeroing loop); here every token of the word is filled.

Besides, where the assignment pairs a word with the same word (the same tokens), its tokens are
copied one to one instead of taking the word's mean, and identical replaced words give the
identity (the official code returns early there), so that the start class as target reproduces
the reconstruction.

The foreground mask: the stored maps of the start-class tokens, averaged over the first
`mask_steps` of the steps, the layers and heads, divided by their maximum, resized (bicubic) to
the latent and to the pixel resolution, and squashed: m ← sqrt(clamp((m − c)/(1 − c), 0, 1)).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor


class CrossAttentionControl:
    """State shared by the processors of one UNet: what to do at which DDIM step.

    The denoising loop sets `step` inside each (checkpointed) step function, so that the
    recomputation in backward sees the same step as the forward pass."""

    def __init__(self) -> None:
        self.mode = "off"  # 'off' | 'store' | 'inject'
        self.step = 0  # current DDIM step i (0 = the noisiest)
        self.store_steps = 0  # store the maps of steps i < store_steps
        self.maps: dict[str, dict[int, Tensor]] = {}  # layer → step → (heads, Q, L)
        self.inject_until: Tensor | None = None  # (B,) item b is injected at steps < this
        self.mixing: Tensor | None = None  # (B, L, L): target token j ← Σ_s A[b, s, j] · token s

    def store(self, steps: int) -> None:
        self.mode, self.store_steps, self.maps = "store", steps, {}

    def inject(self, inject_until: Tensor, mixing: Tensor) -> None:
        self.mode, self.inject_until, self.mixing = "inject", inject_until, mixing

    def off(self) -> None:
        self.mode = "off"

    def process(self, name: str, probs: Tensor, heads: int) -> Tensor:
        """probs (2B·heads, Q, L): the unconditional items' heads first, then the conditional."""
        half = probs.shape[0] // 2
        if self.mode == "store":
            if self.step < self.store_steps:
                if half != heads:
                    raise ValueError("attention maps are stored from a batch of one image")
                self.maps.setdefault(name, {})[self.step] = probs[half:].detach()
            return probs
        if self.mode != "inject" or self.inject_until is None or self.mixing is None:
            return probs
        stored = self.maps.get(name, {}).get(self.step)
        active = self.step < self.inject_until  # (B,) bool
        if stored is None or not bool(active.any()):
            return probs
        b = half // heads
        cond = probs[half:].view(b, heads, *probs.shape[1:])  # (B, h, Q, L)
        mixing = self.mixing.to(device=probs.device, dtype=probs.dtype)
        source = torch.einsum("hql,blm->bhqm", stored.to(probs.dtype), mixing)
        cond = torch.where(active.to(probs.device).view(b, 1, 1, 1), source, cond)
        return torch.cat([probs[:half], cond.reshape(half, *probs.shape[1:])])


class ControlledCrossAttention:
    """diffusers' classic `AttnProcessor` (explicit softmax) with the control's hook on the
    attention probabilities."""

    def __init__(self, name: str, control: CrossAttentionControl) -> None:
        self.name = name
        self.control = control

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, length, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        query = attn.head_to_batch_dim(query)

        probs = attn.get_attention_scores(query, key, attention_mask)  # (2B·h, Q, L)
        probs = self.control.process(self.name, probs, attn.heads)

        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # projection, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def controlled_cross_attention(unet, control: CrossAttentionControl) -> Iterator[None]:
    """Install `ControlledCrossAttention` on every cross-attention layer of `unet`; restore all
    processors (the SDPA ones the loaders set) on exit."""
    saved = unet.attn_processors
    processors = {}
    for name, processor in saved.items():
        module = unet.get_submodule(name.removesuffix(".processor"))
        cross = getattr(module, "is_cross_attention", False)
        processors[name] = ControlledCrossAttention(name, control) if cross else processor
    unet.set_attn_processor(processors)
    try:
        yield
    finally:
        control.off()
        unet.set_attn_processor(saved)


# --- tokens ------------------------------------------------------------------------------------


def find_words(text: str, words: str) -> tuple[int, int] | None:
    """(start, end) characters of the first whole-word, case-insensitive match, or None."""
    match = re.search(rf"(?<!\w){re.escape(words.strip())}(?!\w)", text, flags=re.IGNORECASE)
    return None if match is None else match.span()


def replace_words(text: str, span: tuple[int, int], new: str) -> str:
    return text[: span[0]] + new + text[span[1] :]


def token_span(tokenizer, text: str, span: tuple[int, int]) -> tuple[int, int]:
    """Positions [first, stop) of the tokens of text[span] in the padded token sequence (the
    start token sits at 0). CLIP tokenizers split at word boundaries first, so the tokens of a
    prefix that ends at a word boundary are the first tokens of the whole text."""

    def count(s: str) -> int:
        return len(tokenizer(s).input_ids) - 2  # without the start and end tokens

    first, stop = 1 + count(text[: span[0]]), 1 + count(text[: span[1]])
    limit = tokenizer.model_max_length - 1  # the last position holds the end token
    if stop > limit or stop <= first:
        raise ValueError(
            f"the words {text[span[0] : span[1]]!r} of {text!r} fall outside the tokenizer's "
            f"{tokenizer.model_max_length} tokens; use a shorter caption"
        )
    return first, stop


def word_spans(tokenizer, text: str, span: tuple[int, int]) -> list[tuple[int, int]]:
    """Token positions [first, stop) of each whitespace-separated word of text[span], in order
    (`token_span` of each word)."""
    words = re.finditer(r"\S+", text[span[0] : span[1]])
    return [token_span(tokenizer, text, (span[0] + w.start(), span[0] + w.end())) for w in words]


def word_vectors(hidden: Tensor, spans: list[tuple[int, int]]) -> Tensor:
    """(n, D): the mean of hidden (L, D) over each word's tokens."""
    return torch.stack([hidden[a:b].mean(0) for a, b in spans])


def best_assignment(score: Tensor) -> list[int]:
    """The permutation p maximising Σ_i score[i, p[i]] of a square (n, n) score matrix: the
    Hungarian algorithm (shortest augmenting paths, O(n³)), exact and deterministic (the same
    input gives the same permutation; among equal optima the one it finds first)."""
    n = score.shape[0]
    cost = (-score.double()).tolist()
    inf = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (n + 1)  # potentials of rows and columns (1-based)
    match = [0] * (n + 1)  # match[column] = row, 0 = free; column 0 is the virtual start
    for row in range(1, n + 1):
        match[0], col = row, 0
        dist, prev, used = [inf] * (n + 1), [0] * (n + 1), [False] * (n + 1)
        while match[col] != 0:
            used[col] = True
            r, delta, nxt = match[col], inf, 0
            for c in range(1, n + 1):
                if not used[c]:
                    d = cost[r - 1][c - 1] - u[r] - v[c]
                    if d < dist[c]:
                        dist[c], prev[c] = d, col
                    if dist[c] < delta:
                        delta, nxt = dist[c], c
            for c in range(n + 1):
                if used[c]:
                    u[match[c]] += delta
                    v[c] -= delta
                else:
                    dist[c] -= delta
            col = nxt
        while col != 0:  # augment along the path back to the virtual start
            match[col] = match[prev[col]]
            col = prev[col]
    out = [0] * n
    for c in range(1, n + 1):
        out[match[c] - 1] = c - 1
    return out


def word_weights(source: Tensor, target: Tensor, temperature: float = 1.0) -> Tensor:
    """(m, n) weights W of the caption's n replaced words (source (n, D) embeddings) for each of
    the edited prompt's m words (target (m, D)), rows summing to 1, from the cosine similarity
    S (m, n): for m = n the permutation matrix of the largest total similarity, else
    softmax(S / temperature) per row. Computed in float64."""
    sim = F.cosine_similarity(target.double()[:, None], source.double()[None], dim=-1)  # (m, n)
    m, n = sim.shape
    if m == n:
        w = torch.zeros(m, n, dtype=torch.float64)
        w[torch.arange(m), torch.tensor(best_assignment(sim))] = 1.0
        return w
    return (sim / temperature).softmax(dim=1)


def alignment_matrix(
    length: int,
    source_words: list[tuple[int, int]],
    target_words: list[tuple[int, int]],
    weights: Tensor,
    copies: Collection[tuple[int, int]] = (),
) -> Tensor:
    """(L, L) mixing matrix A (target token j ← Σ_s A[s, j] · source token s) from the caption's
    replaced words (token spans, in order) to the edited prompt's, given the word weights
    (m, n): tokens before the words keep their position, tokens after them take the source token
    shifted by the difference in length (clamped to the last), and *every* token of target word
    i takes Σ_k weights[i, k] · (mean of source word k's tokens); the pairs (i, k) in `copies`
    (the same word on both sides, weight 1) copy the tokens one to one instead."""
    s0, s1 = source_words[0][0], source_words[-1][1]
    t0, t1 = target_words[0][0], target_words[-1][1]
    if s0 != t0:
        raise ValueError(f"the replaced words must start at the same token, got {s0} and {t0}")
    if weights.shape != (len(target_words), len(source_words)):
        raise ValueError(f"weights {tuple(weights.shape)} for {len(target_words)} x "
                         f"{len(source_words)} words")  # fmt: skip
    a = torch.zeros(length, length, dtype=torch.float64)
    for j in range(t0):
        a[j, j] = 1.0
    for j in range(t1, length):
        a[min(j - t1 + s1, length - 1), j] = 1.0
    for i, (a0, a1) in enumerate(target_words):
        for k, (b0, b1) in enumerate(source_words):
            if (i, k) in copies:
                a[b0:b1, a0:a1] += torch.eye(b1 - b0, dtype=torch.float64)
            elif weights[i, k] != 0:
                a[b0:b1, a0:a1] += weights[i, k] / (b1 - b0)
    return a.float()


def prompt_alignment(
    tokenizer,
    caption: str,
    source: tuple[int, int],
    caption_hidden: Tensor,
    prompt: str,
    target: tuple[int, int],
    prompt_hidden: Tensor,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """(L, L) mixing matrix from the caption's tokens to an edited prompt's (see the module
    docstring): the characters `source` of `caption` were replaced by the characters `target`
    of `prompt` (the same text before them); caption_hidden, prompt_hidden (L, D) are the two
    prompts' embeddings C. Deterministic: the same inputs give the same matrix."""
    length = caption_hidden.shape[0]
    if prompt_hidden.shape[0] != length:
        raise ValueError(f"embeddings of {length} and {prompt_hidden.shape[0]} tokens")
    source_words = word_spans(tokenizer, caption, source)
    target_words = word_spans(tokenizer, prompt, target)
    ids_c, ids_p = tokenizer(caption).input_ids, tokenizer(prompt).input_ids
    tokens_c = [tuple(ids_c[a:b]) for a, b in source_words]
    tokens_p = [tuple(ids_p[a:b]) for a, b in target_words]
    if tokens_c == tokens_p:  # the same words: nothing moves
        return torch.eye(length)
    weights = word_weights(
        word_vectors(caption_hidden.detach().cpu(), source_words),
        word_vectors(prompt_hidden.detach().cpu(), target_words),
        temperature,
    )
    copies = {
        (i, k)
        for i, k in (weights == 1).nonzero().tolist()
        if len(target_words) == len(source_words) and tokens_p[i] == tokens_c[k]
    }
    return alignment_matrix(length, source_words, target_words, weights, copies)


# --- masks ---------------------------------------------------------------------------------------


def squash(m: Tensor, cutoff: float) -> Tensor:
    """The official code's 'sqrt_c' squash: sqrt(clamp((m − c)/(1 − c), 0, 1))."""
    return ((m - cutoff) / (1.0 - cutoff)).clamp(0, 1).sqrt()


def attention_map(
    control: CrossAttentionControl, tokens: tuple[int, int], steps: int, latent_side: int
) -> Tensor:
    """(side, side): the stored maps of `tokens`, mean over the steps i < `steps`, layers and
    heads, divided by the maximum. Layers at side latent_side/4 when there are any (16x16 of
    SD's 64x64 latents, as the official code); else all, resized to the largest side."""
    per_layer = [
        (m, int(math.isqrt(m.shape[1])))
        for layer in control.maps.values()
        for step, m in layer.items()
        if step < steps
    ]
    if not per_layer:
        raise ValueError("no cross-attention maps were stored; the UNet has no cross-attention")
    sides = {s for _, s in per_layer}
    side = latent_side // 4 if latent_side // 4 in sides else max(sides)
    maps = []
    for m, s in per_layer:
        if s != side and side == latent_side // 4:
            continue
        x = m[:, :, tokens[0] : tokens[1]].float().mean((0, 2)).view(1, 1, s, s)  # (1, 1, s, s)
        if s != side:
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        maps.append(x)
    mean = torch.cat(maps).mean(0)[0]  # (side, side)
    return mean / (mean.max() + 1e-8)


def foreground_masks(
    attention: Tensor, *, latent_side: int, pixel_side: int, cutoff: float
) -> tuple[Tensor, Tensor]:
    """(latent mask (1, 1, h, w), pixel mask (1, 1, H, W)) in [0, 1], 1 = foreground."""

    def resize(side: int) -> Tensor:
        x = F.interpolate(attention[None, None], size=(side, side), mode="bicubic")
        return squash(x.clamp(0, 1), cutoff)

    return resize(latent_side), resize(pixel_side)
