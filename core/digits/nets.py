"""Architectures of the digits zoo, built from a JSON-able config so a model card rebuilds them.

Classifiers (plain modules, trained by `digin.core.digits.train`, wrapped as `Classifier` by
`digin.core.digits.zoo`) map grey images (N, 1, 16, 16), standardised, to penultimate features (N,
F) and logits (N, 10) = head(features). The diffusion model is a diffusers `UNet2DConditionModel`
(pixel space, 1 channel) conditioned on a transformers `CLIPTextModel`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from digin.core.digits.data import NUM_CLASSES, RESOLUTION


class DigitsCNN(nn.Module):
    """conv-conv-pool-conv-pool → fc → ReLU (penultimate features, F = hidden) → head.

    (N, 1, 16, 16) → (N, c, 8, 8) → (N, 2c, 4, 4) → (N, hidden) → (N, 10)
    """

    def __init__(self, channels: int = 16, hidden: int = 64, dropout: float = 0.2) -> None:
        super().__init__()
        c = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16 → 8
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8 → 4
            nn.Flatten(),
            nn.Linear(2 * c * (RESOLUTION // 4) ** 2, hidden),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(dropout)  # active in training only
        self.head = nn.Linear(hidden, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)  # (N, hidden), >= 0

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))


class DigitsMLP(nn.Module):
    """(N, 1, 16, 16) → flatten 256 → hidden1 → hidden2 (penultimate, ReLU) → head (N, 10)."""

    def __init__(self, hidden1: int = 256, hidden2: int = 128, dropout: float = 0.2) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(RESOLUTION * RESOLUTION, hidden1),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden1, hidden2),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden2, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)  # (N, hidden2), >= 0

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))


ARCHITECTURES: dict[str, type[DigitsCNN] | type[DigitsMLP]] = {"cnn": DigitsCNN, "mlp": DigitsMLP}
DigitsNet = DigitsCNN | DigitsMLP


def build_classifier_net(arch: dict[str, Any]) -> DigitsNet:
    """{"type": "cnn" | "mlp", **kwargs} → an untrained net."""
    kwargs = {k: v for k, v in arch.items() if k != "type"}
    return ARCHITECTURES[arch["type"]](**kwargs)


# --- the diffusion model ---------------------------------------------------------------------

# UNet at 16 → 8 → 4 pixels; cross-attention on the text at the 4x4 level and in the mid block
# (the digit's identity is a global property; attention at 8x8 doubled the training time).
UNET_CONFIG: dict[str, Any] = {
    "sample_size": RESOLUTION,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "cross_attention_dim": 64,  # = the text encoder's hidden size
}

# A small CLIP text transformer; vocabulary and special ids are filled in from the tokenizer.
TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "max_position_embeddings": 32,  # = the tokenizer's model_max_length
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}

# DDIM sampling (eta = 0) of a v-prediction model with a cosine schedule; "trailing" spacing
# starts few-step sampling at t = 999 (pure noise).
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
}


def build_unet(config: dict[str, Any]):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**config)


def build_text_encoder(config: dict[str, Any]):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**config))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay · ema + (1 − decay) · model, parameter by parameter."""
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(pm, 1.0 - decay)
