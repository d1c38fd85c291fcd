"""Shared pytest fixtures. Kept torch-free at import time: the API tests run without torch.

The suite runs in two processes (`pytest -n 2`, pytest-xdist; README "Tests"). What keeps the
two apart, and the slow files from ending last:

- a file's tests run in one process, in order (`pytest_xdist_make_scheduler`), so a
  module-scoped deployment is made once; the adversarial probes share one package-scoped
  instance, so that package goes to one process whole;
- the files that start servers and worker processes are handed out first (`SLOW_FIRST`), the
  quick ones fill in after them;
- each process has its own Redis database numbers (`worker_redis_url`); PostgreSQL databases,
  ports and temporary folders are already per process;
- torch takes one thread per process (OMP_NUM_THREADS=1, set before anything imports it): two
  processes on two cores.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import pytest

# Handed out first, in this order (the slowest, BENCHMARKS.md "Test suite time"); the other
# files keep their collection order after them.
SLOW_FIRST = (
    "tests/bench/",  # one test of minutes: the GPU benchmark's smoke run on the CPU
    "tests/core/test_flops.py",
    "tests/core/test_guidance.py",
    "tests/e2e/",
    "tests/reliability/",
    "tests/core/test_cancellation.py",
    "tests/core/test_digits_semantic.py",
    "tests/core/test_digits_counterfactual.py",
    "tests/worker/",
    "tests/adversarial/",
    "tests/client/",
    "tests/ui/",
)
WHOLE_PACKAGES = ("tests/adversarial/",)  # one package-scoped instance for all its files
REDIS_DATABASES_PER_WORKER = 5  # the suite's databases are 11 to 15 (worker_redis_url)


def xdist_worker() -> int:
    """This process's number among pytest-xdist's workers (gw0 → 0); 0 without xdist."""
    return int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))


def worker_redis_url(url: str) -> str:
    """`url` with its Redis database number moved down by 5 per xdist worker after the first
    (11 to 15 on gw0, 6 to 10 on gw1, 1 to 5 on gw2), so that no two workers flush or read
    each other's queues."""
    base, _, number = url.rstrip("/").rpartition("/")
    database = int(number) - REDIS_DATABASES_PER_WORKER * xdist_worker()
    if database < 0:
        raise pytest.UsageError(f"no Redis database left for xdist worker {xdist_worker()}: {url}")
    return f"{base}/{database}"


if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def scope_of(nodeid: str) -> str:
    """The unit that one xdist worker runs whole: the test's file, or its package for the
    packages in WHOLE_PACKAGES."""
    for package in WHOLE_PACKAGES:
        if nodeid.startswith(package):
            return package
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, the slow files first (each worker collects the same order, which the
    scheduler hands out)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return

    def rank(item: pytest.Item) -> int:
        found = [i for i, p in enumerate(SLOW_FIRST) if item.nodeid.startswith(p)]
        return found[0] if found else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: a file's tests stay together and in order


if importlib.util.find_spec("xdist") is not None:  # a dev dependency; the hook is xdist's

    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
        """Whole files (and WHOLE_PACKAGES) to one worker, in collection order: xdist's
        `loadscope` with `scope_of` as the scope. (Its `loadgroup` marks do not reach the
        scheduler under pytest 9, whose node ids ignore the group suffix.)"""
        from xdist.scheduler import LoadScopeScheduling

        class FileScheduling(LoadScopeScheduling):  # type: ignore[misc]
            def _split_scope(self, nodeid: str) -> str:
                return scope_of(nodeid)

        config.option.loadscopereorder = False  # keep SLOW_FIRST's order
        return FileScheduling(config, log)

    def pytest_testnodedown(node: Any, error: Any) -> None:
        """Terminal-summary sections a worker handed over (`summary_sections` of its
        `workeroutput`, e.g. the adversarial tally), printed here by the controller."""
        SUMMARY_SECTIONS.extend(getattr(node, "workeroutput", {}).get("summary_sections", []))


SUMMARY_SECTIONS: list[list[Any]] = []  # [title, lines] from the xdist workers


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for title, lines in SUMMARY_SECTIONS:
        terminalreporter.section(title)
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Specs of the tiny random-weight models (digin.core.tiny), written once per test session:
    'sd', 'sdxl' (diffusers folders), 'classifier' (timm@safetensors), 'open_clip' (zero-shot)."""
    from digin.core.tiny import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny-models"))
