"""Full-scale speed and memory of the guidance loop: figures, never asserts.

For each architecture (full-size random-weight SD 1.5 at 512 px, SDXL at 1024 px, built directly
on the device by `digin.core.random_models`) and each configuration (`VARIANTS`: the `reference`
preset, the paper's fp32, one item, 16 cutouts, full checkpointing; the `optimised` preset, bf16
weights run natively, the VAE decoder recomputed block by block, batched; `autocast`, the earlier
optimised path, bf16 autocast over fp32 weights; ablations on top of the optimised preset),
`digin.core.guidance.optimize` runs `iterations` iterations of `ddim_steps` DDIM steps, at B = 1 and
at the largest B that fits the device's memory, and measures

- seconds per optimisation iteration (steady state: the iterations after the first, which also
  pays for warm-up and compilation; each iteration ends with its one host copy, so the wall time
  between progress callbacks is the device's time),
- peak memory (GPU: `torch.cuda.max_memory_allocated`, models included; CPU: the process's peak
  resident set, models included, with glibc told to return freed memory at once),
- images per hour: 3600 · B / (20 · seconds per iteration), an image being 20 iterations
  (`--per-image-iterations`), steady state without model loading, compilation and the final
  evaluation pass,
- the FLOPs of an iteration (`digin.core.flops`, counted on the model) and the achieved fraction of
  the device's bf16 matrix rate, measured in the same run (a large bf16 matrix product).

The classifier is a random-weight timm ResNet-50 (224 px, 1000 classes), the objective CE to a
class. On a GPU the largest B comes from the peaks of two one-iteration probes (B = 1, 2) and
`digin.core.batching.largest_batch` under 92 % of the device's memory (capped by `--limit`), backing
off on out-of-memory. Ablation rows add channels-last, torch.compile of the UNet or cuDNN's
benchmark mode to the optimised path, or take its decoder recompute away. The configurations with
fp32 weights run first; then the model's weights are converted to bf16 once. A torch profiler table
of the top kernels of one optimised iteration (`--profile-batch`) shows where the time goes.

    python bench/gpu.py [--archs sd15 sdxl] [--out bench/results/gpu.json]
    python bench/gpu.py --smoke     # CPU: the full-size archs at 64 px, 3 DDIM steps
    python bench/gpu.py --diffusion diffusers:<dir> …   # a downloaded (or written) pipeline
    python bench/gpu.py --report a.json [b.json …]      # the table of earlier runs

`bench/gpu_run.sh` runs all of it (and the digits semantic tests in fp32 and bf16) on a bare
GPU machine; BENCHMARKS.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from digin.core.batching import fit_memory_line, largest_batch
from digin.core.config import GuidanceConfig
from digin.core.flops import iteration_flops
from digin.core.guidance import DTYPES, optimize
from digin.core.objectives import ClassObjective
from digin.core.random_models import build_random_diffusion

NATIVE = {"sd15": 512, "sdxl": 1024}
# glibc malloc: blocks of 128 KiB and more by mmap, freed memory returned at once, so that the
# resident set follows the live tensors (see BENCHMARKS.md, core benchmark section 2).
RETURNING_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"}
GIB = 2**30
# Configurations: a preset and the fields changed from it. The bases run at B = 1 and at their
# largest B; the ablations at B = 1 (and at the optimised's largest B when --ablations-large
# names them). `autocast` is the earlier optimised path: bf16 autocast over fp32 weights, the
# decode checkpointed as one unit.
VARIANTS: dict[str, tuple[str, dict]] = {
    "reference": ("reference", {}),
    "optimised": ("optimised", {}),
    "autocast": ("optimised", {"weights": "fp32", "checkpoint_decoder_blocks": False}),
    "optimised+channels_last": ("optimised", {"channels_last": True}),
    "optimised+cudnn_benchmark": ("optimised", {}),  # and torch.backends.cudnn.benchmark
    "optimised+compile": ("optimised", {"compile_unet": True}),
    "optimised-decoder_checkpointing": ("optimised", {"checkpoint_decoder_blocks": False}),
}
BASE = ("reference", "optimised", "autocast")
ABLATIONS = tuple(n for n in VARIANTS if n not in BASE)
CPU_ABLATIONS = ("optimised+channels_last", "optimised-decoder_checkpointing")  # no cuDNN, compile


def make_config(name: str, common: dict) -> GuidanceConfig:
    preset, changes = VARIANTS[name]
    return GuidanceConfig.from_preset(preset, **common, **changes)  # type: ignore[arg-type]


def _flops_key(config: GuidanceConfig) -> str:
    ckpt = "checkpointed" if config.checkpointing else "not checkpointed"
    blocks = ", decoder blocks recomputed" if config.checkpoint_decoder_blocks else ""
    return ckpt + blocks


TARGET_SPEEDUP, TARGET_PEAK_RATIO = 3.0, 0.6


@dataclass
class Row:
    arch: str
    config: str  # reference | optimised | optimised+<ablation>
    batch: int
    resolution: int
    ddim_steps: int
    iterations: int  # timed here
    s_per_iteration: float  # steady state, the whole batch
    first_iteration_s: float  # warm-up (and compilation) included
    run_s: float  # the whole optimize() call
    images_per_hour: float  # an image = per_image_iterations iterations
    peak_gib: float  # models included
    peak_above_start_gib: float  # above the memory in use before the run (models, caches)
    tflop_per_iteration: float | None = None  # the whole batch
    achieved_tflops: float | None = None
    fraction_of_bf16_peak: float | None = None  # achieved / the measured bf16 matrix rate
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


def _mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    return 0.0


# --- the device's matrix rate -----------------------------------------------------------------


def bf16_matmul_tflops(device: torch.device, n: int | None = None, reps: int = 10) -> float:
    """The median rate of an n×n×n bf16 matrix product on random data (TFLOP/s): the ceiling the
    achieved rates are compared with (GPU: n = 8192; CPU: n = 1024, fewer repeats)."""
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 1024)
    reps = reps if cuda else 3
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    times = []
    for i in range(reps + 3):  # three warm-ups
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000
        else:
            t0 = time.perf_counter()
            a @ b
            seconds = time.perf_counter() - t0
        if i >= 3:
            times.append(seconds)
    return 2 * n**3 / statistics.median(times) / 1e12


# --- one run ---------------------------------------------------------------------------------


def make_classifier(name: str, device: torch.device):
    """A random-weight timm classifier with its own preprocessing (no download)."""
    import timm
    import timm.data

    from digin.core.classes import imagenet_class_names
    from digin.core.classifiers import TimmClassifier

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


def _prompts(clf, batch: int) -> list[str]:
    return [f"a photograph of a {clf.class_names[i % len(clf.class_names)]}" for i in range(batch)]


def run(
    model, clf, config: GuidanceConfig, batch: int, resolution: int
) -> tuple[float, float, float]:
    """One optimisation of `batch` items, timed by the progress callback's clock: (seconds per
    steady iteration, seconds of the first iteration, seconds of the whole run)."""
    stamps: list[float] = []
    t0 = time.perf_counter()
    optimize(
        model,
        ClassObjective(clf, torch.arange(batch, device=model.device) % len(clf.class_names)),
        cond=model.encode_text(_prompts(clf, batch)),
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


def count_flops(model, clf, config: GuidanceConfig, resolution: int) -> dict:
    """FLOPs of one item's training iteration (`digin.core.flops`), with its parts."""
    objective = ClassObjective(clf, torch.zeros(1, dtype=torch.long, device=model.device))
    flops = iteration_flops(
        model, objective, config, model.encode_text(_prompts(clf, 1)), model.null_text(1),
        resolution,
    )  # fmt: skip
    return flops.as_dict()


class Bench:
    """The runs of one architecture, written to the results file after every row (a run cut
    short by its time limit keeps what it measured)."""

    def __init__(self, args, device: torch.device, results: dict) -> None:
        self.args, self.device, self.results = args, device, results

    def save(self) -> None:
        self.results["summary"] = summary(
            [Row(**r) for r in self.results["rows"]], self.results["machine"]
        )
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(self.results, indent=2))

    def measure(self, model, clf, name, config, batch, resolution, arch, flops, note="") -> Row:
        start = reset_peak(self.device)
        steady, first, run_s = run(model, clf, config, batch, resolution)
        peak = read_peak(self.device)
        tflop = batch * flops["per_iteration"] / 1e12 if flops else None
        achieved = tflop / steady if tflop else None
        rate = self.results["machine"].get("bf16_matmul_tflops")
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
            images_per_hour=3600 * batch / (self.args.per_image_iterations * steady),
            peak_gib=peak,
            peak_above_start_gib=peak - start,
            tflop_per_iteration=tflop,
            achieved_tflops=achieved,
            fraction_of_bf16_peak=achieved / rate if achieved and rate else None,
            note=note,
        )
        print(format_row(row), flush=True)
        self.results["rows"].append(asdict(row))
        self.save()
        return row

    def measure_backing_off(self, model, clf, name, config, batch, resolution, arch, flops,
                            note="") -> Row | None:  # fmt: skip
        """`measure` at `batch`, one item fewer after every out-of-memory; an error other than
        out-of-memory in an ablation is recorded as its finding."""
        while batch >= 1:
            try:
                return self.measure(model, clf, name, config, batch, resolution, arch, flops, note)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                print(f"{arch} {name} B={batch}: out of memory, trying B={batch - 1}", flush=True)
                batch -= 1
            except Exception as exc:
                if name in BASE:
                    raise
                error = f"{type(exc).__name__}: {exc}"[:500]
                self.fits(arch)[name] = {"error": error}
                print(f"{arch} {name} B={batch}: failed: {error}", flush=True)
                self.save()
                return None
        return None

    def fits(self, arch: str) -> dict:
        return self.results["per_arch"].setdefault(arch, {}).setdefault("batch_fits", {})

    def probe_largest_batch(self, model, clf, config, resolution, limit: int) -> tuple[int, dict]:
        """Peaks of one-iteration runs at B = 1, 2 → the largest B under 92 % of the GPU."""
        probe = replace(config, iterations=1, max_batch=None)
        peaks = {}
        for b in (1, 2):
            reset_peak(self.device)
            run(model, clf, probe, b, resolution)
            peaks[b] = read_peak(self.device) * GIB
        line = fit_memory_line(peaks)
        budget = 0.92 * torch.cuda.get_device_properties(self.device).total_memory
        info = {
            "peaks_gib": {b: p / GIB for b, p in peaks.items()},
            "budget_gib": budget / GIB,
            "per_item_gib": line.per_item_bytes / GIB,
            "fixed_gib": line.fixed_bytes / GIB,
            "limit": limit,
            "fits_uncapped": largest_batch(line, budget, limit=4096),
        }
        return largest_batch(line, budget, limit=limit), info

    def arch(self, arch: str) -> None:
        """All runs on one model: `arch` names a random full-size architecture, or (with
        `--diffusion`) is a model spec loaded by the normal loader. The configurations with fp32
        weights run first; then the weights are converted to bf16 for the others."""
        args, device = self.args, self.device
        t0 = time.perf_counter()
        if arch in NATIVE:
            model = build_random_diffusion(arch, device=device)
        else:
            from digin.core.loaders import load_diffusion

            model = load_diffusion(arch, device=device)
        info = self.results["per_arch"].setdefault(arch, {})
        info["build_s"] = time.perf_counter() - t0
        resolution = args.resolution or model.resolution
        clf = make_classifier(args.classifier, device)
        common = {
            "ddim_steps": args.ddim_steps,
            "iterations": args.iterations,
            "num_cutouts": args.num_cutouts,
            "max_batch": None,
        }
        configs = {name: make_config(name, common) for name in args.configs}
        flops_by_key: dict[tuple, dict] = {}

        def flops_of(model, clf, config: GuidanceConfig) -> dict:
            key = (config.checkpointing, config.checkpoint_decoder_blocks)
            if key not in flops_by_key:
                t0 = time.perf_counter()
                flops_by_key[key] = count_flops(model, clf, config, resolution)
                f = flops_by_key[key]
                info.setdefault("flops_per_item", {})[_flops_key(config)] = f
                info["flops_count_s"] = info.get("flops_count_s", 0) + time.perf_counter() - t0
                print(f"{arch}: {f['per_iteration'] / 1e12:.1f} TFLOP per item and iteration "
                      f"({_flops_key(config)}; UNet CFG call {f['unet_forward'] / 1e12:.2f} "
                      f"forward, {f['unet_train'] / 1e12:.2f} as trained; decode + loss "
                      f"{f['decode_forward'] / 1e12:.2f} forward, "
                      f"{f['decode_train'] / 1e12:.2f} as trained)", flush=True)  # fmt: skip
            return flops_by_key[key]

        cuda = device.type == "cuda"
        largest: dict[str, int] = {}
        fp32_first = sorted(configs, key=lambda n: configs[n].weights_precision != "fp32")
        for name in fp32_first:
            config = configs[name]
            dtype = DTYPES[config.weights_precision]
            if model.dtype != dtype:  # fp32 → bf16 once, after every fp32 configuration
                model.to(dtype)
            flops = flops_of(model, clf, config)
            if name == "optimised+cudnn_benchmark":  # cuDNN times its algorithms per shape
                torch.backends.cudnn.benchmark = True
            try:
                self.measure_backing_off(model, clf, name, config, 1, resolution, arch, flops)
                if name in BASE:
                    limit = args.limit_reference if name == "reference" else args.limit
                    if cuda and limit > 1:
                        b_max, fit = self.probe_largest_batch(model, clf, config, resolution, limit)
                        self.fits(arch)[name] = {"largest_batch": b_max, **fit}
                        self.save()
                        if b_max > 1:
                            large = replace(config, iterations=args.iterations_large)
                            row = self.measure_backing_off(
                                model, clf, name, large, b_max, resolution, arch, flops
                            )
                            largest[name] = row.batch if row else 1
                    elif not cuda and len(args.batches) > 1:
                        for b in args.batches[1:]:
                            self.measure_backing_off(
                                model, clf, name, config, b, resolution, arch, flops
                            )
                        self.predict_fit(arch, name)
                    if name == "optimised" and args.profile:
                        b = min(args.profile_batch, largest.get(name, 1))
                        self.profile(model, clf, config, resolution, arch, b)
                elif name in args.ablations_large and largest.get("optimised", 1) > 1:
                    large = replace(config, iterations=args.iterations_large)
                    self.measure_backing_off(
                        model, clf, name, large, largest["optimised"], resolution, arch, flops
                    )
            finally:
                torch.backends.cudnn.benchmark = False
        del model, clf
        if cuda:
            torch.cuda.empty_cache()

    def predict_fit(self, arch: str, name: str) -> None:
        """CPU: the memory line through the measured rows (not run)."""
        rows = [r for r in self.results["rows"] if r["arch"] == arch and r["config"] == name]
        line = fit_memory_line({r["batch"]: r["peak_gib"] * GIB for r in rows})
        budget = (_mem_available_gib() + _rss_gib("VmRSS")) * GIB  # what this process may use
        self.fits(arch)[name] = {
            "largest_batch_predicted": largest_batch(line, 0.9 * budget, limit=self.args.limit),
            "per_item_gib": line.per_item_bytes / GIB,
            "fixed_gib": line.fixed_bytes / GIB,
            "budget_gib": 0.9 * budget / GIB,
            "note": "predicted from the measured rows, not run (CPU)",
        }
        self.save()

    def profile(self, model, clf, config, resolution: int, arch: str, batch: int) -> None:
        """A torch profiler table of one optimised training iteration (and the final evaluation
        pass) at `batch`: the top kernels by device time, their kinds, and how busy the device
        was; written next to the results file."""
        try:
            info = profile_iteration(model, clf, replace(config, iterations=1), resolution, batch)
        except Exception as exc:  # the figures above stand without it
            error = f"{type(exc).__name__}: {exc}"[:500]
            self.results["per_arch"][arch]["profile"] = {"error": error}
            print(f"{arch}: profile failed: {error}", flush=True)
            return
        path = self.args.out.parent / f"profile_{_slug(arch)}.txt"
        path.write_text(info.pop("table"))
        info["table_file"] = path.name
        self.results["per_arch"][arch]["profile"] = info
        self.save()
        kinds = ", ".join(f"{k} {v:.0%}" for k, v in info["share_by_kind"].items())
        busy = f"{info['busy_fraction']:.0%} of {info['wall_s']:.2f} s"
        print(f"{arch}: profiled one optimised iteration: device busy {busy}; by kind {kinds}")


# --- profile ----------------------------------------------------------------------------------

KERNEL_KINDS = (  # first match wins; names of cuBLAS/cuDNN/CUTLASS/Triton/ATen kernels
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("convolution", r"conv|implicit_gemm|dgrad|wgrad|fprop|winograd|nhwc|nchw"),
    ("matmul", r"gemm|matmul|cutlass|xmma|sm90|cublas|addmm|\bmm\b|bmm|linear"),
    ("normalisation", r"norm|welford"),
    ("copy", r"copy|memcpy|memset|cat|fill|transpose|permute"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce|kernel"),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, pattern in KERNEL_KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def profile_iteration(model, clf, config: GuidanceConfig, resolution: int, batch: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    cuda = model.device.type == "cuda"
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    run(model, clf, config, batch, resolution)  # warm: the profile shows the steady state
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        run(model, clf, config, batch, resolution)
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    events = prof.key_averages()

    def self_us(e) -> float:
        if not cuda:
            return float(e.self_cpu_time_total)
        for attr in ("self_device_time_total", "self_cuda_time_total", "device_time_total"):
            if getattr(e, attr, 0):  # the first the profiler filled in for this event
                return float(getattr(e, attr))
        return 0.0

    rows = sorted(((self_us(e), e.count, e.key) for e in events), reverse=True)
    rows = [r for r in rows if r[0] > 0]
    total_us = sum(r[0] for r in rows) or 1.0
    by_kind: dict[str, float] = {}
    for us, _, key in rows:
        by_kind[kernel_kind(key)] = by_kind.get(kernel_kind(key), 0.0) + us / total_us
    unit = "device" if cuda else "CPU"
    lines = [
        f"one optimised iteration + final evaluation, B = {batch}, {resolution} px, "
        f"{config.ddim_steps} DDIM steps; wall {wall:.3f} s, {unit} time {total_us / 1e6:.3f} s",
        f"{'self ' + unit + ' ms':>14} {'share':>6} {'calls':>7}  kind           kernel",
    ]
    for us, count, key in rows[:30]:
        lines.append(f"{us / 1e3:14.2f} {us / total_us:6.1%} {count:7d}  "
                     f"{kernel_kind(key):<14} {key[:110]}")  # fmt: skip
    return {
        "batch": batch,
        "wall_s": wall,
        "device_time_s": total_us / 1e6,
        "busy_fraction": total_us / 1e6 / wall,
        "share_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "top": [
            {"kernel": key[:200], "calls": count, "ms": us / 1e3, "share": us / total_us}
            for us, count, key in rows[:30]
        ],
        "table": "\n".join(lines) + "\n",
    }


def _slug(arch: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", arch)[-60:]


# --- report ----------------------------------------------------------------------------------


def format_row(r: Row) -> str:
    rate = "" if r.fraction_of_bf16_peak is None else f"  {r.fraction_of_bf16_peak:5.1%} of bf16"
    return (
        f"{r.arch[-5:]:>5} {r.resolution:>5}px {r.config:<37} B={r.batch:<3} "
        f"{r.s_per_iteration:8.3f} s/it {r.images_per_hour:9.1f} img/h  "
        f"peak {r.peak_gib:6.2f} GiB{rate}"
    )


def summary(rows: list[Row], machine: dict | None = None) -> dict:
    """Optimised against reference per architecture: speed-up in images per hour (best B of
    each), peak memory at B = 1 (the targets: ≥ 3x, ≤ 60 %), and the best configuration."""
    out = {}
    for arch in sorted({r.arch for r in rows}):
        mine = [r for r in rows if r.arch == arch]
        ref = [r for r in mine if r.config == "reference"]
        opt = [r for r in mine if r.config == "optimised"]
        best = max(mine, key=lambda r: r.images_per_hour)
        entry = {
            "best_config": best.config,
            "best_batch": best.batch,
            "best_images_per_hour": best.images_per_hour,
        }
        if ref and opt:
            ref1 = next((r for r in ref if r.batch == 1), None)
            opt1 = next((r for r in opt if r.batch == 1), None)
            ref_best = max(r.images_per_hour for r in ref)
            entry.update(
                speedup_images_per_hour=max(r.images_per_hour for r in opt) / ref_best,
                best_speedup_images_per_hour=best.images_per_hour / ref_best,
                target_speedup_min=TARGET_SPEEDUP,
                peak_ratio_B1=None if not (ref1 and opt1) else opt1.peak_gib / ref1.peak_gib,
                target_peak_ratio_max=TARGET_PEAK_RATIO,
            )
            for r in mine:  # the peak at B = 1 of every configuration against the reference's
                if r.batch == 1 and ref1 and r.config != "reference":
                    entry.setdefault("peak_ratio_B1_by_config", {})[r.config] = (
                        r.peak_gib / ref1.peak_gib
                    )
        out[arch] = entry
    return out


def report(paths: list[Path]) -> None:
    """The table of one or more results files (missing or unfinished ones say so)."""
    for path in paths:
        if not path.exists():
            print(
                f"{path.name}: no results (the run did not start or was cut before its first row)"
            )
            continue
        results = json.loads(path.read_text())
        m = results["machine"]
        rate = m.get("bf16_matmul_tflops")
        measured = f"bf16 matmul {rate:.1f} TFLOP/s measured" if rate else "no matmul rate"
        print(f"\n{path.name}: {m['device']}, torch {m['torch']}, {measured}")
        for arch, info in results.get("per_arch", {}).items():
            for key, f in info.get("flops_per_item", {}).items():
                print(f"  {arch}: {f['per_iteration'] / 1e12:.1f} TFLOP per item-iteration ({key})")
            for name, fit in info.get("batch_fits", {}).items():
                if "error" in fit:
                    print(f"  {arch} {name}: FAILED {fit['error'][:160]}")
                elif "largest_batch" in fit:
                    print(f"  {arch} {name}: largest B {fit['largest_batch']} (limit "
                          f"{fit.get('limit')}, {fit['per_item_gib']:.2f} GiB per item, fits "
                          f"{fit.get('fits_uncapped')} uncapped)")  # fmt: skip
            prof = info.get("profile")
            if prof and "error" in prof:
                print(f"  {arch} profile: FAILED {prof['error'][:160]}")
            elif prof:
                kinds = ", ".join(f"{k} {v:.0%}" for k, v in prof["share_by_kind"].items())
                print(f"  {arch} profile: busy {prof['busy_fraction']:.0%}; {kinds}")
        for row in results["rows"]:
            print("  " + format_row(Row(**row)))
        if not results["rows"]:
            print("  no rows: the run was cut short or failed before its first measurement")
        for arch, s in results.get("summary", {}).items():
            if "speedup_images_per_hour" in s:
                ratio = "n/a" if s["peak_ratio_B1"] is None else f"{s['peak_ratio_B1']:.2f}"
                print(f"  {arch}: optimised / reference images per hour "
                      f"{s['speedup_images_per_hour']:.2f}x (target >= {TARGET_SPEEDUP:g}x); "
                      f"peak at B=1 {ratio} of the reference's (target <= {TARGET_PEAK_RATIO}); "
                      f"best {s['best_config']} B={s['best_batch']} "
                      f"{s['best_images_per_hour']:.0f} img/h")  # fmt: skip
            else:
                print(f"  {arch}: best {s['best_config']} B={s['best_batch']} "
                      f"{s['best_images_per_hour']:.0f} img/h")  # fmt: skip


# --- the benchmark ---------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="CPU size: the full-size archs at 64 px, 3 DDIM steps")  # fmt: skip
    parser.add_argument("--archs", nargs="+", choices=list(NATIVE))
    parser.add_argument(
        "--diffusion", nargs="+", help="model specs to load instead of random --archs"
    )
    parser.add_argument("--configs", nargs="+", choices=list(VARIANTS),
                        help="default: all (compile on a GPU only)")  # fmt: skip
    parser.add_argument("--resolution", type=int, help="default: 512 (SD 1.5), 1024 (SDXL)")
    parser.add_argument("--ddim-steps", type=int)
    parser.add_argument("--iterations", type=int, help="timed iterations at B = 1")
    parser.add_argument("--iterations-large", type=int, help="timed iterations at the largest B")
    parser.add_argument("--per-image-iterations", type=int, default=20)
    parser.add_argument("--batches", type=int, nargs="+", help="CPU: B to run")
    parser.add_argument("--limit", type=int, default=32, help="largest B considered (optimised)")
    parser.add_argument("--limit-reference", type=int, default=16, help="largest B (reference)")
    parser.add_argument("--classifier", default="resnet50", help="timm architecture")
    parser.add_argument("--num-cutouts", type=int, help="default: the presets' 16")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--profile-batch", type=int, default=1, help="B of the profiled run")
    parser.add_argument("--ablations-large", nargs="*", default=[], choices=list(ABLATIONS),
                        help="ablations also run at the optimised's largest B")  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu.json"))
    parser.add_argument("--report", type=Path, nargs="+", help="print the table of these files")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    smoke = {"archs": ["sd15", "sdxl"], "resolution": 64, "ddim_steps": 3, "iterations": 2,
             "iterations_large": 2, "batches": [1, 2], "num_cutouts": 2}  # fmt: skip
    full = {"archs": ["sd15", "sdxl"], "resolution": None, "ddim_steps": 20, "iterations": 3,
            "iterations_large": 2, "batches": [1], "num_cutouts": 16}  # fmt: skip
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.configs is None:
        args.configs = [
            *BASE,
            *(n for n in ABLATIONS if device.type == "cuda" or n in CPU_ABLATIONS),
        ]
    return args


def main(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    results = {
        "machine": {
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "device_memory_gib": torch.cuda.get_device_properties(device).total_memory / GIB
            if cuda
            else None,
            "bf16_matmul_tflops": bf16_matmul_tflops(device),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        },
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("report",)
        },
        "memory_measure": "torch.cuda.max_memory_allocated"
        if cuda
        else "peak resident set (VmHWM, reset per run), returning malloc",
        "per_arch": {},
        "rows": [],
    }
    bench = Bench(args, device, results)
    bench.save()
    print(f"{results['machine']['device']}: bf16 matmul "
          f"{results['machine']['bf16_matmul_tflops']:.1f} TFLOP/s", flush=True)  # fmt: skip
    for arch in args.diffusion or args.archs:
        bench.arch(arch)
    print(f"\n{results['machine']['device']}: {len(results['rows'])} runs")
    report([args.out])
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    arguments = parse()
    if arguments.report:
        report(arguments.report)
        sys.exit(0)
    cpu = torch.device(arguments.device).type == "cpu"
    if cpu and any(os.environ.get(k) != v for k, v in RETURNING_MALLOC.items()):
        # glibc reads these at start: run again with them, so that the peak resident set of a
        # run is not hidden by memory that an earlier run freed and the allocator kept
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **RETURNING_MALLOC})
    main(arguments)
