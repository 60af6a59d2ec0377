"""``nccli extract``: checkpoint + dataset → nccli cache."""

from nccli.extract._core import (
    Discovery,
    LayerChoice,
    _row_range,  # noqa: F401 - used by the distributed tests
    describe_cache,
    describe_checkpoint,
    discover_layers,
    extract,
)
from nccli.extract.devices import AMP_DTYPES, resolve_device

__all__ = [
    "AMP_DTYPES",
    "Discovery",
    "LayerChoice",
    "describe_cache",
    "describe_checkpoint",
    "discover_layers",
    "extract",
    "resolve_device",
]
