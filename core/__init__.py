"""DiG-IN guidance core: diffusion-guided explanations of image classifiers.

This package imports nothing heavy at import time: torch-free modules (``digin.core.config``,
``digin.core.params``, ``digin.core.classes``, ``digin.core.registry``) can be used by the API
without torch.
"""
