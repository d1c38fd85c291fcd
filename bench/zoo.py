"""Quality bars of the bundled digits zoo: figures, and each bar's verdict.

1. Test accuracy of the classifiers (bar: ≥ 95 % for cnn, mlp, judge; ≥ 90 % clean accuracy for
   cnn-spurious) and how often cnn-spurious predicts its correlated class on patched test digits
   of the other classes (bar: ≥ 90 %).
2. The generator: plain class-conditional DDIM + CFG samples (word and numeral prompts); how often
   the judge recognises the prompted digit (bar: ≥ 85 %) and the share with the patch (bar:
   roughly the training share; we report it against that share).
3. The semantic jobs of `examples/*_digits.json` (the zoo's guidance settings) with more items
   than the tests use: judge agreement (guided, bar ≥ 90 %) and patch rate (disagreement and
   neuron, bar ≥ 80 %, against the unguided rate), with their run times.
4. Neural PCA and the spurious score: |r| of a top-3 component of cnn-spurious with the
   planted patch over the train digits of its correlated class, half patched (bar ≥ 0.8;
   digits:cnn for contrast), the patch rate of that component's `pca_component` visualisations
   (bar ≥ 80 %), and the AUC of p(class) separating real digits of the class from patched other
   digits (bars: ≤ 0.7 for cnn-spurious, ≥ 0.9 for cnn).

The correlated class, the patch and the patch unit are read from the zoo folder's model cards
(cnn-spurious.json: `training.patch_plan`, `patch.spec`, `metrics.patch_unit`), so a zoo trained
with another class or patch is measured against its own answers; the examples' settings
otherwise.

    python bench/zoo.py [--zoo DIR] [--out bench/results/zoo.json] [--per-class 50] [--items 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from digin.core.digits import evaluate
from digin.core.digits.data import CLASS_NAMES, load_images, make_splits
from digin.core.digits.semantic import judge_agreement, patch_rates
from digin.core.digits.zoo import ZOO_ENV, card_patch, read_card, resolve_zoo_dir
from digin.core.jobs import ModelCache
from digin.core.kinds import run_job

ROOT = Path(__file__).resolve().parent.parent


def bar(value: float, threshold: float) -> dict:
    return {"value": round(value, 4), "bar": threshold, "pass": value >= threshold}


def pca_and_spurious(cache: ModelCache, spec, k: int, items: int) -> tuple[dict, dict]:
    """Section 4: neural PCA of cnn-spurious for its correlated class k (|r| of the best of the
    top three components with the planted patch; digits:cnn on the same images for contrast),
    that component's `pca_component` visualisations (patch rate, guided vs. unguided), and the
    spurious score of k (patched other digits vs. real digits k) of each classifier, with
    the mean over all ten classes for reference. Returns (figures, bars)."""
    import tempfile

    from digin.core.output import write_outputs

    def example(kind: str) -> dict:
        return json.loads((ROOT / "examples" / f"{kind}_digits.json").read_text())

    out: dict = {"neural_pca": {}, "spurious_score": {}}
    bars: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for clf in ("digits:cnn-spurious", "digits:cnn"):
            params = example("neural_pca") | {"classifier": clf, "class": k}
            params["visualization"]["components"] = 0
            t0 = time.perf_counter()
            result = run_job("neural_pca", params, cache=cache)
            r = result.data["patch_correlation"]
            best = max(range(3), key=lambda l: abs(r[l]))
            out["neural_pca"][clf] = {
                "images": result.data["num_images"],
                "best_top3_component": best,
                "abs_r": abs(r[best]),
                "explained_variance_ratio_top3": result.data["pca"]["explained_variance_ratio"][:3],
                "seconds": round(time.perf_counter() - t0, 2),
            }
            if clf == "digits:cnn-spurious":
                bars["neural_pca: |r| of a top-3 component with the patch"] = bar(abs(r[best]), 0.8)
                write_outputs(result, tmp)
                params = example("pca_component") | {
                    "pca": str(Path(tmp) / "result.json"), "components": [best],
                    "images_per_class": 10 * items,
                }  # fmt: skip
                t0 = time.perf_counter()
                job = run_job("pca_component", params, seed=1000, cache=cache, max_batch=32)
                guided, unguided = patch_rates(job, spec)
                out["pca_component"] = {
                    "component": best,
                    "items": len(job.items),
                    "rate": guided,
                    "unguided_rate": unguided,
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                bars["pca_component: patch present"] = bar(guided, 0.80) | {
                    "unguided": round(unguided, 4)
                }
    for clf in ("digits:cnn-spurious", "digits:cnn", "digits:mlp"):
        t0 = time.perf_counter()
        one = run_job("spurious_score", example("spurious_score") | {"classifier": clf,
                      "classes": [k]}, cache=cache)  # fmt: skip
        every = run_job("spurious_score", example("spurious_score") | {"classifier": clf,
                        "classes": list(range(10))}, cache=cache)  # fmt: skip
        (score,) = one.data["classes"]
        out["spurious_score"][clf] = {
            "class": score["class_name"],
            "auc_correlated_class": score["auc"],
            "mean_p_class": score["mean_p_class"],
            "mean_p_spurious": score["mean_p_spurious"],
            "mean_auc_all_classes": every.data["mean_auc"],
            "seconds": round(time.perf_counter() - t0, 2),
        }
    auc = out["spurious_score"]
    name = CLASS_NAMES[k]
    bars[f"spurious_score: AUC of {name}, cnn-spurious (at most)"] = {
        "value": round(auc["digits:cnn-spurious"]["auc_correlated_class"], 4), "bar": 0.7,
        "pass": auc["digits:cnn-spurious"]["auc_correlated_class"] <= 0.7,
    }  # fmt: skip
    bars[f"spurious_score: AUC of {name}, cnn"] = bar(
        auc["digits:cnn"]["auc_correlated_class"], 0.9
    )
    return out, bars


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--zoo", type=Path, default=None, help="zoo folder (default: $DIGIN_ZOO_DIR or core/zoo)"
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "zoo.json")
    p.add_argument(
        "--per-class", type=int, default=50, help="generator samples per class and prompt form"
    )
    p.add_argument(
        "--items", type=int, default=3, help="images per class (guided) / ×10 items (others)"
    )
    args = p.parse_args()
    zoo = resolve_zoo_dir(args.zoo)
    os.environ[ZOO_ENV] = str(zoo)  # every digits spec of the examples reads this zoo
    cache = ModelCache()
    clf = {
        n: cache.classifier(f"digits:{n}", "cpu", "openai")
        for n in ("cnn", "mlp", "cnn-spurious", "judge")
    }
    model = cache.diffusion("digits", "cpu")
    card = read_card("cnn-spurious", zoo)
    spec, k = card_patch(card), card["training"]["patch_plan"]["correlated_class"]
    gen_card = read_card("digits", zoo)
    results: dict = {
        "zoo": str(zoo),
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    bars: dict = {}

    # 1. classifiers
    x, y = load_images()
    test = make_splits(y).test
    acc = {n: evaluate.accuracy(c, x[test], y[test]) for n, c in clf.items()}
    rates = evaluate.spurious_rates(clf["cnn-spurious"], x[test], y[test], spec, k)
    results["classifiers"] = {"test_accuracy": acc, "spurious": rates, "correlated_class": k}
    for n in ("cnn", "mlp", "judge"):
        bars[f"{n} test accuracy"] = bar(acc[n], 0.95)
    bars["cnn-spurious clean accuracy"] = bar(rates["clean_accuracy"], 0.90)
    bars["cnn-spurious patched others → correlated class"] = bar(
        rates["patched_others_to_target"], 0.90
    )

    # 2. the generator
    t0 = time.perf_counter()
    gen = evaluate.generator_quality(model, clf["judge"], spec, per_class=args.per_class)
    gen["seconds"] = round(time.perf_counter() - t0, 1)
    gen["training_patch_share"] = gen_card["training"]["patch_share_present"]
    results["generator"] = gen
    bars["generator: judge recognises the prompted digit"] = bar(gen["judge_accuracy"], 0.85)
    share = gen["training_patch_share"]
    bars["generator: patch rate within ±50 % of the training share"] = {
        "value": round(gen["patch_rate"], 4), "bar": [share / 2, share * 1.5],
        "pass": share / 2 <= gen["patch_rate"] <= share * 1.5,
    }  # fmt: skip

    # 3. semantic jobs (the examples' settings, more items)
    semantic = {}
    for kind in ("guided", "disagreement", "neuron"):
        params = json.loads((ROOT / "examples" / f"{kind}_digits.json").read_text())
        params["images_per_class"] = args.items if kind == "guided" else 10 * args.items
        if kind == "disagreement":  # the zoo's correlated class and patch unit (its cards)
            params["classes"] = [k]
        elif kind == "neuron":
            params["neurons"] = [card["metrics"]["patch_unit"]]
        t0 = time.perf_counter()
        result = run_job(kind, params, seed=1000, cache=cache, max_batch=32)
        seconds = time.perf_counter() - t0
        if kind == "guided":
            guided, unguided = judge_agreement(result, clf["judge"])
            name, threshold = "guided: judge agrees with the target", 0.90
        else:
            guided, unguided = patch_rates(result, spec)
            name, threshold = f"{kind}: patch present", 0.80
        semantic[kind] = {
            "items": len(result.items),
            "rate": guided,
            "unguided_rate": unguided,
            "seconds": round(seconds, 1),
        }
        bars[name] = bar(guided, threshold) | {"unguided": round(unguided, 4)}
    # The same guided job from the class-free prompt: the generator alone draws the class rarely,
    # so here the classifier's guidance has to make the digit (a figure, no bar of the issue).
    params = json.loads((ROOT / "examples" / "guided_digits.json").read_text())
    params |= {"prompt": "a handwritten digit", "images_per_class": args.items}
    t0 = time.perf_counter()
    result = run_job("guided", params, seed=1000, cache=cache, max_batch=32)
    guided, unguided = judge_agreement(result, clf["judge"])
    semantic["guided_plain_prompt"] = {
        "items": len(result.items),
        "rate": guided,
        "unguided_rate": unguided,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    results["semantic"] = semantic

    # 4. neural PCA, its component visualisations, spurious scores
    results["pca_and_spurious"], pca_bars = pca_and_spurious(cache, spec, k, args.items)
    bars |= pca_bars
    results["bars"] = bars

    width = max(map(len, bars))
    for name, b in bars.items():
        extra = f"  (unguided {b['unguided']:.3f})" if "unguided" in b else ""
        verdict = "PASS" if b["pass"] else "FAIL"
        print(f"{name:<{width}}  {b['value']:.3f}  bar {b['bar']}  {verdict}{extra}")
    for kind, s in semantic.items():
        rates = f"rate {s['rate']:.3f} (unguided {s['unguided_rate']:.3f})"
        print(f"{kind}: {s['items']} items in {s['seconds']} s, {rates}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
