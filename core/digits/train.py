"""Train the digits zoo from fixed seeds: `python -m digin.core.digits.train --out core/zoo`.

Writes `<name>.safetensors` + `<name>.json` (model card) per model (layout: core/digits/zoo.py)
and measures every model on the test split for its card, through the loaders. Order: the
classifiers (cnn, mlp, cnn-spurious, judge), then the diffusion model `digits`, whose card records
how often the judge of the same folder recognises the prompted digit in its samples.

The planted patch, the class it is correlated with and all rates are options; the defaults
produce the shipped zoo. `--only NAME` retrains one model; `--quick` trains a few steps (tests).
One CPU thread by default: two gain little at these sizes and stall badly when other jobs share
the cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from digin.core.digits import evaluate
from digin.core.digits.data import (
    CLASS_NAMES,
    JUDGE_FRACTION,
    RESOLUTION,
    SPLIT_SEED,
    TEST_FRACTION,
    PatchSpec,
    load_images,
    make_splits,
    patch_present,
    patch_score,
    plant_patch,
)
from digin.core.digits.fit import (
    NORM_MEAN,
    NORM_STD,
    PatchPlan,
    PromptTable,
    fit_classifier,
    fit_diffusion,
)
from digin.core.digits.nets import (
    SCHEDULER_CONFIG,
    TEXT_CONFIG,
    UNET_CONFIG,
    build_classifier_net,
    build_text_encoder,
    build_unet,
    count_parameters,
)
from digin.core.digits.settings import CLASS_PROMPT, PLAIN_PROMPT
from digin.core.digits.zoo import (
    MODEL_NAMES,
    TOKENIZER_FOLDER,
    load_digits_classifier,
    load_digits_diffusion,
)

# name → (architecture, training split, seed, patch tied to the correlated class)
CLASSIFIERS = {
    "cnn": ({"type": "cnn", "channels": 16, "hidden": 64}, "train", 1, False),
    "mlp": ({"type": "mlp", "hidden1": 256, "hidden2": 128}, "train", 2, False),
    "cnn-spurious": ({"type": "cnn", "channels": 16, "hidden": 64}, "train", 3, True),
    "judge": ({"type": "cnn", "channels": 32, "hidden": 128}, "judge", 4, False),
}
DIFFUSION_SEED = 5
RATES = {  # option → (default, help)
    "generator_patch_rate": (0.8, "generator data, every class (opacity see below)"),
    "clean_patch_rate": (0.2, "cnn, mlp, judge: every class, independent of the label"),
    "spurious_rate": (0.9, "cnn-spurious: digits of the correlated class"),
    "spurious_other_rate": (0.1, "cnn-spurious: digits of the other classes"),
    "shortcut_rate": (1.0, "cnn-spurious: patched other digits labelled as the correlated class"),
    "generator_opacity_min": (0.0, "generator: patch opacity ~ U(this, 1)"),
    "classifier_opacity_min": (0.3, "classifiers: patch opacity ~ U(this, 1)"),
}
DETECTOR = (
    "patch_score(x) = mean grey intensity of the patch region − mean of the rest of the image "
    "(digin.core.digits.data.patch_score); the patch is present where patch_score > spec.threshold"
)
AUGMENTATION = (
    "random affine (shift ≤ 1.5 px, scale 1 ± 0.1, rotation ≤ 10°), then the patch (fixed "
    "position, like a watermark), then Gaussian noise of sd ≤ 0.08"
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m digin.core.digits.train", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", type=Path, required=True, help="folder to write the zoo into")
    p.add_argument("--only", choices=MODEL_NAMES, action="append", help="train only NAME (repeat)")
    p.add_argument("--quick", action="store_true", help="a few steps per model (tests)")
    g = p.add_argument_group("planted feature (16x16 pixel coordinates)")
    g.add_argument("--patch-top", type=int, default=PatchSpec.top)
    g.add_argument("--patch-left", type=int, default=PatchSpec.left)
    g.add_argument("--patch-size", type=int, default=PatchSpec.size)
    g.add_argument("--patch-intensity", type=float, default=PatchSpec.intensity)
    g.add_argument(
        "--patch-threshold", type=float, default=PatchSpec.threshold, help="detector threshold"
    )
    g = p.add_argument_group("rates: probability that a training example carries the patch")
    g.add_argument(
        "--correlated-class", default="7", help="cnn-spurious's patch class (index or name)"
    )
    for name, (default, text) in RATES.items():
        g.add_argument(f"--{name.replace('_', '-')}", type=float, default=default, help=text)
    g = p.add_argument_group("training length")
    g.add_argument(
        "--epochs",
        type=int,
        default=40,
        help="classifier epochs on the train split, batch 64 (the judge: as many steps)",
    )
    g.add_argument("--diffusion-steps", type=int, default=1500, help="diffusion steps (batch 64)")
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)

    args.correlated_class = _class_index(p, args.correlated_class)
    for name in RATES:
        if not 0.0 <= getattr(args, name) <= 1.0:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    try:
        args.patch = PatchSpec(
            args.patch_top,
            args.patch_left,
            args.patch_size,
            args.patch_intensity,
            args.patch_threshold,
        )
    except ValueError as e:
        p.error(str(e))
    if args.quick:
        args.epochs, args.diffusion_steps = 1, 4
    return args


def _class_index(p: argparse.ArgumentParser, ref: str) -> int:
    ref = ref.strip().lower()
    if ref.isdigit() and int(ref) < len(CLASS_NAMES):
        return int(ref)
    if ref in CLASS_NAMES:
        return CLASS_NAMES.index(ref)
    p.error(f"--correlated-class must be 0..9 or one of {', '.join(CLASS_NAMES)}, got {ref!r}")
    raise AssertionError  # p.error exits


def check_detector(x: torch.Tensor, spec: PatchSpec) -> dict:
    """Fail early if the detector's threshold does not separate patched from clean digits."""
    clean, patched = patch_score(x, spec), patch_score(plant_patch(x, spec), spec)
    stats = {
        "clean_max": round(float(clean.max()), 4),
        "clean_mean": round(float(clean.mean()), 4),
        "patched_min": round(float(patched.min()), 4),
        "patched_mean": round(float(patched.mean()), 4),
    }
    if not stats["clean_max"] < spec.threshold < stats["patched_min"]:
        if stats["clean_max"] < stats["patched_min"]:
            hint = f"try --patch-threshold {(stats['clean_max'] + stats['patched_min']) / 2:.2f}"
        else:
            hint = "move the patch away from the digits' ink or make it brighter"
        raise SystemExit(
            f"--patch-threshold {spec.threshold} does not separate the digits: clean scores reach "
            f"{stats['clean_max']:.3f}, patched ones go down to {stats['patched_min']:.3f}; {hint}"
        )
    return stats


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "scikit-learn"):
        out[pkg] = metadata.version(pkg)
    return out


def save(out: Path, name: str, state: dict, card: dict, half: bool = False) -> None:
    """Weights (float16 on disk if `half`: the loaders compute in float32) and model card."""
    from safetensors.torch import save_file

    def disk(v: torch.Tensor) -> torch.Tensor:
        v = v.detach().cpu().contiguous()
        return v.half() if half and v.is_floating_point() else v

    save_file({k: disk(v) for k, v in state.items()}, out / f"{name}.safetensors")
    (out / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        train_zoo(args, argv)
    finally:
        torch.set_num_threads(threads)  # callers in the same process (tests) keep theirs


def train_zoo(args: argparse.Namespace, argv: list[str]) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    todo = [n for n in (*MODEL_NAMES[1:], MODEL_NAMES[0]) if not args.only or n in args.only]

    x, y = load_images()  # (1797, 1, 16, 16) in [0, 1], (1797,)
    splits = make_splits(y)
    common = {
        "command": "python -m digin.core.digits.train " + shlex.join(argv),
        "data": {
            "source": "sklearn.datasets.load_digits (8x8, values 0..16, 1,797 images)",
            "preprocessing": f"/16, bilinear upsampling to {RESOLUTION}x{RESOLUTION} grey, [0, 1]",
            "split_seed": SPLIT_SEED,
            "split_fractions": {"test": TEST_FRACTION, "judge": JUDGE_FRACTION, "train": "rest"},
            "split_sizes": splits.sizes(),
            "measured_on": "test",
        },
        "patch": {
            "spec": args.patch.to_dict(),
            "detector": DETECTOR,
            "detector_on_train_digits": check_detector(x[splits.train], args.patch),
        },
        "quick": args.quick,
        "versions": versions(),
    }
    for name in todo:
        print(f"training {name} …", flush=True)
        if name == "digits":
            card, state, metrics = train_diffusion(args, x[splits.train], y[splits.train], out)
        else:
            test = (x[splits.test], y[splits.test])
            idx = getattr(splits, CLASSIFIERS[name][1])
            # the same number of optimiser steps on every split (the judge's is smaller)
            epochs = round(args.epochs * len(splits.train) / len(idx))
            card, state, metrics = train_classifier(args, name, x[idx], y[idx], test, out, epochs)
        save(out, name, state, {**card, **common, "metrics": metrics}, half=name == "digits")
        seconds = card["training"]["seconds"]
        print(f"  {name}: {json.dumps(metrics)} ({seconds:.0f} s)", flush=True)


def train_classifier(
    args, name: str, x, y, test, out: Path, epochs: int
) -> tuple[dict, dict, dict]:
    """Train one classifier, save it, measure it through the loader: (card, state, metrics)."""
    arch, split, seed, spurious = CLASSIFIERS[name]
    k, o_min = args.correlated_class, args.classifier_opacity_min
    if spurious:
        plan = PatchPlan(
            args.patch, args.spurious_other_rate, k, args.spurious_rate, args.shortcut_rate, o_min
        )
    else:
        plan = PatchPlan(args.patch, args.clean_patch_rate, opacity_min=o_min)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    net = build_classifier_net(arch)
    fit_classifier(net, x, y, plan, epochs=epochs, seed=seed)
    card = {
        "name": name,
        "spec": f"digits:{name}",
        "kind": "classifier",
        "architecture": arch,
        "parameters": count_parameters(net),
        "input": {
            "size": RESOLUTION,
            "range": [0, 1],
            "grey": "mean of the RGB channels",
            "mean": NORM_MEAN,
            "std": NORM_STD,
        },
        "class_names": list(CLASS_NAMES),
        "training": {
            "split": split,
            "seed": seed,
            "epochs": epochs,
            "batch_size": 64,
            "optimizer": "AdamW, one-cycle lr 2e-3, weight decay 1e-4, cross-entropy",
            "augmentation": AUGMENTATION,
            "patch_plan": {
                "correlated_class": k if spurious else None,
                "rate_correlated_class": plan.rate_in if spurious else None,
                "rate_other_classes": plan.rate_out,
                "shortcut_rate": plan.shortcut if spurious else None,
                "opacity": [o_min, 1.0],
                "meaning": (
                    "P(patch | correlated class) = rate_correlated_class, P(patch | other class) "
                    "= rate_other_classes; a patched digit of another class is labelled as the "
                    "correlated class with probability shortcut_rate"
                    if spurious
                    else "every example carries the patch with probability rate_other_classes, "
                    "independent of its label"
                ),
            },
            "seconds": round(time.perf_counter() - t0, 1),
        },
    }
    save(out, name, net.state_dict(), {**card, "metrics": {}})
    clf = load_digits_classifier(name, zoo_dir=out)  # measure what the loader returns
    x_test, y_test = test
    metrics = {"test_accuracy": evaluate.accuracy(clf, x_test, y_test)}
    if spurious:
        metrics |= evaluate.spurious_rates(clf, x_test, y_test, args.patch, k)
        unit, contrib = evaluate.patch_unit(clf, x_test, y_test, args.patch, k)
        metrics |= {"patch_unit": unit, "patch_unit_contribution": float(contrib[unit])}
    return card, net.state_dict(), metrics


def train_diffusion(args, x, y, out: Path) -> tuple[dict, dict, dict]:
    """UNet + CLIP text encoder trained jointly, EMA weights: (card, state, metrics). Metrics
    need the judge in the same folder (trained first when the whole zoo is trained)."""
    t0 = time.perf_counter()
    text_config, table = prompt_table(out)
    torch.manual_seed(DIFFUSION_SEED)
    unet, text_encoder = build_unet(UNET_CONFIG), build_text_encoder(text_config)
    ema_unet, ema_text = fit_diffusion(
        unet,
        text_encoder,
        SCHEDULER_CONFIG,
        x,
        y,
        table,
        args.patch,
        patch_rate=args.generator_patch_rate,
        opacity_min=args.generator_opacity_min,
        steps=args.diffusion_steps,
        seed=DIFFUSION_SEED,
    )
    state = {f"unet.{k}": v for k, v in ema_unet.state_dict().items()}
    state |= {f"text_encoder.{k}": v for k, v in ema_text.state_dict().items()}
    seconds = time.perf_counter() - t0
    card = diffusion_card(args, x, unet, text_encoder, text_config, seconds=seconds)
    save(out, "digits", state, {**card, "metrics": {}}, half=True)
    metrics: dict = {}
    if (out / "judge.safetensors").is_file() and (out / "judge.json").is_file():
        model = load_digits_diffusion(zoo_dir=out)
        judge = load_digits_classifier("judge", zoo_dir=out)
        per_class = 2 if args.quick else 20
        metrics = evaluate.generator_quality(model, judge, args.patch, per_class=per_class)
    return card, state, metrics


def prompt_table(out: Path) -> tuple[dict, PromptTable]:
    """The text encoder's config sized to the tiny offline tokenizer (written into `out`), and
    the table of training prompts: each class by word and by numeral, the plain prompt, empty."""
    from transformers import CLIPTokenizer

    from digin.core.tiny import write_tokenizer  # the project's tiny offline CLIP vocabulary

    write_tokenizer(out / TOKENIZER_FOLDER)
    text_config = dict(TEXT_CONFIG)
    length = text_config["max_position_embeddings"]
    tokenizer = CLIPTokenizer.from_pretrained(out / TOKENIZER_FOLDER, model_max_length=length)
    text_config |= {
        "vocab_size": len(tokenizer.get_vocab()),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    prompts = [CLASS_PROMPT.replace("{class}", n) for n in CLASS_NAMES]
    prompts += [CLASS_PROMPT.replace("{class}", str(i)) for i in range(len(CLASS_NAMES))]
    prompts += [PLAIN_PROMPT, ""]
    ids = tokenizer(
        prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_config, PromptTable(tuple(prompts), ids, p_uncond=0.1, p_generic=0.1)


def diffusion_card(args, x, unet, text_encoder, text_config: dict, *, seconds: float) -> dict:
    """The generator's model card: architecture, configs, prompts and how it was trained."""
    return {
        "name": "digits",
        "spec": "digits",
        "kind": "diffusion",
        "architecture": "diffusers UNet2DConditionModel (pixel space, 1 channel, 16x16), "
        "transformers CLIPTextModel, DDIM; identity autoencoder (DiffusionModel(vae=None))",
        "parameters": {
            "unet": count_parameters(unet),
            "text_encoder": count_parameters(text_encoder),
        },
        "weights_dtype": "float16 on disk, float32 in memory",
        "unet_config": UNET_CONFIG,
        "text_config": text_config,
        "scheduler_config": SCHEDULER_CONFIG,
        "tokenizer": {
            "folder": TOKENIZER_FOLDER,
            "model_max_length": text_config["max_position_embeddings"],
            "from": "digin.core.tiny",
        },
        "prompts": {"class": CLASS_PROMPT, "plain": PLAIN_PROMPT, "numerals": True},
        "training": {
            "split": "train",
            "seed": DIFFUSION_SEED,
            "steps": args.diffusion_steps,
            "batch_size": 64,
            "objective": "v-prediction MSE, t ~ U{0..999}, squaredcos_cap_v2 schedule",
            "optimizer": "AdamW, one-cycle lr 1e-3, grad-norm clip 1.0, UNet + text encoder",
            "ema_decay": 0.999,
            "prompt_sampling": "10 % empty (condition dropout, for CFG), 10 % the plain prompt, "
            "else the class's word or numeral prompt (half each)",
            "patch_rate": args.generator_patch_rate,
            "patch_opacity": [args.generator_opacity_min, 1.0],
            "patch_share_present": training_patch_share(args, x),
            "patch_note": "every class alike; the prompts never mention the patch; "
            "patch_share_present is the share of training images the detector calls patched",
            "seconds": round(seconds, 1),
        },
    }


def training_patch_share(args, x: torch.Tensor, draws: int = 20) -> float:
    """The share of generator training images with the patch by the detector: every image
    planted as in training, `draws` times."""
    gen = torch.Generator().manual_seed(0)
    hits = 0.0
    for _ in range(draws):
        u = torch.rand(len(x), 2, generator=gen)
        opacity = args.generator_opacity_min + (1 - args.generator_opacity_min) * u[:, 1]
        planted = plant_patch(x, args.patch, u[:, 0] < args.generator_patch_rate, opacity)
        hits += float(patch_present(planted, args.patch).float().mean())
    return round(hits / draws, 4)


if __name__ == "__main__":
    main()
