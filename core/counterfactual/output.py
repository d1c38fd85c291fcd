"""Artifacts of a counterfactual job: name → bytes, like `digin.core.output.render_artifacts`.

original.png          the start image at the model resolution
reconstruction.png    its reconstruction from the inversion (z_T, ∅_t)
mask.png              the foreground mask (start-class cross-attention, refined by SAM with a
                      segmenter, post-processed), white = foreground
caption.txt           the caption the image was inverted with (given, the prompt, or captioned)
item_XXX.png          the counterfactual towards target XXX (best clean loss)
item_XXX_start.png    the unoptimised prompt-to-prompt edit (iteration 0)
grid.png              per target: original, reconstruction, mask, then every iteration,
                      captioned with p(target) / p(start), the selected one framed in red
result.json           `CounterfactualResult.summary()` with the artifact names
"""

from __future__ import annotations

import json
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from digin.core.output import CAPTION_H, GRID_TILE, png_bytes, to_pil


def _tile(image: torch.Tensor, tile: int) -> Image.Image:
    resample = Image.Resampling.NEAREST if image.shape[-1] < tile else Image.Resampling.LANCZOS
    return to_pil(image).resize((tile, tile), resample)


def mask_image(mask: torch.Tensor) -> torch.Tensor:
    """(1, 1, H, W) in [0, 1] → (3, H, W)."""
    return mask[0].expand(3, -1, -1).clamp(0, 1)


def counterfactual_grid(result: Any, tile: int = GRID_TILE) -> Image.Image:
    """Rows: targets; columns: original, reconstruction, mask, iterations 0..I."""
    side = result.original.shape[-1]
    tile = min(tile, side) if side >= 64 else 96
    font = ImageFont.load_default(size=11)
    fixed = [("original", result.original[0])]
    if result.reconstruction is not None:
        fixed.append(("reconstruction", result.reconstruction[0]))
    if result.pixel_mask is not None:
        fixed.append(("mask", mask_image(result.pixel_mask)))
    g = result.guidance
    n_it = 0 if g is None else g.trajectory.shape[0]
    rows = max(1, len(result.items))
    grid = Image.new("RGB", ((len(fixed) + n_it) * tile, rows * (tile + CAPTION_H)), "white")
    draw = ImageDraw.Draw(grid)
    p_start = float(result.probs["original"][result.start_index])
    for b in range(rows):
        y = b * (tile + CAPTION_H)
        for c, (name, image) in enumerate(fixed):
            grid.paste(_tile(image, tile), (c * tile, y))
            text = f"{name} ps {p_start:.2f}" if name == "original" else name
            draw.text((c * tile + 2, y + tile + 2), text, fill="black", font=font)
        if g is None or not result.items:
            continue
        for it in range(n_it):
            x = (len(fixed) + it) * tile
            grid.paste(_tile(g.trajectory[it, b], tile), (x, y))
            p, ps = float(g.metrics["p"][it, b]), float(g.metrics["p_start"][it, b])
            draw.text(
                (x + 2, y + tile + 2), f"it {it} p {p:.2f} ps {ps:.2f}", fill="black", font=font
            )
            if it == g.best_iteration[b]:
                draw.rectangle([x, y, x + tile - 1, y + tile - 1], outline="red", width=2)
        label = f"{result.start_name} -> {result.items[b].target_name}"
        draw.text((2, y + tile + 15), label[:40], fill="gray", font=font)
    return grid


def render_counterfactual(result: Any) -> dict[str, bytes]:
    out: dict[str, bytes] = {"original.png": png_bytes(to_pil(result.original[0]))}
    if result.reconstruction is not None:
        out["reconstruction.png"] = png_bytes(to_pil(result.reconstruction[0]))
    if result.pixel_mask is not None:
        out["mask.png"] = png_bytes(to_pil(mask_image(result.pixel_mask)))
    g = result.guidance
    if g is not None:
        for b, item in enumerate(result.items):
            out[f"item_{item.index:03d}.png"] = png_bytes(to_pil(g.images[b]))
            out[f"item_{item.index:03d}_start.png"] = png_bytes(to_pil(g.trajectory[0, b]))
    out["grid.png"] = png_bytes(counterfactual_grid(result))
    out["caption.txt"] = (result.caption + "\n").encode()  # given, the prompt, or captioned
    summary = result.summary()
    summary["artifacts"] = sorted([*out, "result.json"])
    out["result.json"] = json.dumps(summary, indent=2).encode()
    return out
