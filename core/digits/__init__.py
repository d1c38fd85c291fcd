"""The bundled digits model zoo: data, nets, training, loaders, evaluation.

See docs/architecture.md §6.4.
"""
