"""The bundled digits model zoo (DESIGN §4): data, nets, training, loaders, evaluation."""
