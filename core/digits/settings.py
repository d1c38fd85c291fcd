"""The guidance and sampling settings of the digits zoo: the one place in the code.

`examples/*_digits.json` repeat these values (a test checks that they agree), and every semantic
test and benchmark uses them. They differ from the Stable Diffusion defaults (DESIGN §3.1): the
16x16 model needs fewer DDIM steps, takes larger learning rates, and its classifiers see the
whole image (the generator's side equals the classifiers' input size, so a cutout is the full
image plus noise).
"""

from __future__ import annotations

from core.config import GuidanceConfig

# Prompts: "{class}" is the class name ("seven"); the numeral ("7") works as well.
CLASS_PROMPT = "a handwritten digit {class}"
PLAIN_PROMPT = "a handwritten digit"

DIGITS_GUIDANCE = GuidanceConfig(
    ddim_steps=10,
    guidance_scale=3.0,
    iterations=10,
    lr=0.05,
    latent_lr_factor=1.0,
    loss_steps=3,
    num_cutouts=4,
    noise_sd=0.02,
)

# Plain class-conditional sampling (benchmarks, model cards): DDIM steps and CFG scale.
SAMPLE_STEPS = DIGITS_GUIDANCE.ddim_steps
SAMPLE_GUIDANCE_SCALE = DIGITS_GUIDANCE.guidance_scale
