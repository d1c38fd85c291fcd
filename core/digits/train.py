"""Train the digits zoo from fixed seeds: `python -m core.digits.train --out core/zoo`.

Writes `<name>.safetensors` + `<name>.json` (model card) per model (see core/digits/zoo.py for
the layout) and measures every model on the test split for its card. Order: the classifiers
(cnn, mlp, cnn-spurious, judge), then the diffusion model `digits`, whose card records how often
the judge of the same folder recognises the prompted digit in its samples.

The planted patch, the class it is correlated with and all rates are options; the defaults
produce the shipped zoo. `--only NAME` retrains one model; `--quick` trains a few steps (tests).
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

from core.digits import evaluate
from core.digits.data import (
    CLASS_NAMES,
    JUDGE_FRACTION,
    RESOLUTION,
    SPLIT_SEED,
    TEST_FRACTION,
    PatchSpec,
    load_images,
    make_splits,
    patch_score,
    plant_patch,
)
from core.digits.fit import (
    NORM_MEAN,
    NORM_STD,
    PatchPlan,
    PromptTable,
    fit_classifier,
    fit_diffusion,
)
from core.digits.nets import (
    SCHEDULER_CONFIG,
    TEXT_CONFIG,
    UNET_CONFIG,
    build_classifier_net,
    build_text_encoder,
    build_unet,
    count_parameters,
)
from core.digits.settings import CLASS_PROMPT, PLAIN_PROMPT
from core.digits.zoo import (
    MODEL_NAMES,
    TOKENIZER_FOLDER,
    load_digits_classifier,
    load_digits_diffusion,
)

# name → architecture, training split, seed, and whether the patch is tied to a class
CLASSIFIERS = {
    "cnn": ({"type": "cnn", "channels": 16, "hidden": 64}, "train", 1, False),
    "mlp": ({"type": "mlp", "hidden1": 256, "hidden2": 128}, "train", 2, False),
    "cnn-spurious": ({"type": "cnn", "channels": 16, "hidden": 64}, "train", 3, True),
    "judge": ({"type": "cnn", "channels": 32, "hidden": 128}, "judge", 4, False),
}
DIFFUSION_SEED = 5
DETECTOR = (
    "patch_score(x) = mean grey intensity of the patch region − mean of the rest of the image "
    "(core.digits.data.patch_score); the patch is present where patch_score > threshold"
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m core.digits.train", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", type=Path, required=True, help="folder to write the zoo into")
    p.add_argument(
        "--only", choices=MODEL_NAMES, action="append", help="train only this model (repeatable)"
    )
    p.add_argument("--quick", action="store_true", help="a few steps per model (tests)")
    g = p.add_argument_group("planted feature (16x16 pixel coordinates)")
    g.add_argument("--patch-top", type=int, default=PatchSpec.top)
    g.add_argument("--patch-left", type=int, default=PatchSpec.left)
    g.add_argument("--patch-size", type=int, default=PatchSpec.size)
    g.add_argument("--patch-intensity", type=float, default=PatchSpec.intensity)
    g.add_argument(
        "--patch-threshold",
        type=float,
        default=PatchSpec.threshold,
        help="patch_score above this = present",
    )
    g = p.add_argument_group("rates (probability that a training example carries the patch)")
    g.add_argument(
        "--correlated-class",
        default="7",
        help="class tied to the patch in cnn-spurious (index or name)",
    )
    g.add_argument(
        "--generator-patch-rate",
        type=float,
        default=0.2,
        help="every class, generator training data",
    )
    g.add_argument(
        "--clean-patch-rate",
        type=float,
        default=0.2,
        help="every class, cnn/mlp/judge (label-independent)",
    )
    g.add_argument(
        "--spurious-rate", type=float, default=0.9, help="correlated class, cnn-spurious"
    )
    g.add_argument(
        "--spurious-other-rate", type=float, default=0.1, help="other classes, cnn-spurious"
    )
    g.add_argument(
        "--shortcut-rate",
        type=float,
        default=0.9,
        help="patched other-class digits labelled as the correlated class",
    )
    g = p.add_argument_group("training length")
    g.add_argument("--epochs", type=int, default=40, help="classifier epochs")
    g.add_argument(
        "--diffusion-steps", type=int, default=3000, help="diffusion optimiser steps (batch 64)"
    )
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    args.correlated_class = _class_index(p, args.correlated_class)
    for name in (
        "generator_patch_rate",
        "clean_patch_rate",
        "spurious_rate",
        "spurious_other_rate",
        "shortcut_rate",
    ):
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
    if ref.strip().isdigit() and int(ref) < len(CLASS_NAMES):
        return int(ref)
    if ref.strip().lower() in CLASS_NAMES:
        return CLASS_NAMES.index(ref.strip().lower())
    p.error(f"--correlated-class must be 0..9 or one of {', '.join(CLASS_NAMES)}, got {ref!r}")
    raise AssertionError  # p.error exits


def check_detector(x: torch.Tensor, spec: PatchSpec) -> dict:
    """Fail early if the detector's threshold does not separate patched from clean digits."""
    clean, patched = patch_score(x, spec), patch_score(plant_patch(x, spec), spec)
    stats = {
        "clean_max": float(clean.max()),
        "clean_mean": float(clean.mean()),
        "patched_min": float(patched.min()),
        "patched_mean": float(patched.mean()),
    }
    if not stats["clean_max"] < spec.threshold < stats["patched_min"]:
        mid = (stats["clean_max"] + stats["patched_min"]) / 2
        raise SystemExit(
            f"--patch-threshold {spec.threshold} does not separate the digits: clean scores reach "
            f"{stats['clean_max']:.3f}, patched ones go down to {stats['patched_min']:.3f}"
            + (
                f"; try --patch-threshold {mid:.2f}"
                if stats["clean_max"] < stats["patched_min"]
                else "; move or brighten the patch"
            )
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
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    todo = [n for n in MODEL_NAMES[1:] + MODEL_NAMES[:1] if not args.only or n in args.only]

    x, y = load_images()  # (1797, 1, 16, 16) in [0, 1], (1797,)
    splits = make_splits(y)
    detector = check_detector(x[splits.train], args.patch)
    common = {
        "command": "python -m core.digits.train " + shlex.join(argv),
        "data": {
            "source": "sklearn.datasets.load_digits (8x8, values 0..16, 1,797 images)",
            "preprocessing": f"/16, bilinear upsampling to {RESOLUTION}x{RESOLUTION} grey, [0, 1]",
            "split_seed": SPLIT_SEED,
            "split_fractions": {"test": TEST_FRACTION, "judge": JUDGE_FRACTION, "train": "rest"},
            "split_sizes": splits.sizes(),
        },
        "patch": {
            "spec": args.patch.to_dict(),
            "detector": DETECTOR,
            "detector_on_train_digits": detector,
        },
        "quick": args.quick,
        "versions": versions(),
    }
    x_test, y_test = x[splits.test], y[splits.test]
    k = args.correlated_class

    for name in todo:
        t0 = time.perf_counter()
        print(f"training {name} …", flush=True)
        if name != "digits":
            arch, split, seed, spurious = CLASSIFIERS[name]
            idx = getattr(splits, split)
            if spurious:
                plan = PatchPlan(
                    args.patch, args.spurious_other_rate, k, args.spurious_rate, args.shortcut_rate
                )
            else:
                plan = PatchPlan(args.patch, args.clean_patch_rate)
            torch.manual_seed(seed)
            net = build_classifier_net(arch)
            fit_classifier(net, x[idx], y[idx], plan, epochs=args.epochs, seed=seed)
            seconds = time.perf_counter() - t0
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
                **common,
                "training": {
                    "split": split,
                    "seed": seed,
                    "epochs": args.epochs,
                    "batch_size": 64,
                    "optimizer": "AdamW, one-cycle lr 2e-3, weight decay 1e-4, cross-entropy",
                    "augmentation": "random affine (shift ≤ 1.5 px, scale 1 ± 0.1, rotation ≤ 10°), patch, Gaussian noise sd ≤ 0.08",
                    "patch_plan": {
                        "correlated_class": plan.target,
                        "rate_correlated_class": plan.rate_in if spurious else None,
                        "rate_other_classes": plan.rate_out,
                        "shortcut_rate": plan.shortcut if spurious else None,
                        "meaning": (
                            "P(patch | correlated class) = rate_correlated_class, P(patch | other) = rate_other_classes; "
                            "a patched digit of another class is labelled as the correlated class with probability shortcut_rate"
                            if spurious
                            else "every example carries the patch with probability rate_other_classes, independent of its label"
                        ),
                    },
                    "seconds": round(seconds, 1),
                },
            }
            save(out, name, net.state_dict(), {**card, "metrics": {}})
            clf = load_digits_classifier(name, zoo_dir=out)  # measure what the loader returns
            metrics = {
                "test_accuracy": evaluate.accuracy(clf, x_test, y_test),
                "test_split_size": len(y_test),
            }
            if spurious:
                metrics |= evaluate.spurious_rates(clf, x_test, y_test, args.patch, k)
                unit, contrib = evaluate.patch_unit(clf, x_test, y_test, args.patch, k)
                metrics["patch_unit"] = unit
                metrics["patch_unit_contribution"] = float(contrib[unit])
            save(out, name, net.state_dict(), {**card, "metrics": metrics})
        else:
            card, state, seconds = train_diffusion(args, x[splits.train], y[splits.train], out)
            card = {**card, **common}
            card["training"]["seconds"] = round(seconds, 1)
            save(out, name, state, {**card, "metrics": {}}, half=True)
            metrics = {}
            judge_files = [out / "judge.safetensors", out / "judge.json"]
            if all(f.is_file() for f in judge_files):
                model = load_digits_diffusion(zoo_dir=out)
                judge = load_digits_classifier("judge", zoo_dir=out)
                metrics = evaluate.generator_quality(
                    model, judge, args.patch, per_class=2 if args.quick else 20
                )
            save(out, name, state, {**card, "metrics": metrics}, half=True)
        print(f"  {name}: {json.dumps(metrics)} ({seconds:.0f} s)", flush=True)


def train_diffusion(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, out: Path):
    """UNet + CLIP text encoder, trained jointly; returns (card, EMA state dict, seconds)."""
    from transformers import CLIPTokenizer

    from core.tiny import _write_tokenizer  # the project's tiny offline CLIP vocabulary

    t0 = time.perf_counter()
    _write_tokenizer(out / TOKENIZER_FOLDER)
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
    table = PromptTable(tuple(prompts), ids, p_uncond=0.1, p_generic=0.1)

    torch.manual_seed(DIFFUSION_SEED)
    unet, text_encoder = build_unet(UNET_CONFIG), build_text_encoder(text_config)
    ema_unet, ema_text = fit_diffusion(
        unet, text_encoder, SCHEDULER_CONFIG, x, y, table, args.patch,
        patch_rate=args.generator_patch_rate, steps=args.diffusion_steps, seed=DIFFUSION_SEED,
    )  # fmt: skip
    state = {f"unet.{k}": v for k, v in ema_unet.state_dict().items()}
    state |= {f"text_encoder.{k}": v for k, v in ema_text.state_dict().items()}
    card = {
        "name": "digits",
        "spec": "digits",
        "kind": "diffusion",
        "architecture": "diffusers UNet2DConditionModel (pixel space, 1 channel, 16x16) + transformers CLIPTextModel",
        "parameters": {
            "unet": count_parameters(unet),
            "text_encoder": count_parameters(text_encoder),
        },
        "unet_config": UNET_CONFIG,
        "text_config": text_config,
        "scheduler_config": SCHEDULER_CONFIG,
        "weights_dtype": "float16 on disk, float32 in memory",
        "tokenizer": {
            "folder": TOKENIZER_FOLDER,
            "model_max_length": length,
            "source": "core.tiny (byte-level CLIP BPE)",
        },
        "prompts": {"class": CLASS_PROMPT, "plain": PLAIN_PROMPT, "numerals": True},
        "training": {
            "split": "train",
            "seed": DIFFUSION_SEED,
            "steps": args.diffusion_steps,
            "batch_size": 64,
            "objective": "v-prediction MSE, t ~ U{0..999}, cosine (squaredcos_cap_v2) schedule",
            "optimizer": "AdamW, one-cycle lr 1e-3, grad-norm clip 1.0; UNet and text encoder jointly",
            "ema_decay": 0.999,
            "prompt_sampling": "10 % empty (condition dropout, for CFG), 10 % the plain prompt, else word or numeral prompt (half each)",
            "patch_rate": args.generator_patch_rate,
            "patch_note": "every class alike; the prompts never mention the patch",
        },
    }
    return card, state, time.perf_counter() - t0


if __name__ == "__main__":
    main()
