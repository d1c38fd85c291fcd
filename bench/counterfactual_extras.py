"""Extra cost of automatic captions and SAM mask refinement per counterfactual (docs/architecture.md
§5.3, §5.6), on the tiny random models (`digin.core.tiny`): figures only, the images are noise.

1. Components, median of `--repeats` after one warm-up: the tiny BLIP captioner continuing the
   prompt (`caption_max_tokens`, `caption_beams` of the defaults), the tiny SAM-HQ from 5 points,
   and the mask post-processing (erosion, dilation, blur, resize) at 64 and 512 px.
2. Jobs on the tiny Stable Diffusion at `--resolution`, one target: without extras, with the
   captioner, with the segmenter, with both; each twice in one process (cold: models loaded and
   the image inverted; warm: both cached); per job its total and load seconds, the caption step
   and the SAM step as the job records them (`timings.caption_s`, `mask.segmenter.seconds`).
3. With `--full-size`: the same two components at full size with random weights
   (`digin.core.random_models`: BLIP base at 384 px, SAM-HQ ViT-B or, `--sam-size huge`, the
   official ViT-H, at 1024 px) on a 512 px
   image, on `--device`, one warm-up and `--full-repeats` runs.

    python bench/counterfactual_extras.py [--tiny-models DIR] [--repeats 5] [--resolution 32]
        [--threads N] [--full-size [--device cuda] [--full-repeats 1] [--sam-size base]]
        [--out bench/results/counterfactual_extras.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from digin.core.context import RunContext
from digin.core.counterfactual.config import CounterfactualConfig
from digin.core.counterfactual.job import run_counterfactual
from digin.core.counterfactual.masks import latent_mask, postprocess
from digin.core.jobs import ModelCache
from digin.core.loaders import load_captioner, load_segmenter
from digin.core.params import CounterfactualParams
from digin.core.random_models import build_random_captioner, build_random_segmenter
from digin.core.tiny import make_tiny_models

ROOT = Path(__file__).resolve().parent.parent
GUIDANCE = {"ddim_steps": 5, "iterations": 2, "loss_steps": 2, "num_cutouts": 2, "lr": 0.05}


def median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 5)


def components(specs: dict[str, str], repeats: int) -> dict:
    cf = CounterfactualConfig()
    captioner, segmenter = load_captioner(specs["captioner"]), load_segmenter(specs["segmenter"])
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    points = torch.tensor([[10.0, 12.0], [30.0, 40.0], [50.0, 20.0], [20.0, 50.0], [40.0, 30.0]])
    out = {
        "caption_s": _caption_s(captioner, image, repeats),
        "sam_points_s": median_s(lambda: segmenter.segment(image, points=points), repeats),
    }
    for side in (64, 512):
        mask = torch.rand(1, 1, side, side, generator=torch.Generator().manual_seed(1))
        out[f"postprocess_{side}px_s"] = median_s(
            lambda m=mask, s=side: latent_mask(postprocess(m, cf)[0], s // 8), repeats
        )
    return out


def full_size(device: str, repeats: int, sam_size: str) -> dict:
    image = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0)).to(device)
    return {
        "device": device,
        "repeats": repeats,
        "caption_blip_base_s": _caption_s(build_random_captioner(device=device), image, repeats),
        f"sam_hq_{sam_size}_points_s": _sam_s(
            build_random_segmenter(size=sam_size, device=device), image, repeats
        ),
    }


def _sam_s(segmenter, image: torch.Tensor, repeats: int) -> float:
    """Median seconds of SAM's mask of `image` from 5 points."""
    points = torch.tensor([[100.0, 120.0], [300.0, 400.0], [250.0, 200.0], [200.0, 350.0],
                           [400.0, 300.0]])  # fmt: skip
    return median_s(lambda: segmenter.segment(image, points=points), repeats)


def _caption_s(captioner, image: torch.Tensor, repeats: int) -> float:
    """Median seconds of the default caption (20 tokens, 3 beams) of `image`."""
    cf = CounterfactualConfig()
    return median_s(
        lambda: captioner.continue_caption(
            image, "a photograph of a tench", max_new_tokens=cf.caption_max_tokens,
            num_beams=cf.caption_beams,
        ),
        repeats,
    )  # fmt: skip


def start_image(folder: Path) -> str:
    small = torch.rand(1, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    pixels = torch.nn.functional.interpolate(small, size=(40, 48), mode="bicubic").clamp(0, 1)
    path = folder / "start.png"
    Image.fromarray((pixels[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    return str(path)


def jobs(specs: dict[str, str], image: str, resolution: int) -> dict:
    base = {"image": image, "diffusion": specs["sd"], "classifier": specs["classifier"],
            "resolution": resolution, "start_class": "tench", "targets": ["goldfish"],
            "guidance": GUIDANCE}  # fmt: skip
    variants = {
        "plain": {},
        "captioner": {"captioner": specs["captioner"]},
        "segmenter": {"segmenter": specs["segmenter"]},
        "both": {"captioner": specs["captioner"], "segmenter": specs["segmenter"]},
    }
    out = {}
    for name, extra in variants.items():
        cache = ModelCache()
        params = CounterfactualParams.model_validate({**base, **extra})
        runs = {}
        # cold: the models load and the image is inverted; warm: both come from the process's
        # caches, as in a worker's second job on the image (the caption is deterministic)
        for run in ("cold", "warm"):
            summary = run_counterfactual(params, RunContext(cache=cache)).summary()
            sam = (summary["mask"] or {}).get("segmenter") or {}
            runs[run] = {
                "total_s": round(summary["timings"]["total_s"], 3),
                "load_s": round(summary["timings"]["load_s"], 3),
                "caption_s": round(summary["timings"]["caption_s"], 4),
                "sam_s": round(sam["seconds"], 4) if sam else 0.0,
                "inversion_cached": summary["inversion"]["cached"],
            }
        out[name] = {**runs, "caption": summary["caption"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny-models", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--full-size", action="store_true", help="also full-size random models")
    parser.add_argument("--device", default="cpu", help="device of the full-size models")
    parser.add_argument("--full-repeats", type=int, default=1)
    parser.add_argument("--sam-size", choices=("base", "huge"), default="base")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench/results/counterfactual_extras.json"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.tiny_models or Path(tmp) / "tiny-models"
        specs_file = folder / "specs.json"
        specs = json.loads(specs_file.read_text()) if specs_file.is_file() else None
        if specs is None or "segmenter" not in specs:
            specs = make_tiny_models(folder)
        figures = {
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(), "loadavg_before": load_before},
            "components": components(specs, args.repeats),
            "jobs": jobs(specs, start_image(Path(tmp)), args.resolution),
            "full_size": None,
            "settings": {"resolution": args.resolution, "guidance": GUIDANCE,
                         "repeats": args.repeats},
        }  # fmt: skip
    if args.full_size:
        figures["full_size"] = full_size(args.device, args.full_repeats, args.sam_size)
    figures["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(figures, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
