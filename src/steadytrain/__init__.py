"""steadytrain: distributed PyTorch training that survives failures and proves it."""

__version__ = "0.1.0"
