"""Visual counterfactual explanations of real images, the `counterfactual` kind.

See docs/architecture.md §5.

    images.py     load, validate and preprocess the start image (file, upload, bundled digit)
    inversion.py  DDIM inversion + null-text inversion, and the inversion cache
    attention.py  cross-attention store/inject processors (prompt-to-prompt), token spans, masks
    edit.py       the regularised DiG-IN optimisation from the inverted image
    job.py        the runner: params → typed `CounterfactualResult`
    output.py     its artifacts (images, mask, trajectory grid, result.json)

This package's `__init__` and `config` stay torch-free: `digin.core.params` imports the config.
"""
