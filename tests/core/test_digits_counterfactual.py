"""Counterfactuals on the shipped digits zoo, with known answers.

Held-out test digits are changed towards other classes with the zoo's counterfactual settings
(`digin.core.digits.settings.DIGITS_COUNTERFACTUAL*`, repeated in
`examples/counterfactual_digits.json`) and explained classifier `digits:cnn`. A real counterfactual
must convince the independent judge (`digits:judge`, trained on a disjoint split), not only the
explained classifier, and stay closer to the start digit than the digits of the target class are.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import TypeAdapter

from digin.core.config import GuidanceConfig
from digin.core.counterfactual.config import CounterfactualConfig
from digin.core.counterfactual.job import class_probs
from digin.core.digits.data import load_images, make_splits
from digin.core.digits.settings import (
    CLASS_PROMPT,
    DIGITS_COUNTERFACTUAL,
    DIGITS_COUNTERFACTUAL_GUIDANCE,
)
from digin.core.jobs import ModelCache
from digin.core.kinds import run_job
from digin.core.params import validate_params
from tests.core.precision import with_precision

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "counterfactual_digits.json"
STARTS = (0, 2, 4, 6, 8)  # one held-out digit of each of these classes …
OFFSETS = (1, 2, 5, 7)  # … towards the classes k + offset (mod 10): every class is a target


def example() -> dict:
    return json.loads(EXAMPLE.read_text())


def test_example_uses_the_zoo_counterfactual_settings():
    params = example()
    assert params["diffusion"] == "digits" and params["classifier"] == "digits:cnn"
    assert params["prompt"] == CLASS_PROMPT
    assert GuidanceConfig(**params["guidance"]) == DIGITS_COUNTERFACTUAL_GUIDANCE
    cf = TypeAdapter(CounterfactualConfig).validate_python(params["counterfactual"])
    assert cf == DIGITS_COUNTERFACTUAL
    validated = validate_params("counterfactual", {"image": "digits:test/0", "targets": [1]})
    assert validated.guidance == DIGITS_COUNTERFACTUAL_GUIDANCE  # the defaults for 'digits'
    assert validated.counterfactual == DIGITS_COUNTERFACTUAL


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these small models gain little from two, and two threads lose many
    times their speed when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def counterfactuals():
    """(start image (16, 16), target, counterfactual (3, 16, 16), cnn flip, summary item) for
    every start digit and target."""
    cache = ModelCache()
    _, y = load_images()
    test_labels = y[make_splits(y).test]
    rows = []
    for k in STARTS:
        n = int((test_labels == k).nonzero()[0])  # the first test digit of class k
        params = example() | {
            "image": f"digits:test/{n}",
            "start_class": k,
            "targets": [(k + d) % 10 for d in OFFSETS],
        }
        result = run_job("counterfactual", with_precision(params), seed=n, cache=cache)
        for b, item in enumerate(result.summary()["items"]):
            rows.append(
                (result.original[0, 0], item["target_index"], result.guidance.images[b], item)
            )
    return rows, cache


def test_counterfactuals_of_held_out_digits_convince_the_judge(counterfactuals, record_property):
    rows, cache = counterfactuals
    judge = cache.classifier("digits:judge", "cpu", "openai")
    images = torch.stack([image for _, _, image, _ in rows])
    targets = torch.tensor([t for _, t, _, _ in rows])
    judge_flips = (class_probs(judge, images).argmax(1) == targets).float().mean()
    cnn_flips = sum(item["flip"] for *_, item in rows) / len(rows)
    record_property("judge_flip_rate", float(judge_flips))
    record_property("cnn_flip_rate", cnn_flips)
    print(f"flip rates: judge {float(judge_flips):.2f}, digits:cnn {cnn_flips:.2f}")
    assert len(rows) == 20 and sorted(set(targets.tolist())) == list(range(10))
    assert float(judge_flips) >= 0.80
    assert cnn_flips >= 0.80


def test_counterfactuals_stay_closer_than_digits_of_the_target_class(
    counterfactuals, record_property
):
    rows, _ = counterfactuals
    x, y = load_images()
    train = make_splits(y).train
    digits, labels = x[train, 0], y[train]
    l1 = torch.tensor([item["l1_distance"] for *_, item in rows])
    # the mean L1 distance of the start digit to the target class's training digits
    typical = torch.tensor(
        [
            float((digits[labels == t] - start).abs().flatten(1).mean(1).mean())
            for start, t, *_ in rows
        ]
    )
    record_property("mean_l1_distance", float(l1.mean()))
    record_property("mean_typical_l1_distance", float(typical.mean()))
    print(
        f"mean L1 distance {float(l1.mean()):.3f}, to the target class {float(typical.mean()):.3f}"
    )
    assert float(l1.mean()) <= 0.65 * float(typical.mean())
    assert all(item["l2_distance"] >= item["l1_distance"] for *_, item in rows)
