"""Streaming, mergeable float64 sufficient statistics for Neural Collapse metrics.

:class:`ClassStats` plays the role of a torchmetrics ``Metric`` state: it declares its
states once (all are *sums* in the Chan et al. sense, so merging is exact), ``update``
folds a batch in, ``merge`` combines two partitions (batches, files, ranks), and the
metrics in :mod:`nccli.metrics` are pure functions of the result.

States, per layer (docs/metrics.md, "How the numbers are computed"):

- ``counts``   ``n_k``                                          (K,)   int64
- ``means``    ``μ_k``                                          (K, d) float64
- ``scatter``  ``S_W = Σ_i (h_i - μ_{y_i})(h_i - μ_{y_i})ᵀ = N·Σ_W``  (d, d) float64
- ``class_ss`` ``SS_k = Σ_{i: y_i = k} ||h_i - μ_k||² = n_k σ_k²``     (K,)   float64

A batch is reduced two-pass *within the batch* (batch class means first, then the centred
scatter with one GEMM), and folded into the running state with the pairwise update

    δ_k = μ_k^B - μ_k^A,  n_k = n_k^A + n_k^B,  μ_k = μ_k^A + δ_k n_k^B / n_k,
    S_W = S_W^A + S_W^B + Σ_k (n_k^A n_k^B / n_k) δ_k δ_kᵀ,
    SS_k = SS_k^A + SS_k^B + (n_k^A n_k^B / n_k) ||δ_k||².

The batch is reduced over the classes it holds only (its labels renumbered ``0..K_b-1``)
and only those ``K_b`` rows of ``counts``, ``means`` and ``class_ss`` are merged (``δ_k``
and the weight are 0 for the others), so an update costs ``O(B·d + K_b·d + d²)`` however
large ``K`` is: a language model's vocabulary of 50,000 classes costs a 512-row batch
what its few hundred present classes cost.

Raw moments (``Σ hhᵀ - N μμᵀ``) are never formed: near collapse the spread is tiny beside
the mean and the subtraction would cancel catastrophically.

Two backends, one table of states.  On the CPU the states are numpy arrays and torch is
never imported (``measure`` on caches and feature files starts without it); torch tensors
given to :meth:`ClassStats.update` are read as numpy arrays.  On a CUDA device (``device=``,
or :meth:`ClassStats.to`) the states are torch tensors on the device and the batch never
leaves it.

``precision`` is the arithmetic of the one large product, the batch's centred scatter:
``"exact"`` (default) multiplies and sums in float64; ``"fast"`` rounds the rows, centred
in float64, to float32 and multiplies blocks of :data:`FAST_BLOCK_ROWS` rows in float32,
summing the blocks in float64 (docs/metrics.md, "Precision of the scatter").

The states are declared once, in :data:`STATES`; ``reset``, ``copy``, ``to``,
``state_dict`` / ``from_state_dict`` (what the cache stores, :mod:`nccli.io.cache`) and
``flatten`` / ``unflatten`` (what ranks all-gather, :mod:`nccli.extract.distributed`)
iterate that table.  This module knows no file format.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from nccli.arrays import as_array, as_tensor, check_batch, import_torch, is_tensor
from nccli.errors import CacheError, DataError, UsageError

ArrayLike = Any  # numpy array or torch tensor

__all__ = ["PRECISIONS", "STATES", "ClassStats", "State", "as_array", "as_tensor", "check_batch"]

#: ``precision`` choices (``--precision``): float64 products, or float32 blocks
PRECISIONS = ("exact", "fast")
#: rows per float32 product under ``precision="fast"`` (the error grows with it)
FAST_BLOCK_ROWS = 1024


@dataclass(frozen=True)
class State:
    """One declared state: its name, dtype (``"int64"`` / ``"float64"``) and shape as a
    function of ``(K, d)``."""

    name: str
    dtype: str
    shape: Callable[[int, int], tuple[int, ...]]

    @property
    def numpy_dtype(self) -> np.dtype:
        """Little-endian numpy dtype of the state (how it is stored)."""
        return np.dtype("<i8" if self.dtype == "int64" else "<f8")

    @property
    def torch_dtype(self) -> Any:
        """The torch dtype of the state (imports torch)."""
        return getattr(import_torch(), self.dtype)


#: every state is a sum-type state merged with the pairwise update
STATES: tuple[State, ...] = (
    State("counts", "int64", lambda K, d: (K,)),
    State("means", "float64", lambda K, d: (K, d)),
    State("scatter", "float64", lambda K, d: (d, d)),
    State("class_ss", "float64", lambda K, d: (K,)),
)


#: tests set this to run the device (torch) reduction on the CPU and compare both paths
_FORCE_TORCH_PATH = False


def _reduce_batch_torch(h: Any, y: Any, K: int) -> tuple[Any, Any, Any, Any]:
    """Batch counts, class means, centred rows and per-class sums of squares (float64), on
    the batch's device: the GPU path."""
    torch = import_torch()
    h = h.to(torch.float64)
    cnt = torch.bincount(y, minlength=K)
    sums = torch.zeros(K, h.shape[1], dtype=torch.float64, device=h.device)
    sums.index_add_(0, y, h)
    bmeans = sums / cnt.clamp_min(1).to(torch.float64)[:, None]
    centred = h - bmeans[y]
    bss = torch.zeros(K, dtype=torch.float64, device=h.device)
    bss.index_add_(0, y, (centred * centred).sum(dim=1))
    return cnt, bmeans, centred, bss


def _class_sums(h: np.ndarray, y: np.ndarray, K: int) -> np.ndarray:
    """``Σ_{i: y_i = k} h_i`` (K, d) in float64, exact per class order: one weighted
    ``bincount`` over the flattened rows (torch's ``index_add_`` when torch is already
    loaded: measured 2× faster)."""
    torch = sys.modules.get("torch")
    d = h.shape[1]
    if torch is not None:
        sums = torch.zeros(K, d, dtype=torch.float64)
        sums.index_add_(0, torch.from_numpy(y), torch.from_numpy(h))
        return sums.numpy()
    idx = (y[:, None] * d + np.arange(d)).reshape(-1)
    return np.bincount(idx, weights=h.reshape(-1), minlength=K * d).reshape(K, d)


def _reduce_batch_numpy(
    h: np.ndarray, y: np.ndarray, K: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The same reduction as :func:`_reduce_batch_torch` with numpy, whose elementwise
    kernels measured 2–8× faster than torch's on the CPU (this is the hot loop of
    ``measure`` on feature files)."""
    owned = h.dtype != np.float64
    h = h.astype(np.float64, copy=False)  # a private copy unless already float64 (shared)
    cnt = np.bincount(y, minlength=K)
    bmeans = _class_sums(h, y, K) / np.maximum(cnt, 1)[:, None]
    if owned:
        h -= bmeans[y]  # centre in place: the float64 copy is ours
        centred = h
    else:
        centred = h - bmeans[y]
    bss = np.bincount(y, weights=np.einsum("ij,ij->i", centred, centred), minlength=K)
    return cnt.astype(np.int64), bmeans, centred, bss.astype(np.float64)


#: compact labels by counting (``O(B + K)``) rather than sorting when ``K`` is at most this
#: many times the batch's length: ``O(B)`` either way, without a sort for a few classes
DENSE_LABELS_RATIO = 4


def _compact_labels(y: Any, K: int) -> tuple[Any, Any]:
    """The classes present in the labels ``y`` (ascending) and ``y`` renumbered into them,
    ``(present, inv)`` with ``y == present[inv]`` (numpy or torch, as ``y``).  Never an
    array of length ``K`` unless ``K ≤ DENSE_LABELS_RATIO · B``."""
    tensor = is_tensor(y)
    if K > DENSE_LABELS_RATIO * y.shape[0]:
        if tensor:
            return import_torch().unique(y, sorted=True, return_inverse=True)
        present, inv = np.unique(y, return_inverse=True)
        return present, inv.reshape(-1).astype(np.int64, copy=False)
    if tensor:
        torch = import_torch()
        present = torch.bincount(y, minlength=K).nonzero().reshape(-1)
        lut = torch.zeros(K, dtype=torch.int64, device=y.device)
        lut[present] = torch.arange(present.shape[0], device=y.device)
    else:
        present = np.flatnonzero(np.bincount(y, minlength=K))
        lut = np.zeros(K, dtype=np.int64)
        lut[present] = np.arange(present.size)
    return present, lut[y]


def _gram(X: Any, precision: str = "exact") -> Any:
    """``XᵀX`` in float64 (numpy or torch, as ``X``).  numpy's ``X.T @ X`` runs a symmetric
    rank-k update (syrk: half the flops of a GEMM); a torch matmul stays on the device.
    ``precision="fast"``: float32 products over blocks of :data:`FAST_BLOCK_ROWS` rows,
    the blocks summed in float64."""
    tensor = is_tensor(X)
    if precision != "fast" or X.shape[0] == 0:
        return X.T @ X if tensor or X.shape[0] else np.zeros((X.shape[1],) * 2)
    if tensor:
        torch = import_torch()
        out = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float64, device=X.device)
        for s in range(0, X.shape[0], FAST_BLOCK_ROWS):
            b = X[s : s + FAST_BLOCK_ROWS].to(torch.float32)
            out += (b.T @ b).to(torch.float64)
        return out
    out = np.zeros((X.shape[1], X.shape[1]))
    for s in range(0, X.shape[0], FAST_BLOCK_ROWS):
        b = X[s : s + FAST_BLOCK_ROWS].astype(np.float32)
        out += b.T @ b
    return out


def _check_precision(precision: Any) -> str:
    value = str(getattr(precision, "value", precision))
    if value not in PRECISIONS:
        raise UsageError(f"--precision {value!r}: choose one of {', '.join(PRECISIONS)}")
    return value


def _torch_device(device: Any) -> Any | None:
    """``device`` as a torch device when it is not the CPU, else None (numpy states)."""
    if device is None:
        return None
    if str(getattr(device, "type", device)).split(":")[0] == "cpu":
        return None
    return import_torch().device(device)


class ClassStats:
    """Per-class counts, means, pooled within-class scatter and per-class sum of squares.

    Parameters
    ----------
    num_classes:
        ``K``; labels must lie in ``0..K-1``.
    dim:
        feature dimension ``d``.
    device:
        where the float64 states live: the CPU by default (numpy arrays, no torch);
        ``"cuda"`` accumulates on the GPU (torch tensors) so batches need not be copied to
        the host.
    source:
        a name used in error messages (a file path, usually).
    precision:
        ``"exact"`` (float64 scatter products, the default) or ``"fast"`` (float32 blocks
        of rows centred in float64; docs/metrics.md, "Precision of the scatter").
    """

    #: the names of :data:`STATES`, in order
    states = tuple(st.name for st in STATES)

    def __init__(
        self,
        num_classes: int,
        dim: int,
        device: Any = None,
        *,
        source: str = "features",
        precision: str = "exact",
    ) -> None:
        if int(num_classes) < 1:
            raise UsageError(f"{source}: num_classes must be at least 1, got {num_classes}")
        if int(dim) < 1:
            raise UsageError(f"{source}: feature dimension must be at least 1, got {dim}")
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self._device = _torch_device(device)
        self.source = source
        self.precision = _check_precision(precision)
        self.reset()

    @property
    def device(self) -> Any:
        """The torch device of the states on a GPU; ``"cpu"`` (numpy states) otherwise."""
        return "cpu" if self._device is None else self._device

    @property
    def on_torch(self) -> bool:
        """Whether the states are torch tensors (on a non-CPU device)."""
        return self._device is not None

    # ------------------------------------------------------------------ state
    def reset(self) -> ClassStats:
        """Restore the empty state."""
        K, d = self.num_classes, self.dim
        for st in STATES:
            if self._device is None:
                value = np.zeros(st.shape(K, d), dtype=st.dtype)
            else:
                value = import_torch().zeros(
                    st.shape(K, d), dtype=st.torch_dtype, device=self._device
                )
            setattr(self, f"_{st.name}", value)
        self._memo: dict[Any, Any] = {}
        return self

    def _host(self, name: str) -> np.ndarray:
        """State ``name`` as a numpy array (a view on the CPU)."""
        v = getattr(self, f"_{name}")
        return v.cpu().numpy() if is_tensor(v) else v

    def memo(self, key: Any, fn: Any) -> Any:
        """Derived quantity ``fn()`` computed once per state (cleared by update / merge).

        Metrics share expensive pieces (the symmetric scatter, the SVD of the centred
        means) through this, so a full ``measure`` factorises each matrix once.
        """
        try:
            return self._memo[key]
        except KeyError:
            value = self._memo[key] = fn()
            return value

    def _frozen(self, key: Any, fn: Any, *, fresh: bool = False) -> np.ndarray:
        """Memoised read-only array; ``fresh``: ``fn`` returns a new array (no copy needed)."""

        def make() -> np.ndarray:
            arr = np.asarray(fn()) if fresh else np.array(fn(), copy=True)
            arr.flags.writeable = False  # shared between metrics: nobody may edit it
            return arr

        return self.memo(key, make)

    @property
    def n(self) -> int:
        """Total number of samples ``N``."""
        return int(self._host("counts").sum())

    # The numpy views below are computed once per state and read-only.
    @property
    def counts(self) -> np.ndarray:
        """``n_k`` as an int64 numpy array (K,)."""
        return self._frozen("counts", lambda: self._host("counts"))

    @property
    def means(self) -> np.ndarray:
        """Class means ``μ_k`` as a float64 numpy array (K, d); rows of empty classes are 0."""
        return self._frozen("means", lambda: self._host("means"))

    @property
    def scatter(self) -> np.ndarray:
        """Pooled within-class scatter ``S_W = N·Σ_W`` (d, d), float64, symmetric."""

        def sym() -> np.ndarray:
            s = self._host("scatter")
            out = s + s.T  # symmetrise away the rounding of the accumulated GEMMs
            out *= 0.5
            return out

        return self._frozen("scatter", sym, fresh=True)

    @property
    def class_ss(self) -> np.ndarray:
        """Per-class sum of squared distances to the class mean, ``n_k σ_k²`` (K,)."""
        return self._frozen("class_ss", lambda: self._host("class_ss"))

    def global_mean(self, center: str = "global") -> np.ndarray:
        """``μ_G``: sample-weighted (``"global"``) or the plain mean of the non-empty class
        means (``"classmean"``)."""
        if center not in ("global", "classmean"):
            raise UsageError(f"unknown centring {center!r}: use 'global' or 'classmean'")

        def compute() -> np.ndarray:
            counts = self.counts
            means = self.means
            present = counts > 0
            if not present.any():
                return np.zeros(self.dim)
            if center == "classmean":
                return means[present].mean(axis=0)
            # rows of empty classes are 0 and weigh 0: one GEMV over all classes
            return (counts.astype(np.float64) @ means) / counts.sum()

        return self._frozen(("global_mean", center), compute, fresh=True)

    # ----------------------------------------------------------------- update
    def update(self, features: ArrayLike, labels: ArrayLike) -> ClassStats:
        """Fold a batch ``(features (B, d), labels (B,))`` into the statistics.

        The batch is promoted to float64 where the states live, reduced two-pass over the
        ``K_b`` classes it holds (batch class means, then one GEMM for the centred
        scatter), and merged into those ``K_b`` rows: ``O(B·d + K_b·d + d²)``, not
        ``O(K·d)``.
        """
        K = self.num_classes
        if self._device is not None:
            h, y = as_tensor(features, self._device), as_tensor(labels, self._device)
            h, y = check_batch(h, y, K, self.dim, self.source)
            if h.shape[0]:
                present, inv = _compact_labels(y, K)
                cnt, bmeans, centred, bss = _reduce_batch_torch(h, inv, present.shape[0])
                self._merge_rows(present, cnt, bmeans, bss, _gram(centred, self.precision))
            return self
        h, y = check_batch(as_array(features), as_array(labels), K, self.dim, self.source)
        if h.shape[0] == 0:
            return self
        present, inv = _compact_labels(y, K)
        if _FORCE_TORCH_PATH:
            torch = import_torch()
            parts = _reduce_batch_torch(torch.from_numpy(h), torch.from_numpy(inv), present.size)
            cnt, bmeans, centred, bss = (p.numpy() for p in parts)
        else:
            cnt, bmeans, centred, bss = _reduce_batch_numpy(h, inv, present.size)
        self._merge_rows(present, cnt, bmeans, bss, _gram(centred, self.precision))
        return self

    def merge(self, other: ClassStats) -> ClassStats:
        """Combine ``other`` into ``self`` in place with the pairwise (Chan) update (the
        classes ``other`` holds: ``O(K·d)`` at most)."""
        if not isinstance(other, ClassStats):
            raise UsageError(f"cannot merge ClassStats with {type(other).__name__}")
        if (other.num_classes, other.dim) != (self.num_classes, self.dim):
            raise DataError(
                f"cannot merge statistics of shape (K={other.num_classes}, d={other.dim}) "
                f"into (K={self.num_classes}, d={self.dim}); were they made from the same layer?"
            )
        cnt, means, scatter, ss = (self._like(getattr(other, f"_{st.name}")) for st in STATES)
        present = cnt.nonzero()[0] if self._device is None else cnt.nonzero().reshape(-1)
        # the rows are copies (fancy indexing): merging an object into itself is safe
        self._merge_rows(present, cnt[present], means[present], ss[present], scatter)
        return self

    def _like(self, v: Any) -> Any:
        """``v`` (a state of any backend) on this object's backend and device."""
        if self._device is None:
            return v.cpu().numpy() if is_tensor(v) else v
        return as_tensor(v, self._device)

    def _merge_rows(
        self, present: Any, cnt_b: Any, means_b: Any, ss_b: Any, scatter_b: Any
    ) -> None:
        """Pairwise update with a partition B that holds the classes ``present``
        (ascending, distinct): its counts (all > 0), means and class_ss in those rows, and
        its scatter matrix.  Only those rows of the states are read and written; the other
        classes have ``n_k^B = 0``, so their ``δ_k`` terms weigh 0.  The same arithmetic on
        numpy arrays and torch tensors."""
        cnt_a = self._counts[present]
        means_a = self._means[present]
        n = cnt_a + cnt_b  # > 0: every class in B has a sample
        if self._device is None:
            na, nb, nn_ = (c.astype(np.float64) for c in (cnt_a, cnt_b, n))
        else:
            na, nb, nn_ = (c.double() for c in (cnt_a, cnt_b, n))
        delta = means_b - means_a
        w = na * nb / nn_  # 0 where a class is new (in B only)
        # new means: classes new in B take B's mean exactly (their rows of A are 0)
        self._means[present] = means_a + delta * (nb / nn_)[:, None]
        self._scatter += scatter_b
        both = cnt_a > 0
        rows = both.nonzero()[0] if self._device is None else both.nonzero().reshape(-1)
        if rows.shape[0]:
            # rows sqrt(c_k) δ_k: Σ c_k δδᵀ = crossᵀcross (K_b×d: float64 whatever precision)
            cross = delta[rows] * (w[rows] ** 0.5)[:, None]
            self._scatter += cross.T @ cross
        self._class_ss[present] += ss_b + w * (delta * delta).sum(1)
        self._counts[present] = n
        self._memo = {}

    # ------------------------------------------------------------- builders
    @classmethod
    def from_arrays(
        cls,
        features: ArrayLike,
        labels: ArrayLike,
        num_classes: int | None = None,
        batch_size: int | None = None,
        *,
        device: Any = None,
        source: str = "features",
        precision: str = "exact",
    ) -> ClassStats:
        """Statistics of a whole array, folded in batches of ``batch_size`` (all at once
        when ``None``)."""
        y = as_array(labels).reshape(-1)
        if num_classes is None:
            if y.size == 0:
                raise DataError(f"{source}: no labels, cannot infer the number of classes")
            num_classes = int(np.max(y)) + 1
        shape = tuple(features.shape)
        if len(shape) < 1:
            raise DataError(f"{source}: features must be a 2-D array (N, d)")
        dim = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        st = cls(num_classes, dim, device=device, source=source, precision=precision)
        n = shape[0]
        step = n if not batch_size else int(batch_size)
        if n != y.shape[0]:
            raise DataError(f"{source}: {n} feature rows but {y.shape[0]} labels; they must match")
        for start in range(0, n, max(step, 1)):
            st.update(features[start : start + step], labels[start : start + step])
        return st

    def copy(self) -> ClassStats:
        """A deep copy."""
        out = ClassStats(self.num_classes, self.dim, source=self.source, precision=self.precision)
        out._device = self._device
        for st in STATES:
            v = getattr(self, f"_{st.name}")
            setattr(out, f"_{st.name}", v.clone() if is_tensor(v) else v.copy())
        return out

    def to(self, device: Any) -> ClassStats:
        """Move the states to ``device`` (in place) and return self: numpy arrays on the
        CPU, torch tensors elsewhere."""
        self._device = _torch_device(device)
        for st in STATES:
            setattr(self, f"_{st.name}", self._like(getattr(self, f"_{st.name}")))
        self._memo = {}
        return self

    # ------------------------------------------------------ serialisation
    def state_dict(self) -> dict[str, np.ndarray]:
        """The states as numpy arrays in their stored dtypes (the scatter symmetrised)."""
        return {st.name: np.asarray(getattr(self, st.name), dtype=st.numpy_dtype) for st in STATES}

    @classmethod
    def from_state_dict(
        cls, arrays: Mapping[str, Any], num_classes: int, dim: int, *, source: str = "features"
    ) -> ClassStats:
        """Statistics from arrays of :meth:`state_dict`'s shapes; shapes, dtypes,
        non-negative counts and finiteness are checked (a :class:`CacheError` names
        ``source``).  Arrays are used without a copy when they already have the dtype."""
        K, d = int(num_classes), int(dim)
        out = cls(K, d, source=source)
        for st in STATES:
            if st.name not in arrays:
                raise CacheError(f"{source}: statistics dataset {st.name!r} is missing; re-extract")
            a = as_array(arrays[st.name])
            if a.shape != st.shape(K, d):
                raise CacheError(
                    f"{source}: statistics {st.name!r} has shape {a.shape}, expected "
                    f"{st.shape(K, d)}; the cache is corrupt, re-extract it"
                )
            if a.dtype.kind not in ("iu" if st.dtype == "int64" else "f"):
                raise CacheError(
                    f"{source}: statistics {st.name!r} have dtype {a.dtype}; re-extract"
                )
            a = a.astype(st.numpy_dtype.newbyteorder("="), copy=not a.flags.writeable)
            if (st.dtype == "int64" and (a < 0).any()) or not np.isfinite(a).all():
                raise CacheError(
                    f"{source}: statistics contain negative counts or NaN/Inf; re-extract"
                )
            setattr(out, f"_{st.name}", a)
        scatter = out._scatter
        if np.array_equal(scatter[:8], scatter[:, :8].T):
            # written symmetrised (state_dict): serve it as the symmetric scatter without
            # another d×d pass; a private copy, since the state shares the array
            sym = np.array(scatter, dtype=np.float64)
            sym.flags.writeable = False
            out._memo["scatter"] = sym
        return out

    def flatten(self) -> Any:
        """Every state as one float64 torch vector (in :data:`STATES` order) on the states'
        device, for collectives (imports torch)."""
        torch = import_torch()
        parts = [as_tensor(getattr(self, f"_{st.name}"), self._device or "cpu") for st in STATES]
        return torch.cat([p.to(torch.float64).reshape(-1) for p in parts])

    @classmethod
    def unflatten(
        cls, flat: ArrayLike, num_classes: int, dim: int, *, source: str = "features"
    ) -> ClassStats:
        """The inverse of :meth:`flatten` (counts must be whole numbers); CPU states."""
        K, d = int(num_classes), int(dim)
        out = cls(K, d, source=source)
        flat = np.asarray(as_array(flat), dtype=np.float64).reshape(-1)
        pos = 0
        for st in STATES:
            shape = st.shape(K, d)
            n = int(np.prod(shape))
            part = flat[pos : pos + n].reshape(shape).copy()
            pos += n
            if st.dtype == "int64":
                if not np.all(part == np.round(part)):
                    raise CacheError(f"{source}: gathered {st.name} are not integers")
                part = part.astype(np.int64)
            setattr(out, f"_{st.name}", part)
        if pos != flat.size:
            raise CacheError(f"{source}: {flat.size} gathered numbers, expected {pos}")
        return out

    def __repr__(self) -> str:
        return f"ClassStats(num_classes={self.num_classes}, dim={self.dim}, n={self.n})"
