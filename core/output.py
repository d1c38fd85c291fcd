"""Artifacts of a job: result.json, the best image of every item, and a captioned trajectory grid.

`render_artifacts` returns name → bytes, so the CLI writes them to a folder and the workers
upload the same bytes to object storage.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


class Result(Protocol):
    """What every kind's result can do: summarise itself (result.json) and render its files."""

    def summary(self) -> dict: ...

    def render_artifacts(self) -> dict[str, bytes]: ...


GRID_TILE = 160  # pixels per trajectory tile (tiles are downscaled from the image side)
CAPTION_H = 30


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] or uint8 → RGB image."""
    if image.dtype != torch.uint8:
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy())


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _caption(result: Any, it: int, b: int) -> str:
    g = result.guidance
    parts = [f"it {it}"]
    for name in ("p", "p1", "p2", "activation", "alpha"):
        if name in g.metrics:
            value = float(g.metrics[name][it, b])
            short = {"activation": "a", "alpha": "pc"}.get(name)  # pc: α_l of pca_component
            parts.append(f"{name} {value:.2f}" if short is None else f"{short} {value:.1f}")
    return " ".join(parts)


def trajectory_grid(result: Any, tile: int = GRID_TILE) -> Image.Image:
    """Rows: items; columns: iterations 0..I; each tile captioned with iteration and
    confidence; the selected (best) iteration is framed in red."""
    traj = result.guidance.trajectory  # (I + 1, B, 3, H, W) uint8
    n_it, n_items = traj.shape[:2]
    tile = min(tile, traj.shape[-1]) if traj.shape[-1] >= 64 else 96
    font = ImageFont.load_default(size=11)
    grid = Image.new("RGB", (n_it * tile, n_items * (tile + CAPTION_H)), "white")
    draw = ImageDraw.Draw(grid)
    for b in range(n_items):
        y = b * (tile + CAPTION_H)
        for it in range(n_it):
            x = it * tile
            img = to_pil(traj[it, b]).resize((tile, tile), Image.Resampling.LANCZOS)
            grid.paste(img, (x, y))
            text = _caption(result, it, b)
            draw.text((x + 2, y + tile + 2), text, fill="black", font=font)
            if it == result.guidance.best_iteration[b]:
                draw.rectangle([x, y, x + tile - 1, y + tile - 1], outline="red", width=2)
        label = result.items[b].class_name or f"neuron {result.items[b].neuron}"
        if getattr(result.items[b], "component", None) is not None:  # pca_component
            label = f"{label}, component {result.items[b].component}"
        draw.text((2, y + tile + 15), label[:40], fill="gray", font=font)
    return grid


def render_artifacts(result: Result) -> dict[str, bytes]:
    """A job's files, name → bytes (each kind's result renders its own)."""
    return result.render_artifacts()


def render_generative(result: Any) -> dict[str, bytes]:
    """The files of a generative job (`digin.core.jobs.JobResult`): result.json, item_XXX.png
    (best), item_XXX_start.png (iteration 0), grid.png (the trajectory of every item)."""
    out: dict[str, bytes] = {}
    for b, item in enumerate(result.items):
        out[f"item_{item.index:03d}.png"] = png_bytes(to_pil(result.guidance.images[b]))
        out[f"item_{item.index:03d}_start.png"] = png_bytes(
            to_pil(result.guidance.trajectory[0, b])
        )
    out["grid.png"] = png_bytes(trajectory_grid(result))
    summary = result.summary()
    summary["artifacts"] = sorted([*out, "result.json"])
    out["result.json"] = json.dumps(summary, indent=2, default=_json_default).encode()
    return out


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_outputs(result: Result, out_dir: Path | str) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, data in render_artifacts(result).items():
        (out_dir / name).write_bytes(data)
        paths[name] = out_dir / name
    return paths
