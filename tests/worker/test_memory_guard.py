"""The memory guard of CPU workers (docs/architecture.md §8.10, `digin.worker.memory`): the
limit each pool process gets, the failure code of an allocation beyond it, and a real process
under a real limit that fails one job with `resource_limit` and runs the next."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from digin.service.settings import WORKER_MEMORY_SHARE, fresh_settings
from digin.worker.execution import ClaimedJob, classify
from digin.worker.memory import MIN_LIMIT_MB, memory_limit_mb, physical_memory_bytes
from tests.worker.helpers import ROOT

# 64 digits at 64 px in one batch, without checkpointing: about 5.6 GB of data segment at its
# peak (measured), inside every params bound and the default cost cap
BIG = {"classes": [3], "images_per_class": 64, "resolution": 64,
       "guidance": {"iterations": 1, "ddim_steps": 1, "loss_steps": 1, "checkpointing": False,
                    "max_batch": 64}}  # fmt: skip
SMALL = {"classes": [7], "guidance": {"iterations": 2}}
LIMIT_MB = 2500  # a torch process with the digits zoo loaded: about 1.1 GB


def job() -> ClaimedJob:
    return ClaimedJob(uuid.uuid4(), 1, 3, "guided", {}, 0, "interactive", 0, "t", uuid.uuid4())


def test_the_limit_of_a_pool_process():
    settings = fresh_settings()
    total = physical_memory_bytes()
    assert total is not None and total > 0
    share = int(total * WORKER_MEMORY_SHARE / 4) // 2**20
    assert memory_limit_mb(settings, device="cpu", processes=4) == max(MIN_LIMIT_MB, share)
    assert memory_limit_mb(settings, device="cuda", processes=1) is None  # GPU workers: off
    assert memory_limit_mb(settings, device="cuda:1", processes=1) is None
    given = fresh_settings(worker_memory_limit_mb=3000)
    assert memory_limit_mb(given, device="cpu", processes=4) == 3000
    assert memory_limit_mb(given, device="cuda", processes=1) == 3000  # asked for: applied
    off = fresh_settings(worker_memory_limit_mb=0)
    assert memory_limit_mb(off, device="cpu", processes=1) is None


@pytest.mark.parametrize(
    "exc",
    [
        MemoryError(),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 4294967296 bytes. Error code 12 (Cannot allocate memory)"
        ),
        RuntimeError("std::bad_alloc"),
    ],
)
def test_a_failed_host_allocation_is_a_resource_limit(exc):
    failure = classify(exc, job())
    assert (failure.action, failure.code) == ("fail", "resource_limit")
    assert "more memory" in failure.message
    assert not failure.error()["retryable"]


def test_other_runtime_errors_stay_internal():
    assert classify(RuntimeError("shape mismatch"), job()).code == "internal"


SCRIPT = """
import json, resource, sys, uuid
import torch
torch.set_num_threads(1)
from digin.core.kinds import run_job
from digin.worker.execution import ClaimedJob, classify
from digin.worker.memory import apply_memory_limit, release_memory

big, small, limit = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
run_job("guided", small)  # models loaded, the process at its usual size
assert apply_memory_limit(limit) == limit
job = ClaimedJob(uuid.uuid4(), 1, 3, "guided", big, 0, "interactive", 0, "t", uuid.uuid4())
out = {}
try:
    run_job("guided", big, max_batch=64)
    out["big"] = "succeeded"
except Exception as exc:
    out["big"] = classify(exc, job).code
release_memory()
out["small"] = len(run_job("guided", small).items)
out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(json.dumps(out))
"""


def test_a_process_under_its_limit_fails_the_big_job_and_runs_the_next():
    """A real process, the worker's own limit and classification: the job that needs more
    fails with resource_limit, and the same process then runs a job that fits."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(BIG), json.dumps(SMALL), str(LIMIT_MB)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["big"] == "resource_limit" and out["small"] == 1
