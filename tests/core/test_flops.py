"""FLOPs of one guidance iteration (digin.core.flops): the per-part counts, composed by the formula,
equal what the flop counter sees around the optimisation loop itself."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from digin.core.config import GuidanceConfig
from digin.core.flops import iteration_flops
from digin.core.guidance import optimize
from digin.core.loaders import load_classifier, load_diffusion
from digin.core.objectives import ClassObjective


def _loop_flops(model, clf, config, iterations: int) -> int:
    with FlopCounterMode(display=False) as counter:
        optimize(
            model,
            ClassObjective(clf, torch.tensor([3])),
            cond=model.encode_text(["a photograph of a dog"]),
            uncond=model.null_text(1),
            seeds=[0],
            config=GuidanceConfig(**{**config.__dict__, "iterations": iterations}),
        )
    return int(counter.get_total_flops())


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
@pytest.mark.parametrize(
    "settings",
    [{"checkpointing": True}, {"checkpointing": False},
     {"checkpoint_decoder_blocks": True}, {"precision": "bf16", "weights": "bf16"}],
)  # fmt: skip
def test_counted_iteration_equals_one_more_iteration_of_the_loop(tiny_models, arch, settings):
    model = load_diffusion(tiny_models[arch])
    if settings.get("weights") == "bf16":
        model.to(torch.bfloat16)
    clf = load_classifier(tiny_models["classifier"])
    config = GuidanceConfig(ddim_steps=3, loss_steps=2, num_cutouts=3, **settings)
    # the text encoders run outside the counted iteration: count them apart and take them out
    with FlopCounterMode(display=False) as text:
        model.encode_text(["a photograph of a dog"]), model.null_text(1)
    one, two = (_loop_flops(model, clf, config, i) - text.get_total_flops() for i in (1, 2))
    counted = iteration_flops(
        model, ClassObjective(clf, torch.tensor([3])), config,
        model.encode_text(["a photograph of a dog"]), model.null_text(1),
    )  # fmt: skip
    assert counted.unet_forward > 0 and counted.decode_forward > 0
    assert counted.per_iteration == two - one  # one training iteration, exactly
    assert counted.as_dict()["per_iteration"] == counted.per_iteration
    # recompute runs the forward again: at least twice the forward, plus a backward
    times = 2 if config.checkpointing else 1
    assert counted.unet_train > (times + 0.5) * counted.unet_forward
    assert counted.decode_train > (times + 0.5) * counted.decode_forward


def test_one_item_only(tiny_models):
    model = load_diffusion(tiny_models["sd"])
    clf = load_classifier(tiny_models["classifier"])
    cond = model.encode_text(["a", "b"])
    with pytest.raises(ValueError, match="one item"):
        iteration_flops(model, ClassObjective(clf, torch.tensor([1, 2])), GuidanceConfig(), cond,
                        model.null_text(2))  # fmt: skip
