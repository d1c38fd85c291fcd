"""The paper's fixed noise bank: the starting latents z_T of its official code.

See docs/architecture.md §3.9 and docs/differences.md.

The official generation script seeds torch's global generator with 0 and draws, once, on the
CPU in float32,

    bank = randn(1000, max(images per class, 50), c, h, w)

and item (class k, image j) starts from bank[k, j], whatever the job's seed. The whole bank
of a 512-pixel Stable Diffusion model is 3.3 GB; `official_latents` draws only what it needs,
class by class: torch's CPU normal sampler fills a tensor of n ≥ 16 values from n uniform draws
in order and turns each block of 16 into normals on its own (Box-Muller within the block), so
a draw of the bank's first k rows followed by a draw of row k gives exactly bank[k] when a
row's size is a multiple of 16 (with 50 images a row: whenever c · h · w is a multiple of 8,
as for every Stable Diffusion latent and the digits). Otherwise the whole bank is drawn at
once. The generator's state at the start of each row is kept (`_ROW_STATES`), so later jobs
skip ahead without drawing again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from digin.core.limits import LRU

BANK_CLASSES = 1000  # rows of the bank: the official code's num_classes, ImageNet-1k
BANK_MIN_IMAGES = 50  # images per row: max(images per class, 50)
BANK_SEED = 0
_ROW_STATES: LRU[tuple, list[Tensor]] = LRU(4)  # (row shape) → generator state at each row start


def bank_images(images_per_class: int) -> int:
    """Images per row of the official bank for a job with `images_per_class` images."""
    return max(images_per_class, BANK_MIN_IMAGES)


def official_latents(
    shape: Sequence[int], classes: Sequence[int], images: Sequence[int], images_per_class: int
) -> Tensor:
    """bank[classes[b], images[b]] for every item b: (B, *shape) float32 on the CPU, bit for
    bit the official code's z_T for the same latent shape (before the scheduler's
    init_noise_sigma, which the caller applies as for its own latents)."""
    per_row = bank_images(images_per_class)
    if len(classes) != len(images):
        raise ValueError(f"got {len(classes)} classes for {len(images)} image indices")
    for k, j in zip(classes, images, strict=True):
        if not 0 <= k < BANK_CLASSES:
            raise ValueError(f"latents 'official': class index {k} is outside the bank's 1000 rows")
        if not 0 <= j < per_row:
            raise ValueError(f"latents 'official': image {j} is outside the row's {per_row}")
    row_shape = (per_row, *shape)
    row_numel = per_row * torch.Size(shape).numel()
    if row_numel % 16 != 0:
        gen = torch.Generator().manual_seed(BANK_SEED)
        bank = torch.randn((BANK_CLASSES, *row_shape), generator=gen, dtype=torch.float32)
        return torch.stack([bank[k, j] for k, j in zip(classes, images, strict=True)])
    rows = {k: _row(row_shape, k) for k in sorted(set(classes))}
    return torch.stack([rows[k][j] for k, j in zip(classes, images, strict=True)])


def _row(row_shape: tuple[int, ...], k: int) -> Tensor:
    """Row k of the bank, drawn from the generator state at its start."""
    states = _ROW_STATES.get(row_shape)
    if states is None:
        states = [torch.Generator().manual_seed(BANK_SEED).get_state()]
        _ROW_STATES[row_shape] = states
    gen = torch.Generator()
    gen.set_state(states[min(k, len(states) - 1)])
    while len(states) <= k:  # draw (and drop) the rows before k, keeping their end states
        torch.randn(row_shape, generator=gen, dtype=torch.float32)
        states.append(gen.get_state())
    return torch.randn(row_shape, generator=gen, dtype=torch.float32)


def item_latents(model: Any, items: Sequence[Any], params: Any, resolution: int) -> Tensor | None:
    """The z_T of a batch of generative items under the params' `latents` choice: None for ours
    (`optimize` draws each item's from its seed), the official bank's otherwise, scaled by the
    scheduler's init_noise_sigma and on the model's device: (B, c, h, w)."""
    if getattr(params, "latents", "ours") == "ours":
        return None
    missing = [it.index for it in items if it.class_index is None]
    if missing:
        raise ValueError(
            f"latents 'official' draws z_T per class and image; items {missing} have no class "
            "(give classes, or use latents 'ours')"
        )
    shape = model.latent_shape(resolution)
    z = official_latents(shape, [it.class_index for it in items],
                         [it.image_index for it in items], params.images_per_class)  # fmt: skip
    return z.to(model.device) * model.make_scheduler(1).init_noise_sigma
