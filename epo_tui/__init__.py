"""epo-tui: evolutionary prompt optimization (EPO) for sparse-autoencoder features."""

__version__ = "0.1.0"
