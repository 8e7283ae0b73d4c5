"""lab: a PyTorch training-behaviour lab for regression losses."""

__version__ = "0.1.0"
