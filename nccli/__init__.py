"""nccli — measure Neural Collapse in trained networks.

Python API::

    from nccli import ClassStats, measure
    st = ClassStats.from_arrays(features, labels)
    df = measure("cache/ep200.h5")          # tidy DataFrame: source, epoch, layer, metric, value
    extract(["ep200.pt"], "data.npz", arch="mlp:...", out_dir="cache/")
    result = compare(["cache/ep010.h5", "cache/ep200.h5"])   # trajectory + thresholds
    tracker = Tracker(model, path="runs/exp1/nc.h5")   # during training: observe(loader, epoch=e)

The names are imported on first use (PEP 562), so ``import nccli.stats`` or the CLI's
``--help`` does not pay for the extraction machinery, and no submodule depends on this
package face.
"""

from __future__ import annotations

import importlib as _importlib
import os as _os
import sys as _sys
import types as _types
from typing import TYPE_CHECKING, Any

# torch's OpenMP threads busy-wait after each parallel region; numpy's BLAS threads,
# which compute the metrics, then fight them for the cores (measured: an SVD right after
# a torch GEMM ran 40× slower on 2 cores).  Sleeping waiters cost nothing here.  Only takes
# effect when nccli is imported before torch; set OMP_WAIT_POLICY yourself to override.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from nccli._version import __version__  # noqa: E402

#: public name -> module that defines it
_API = {
    "ClassStats": "nccli.stats",
    "NCError": "nccli.errors",
    "Tracker": "nccli.track",
    "compare": "nccli.compare",
    "extract": "nccli.extract",
    "measure": "nccli.measure",
}

__all__ = ["ClassStats", "NCError", "Tracker", "__version__", "compare", "extract", "measure"]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from nccli.compare import compare
    from nccli.errors import NCError
    from nccli.extract import extract
    from nccli.measure import measure
    from nccli.stats import ClassStats
    from nccli.track import Tracker


class _Face(_types.ModuleType):
    """The package module.  Importing ``nccli.extract`` (a package) would bind the
    attribute ``nccli.extract`` to that module; the face keeps the *function* there, so
    ``from nccli import extract`` means the same whatever was imported before."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Face


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(_importlib.import_module(_API[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'nccli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
