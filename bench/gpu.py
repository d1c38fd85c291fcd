"""Full-scale speed and memory of the guidance loop (issue 9, DESIGN §7): figures, never asserts.

For each architecture (full-size random-weight SD 1.5 at 512 px, SDXL at 1024 px, built in memory
by `core.random_models`) and each configuration (the `reference` preset: the paper's fp32, one
item, 16 cutouts, full checkpointing; the `optimised` preset: bf16 autocast, batched), one
`core.guidance.optimize` run of `iterations` iterations of `ddim_steps` DDIM steps, at B = 1 and
at the largest B that fits the device's memory, measures

- seconds per optimisation iteration (steady state: the iterations after the first, which also
  pays for warm-up and compilation; each iteration ends with its one host copy, so the wall time
  between progress callbacks is the device's time),
- peak memory (GPU: `torch.cuda.max_memory_allocated`, models included; CPU: the process's peak
  resident set, models included, with glibc told to return freed memory at once),
- images per hour: 3600 · B / (iterations · seconds per iteration), i.e. steady state without
  model loading, compilation and the final evaluation pass.

The classifier is a random-weight timm ResNet-50 (224 px, 1000 classes), the objective CE to a
class. On a GPU the largest B comes from the peaks of two one-iteration probes (B = 1, 2) and
`core.batching.largest_batch` under 92 % of the device's memory, backing off on out-of-memory.
Ablation rows (GPU default) add channels-last, torch.compile of the UNet, and bf16 weights to the
optimised path.

    python bench/gpu.py [--archs sd15 sdxl] [--out bench/results/gpu.json]
    python bench/gpu.py --smoke     # CPU: SD 1.5 at 256 px, 4 DDIM steps, 2 iterations, B = 1, 2
    python bench/gpu.py --diffusion diffusers:<dir> …   # a downloaded (or written) pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from core.batching import fit_memory_line, largest_batch
from core.config import GuidanceConfig
from core.guidance import optimize
from core.objectives import ClassObjective
from core.random_models import build_random_diffusion

NATIVE = {"sd15": 512, "sdxl": 1024}
# glibc malloc: blocks of 128 KiB and more by mmap, freed memory returned at once, so that the
# resident set follows the live tensors (see BENCHMARKS.md, core benchmark section 2).
RETURNING_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"}
GIB = 2**30


@dataclass
class Row:
    arch: str
    config: str  # reference | optimised | optimised+<ablation>
    batch: int
    resolution: int
    ddim_steps: int
    iterations: int
    s_per_iteration: float  # steady state, the whole batch
    first_iteration_s: float  # warm-up (and compilation) included
    run_s: float  # the whole optimize() call
    images_per_hour: float
    peak_gib: float  # models included
    peak_above_start_gib: float  # above the memory in use before the run (models, caches)
    note: str = ""


# --- memory ----------------------------------------------------------------------------------


def _rss_gib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak(device: torch.device) -> float:
    """Start a peak measurement; return the memory in use now (GiB)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / GIB
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak resident set (VmHWM)
        f.write("5")
    return _rss_gib("VmRSS")


def read_peak(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return _rss_gib("VmHWM")


# --- one run ---------------------------------------------------------------------------------


def make_classifier(name: str, device: torch.device):
    """A random-weight timm classifier with its own preprocessing (no download)."""
    import timm
    import timm.data

    from core.classes import imagenet_class_names
    from core.classifiers import TimmClassifier

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    data = timm.data.resolve_model_data_config(model)
    clf = TimmClassifier(
        f"timm:{name} (random weights)",
        model,
        class_names=imagenet_class_names()[: model.num_classes],
        input_size=data["input_size"][1],
        mean=data["mean"],
        std=data["std"],
    )
    return clf.to(device)


def run(
    model, clf, config: GuidanceConfig, batch: int, resolution: int
) -> tuple[float, float, float]:
    """One optimisation of `batch` items, timed by the progress callback's clock: (seconds per
    steady iteration, seconds of the first iteration, seconds of the whole run)."""
    stamps: list[float] = []
    prompts = [f"a photograph of a {clf.class_names[i]}" for i in range(batch)]
    t0 = time.perf_counter()
    optimize(
        model,
        ClassObjective(clf, torch.arange(batch, device=model.device)),
        cond=model.encode_text(prompts),
        uncond=model.null_text(batch),
        seeds=list(range(batch)),
        config=config,
        resolution=resolution,
        progress=lambda step, total, info: stamps.append(time.perf_counter()),
    )
    run_s = time.perf_counter() - t0
    train = stamps[: config.iterations]  # ends of the training iterations
    first = train[0] - t0
    steady = (train[-1] - train[0]) / (len(train) - 1) if len(train) > 1 else first
    return steady, first, run_s


def measure(model, clf, name, config, batch, resolution, arch, note="") -> Row:
    device = model.device
    start = reset_peak(device)
    steady, first, run_s = run(model, clf, config, batch, resolution)
    peak = read_peak(device)
    row = Row(
        arch=arch,
        config=name,
        batch=batch,
        resolution=resolution,
        ddim_steps=config.ddim_steps,
        iterations=config.iterations,
        s_per_iteration=steady,
        first_iteration_s=first,
        run_s=run_s,
        images_per_hour=3600 * batch / (config.iterations * steady),
        peak_gib=peak,
        peak_above_start_gib=peak - start,
        note=note,
    )
    print(format_row(row), flush=True)
    return row


def probe_largest_batch(model, clf, config, resolution, device, limit: int) -> tuple[int, dict]:
    """Peaks of one-iteration runs at B = 1, 2 → the largest B under 92 % of the GPU."""
    probe = GuidanceConfig(**{**asdict(config), "iterations": 1, "max_batch": None})
    peaks = {}
    for b in (1, 2):
        reset_peak(device)
        run(model, clf, probe, b, resolution)
        peaks[b] = read_peak(device) * GIB
    line = fit_memory_line(peaks)
    budget = 0.92 * torch.cuda.get_device_properties(device).total_memory
    info = {
        "peaks_gib": {b: p / GIB for b, p in peaks.items()},
        "budget_gib": budget / GIB,
        "per_item_gib": line.per_item_bytes / GIB,
        "fixed_gib": line.fixed_bytes / GIB,
    }
    return largest_batch(line, budget, limit=limit), info


# --- the benchmark ---------------------------------------------------------------------------


def configs(args) -> dict[str, GuidanceConfig]:
    common = {"ddim_steps": args.ddim_steps, "iterations": args.iterations, "max_batch": None}
    out = {
        "reference": GuidanceConfig.from_preset("reference", **common),
        "optimised": GuidanceConfig.from_preset("optimised", **common),
    }
    if args.ablations:
        out["optimised+channels_last"] = GuidanceConfig.from_preset(
            "optimised", channels_last=True, **common
        )
        out["optimised+compile"] = GuidanceConfig.from_preset(
            "optimised", compile_unet=True, **common
        )
    return out


def bench_arch(arch: str, args, device: torch.device) -> tuple[list[Row], dict]:
    """All runs on one model: `arch` names a random full-size architecture, or (with
    `--diffusion`) is a model spec loaded by the normal loader."""
    t0 = time.perf_counter()
    if arch in NATIVE:
        model = build_random_diffusion(arch, device=device)
    else:
        from core.diffusion import load_diffusion

        model = load_diffusion(arch, device=device)
    build_s = time.perf_counter() - t0
    resolution = args.resolution or model.resolution
    clf = make_classifier(args.classifier, device)
    rows, fits = [], {}
    for name, config in configs(args).items():
        batches = list(args.batches)
        if device.type == "cuda" and name in ("reference", "optimised"):
            b_max, info = probe_largest_batch(model, clf, config, resolution, device, args.limit)
            fits[name] = {"largest_batch": b_max, **info}
            batches = sorted({*batches, b_max} - {0})
        ablation = name.startswith("optimised+")
        for b in batches[:1] if ablation else batches:
            while b >= 1:
                try:
                    rows.append(measure(model, clf, name, config, b, resolution, arch))
                    break
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    print(f"{arch} {name} B={b}: out of memory, trying B={b - 1}", flush=True)
                    b -= 1
                except Exception as exc:  # an ablation that fails (e.g. compile) is a finding
                    if not ablation:
                        raise
                    fits[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                    print(f"{arch} {name} B={b}: failed: {fits[name]['error']}", flush=True)
                    break
        if device.type == "cpu" and len(batches) >= 2:  # the memory line from the measured rows
            peaks = {r.batch: r.peak_gib * GIB for r in rows if r.config == name}
            line = fit_memory_line(peaks)
            budget = (_mem_available_gib() + _rss_gib("VmRSS")) * GIB  # what this process may use
            fits[name] = {
                "largest_batch_predicted": largest_batch(line, 0.9 * budget, limit=args.limit),
                "per_item_gib": line.per_item_bytes / GIB,
                "fixed_gib": line.fixed_bytes / GIB,
                "budget_gib": 0.9 * budget / GIB,
                "note": "predicted from the measured rows, not run (CPU)",
            }
    if args.ablations:  # last: it converts the shared model's weights for good
        model.to(torch.bfloat16)
        config = GuidanceConfig.from_preset(
            "optimised", ddim_steps=args.ddim_steps, iterations=args.iterations, max_batch=None
        )
        try:
            rows.append(
                measure(model, clf, "optimised+bf16_weights", config, args.batches[0],
                        resolution, arch, note="UNet, VAE and text encoders stored in bf16")
            )  # fmt: skip
        except Exception as exc:  # a finding, not the end of the benchmark
            fits["optimised+bf16_weights"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    del model
    return rows, {"build_s": build_s, "batch_fits": fits}


def _mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    return 0.0


def format_row(r: Row) -> str:
    return (
        f"{r.arch:>5} {r.resolution:>5}px {r.config:<24} B={r.batch:<3} "
        f"{r.s_per_iteration:8.2f} s/it  {r.images_per_hour:9.2f} img/h  "
        f"peak {r.peak_gib:6.2f} GiB (+{r.peak_above_start_gib:5.2f})  "
        f"first {r.first_iteration_s:7.1f} s"
    )


def summary(rows: list[Row]) -> dict:
    """Optimised against reference per architecture: speed-up in images per hour (best B of
    each) and peak memory at B = 1 (the issue's targets: ≥ 3x, ≤ 60 %)."""
    out = {}
    for arch in sorted({r.arch for r in rows}):
        ref = [r for r in rows if r.arch == arch and r.config == "reference"]
        opt = [r for r in rows if r.arch == arch and r.config == "optimised"]
        if not ref or not opt:
            continue
        ref1 = next((r for r in ref if r.batch == 1), None)
        opt1 = next((r for r in opt if r.batch == 1), None)
        out[arch] = {
            "speedup_images_per_hour": max(r.images_per_hour for r in opt)
            / max(r.images_per_hour for r in ref),
            "target_speedup_min": 3.0,
            "peak_ratio_B1": None if not (ref1 and opt1) else opt1.peak_gib / ref1.peak_gib,
            "peak_above_start_ratio_B1": None
            if not (ref1 and opt1)
            else opt1.peak_above_start_gib / ref1.peak_above_start_gib,
            "target_peak_ratio_max": 0.6,
        }
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU size: 256 px, T=4, 2 iterations")
    parser.add_argument("--archs", nargs="+", choices=list(NATIVE))
    parser.add_argument(
        "--diffusion", nargs="+", help="model specs to load instead of random --archs"
    )
    parser.add_argument("--resolution", type=int, help="default: 512 (SD 1.5), 1024 (SDXL)")
    parser.add_argument("--ddim-steps", type=int)
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--batches", type=int, nargs="+", help="B to run (GPU: + the largest)")
    parser.add_argument("--limit", type=int, default=64, help="largest B considered")
    parser.add_argument("--classifier", default="resnet50", help="timm architecture")
    parser.add_argument("--ablations", action=argparse.BooleanOptionalAction)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    smoke = {"archs": ["sd15"], "resolution": 256, "ddim_steps": 4, "iterations": 2,
             "batches": [1, 2], "ablations": False}  # fmt: skip
    full = {"archs": ["sd15", "sdxl"], "resolution": None, "ddim_steps": 20, "iterations": 20,
            "batches": [1], "ablations": device.type == "cuda"}  # fmt: skip
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows: list[Row] = []
    per_arch = {}
    for arch in args.diffusion or args.archs:
        arch_rows, info = bench_arch(arch, args, device)
        rows += arch_rows
        per_arch[arch] = info
    results = {
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "device_memory_gib": torch.cuda.get_device_properties(device).total_memory / GIB
            if device.type == "cuda"
            else None,
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        },
        "settings": {
            k: getattr(args, k)
            for k in (
                "smoke",
                "archs",
                "diffusion",
                "resolution",
                "ddim_steps",
                "iterations",
                "batches",
                "classifier",
                "ablations",
            )
        },  # fmt: skip
        "memory_measure": "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "peak resident set (VmHWM, reset per run), returning malloc",
        "per_arch": per_arch,
        "rows": [asdict(r) for r in rows],
        "summary": summary(rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\n{results['machine']['device']}: {len(rows)} runs")
    for arch, s in results["summary"].items():
        ratio = "n/a" if s["peak_ratio_B1"] is None else f"{s['peak_ratio_B1']:.2f}"
        print(
            f"{arch}: optimised / reference images per hour {s['speedup_images_per_hour']:.2f}x "
            f"(target >= 3x); peak at B=1 {ratio} of the reference's (target <= 0.6)"
        )
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    arguments = parse()
    cpu = torch.device(arguments.device).type == "cpu"
    if cpu and any(os.environ.get(k) != v for k, v in RETURNING_MALLOC.items()):
        # glibc reads these at start: run again with them, so that the peak resident set of a
        # run is not hidden by memory that an earlier run freed and the allocator kept
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **RETURNING_MALLOC})
    main(arguments)
