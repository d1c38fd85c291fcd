"""Classifier audits on the digits zoo (CPU): run time and verdicts.

An audit of every class of `digits:cnn-spurious` and of `digits:cnn` (the train digits, each
classifier's planted feature at its training rates; the default budget and thresholds), run
step after step in one process (`digin.core.audit.run_audit`), as the tests do. Figures: the time
of the ten class steps and of the follow-ups, the flagged classes (expected: the correlated class
of cnn-spurious's model card, and none for cnn), the AUC of the flagged component, and the share
of its `pca_component` visualisations with the card's patch (`patch_present`).

    python bench/audit.py [--out bench/results/audit.json] [--threads 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from digin.core.audit import run_audit
from digin.core.audit_params import AuditParams
from digin.core.context import RunContext
from digin.core.digits.data import CLASS_NAMES, patch_present
from digin.core.digits.zoo import card_patch, read_card
from digin.core.jobs import ModelCache

ROOT = Path(__file__).resolve().parent.parent


def timed_audit(cache: ModelCache, classifier: str) -> tuple[dict, float, float]:
    """(the audit's run, seconds of the class steps, seconds of the follow-ups)."""
    step_s: dict[str, float] = {"audit_class": 0.0, "follow_up": 0.0}
    ctx = RunContext(cache=cache, max_batch=32)
    t0 = time.perf_counter()
    run = run_audit(AuditParams.model_validate({"classifier": classifier}), ctx)
    total = time.perf_counter() - t0
    for key, data in run.files.items():
        if key.endswith("/result.json"):
            summary = json.loads(data)
            which = "audit_class" if summary["kind"] == "audit_class" else "follow_up"
            step_s[which] += summary["timings"]["total_s"]
    return {"run": run, "total_s": total}, step_s["audit_class"], step_s["follow_up"]


def verdict(run, card: dict) -> dict:
    report = run.report
    out: dict = {"flagged": report["flagged"]}
    if report["flagged"]:
        top = report["classes"][0]
        comp = next(c for c in top["components"] if c["component"] == top["component"])
        images = [np.asarray(Image.open(io.BytesIO(run.files[k])).convert("RGB"))
                  for k in comp["visualizations"]]  # fmt: skip
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
        out |= {
            "auc": top["auc"],
            "variance_share": top["variance_share"],
            "visualisations": len(images),
            "patch_rate": float(patch_present(x, card_patch(card)).float().mean()),
        }
    out["lowest_auc_unflagged"] = min(
        (r["min_auc"] for r in report["classes"] if not r["flagged"]), default=None
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "audit.json")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--repeat", type=int, default=3, help="runs per classifier (median time)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cache = ModelCache()
    card = read_card("cnn-spurious")
    expected = CLASS_NAMES[card["training"]["patch_plan"]["correlated_class"]]
    results: dict = {
        "device": "cpu",
        "threads": args.threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "expected_flagged": {"digits:cnn-spurious": [expected], "digits:cnn": []},
        "audits": {},
    }
    run_audit(AuditParams.model_validate({"classifier": "digits:cnn"}), RunContext(cache=cache))
    for classifier in ("digits:cnn-spurious", "digits:cnn"):  # after one warm-up audit
        runs = [timed_audit(cache, classifier) for _ in range(args.repeat)]
        totals = [r[0]["total_s"] for r in runs]
        results["audits"][classifier] = {
            **verdict(runs[-1][0]["run"], card),
            "total_s": round(statistics.median(totals), 3),
            "class_steps_s": round(statistics.median(r[1] for r in runs), 3),
            "follow_ups_s": round(statistics.median(r[2] for r in runs), 3),
            "runs_s": [round(t, 3) for t in totals],
        }
    for classifier, r in results["audits"].items():
        rate = f", patch in {r['patch_rate']:.0%} of its visualisations" if r["flagged"] else ""
        expected = results["expected_flagged"][classifier]
        steps = f"class steps {r['class_steps_s']:.2f} s, follow-ups {r['follow_ups_s']:.2f} s"
        print(f"{classifier}: flagged {r['flagged']} (expected {expected}){rate}; "
              f"{r['total_s']:.2f} s ({steps})")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
