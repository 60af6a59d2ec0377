"""nccli — measure Neural Collapse in trained networks.

Python API::

    from nccli import ClassStats, measure
    st = ClassStats.from_arrays(features, labels)
    df = measure("cache/ep200.h5")          # tidy DataFrame: source, epoch, layer, metric, value
    extract(["ep200.pt"], "data.npz", arch="mlp:...", out_dir="cache/")
    result = compare(["cache/ep010.h5", "cache/ep200.h5"])   # trajectory + thresholds
"""

from __future__ import annotations

import os as _os

# torch's OpenMP threads busy-wait after each parallel region; numpy's BLAS threads,
# which compute the metrics, then fight them for the cores (measured: an SVD right after
# a torch GEMM ran 40× slower on 2 cores).  Sleeping waiters cost nothing here.  Only takes
# effect when nccli is imported before torch; set OMP_WAIT_POLICY yourself to override.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

from nccli.compare import compare  # noqa: E402
from nccli.errors import NCError  # noqa: E402
from nccli.extract import extract  # noqa: E402
from nccli.measure import measure  # noqa: E402
from nccli.stats import ClassStats  # noqa: E402

__all__ = ["ClassStats", "NCError", "__version__", "compare", "extract", "measure"]
