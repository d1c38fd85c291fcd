"""bench/gpu.py end to end in its --smoke mode (3 DDIM steps, 2 iterations, B = 1 and 2, the
reference and the optimised preset, an ablation), on the tiny SD pipeline at 64 px and timm's tiny
test_resnet, so that it fits a test's time on a 2-core CPU. The full-size archs' smoke run
(`make gpu-smoke`, bench/gpu_run.sh --smoke) takes far longer on such a machine and is run by
hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_benchmark_runs_end_to_end_in_smoke_mode(tiny_models, tmp_path):
    out = tmp_path / "gpu.json"
    cmd = [
        sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke",
        "--diffusion", tiny_models["sd"], "--resolution", "64",
        "--classifier", "test_resnet", "--out", str(out),
        "--configs", "reference", "optimised", "optimised+channels_last",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["machine"]["device"] == "cpu"
    assert result["settings"]["ddim_steps"] == 3 and result["settings"]["iterations"] == 2
    runs = {(r["config"], r["batch"]) for r in result["rows"]}
    assert runs == {(c, b) for c in ("reference", "optimised") for b in (1, 2)} | {
        ("optimised+channels_last", 1)
    }
    for row in result["rows"]:
        assert row["resolution"] == 64
        assert row["s_per_iteration"] > 0 and row["images_per_hour"] > 0
        assert row["peak_gib"] >= row["peak_above_start_gib"] > 0
        assert row["tflop_per_iteration"] > 0 and row["fraction_of_bf16_peak"] > 0
    flops = result["per_arch"][tiny_models["sd"]]["flops_per_item"]
    # the optimised preset recomputes the decoder block by block: one more decoder forward
    plain, blocks = flops["checkpointed"], flops["checkpointed, decoder blocks recomputed"]
    assert blocks["decode_train"] > plain["decode_train"]
    assert blocks["unet_train"] == plain["unet_train"]
    profile = result["per_arch"][tiny_models["sd"]]["profile"]
    assert profile["busy_fraction"] > 0 and profile["top"]
    assert (out.parent / profile["table_file"]).read_text().count("\n") > 3
    # the memory line through B = 1, 2 predicts a largest batch on the CPU (not run there)
    fits = result["per_arch"][tiny_models["sd"]]["batch_fits"]
    assert set(fits) == {"reference", "optimised"}
    assert all(f["largest_batch_predicted"] >= 0 for f in fits.values())
    summary = result["summary"][tiny_models["sd"]]
    assert summary["speedup_images_per_hour"] > 0 and summary["peak_ratio_B1"] > 0
    assert "optimised / reference images per hour" in proc.stdout
