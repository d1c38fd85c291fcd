"""The start image's caption when the job gives none (docs/architecture.md §5.3).

A captioner (`blip:<hub id | folder>`, loaded by `digin.core.loaders.load_captioner`) continues
the prompt with the start class, e.g. 'a photograph of a tench' → 'a photograph of a tench
held by a man on a boat': conditional captioning, so the caption always names the start class,
whose words prompt-to-prompt replaces. The paper's code does the same with its vision-language
models (OpenFlamingo continues 'an image of a <class>'; CogVLM is asked for a caption that
contains the class).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor


@dataclass(eq=False)
class Captioner:
    """A BLIP captioner: `BlipForConditionalGeneration` and its `BlipProcessor` (image
    preprocessing and the BERT tokenizer)."""

    spec: str
    model: Any  # BlipForConditionalGeneration
    processor: Any

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @cached_property
    def _token_ids(self) -> tuple[list[int], list[int]]:
        """(every token id, the ids of tokens that start a word: not '##' continuations)."""
        vocab = self.processor.tokenizer.get_vocab()
        word_starts = sorted(i for token, i in vocab.items() if not token.startswith("##"))
        return sorted(vocab.values()), word_starts

    @torch.no_grad()
    def continue_caption(
        self, image: Tensor, prefix: str, *, max_new_tokens: int, num_beams: int
    ) -> str:
        """`prefix` continued by at most `max_new_tokens` tokens describing `image` (1, 3, H, W)
        in [0, 1] (beam search, deterministic). The prefix is kept as given (the tokenizer
        lower-cases it); only the new tokens are decoded."""
        if image.ndim != 4 or image.shape[:2] != (1, 3):
            raise ValueError(f"expected one RGB image (1, 3, H, W), got {tuple(image.shape)}")
        pixels = (image[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        inputs = self.processor(images=pixels, text=prefix, return_tensors="pt").to(self.device)
        # BLIP's generate replaces the prefix's [CLS] by its start token and drops its [SEP]
        given = inputs["input_ids"][0, 1:-1]
        n = 1 + len(given)
        every, word_starts = self._token_ids

        def allowed(_: int, ids: Tensor) -> list[int]:
            # the first new token starts a word: the prefix's last word (the start class)
            # stays whole, so the caption still names it
            return word_starts if len(ids) == n else every

        out = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            prefix_allowed_tokens_fn=allowed,
        )[0]  # (L,) token ids: the start token, the prefix's tokens, then the new ones
        if len(out) < n or not torch.equal(out[1:n], given):
            raise RuntimeError(f"{self.spec}: the generated tokens do not start with the prefix")
        decode = self.processor.tokenizer.decode
        full, head = (
            decode(out, skip_special_tokens=True),
            decode(out[:n], skip_special_tokens=True),
        )
        if not full.startswith(head):
            raise RuntimeError(f"{self.spec}: the decoded caption does not start with the prefix")
        return " ".join((prefix + full[len(head) :]).split())
