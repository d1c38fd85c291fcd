"""Core benchmark on the tiny models (docs/architecture.md §12): figures, never asserts.

1. Time per optimisation iteration against the measured cost of its parts in the same run:
   per DDIM step a UNet forward (the chain) plus a recomputed forward and a backward (the
   checkpointed step), per loss step the same for VAE decode + classifier on the cutouts.
2. Peak memory of one optimisation for T = 5, 10, 20 DDIM steps at 128 px (each in a fresh
   process; on a CPU the peak resident set size above the process's state after loading the
   models), with and without checkpointing.
3. Throughput of B = 4 items in one batched run against B = 1 (seconds per item-iteration).

    python bench/guidance.py [--models DIR] [--out bench/results/guidance.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from digin.core.config import GuidanceConfig
from digin.core.guidance import optimize
from digin.core.loaders import load_classifier, load_diffusion
from digin.core.objectives import ClassObjective

RES = 64
CONFIG = GuidanceConfig(ddim_steps=10, iterations=3, loss_steps=3, num_cutouts=16)


def load(models: dict[str, str]):
    return load_diffusion(models["sd"]), load_classifier(models["classifier"])


def timed(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def run_once(sd, clf, batch: int, config: GuidanceConfig, resolution: int = RES):
    prompts = [f"a photograph of a {clf.class_names[i % 10]}" for i in range(batch)]
    return optimize(
        sd,
        ClassObjective(clf, torch.arange(batch) % 10),
        cond=sd.encode_text(prompts),
        uncond=sd.null_text(batch),
        seeds=list(range(batch)),
        config=config,
        resolution=resolution,
    )


def iteration_vs_parts(sd, clf, batch: int = 1) -> dict:
    cfg = CONFIG
    # whole iterations: a run of I iterations minus a run of 0 iterations (the final evaluation)
    t_full = timed(lambda: run_once(sd, clf, batch, cfg), repeat=2)
    t_eval = timed(lambda: run_once(sd, clf, batch, replace(cfg, iterations=0)), repeat=2)
    per_iteration = (t_full - t_eval) / cfg.iterations

    # parts, measured on the same models and shapes
    c, h, w = sd.latent_shape(RES)
    z = torch.randn(2 * batch, c, h, w, requires_grad=True)  # CFG doubles the batch
    text = sd.encode_text(["a"] * 2 * batch)
    t = torch.tensor(500)
    unet_f = timed(lambda: sd.eps(z.detach(), t, text, None))
    unet_fb = timed(lambda: sd.eps(z, t, text, None).sum().backward())
    x0 = torch.randn(batch, c, h, w, requires_grad=True)
    vae_f = timed(lambda: sd.decode(x0.detach()))
    vae_fb = timed(lambda: sd.decode(x0).sum().backward())
    views = torch.rand(batch * cfg.num_cutouts, 3, clf.input_size, clf.input_size)
    views.requires_grad_(True)
    clf_f = timed(lambda: clf(views.detach()))
    clf_fb = timed(lambda: clf(views).sum().backward())
    parts = {
        "unet_chain_s": cfg.ddim_steps * unet_f,
        "unet_recompute_backward_s": cfg.ddim_steps * unet_fb,
        "vae_decode_s": cfg.loss_steps * (vae_f + vae_fb),
        "classifier_s": cfg.loss_steps * (clf_f + clf_fb),
    }
    total = sum(parts.values())
    return {
        "batch": batch,
        "ddim_steps": cfg.ddim_steps,
        "num_cutouts": cfg.num_cutouts,
        "loss_steps": cfg.loss_steps,
        "iteration_s": per_iteration,
        "parts_s": parts,
        "sum_of_parts_s": total,
        "ratio": per_iteration / total,
        "target_ratio_max": 1.25,
    }


MEMORY_RES = 128  # larger images, so that activations dominate the resident set


def peak_memory_child(models_json: str, steps: int, checkpointing: bool) -> None:
    """Run in a fresh process: print the peak RSS growth of one optimisation in MiB (the peak
    resident set during the run minus the resident set after loading the models)."""
    sd, clf = load(json.loads(models_json))
    cfg = replace(CONFIG, ddim_steps=steps, iterations=1, checkpointing=checkpointing)
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    run_once(sd, clf, 1, cfg, resolution=MEMORY_RES)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_growth_mib": peak - before, "peak_rss_mib": peak}))


# glibc malloc: serve blocks of 128 KiB and more by mmap and give freed memory back at once, so
# the resident set follows the live tensors instead of the allocator's high-water mark.
RETURNING_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"}
MEMORY_VARIANTS = {  # name → (checkpointing, extra environment)
    "checkpointing": (True, {}),
    "checkpointing_returning_malloc": (True, RETURNING_MALLOC),
    "no_checkpointing": (False, {}),
}


def peak_memory(models: dict[str, str], variants: list[str] | None = None) -> dict:
    out: dict[str, dict] = {name: {} for name in variants or MEMORY_VARIANTS}
    for name in out:
        ckpt, env = MEMORY_VARIANTS[name]
        for steps in (5, 10, 20):
            proc = subprocess.run(
                [sys.executable, __file__, "--child-memory", str(steps), "--models-json",
                 json.dumps(models)] + ([] if ckpt else ["--no-checkpointing"]),
                capture_output=True, text=True, check=True, env={**os.environ, **env},
            )  # fmt: skip
            out[name][str(steps)] = json.loads(proc.stdout.strip().splitlines()[-1])
    ratios = {
        name: rows["20"]["peak_growth_mib"] / rows["5"]["peak_growth_mib"]
        for name, rows in out.items()
    }
    return {
        "resolution": MEMORY_RES,
        "by_steps": out,
        "ratio_T20_over_T5": ratios.get("checkpointing"),
        "ratio_T20_over_T5_by_variant": ratios,
        "returning_malloc_env": RETURNING_MALLOC,
        "target_ratio_max": 1.3,
    }


def batching(sd, clf) -> dict:
    cfg = replace(CONFIG, iterations=2)
    t1 = timed(lambda: run_once(sd, clf, 1, cfg), repeat=2)
    t4 = timed(lambda: run_once(sd, clf, 4, cfg), repeat=2)
    return {
        "seconds_per_item_B1": t1,
        "seconds_per_item_B4": t4 / 4,
        "speedup_per_item": t1 / (t4 / 4),
        "target_speedup_min": 1.3,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, help="folder from `digin make-tiny-models`")
    parser.add_argument("--out", type=Path, default=Path("bench/results/guidance.json"))
    parser.add_argument("--child-memory", type=int)
    parser.add_argument("--models-json")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument(
        "--memory-variants", nargs="+", choices=list(MEMORY_VARIANTS), help="memory: only these"
    )
    parser.add_argument(
        "--only", choices=("timing", "memory", "batching"), action="append", help="run these parts"
    )
    args = parser.parse_args()
    if args.child_memory:
        peak_memory_child(args.models_json, args.child_memory, not args.no_checkpointing)
        return

    from digin.core.tiny import make_tiny_models

    folder = args.models or Path(tempfile.mkdtemp(prefix="digin-tiny-"))
    specs_file = folder / "specs.json"
    models = json.loads(specs_file.read_text()) if specs_file.exists() else make_tiny_models(folder)
    torch.manual_seed(0)
    sd, clf = load(models)
    results = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": "cpu",
        },
        "resolution": RES,
    }
    parts = args.only or ["timing", "memory", "batching"]
    if "timing" in parts:
        results["iteration_vs_parts"] = iteration_vs_parts(sd, clf)
    if "memory" in parts:
        results["peak_memory"] = peak_memory(models, args.memory_variants)
    if "batching" in parts:
        results["batching"] = batching(sd, clf)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    if it := results.get("iteration_vs_parts"):
        print(
            f"iteration {it['iteration_s']:.3f} s vs parts {it['sum_of_parts_s']:.3f} s "
            f"-> ratio {it['ratio']:.2f} (target <= 1.25)"
        )
    if mem := results.get("peak_memory"):
        for name, rows in mem["by_steps"].items():
            for steps, row in rows.items():
                print(f"{name:>16} T={steps:>2}: peak growth {row['peak_growth_mib']:.0f} MiB")
        for name, ratio in mem["ratio_T20_over_T5_by_variant"].items():
            print(f"T=20 / T=5 peak growth, {name}: {ratio:.2f} (target <= 1.3)")
    if bat := results.get("batching"):
        print(f"batching B=4 per-item speed-up {bat['speedup_per_item']:.2f}x (target >= 1.3)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
