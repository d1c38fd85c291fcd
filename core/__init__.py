"""DiG-IN guidance core: diffusion-guided explanations of image classifiers.

This package imports nothing heavy at import time: torch-free modules (``core.config``,
``core.params``, ``core.classes``, ``core.registry``) can be used by the API without torch.
"""
