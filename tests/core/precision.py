"""Where and in what precision the digits semantic tests run.

`DIGIN_TEST_PRECISION=bf16` (or fp16) runs them with the diffusion model's weights stored and run
in that dtype (the `optimised` preset's numerics), with the classifier losses in fp32 (the pass
rates must be the same in bf16 as in fp32; bench/gpu_run.sh runs both on a GPU). Unset or
`fp32`: the params as written. `DIGIN_TEST_DEVICE` (default cpu) is the device the jobs run on."""

from __future__ import annotations

import os

PRECISION = os.environ.get("DIGIN_TEST_PRECISION", "fp32")
DEVICE = os.environ.get("DIGIN_TEST_DEVICE", "cpu")
if PRECISION not in ("fp32", "bf16", "fp16"):
    raise ValueError(f"DIGIN_TEST_PRECISION must be fp32, bf16 or fp16, got {PRECISION!r}")


def with_precision(params: dict) -> dict:
    """`params` with its guidance precision set to DIGIN_TEST_PRECISION (as given for fp32)."""
    if PRECISION == "fp32":
        return params
    return {**params, "guidance": {**params.get("guidance", {}), "precision": PRECISION}}
