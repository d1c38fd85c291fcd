"""The same params and seed give the same optimisation, whatever the code around it becomes.

Per-iteration clean and training losses of a guided, a disagreement and a counterfactual job, on
the tiny random models and on the digits zoo, recorded in `same_results.json` and compared to
float tolerance. A change that means to alter the results (a new default, a fixed bug) records
them again and says so:

    python -m tests.core.test_same_results --write
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from digin.core.jobs import ModelCache
from digin.core.kinds import run_job

RECORD = Path(__file__).with_name("same_results.json")
FAST = {"ddim_steps": 3, "iterations": 2, "loss_steps": 2, "num_cutouts": 2, "lr": 0.5}
ZOO_FAST = {"iterations": 2}  # the zoo's own guidance settings otherwise
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _start_image(folder: Path) -> str:
    """A smooth 48 x 40 RGB image from a fixed seed."""
    gen = torch.Generator().manual_seed(0)
    small = torch.rand(1, 3, 5, 6, generator=gen)
    pixels = torch.nn.functional.interpolate(small, size=(40, 48), mode="bicubic").clamp(0, 1)
    path = folder / "start.png"
    Image.fromarray((pixels[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    return str(path)


def _example(name: str, **changes) -> dict:
    params = json.loads((EXAMPLES / f"{name}.json").read_text())
    params.update(changes)
    params["guidance"] = {**params.get("guidance", {}), **ZOO_FAST}
    return params


def cases(tiny: dict[str, str], folder: Path) -> dict[str, tuple[str, dict]]:
    return {
        "guided_tiny_sd": (
            "guided",
            {"diffusion": tiny["sd"], "classifier": tiny["classifier"], "resolution": 32,
             "classes": [1, 7], "guidance": FAST},
        ),
        "disagreement_tiny_sdxl": (
            "disagreement",
            {"diffusion": tiny["sdxl"], "classifier1": tiny["classifier"],
             "classifier2": tiny["open_clip"], "clip_templates": "simple", "resolution": 32,
             "classes": [2], "loss": "logits", "guidance": FAST},
        ),
        "counterfactual_tiny_sd": (
            "counterfactual",
            {"image": _start_image(folder), "diffusion": tiny["sd"],
             "classifier": tiny["classifier"], "resolution": 32, "start_class": "tench",
             "targets": [3], "guidance": FAST},
        ),
        "guided_digits": (
            "guided", _example("guided_digits", classes=[3, 8], prompt="a handwritten digit")
        ),
        "disagreement_digits": ("disagreement", _example("disagreement_digits")),
        "counterfactual_digits": ("counterfactual", _example("counterfactual_digits", targets=[3])),
    }  # fmt: skip


def losses(kind: str, params: dict, cache: ModelCache) -> dict[str, list]:
    torch.set_num_threads(1)  # the same reduction order on every machine of this kind
    guidance = run_job(kind, params, seed=5, cache=cache, max_batch=4).guidance
    return {"clean_loss": guidance.clean_loss.tolist(), "train_loss": guidance.train_loss.tolist()}


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(RECORD.read_text())


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    return ModelCache()


@pytest.mark.parametrize(
    "name",
    ["guided_tiny_sd", "disagreement_tiny_sdxl", "counterfactual_tiny_sd", "guided_digits",
     "disagreement_digits", "counterfactual_digits"],
)  # fmt: skip
def test_the_recorded_losses_come_again(name, tiny_models, tmp_path, recorded, cache):
    threads = torch.get_num_threads()
    try:
        kind, params = cases(tiny_models, tmp_path)[name]
        got = losses(kind, params, cache)
    finally:
        torch.set_num_threads(threads)
    for key, values in recorded[name].items():
        assert torch.allclose(torch.tensor(got[key]), torch.tensor(values), rtol=1e-5, atol=1e-5), (
            f"{name} {key}: {got[key]} != recorded {values}"
        )


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    from digin.core.tiny import make_tiny_models

    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_tiny_models(Path(tmp) / "tiny-models")
        shared = ModelCache()
        out = {name: losses(kind, p, shared) for name, (kind, p) in cases(tiny, Path(tmp)).items()}
    RECORD.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {RECORD}")
