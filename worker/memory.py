"""The memory guard of a worker's pool processes (docs/architecture.md §8.10).

On a GPU, a job that does not fit raises torch's OutOfMemoryError (`gpu_oom`) and the process
lives on. On a CPU nothing says no before the machine is out of memory and the kernel kills a
process, often the worker itself. So each pool process of a CPU worker limits its own data
segment (`RLIMIT_DATA`: heap and private anonymous mappings, which every tensor lives in) when it
starts: an allocation beyond the limit fails at once with MemoryError, or torch's "can't
allocate memory" RuntimeError; `digin.worker.execution.classify` fails the job with
`resource_limit`, its tensors are released, and the process takes the next job.

`DIGIN_WORKER_MEMORY_LIMIT_MB` sets the limit; unset, a CPU worker's processes share
`WORKER_MEMORY_SHARE` of the machine's memory (the container's limit where lower), a GPU
worker has none (its jobs live in GPU memory, and the CUDA runtime maps large address ranges);
0 turns it off. The limit counts the mapped data segment, a little more than the resident
memory: a torch process starts at about 0.8 GB.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import resource
from pathlib import Path

from digin.service.settings import WORKER_MEMORY_SHARE, Settings

log = logging.getLogger("digin.worker")

MIN_LIMIT_MB = 1024  # below this a pool process cannot even load torch and the digits zoo
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def physical_memory_bytes() -> int | None:
    """The memory this machine gives its processes: the physical memory, or the container's
    cgroup limit where lower; None if unknown."""
    found: list[int] = []
    with contextlib.suppress(ValueError, OSError, AttributeError):
        found.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    for path in _CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # 'max' or a huge number: no limit
            found.append(int(text))
    return min(found) if found else None


def memory_limit_mb(settings: Settings, *, device: str, processes: int) -> int | None:
    """The data-segment limit of one pool process in MB, or None for none: the setting, else
    on CPU workers WORKER_MEMORY_SHARE of the memory divided among the `processes`."""
    if settings.worker_memory_limit_mb is not None:
        return settings.worker_memory_limit_mb or None  # 0: off
    if not device.startswith("cpu"):
        return None
    total = physical_memory_bytes()
    if total is None:
        return None
    share = int(total * WORKER_MEMORY_SHARE / max(1, processes)) // 2**20
    return max(MIN_LIMIT_MB, share)


def apply_memory_limit(limit_mb: int | None) -> int | None:
    """Limit this process's data segment to `limit_mb` MB (the soft limit; the hard limit is
    left as it is); returns the limit set, or None."""
    if limit_mb is None:
        return None
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    soft = limit_mb * 2**20
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    return soft // 2**20


def current_limit_mb() -> int | None:
    """This process's data-segment limit in MB, or None for none."""
    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    return None if soft == resource.RLIM_INFINITY else soft // 2**20


def is_memory_exhausted(exc: BaseException) -> bool:
    """Whether `exc` is an allocation that failed for want of host memory: MemoryError (Python,
    numpy), torch's CPU allocator ("can't allocate memory"), or a C++ std::bad_alloc."""
    if isinstance(exc, MemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    return any(s in text for s in ("can't allocate memory", "Cannot allocate memory", "bad_alloc"))


def release_memory() -> None:
    """After a failed allocation: collect what the failed job left (its tensors are garbage once
    its frames are gone) and give the freed heap back to the system (glibc's malloc_trim), so
    that the next job starts from the process's usual size."""
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the allocator keeps what it keeps
        pass


def pool_device(settings: Settings) -> str:
    """The device a pool process runs jobs on (as `WorkerContext.resolve_device` decides it):
    DIGIN_DEVICE, or with `auto` CUDA when this process sees a GPU."""
    if settings.device != "auto":
        return settings.device
    import torch  # in the pool process, after the fork

    return "cuda" if torch.cuda.is_available() else "cpu"


def limit_this_process(settings: Settings, *, device: str, processes: int) -> int | None:
    """Apply the limit that `settings` give a pool process on `device` (logged)."""
    limit = apply_memory_limit(memory_limit_mb(settings, device=device, processes=processes))
    if limit is not None:
        log.info(
            f"memory limit of this pool process: {limit} MB (data segment)",
            extra={"event": "memory_limit", "limit_mb": limit},
        )
    return limit
