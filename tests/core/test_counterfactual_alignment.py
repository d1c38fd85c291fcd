"""Prompt-to-prompt word alignment by text-embedding similarity (digin.core.counterfactual.
attention, docs/differences.md): which tokens of the edited prompt take which of the caption's
cross-attention, with the real tiny CLIP tokenizer and text encoder; every head realigned; and an
edit with the alignment on the tiny models end to end."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from digin.core.config import GuidanceConfig
from digin.core.counterfactual.attention import (
    CrossAttentionControl,
    alignment_matrix,
    attention_map,
    best_assignment,
    controlled_cross_attention,
    find_words,
    foreground_masks,
    prompt_alignment,
    replace_words,
    token_span,
    word_spans,
    word_weights,
)
from digin.core.counterfactual.config import CounterfactualConfig
from digin.core.counterfactual.edit import EditStart, edit, reconstruct
from digin.core.counterfactual.images import load_start_image
from digin.core.counterfactual.inversion import invert
from digin.core.jobs import ModelCache

CAPTION = "a photo of a great white shark swimming"
L = 77


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache():
    return ModelCache()


@pytest.fixture(scope="module")
def model(tiny_models, cache):
    return cache.diffusion(tiny_models["sd"], "cpu")


def concept_hidden(tokenizer, text: str, concepts: dict[str, int], dim: int = 16) -> torch.Tensor:
    """(L, dim) embeddings in which every token of a word named in `concepts` is the one-hot
    vector of its concept (so that a word's mean embedding is that vector and two words' cosine
    similarity is 1 for the same concept, else 0); other tokens get fixed random vectors."""
    hidden = torch.randn(L, dim, generator=torch.Generator().manual_seed(0))
    for word, concept in concepts.items():
        first, stop = token_span(tokenizer, text, find_words(text, word))
        hidden[first:stop] = torch.nn.functional.one_hot(torch.tensor(concept), dim).float()
    return hidden


def edited(caption: str, old: str, new: str) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """(prompt, source character span, target character span) of replacing `old` by `new`."""
    span = find_words(caption, old)
    return replace_words(caption, span, new), span, (span[0], span[0] + len(new))


# --- word weights -------------------------------------------------------------------------------


def test_word_weights_follow_similarity_not_distance():
    e = torch.eye(4, dtype=torch.float64)
    source = torch.stack([e[0], e[1], e[2]])  # three words
    target = torch.stack([e[1] + 0.2 * e[3], e[0]])  # two words: like source 1, like source 0
    w = word_weights(source, target)
    sim = torch.nn.functional.cosine_similarity(target[:, None], source[None], dim=-1)
    assert torch.allclose(w, sim.softmax(1))
    assert torch.allclose(w.sum(1), torch.ones(2, dtype=w.dtype))
    assert w[0].argmax() == 1 and w[1].argmax() == 0
    # the official softmax over distances 1 − cos would put the most weight on the least similar
    assert w[0, 1] > w[0, 0] and (1 - sim[0]).softmax(0).argmax() != 1
    sharp = word_weights(source, target, temperature=0.01)
    assert torch.allclose(sharp, torch.tensor([[0.0, 1, 0], [1, 0, 0]], dtype=sharp.dtype))


def test_equal_word_counts_take_the_best_one_to_one_assignment():
    # greedy per row would give both target words source 0; the best assignment is 0 → 1, 1 → 0
    sim = torch.tensor([[0.9, 0.8], [0.95, 0.1]], dtype=torch.float64)
    assert best_assignment(sim) == [1, 0]
    g = torch.Generator().manual_seed(1)
    for n in (1, 3, 5):
        score = torch.randn(n, n, generator=g, dtype=torch.float64)
        best = max(
            ([*p] for p in itertools.permutations(range(n))),
            key=lambda p: sum(float(score[i, p[i]]) for i in range(n)),
        )
        assert best_assignment(score) == best
    source = torch.eye(3, dtype=torch.float64)
    w = word_weights(source, source[[2, 0, 1]])  # the same words, reordered
    assert torch.equal(w, torch.eye(3, dtype=torch.float64)[[2, 0, 1]])


# --- the token mixing matrix ------------------------------------------------------------------


def test_every_token_of_a_multi_token_word_is_filled():
    # caption words at tokens [2, 4) and [4, 7); edited prompt words at [2, 5) and [5, 6)
    weights = torch.tensor([[0.25, 0.75], [1.0, 0.0]], dtype=torch.float64)
    a = alignment_matrix(10, [(2, 4), (4, 7)], [(2, 5), (5, 6)], weights)
    for j in (2, 3, 4):  # all three tokens of the first edited word, not only the last
        expected = torch.tensor([0, 0, 0.125, 0.125, 0.25, 0.25, 0.25, 0, 0, 0])
        assert torch.allclose(a[:, j], expected), j
    assert torch.allclose(a[:, 5], torch.tensor([0, 0, 0.5, 0.5, 0, 0, 0, 0, 0, 0]))
    assert torch.equal(a[:, :2], torch.eye(10)[:, :2])  # the prefix keeps its place
    assert a[7, 6] == 1 and a[8, 7] == 1 and a[9, 8] == 1 and a[9, 9] == 1  # shifted, clamped
    assert torch.allclose(a.sum(0), torch.ones(10))  # every target token takes one unit
    copied = alignment_matrix(10, [(2, 4)], [(2, 4)], torch.ones(1, 1, dtype=torch.float64),
                              copies={(0, 0)})  # fmt: skip
    assert torch.equal(copied, torch.eye(10))


def test_words_are_mapped_by_their_embeddings_not_their_positions(model):
    """Inserted, removed and reordered words, multi-token words (the tiny tokenizer spells
    these words letter by letter), with embeddings built so that the right answer is known."""
    tok = model.tokenizers[0]
    concepts = {"great": 0, "white": 1, "shark": 2, "swimming": 5}
    hc = concept_hidden(tok, CAPTION, concepts)
    src = word_spans(tok, CAPTION, find_words(CAPTION, "great white shark"))
    assert src == [(5, 10), (10, 15), (15, 20)]

    def align(new: str, target_concepts: dict[str, int], **kw) -> tuple[torch.Tensor, list]:
        prompt, s, t = edited(CAPTION, "great white shark", new)
        hp = concept_hidden(tok, prompt, target_concepts)
        a = prompt_alignment(tok, CAPTION, s, hc, prompt, t, hp, **kw)
        assert torch.equal(a, prompt_alignment(tok, CAPTION, s, hc, prompt, t, hp, **kw))
        assert torch.allclose(a.sum(0), torch.ones(L))
        return a, word_spans(tok, prompt, t)

    def mean_of(span: tuple[int, int]) -> torch.Tensor:
        col = torch.zeros(L)
        col[span[0] : span[1]] = 1 / (span[1] - span[0])
        return col

    # a removed word: "great" is gone, "white" and "shark" move five tokens to the left
    a, tgt = align("white shark", {"white": 1, "shark": 2, "swimming": 5}, temperature=1e-3)
    assert tgt == [(5, 10), (10, 15)]
    for (t0, t1), source in zip(tgt, src[1:], strict=True):
        for j in range(t0, t1):  # every token of the word
            assert torch.allclose(a[:, j], mean_of(source), atol=1e-6)
    assert a[20, 15] == 1 and a[:5, :5].equal(torch.eye(5))  # "swimming" shifted, prefix kept
    # at the official temperature the weights are the softmax of the similarities: largest on
    # the same word, and exactly e / (e + 2) there (cosine 1 against 0, 0)
    a, tgt = align("white shark", {"white": 1, "shark": 2, "swimming": 5})
    top = math.e / (math.e + 2)
    assert math.isclose(float(a[10:15, 5].sum()), top, rel_tol=1e-5)  # white ← white
    assert math.isclose(float(a[15:20, 10].sum()), top, rel_tol=1e-5)  # shark ← shark

    # inserted words: "big" (a new concept) and "hungry" (like "great")
    inserted = {"big": 3, "great": 0, "hungry": 0, "white": 1, "shark": 2}
    a, tgt = align("big great hungry white shark", inserted, temperature=1e-3)
    assert [t1 - t0 for t0, t1 in tgt] == [3, 5, 6, 5, 5]
    for word, source in ((1, src[0]), (2, src[0]), (3, src[1]), (4, src[2])):
        for j in range(*tgt[word]):
            assert torch.allclose(a[:, j], mean_of(source), atol=1e-6)
    for j in range(*tgt[0]):  # "big" is like none of them: the plain mean of the three words
        assert torch.allclose(a[5:20, j], torch.full((15,), 1 / 15), atol=1e-6)

    # reordered, equal counts: the same words copy their tokens one to one
    a, tgt = align("shark great white", {"shark": 2, "great": 0, "white": 1})
    for (t0, t1), (s0, s1) in zip(tgt, [src[2], src[0], src[1]], strict=True):
        assert torch.equal(a[s0:s1, t0:t1], torch.eye(5))
    # equal counts, other words: each takes the mean of its partner, on every token
    a, tgt = align("whale small grey", {"whale": 2, "small": 0, "grey": 1})
    assert [t1 - t0 for t0, t1 in tgt] == [5, 5, 4]
    for (t0, t1), source in zip(tgt, [src[2], src[0], src[1]], strict=True):
        for j in range(t0, t1):
            assert torch.allclose(a[:, j], mean_of(source))


def test_alignment_on_the_tiny_text_encoder(model):
    """The real embeddings: deterministic, the identity for the same words, a word replaced by
    several takes the replaced word on every token of each, and the rest keeps or shifts."""
    tok = model.tokenizers[0]

    def align(caption: str, old: str, new: str) -> tuple[torch.Tensor, list, list]:
        prompt, s, t = edited(caption, old, new)
        hc, hp = model.encode_text([caption, prompt]).hidden
        a = prompt_alignment(tok, caption, s, hc, prompt, t, hp)
        again = prompt_alignment(tok, caption, s, hc.clone(), prompt, t, hp.clone())
        assert torch.equal(a, again)  # deterministic
        assert torch.allclose(a.sum(0), torch.ones(L))
        return a, word_spans(tok, caption, s), word_spans(tok, prompt, t)

    a, src, tgt = align(CAPTION, "great white shark", "great white shark")
    assert torch.equal(a, torch.eye(L))  # the start class as target: the reconstruction
    a, src, tgt = align("a photo of a tench, swimming", "tench", "great white shark")
    assert src == [(5, 6)] and tgt == [(5, 10), (10, 15), (15, 20)]
    assert torch.equal(a[:, 5:20], torch.eye(L)[:, [5] * 15])  # all 15 tokens take "tench"
    assert a[6, 20] == 1 and a[7, 21] == 1  # ", swimming" moved 14 tokens to the right
    a, src, tgt = align(CAPTION, "great white shark", "tench")  # three words → one
    w = a[5:20, 5]  # the tench token takes a convex mix of the three words' token means
    assert torch.allclose(w.sum(), torch.tensor(1.0)) and bool((w > 0).all())
    for s0, s1 in src:
        assert torch.allclose(w[s0 - 5 : s1 - 5], w[s0 - 5].expand(s1 - s0))
    assert a[20, 6] == 1 and a[27, 13] == 1  # "swimming" moved 14 tokens to the left


# --- every head --------------------------------------------------------------------------------


def test_every_head_is_realigned():
    g = torch.Generator().manual_seed(0)
    heads, q, length, b = 4, 6, 8, 2
    stored = torch.rand(heads, q, length, generator=g).softmax(-1)  # distinct per head
    control = CrossAttentionControl()
    control.maps = {"layer": {0: stored}}
    mixing = torch.stack(
        [
            alignment_matrix(length, [(2, 3)], [(2, 4)], torch.ones(1, 1, dtype=torch.float64)),
            torch.eye(length),
        ]
    )
    control.inject(torch.tensor([1, 0]), mixing)  # item 1 is not injected at step 0
    probs = torch.rand(2 * b * heads, q, length, generator=g)
    out = control.process("layer", probs, heads)
    assert torch.equal(out[: b * heads], probs[: b * heads])  # the unconditional half
    for h in range(heads):  # every head of item 0, the first half of them included
        assert torch.allclose(out[b * heads + h], stored[h] @ mixing[0])
        assert not torch.allclose(out[b * heads + h], stored[h])
    assert torch.equal(out[b * heads + heads :], probs[b * heads + heads :])  # item 1


# --- end to end -------------------------------------------------------------------------------


def test_an_edit_with_the_alignment_runs_end_to_end(tiny_models, model, cache, tmp_path):
    """Inversion, reconstruction with stored maps, masks and the edit of three targets
    (two words fewer, one word fewer, the same words) with zero learning rate: the same words
    give back the reconstruction; every item's losses are finite."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    small = torch.rand(1, 3, 5, 6, generator=gen)
    pixels = torch.nn.functional.interpolate(small, size=(40, 48), mode="bicubic").clamp(0, 1)
    path = tmp_path / "start.png"
    Image.fromarray((pixels[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    classifier = cache.classifier(tiny_models["classifier"], "cpu", "openai")
    res = 32
    original = load_start_image(str(path), resolution=res).pixels
    guidance = GuidanceConfig(ddim_steps=3, iterations=1, loss_steps=2, num_cutouts=2, lr=0.0)
    cf = CounterfactualConfig(null_text_steps=2)
    caption = "a photograph of a great white shark"
    start = classifier.class_names.index("great white shark")
    cond = model.encode_text([caption])
    inversion = invert(model, original, cond, model.null_text(1), guidance=guidance, config=cf)
    tok, words = model.tokenizers[0], find_words(caption, "great white shark")
    names = ["tench", "tiger shark", "great white shark"]
    prompts = [replace_words(caption, words, n) for n in names]
    texts = model.encode_text(prompts)
    mixing = torch.stack(
        [
            prompt_alignment(
                tok,
                caption,
                words,
                cond.hidden[0],
                p,
                (words[0], words[0] + len(n)),
                texts.hidden[i],
            )  # fmt: skip
            for i, (p, n) in enumerate(zip(prompts, names, strict=True))
        ]
    )
    assert torch.equal(mixing[2], torch.eye(L))
    control = CrossAttentionControl()
    steps = guidance.ddim_steps
    latent_side = model.latent_shape(res)[-1]
    with controlled_cross_attention(model.unet, control):
        recon, templates = reconstruct(model, z_T=inversion.z_T, null_texts=inversion.null_texts,
                                       cond=cond, config=guidance, control=control,
                                       store_steps=steps, resolution=res)  # fmt: skip
        mask_steps = math.ceil(cf.mask_steps * steps)
        source = token_span(tok, caption, words)
        attention = attention_map(control, source, mask_steps, latent_side)
        latent_mask, pixel_mask = foreground_masks(
            attention, latent_side=latent_side, pixel_side=res, cutoff=cf.mask_cutoff
        )
        start_point = EditStart(inversion.z_T, inversion.null_texts, templates, inversion.z0,
                                original, latent_mask, pixel_mask)  # fmt: skip
        out = edit(model, classifier, start=start_point, cond=texts,
                   targets=torch.tensor([classifier.class_names.index(n) for n in names]),
                   start_class=start, seeds=[0, 1, 2], mixing=mixing, control=control,
                   config=guidance, cf=cf, resolution=res)  # fmt: skip
    g = out.guidance
    assert g.images.shape == (3, 3, res, res) and torch.isfinite(g.clean_loss).all()
    assert torch.allclose(g.images[2:], recon, atol=1e-4)  # the same words: the reconstruction
    assert not torch.allclose(g.images[0], recon[0], atol=1e-3)
