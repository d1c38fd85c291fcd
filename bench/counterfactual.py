"""Counterfactual benchmark (docs/architecture.md §12): time per image and quality, figures only.

1. Digits zoo (`examples/counterfactual_digits.json`, the settings of
   `digin.core.digits.settings.DIGITS_COUNTERFACTUAL*`): held-out test digits, `--per-class` of each
   class, each towards every other class (one job per image, its targets as one batch).
   Per image: seconds of the inversion, of the reconstruction + mask, and of the edit (the
   prompt-to-prompt search and the optimisation). Quality: flip rates by the explained
   classifier (digits:cnn) and by the independent judge (digits:judge), for the counterfactual
   and for the unoptimised prompt-to-prompt edit; mean L1 / L2 distances to the original
   against the mean L1 distance of the start digit to the target class's (and its own class's)
   training digits; the reconstruction errors (MSE of x̂0 to the latent, of the decoded image to
   the original) of plain DDIM and of null-text inversion; an inversion cache check.
2. Tiny random Stable Diffusion (`digin.core.tiny`, 64 px): the same timings for a PNG file through
   the path loader, two targets, with `TINY_GUIDANCE` (quality is meaningless there).

    python bench/counterfactual.py [--per-class 1] [--out bench/results/counterfactual.json]
        [--tiny-models DIR] [--threads N] [--override '{"guidance": {"iterations": 5}}']
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from digin.core.counterfactual.job import class_probs
from digin.core.digits.data import load_images, make_splits
from digin.core.jobs import ModelCache
from digin.core.kinds import run_job

ROOT = Path(__file__).resolve().parent.parent
TINY_GUIDANCE = {"ddim_steps": 10, "iterations": 5, "loss_steps": 3, "num_cutouts": 4}
MSE_KEYS = ("ddim_latent_mse", "null_text_latent_mse", "ddim_pixel_mse", "null_text_pixel_mse")


def mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 5) if values else None


def digits(per_class: int, override: dict, cache: ModelCache) -> dict:
    example = json.loads((ROOT / "examples" / "counterfactual_digits.json").read_text())
    x, y = load_images()
    splits = make_splits(y)
    test_labels = y[splits.test]
    train_x, train_y = x[splits.train], y[splits.train]
    judge = cache.classifier("digits:judge", "cpu", "openai")
    rows, per_image = [], []
    for k in range(10):
        for n in (test_labels == k).nonzero().flatten()[:per_class].tolist():
            params = {**example, "image": f"digits:test/{n}", "targets": "others"}
            for key, value in override.items():
                params[key] = {**params.get(key, {}), **value} if isinstance(value, dict) else value
            t0 = time.perf_counter()
            result = run_job("counterfactual", params, seed=n, cache=cache, max_batch=16)
            seconds = time.perf_counter() - t0
            s = result.summary()
            g = result.guidance
            start = result.original[0, 0]  # (16, 16) grey
            edit_images = g.trajectory[0].float() / 255  # iteration 0: the unoptimised edit
            judge_after = class_probs(judge, g.images).argmax(1)
            judge_edit = class_probs(judge, edit_images).argmax(1)
            clf_edit = torch.tensor([it["edit"]["p_target"] for it in s["items"]])
            for b, item in enumerate(s["items"]):
                t = item["target_index"]
                typical = (train_x[train_y == t, 0] - start).abs().flatten(1).mean(1).mean()
                rows.append(
                    {
                        "image": n,
                        "start": k,
                        "target": t,
                        "flip": item["flip"],
                        "judge_flip": int(judge_after[b]) == t,
                        "edit_flip": bool(clf_edit[b] > 0.5),
                        "edit_judge_flip": int(judge_edit[b]) == t,
                        "l1": item["l1_distance"],
                        "l2": item["l2_distance"],
                        "typical_l1": float(typical),
                        "p2p_fraction": item["p2p_fraction"],
                    }
                )
            timings = s["timings"]
            per_image.append(
                {
                    "image": n,
                    "label": k,
                    "prediction": s["start_class"]["index"],
                    "targets": len(s["items"]),
                    "inversion_s": timings["inversion_s"],
                    "reconstruction_mask_s": timings["reconstruction_mask_s"],
                    "p2p_search_s": timings["p2p_search_s"],
                    "optimisation_s": timings["edit_s"] - timings["p2p_search_s"],
                    "total_s": seconds,
                    **{k: s["inversion"][k] for k in MSE_KEYS},
                    "own_class_l1": float(
                        (train_x[train_y == k, 0] - start).abs().flatten(1).mean(1).mean()
                    ),
                    "mask_foreground_share": s["mask"]["foreground_share"],
                }
            )
            print(
                f"digit {n} ({k}): judge flips {sum(r['judge_flip'] for r in rows[-9:])}/9, "
                f"{seconds:.1f} s",
                flush=True,
            )

    # the inversion cache: the same image and settings, another target
    first = per_image[0]
    params = {**example, "image": f"digits:test/{first['image']}"}
    params["targets"] = [(first["label"] + 1) % 10]
    for key, value in override.items():
        params[key] = {**params.get(key, {}), **value} if isinstance(value, dict) else value
    again = run_job("counterfactual", params, cache=cache).summary()

    def rate(key: str) -> float:
        return mean([float(r[key]) for r in rows])

    return {
        "settings": {
            k: v for k, v in again["params"].items() if k in ("guidance", "counterfactual")
        },
        "images": len(per_image),
        "counterfactuals": len(rows),
        "flip_rate_explained": rate("flip"),
        "flip_rate_judge": rate("judge_flip"),
        "edit_only_flip_rate_explained": rate("edit_flip"),
        "edit_only_flip_rate_judge": rate("edit_judge_flip"),
        "mean_l1_distance": rate("l1"),
        "mean_l2_distance": rate("l2"),
        "mean_typical_l1_start_to_target_class": rate("typical_l1"),
        "l1_ratio_to_typical": round(rate("l1") / rate("typical_l1"), 4),
        "mean_l1_start_to_own_class": mean([p["own_class_l1"] for p in per_image]),
        "reconstruction_mse": {key: mean([p[key] for p in per_image]) for key in MSE_KEYS},
        "seconds_per_image": {
            key: mean([p[key] for p in per_image])
            for key in (
                "inversion_s",
                "reconstruction_mask_s",
                "p2p_search_s",
                "optimisation_s",
                "total_s",
            )
        },
        "targets_per_image": 9,
        "p2p_fraction_counts": {
            str(f): sum(r["p2p_fraction"] == f for r in rows) for f in (0.3, 0.4, 0.5)
        },
        "cache_check": {
            "cached": again["inversion"]["cached"],
            "inversion_s": round(again["timings"]["inversion_s"], 4),
        },
        "per_image": per_image,
    }


def tiny_sd(models_dir: Path, cache: ModelCache) -> dict:
    from PIL import Image

    from digin.core.tiny import make_tiny_models

    specs = make_tiny_models(models_dir)
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 3, 16, 16, generator=gen)
    image = torch.nn.functional.interpolate(noise, size=96, mode="bicubic").clamp(0, 1)[0]
    path = models_dir / "start.png"
    array = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(array).save(path)
    params = {
        "image": str(path),
        "diffusion": specs["sd"],
        "classifier": specs["classifier"],
        "start_class": 0,
        "targets": [1, 2],
        "guidance": TINY_GUIDANCE,
    }
    runs = []
    for _ in range(2):  # the second run hits the inversion cache
        t0 = time.perf_counter()
        s = run_job("counterfactual", params, cache=cache).summary()
        runs.append((s, time.perf_counter() - t0))
    (s, seconds), (again, _) = runs
    timings = s["timings"]
    return {
        "resolution": 64,
        "guidance": TINY_GUIDANCE,
        "targets": 2,
        "inversion_s": timings["inversion_s"],
        "reconstruction_mask_s": timings["reconstruction_mask_s"],
        "p2p_search_s": timings["p2p_search_s"],
        "optimisation_s": timings["edit_s"] - timings["p2p_search_s"],
        "total_s": seconds,
        "reconstruction_mse": {key: s["inversion"][key] for key in MSE_KEYS},
        "second_run_cached": again["inversion"]["cached"],
        "second_run_inversion_s": again["timings"]["inversion_s"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "counterfactual.json")
    p.add_argument("--per-class", type=int, default=1, help="test digits per class")
    p.add_argument("--tiny-models", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--override", type=json.loads, default={}, help="JSON merged into the params")
    p.add_argument("--skip-tiny", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = ModelCache()
    results: dict = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "digits": digits(args.per_class, args.override, cache),
    }
    if not args.skip_tiny:
        with tempfile.TemporaryDirectory() as tmp:
            results["tiny_sd"] = tiny_sd(args.tiny_models or Path(tmp), cache)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    summary = {k: v for k, v in results["digits"].items() if k != "per_image"}
    print(json.dumps({**results, "digits": summary}, indent=2))


if __name__ == "__main__":
    main()
