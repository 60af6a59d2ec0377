"""``nccli extract``: checkpoint + dataset → nccli cache.

Modules, one job each (docs/architecture.md):

- :mod:`~nccli.extract.devices` — device and precision choices (the CLI's enums);
- :mod:`~nccli.extract.discovery` — the probe forward, the linear head, layer selection;
- :mod:`~nccli.extract.capture` — hooks that capture features, the NaN/Inf policy;
- :mod:`~nccli.extract.pipeline` — prefetching, host copies, the background writer;
- :mod:`~nccli.extract.runner` — one checkpoint: skip / resume / stream / finalise;
- :mod:`~nccli.extract.distributed` — torchrun shards, merged and verified;
- :mod:`~nccli.extract.api` — :func:`extract`, the call behind the command;
- :mod:`~nccli.extract.inspect` — ``nccli info``.
"""

from nccli.extract.api import extract
from nccli.extract.devices import AMP_DTYPES, resolve_device
from nccli.extract.discovery import Discovery, discover_layers
from nccli.extract.inspect import describe_cache, describe_checkpoint
from nccli.extract.runner import row_range

__all__ = [
    "AMP_DTYPES",
    "Discovery",
    "describe_cache",
    "describe_checkpoint",
    "discover_layers",
    "extract",
    "resolve_device",
    "row_range",
]
