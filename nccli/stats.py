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

Raw moments (``Σ hhᵀ - N μμᵀ``) are never formed: near collapse the spread is tiny beside
the mean and the subtraction would cancel catastrophically.

On a CUDA device the states live on the device and the batch never leaves it.

The states are declared once, in :data:`STATES`; ``reset``, ``copy``, ``to``,
``state_dict`` / ``from_state_dict`` (what the cache stores, :mod:`nccli.io.cache`) and
``flatten`` / ``unflatten`` (what ranks all-gather, :mod:`nccli.extract.distributed`)
iterate that table.  This module knows no file format.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nccli.errors import CacheError, DataError, UsageError

ArrayLike = Any  # numpy array or torch tensor


@dataclass(frozen=True)
class State:
    """One declared state: its name, dtype and shape as a function of ``(K, d)``."""

    name: str
    dtype: torch.dtype
    shape: Callable[[int, int], tuple[int, ...]]

    @property
    def numpy_dtype(self) -> np.dtype:
        """Little-endian numpy dtype of the state (how it is stored)."""
        return np.dtype("<i8" if self.dtype == torch.int64 else "<f8")


#: every state is a sum-type state merged with the pairwise update
STATES: tuple[State, ...] = (
    State("counts", torch.int64, lambda K, d: (K,)),
    State("means", torch.float64, lambda K, d: (K, d)),
    State("scatter", torch.float64, lambda K, d: (d, d)),
    State("class_ss", torch.float64, lambda K, d: (K,)),
)


def as_tensor(x: ArrayLike, device: torch.device | str = "cpu") -> torch.Tensor:
    """A tensor view (or copy) of ``x`` on ``device``.  numpy input is made contiguous in
    native byte order first: torch refuses big-endian data (an HDF5 file written as
    ``>f4``) and negative strides (``h[::-1]``)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device)
    a = np.asarray(x)
    if a.dtype.byteorder not in ("=", "|"):
        a = a.astype(a.dtype.newbyteorder("="))
    return torch.as_tensor(np.ascontiguousarray(a), device=device)


def _all_finite(h: torch.Tensor) -> bool:
    """``isfinite(h).all()``; through numpy on the CPU, where it is several times faster."""
    if h.device.type == "cpu" and h.dtype in (torch.float32, torch.float64):
        return bool(np.isfinite(h.numpy()).all())
    return bool(torch.isfinite(h).all())


def check_batch(
    h: torch.Tensor, y: torch.Tensor, num_classes: int, dim: int, src: str = "features"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a batch: 2-D features of width ``dim``, integer labels in ``0..K-1`` of the
    same length, finite values.  Returns ``(features, int64 labels)``; raises DataError."""
    if h.ndim == 1 and dim == 1:
        h = h[:, None]
    if h.ndim > 2:
        h = h.reshape(h.shape[0], -1)
    if h.ndim != 2:
        raise DataError(f"{src}: features must be a 2-D array (N, d), got shape {tuple(h.shape)}")
    if h.shape[1] != dim:
        raise DataError(
            f"{src}: features have dimension {h.shape[1]} but the statistics expect {dim}"
        )
    y = y.reshape(-1)
    if y.shape[0] != h.shape[0]:
        raise DataError(
            f"{src}: {h.shape[0]} feature rows but {y.shape[0]} labels; they must match"
        )
    if y.dtype.is_floating_point and not bool(torch.all(y == torch.round(y))):
        raise DataError(f"{src}: labels are fractional floats; class labels must be integers")
    y = y.to(torch.int64)
    if y.numel():
        lo, hi = int(y.min().item()), int(y.max().item())
        if lo < 0 or hi >= num_classes:
            raise DataError(
                f"{src}: labels must lie in 0..{num_classes - 1}, found {lo}..{hi}; "
                "pass the right number of classes"
            )
    if not h.dtype.is_floating_point:
        h = h.to(torch.float64)
    if h.numel() and not _all_finite(h):
        bad = int((~torch.isfinite(h)).any(dim=1).sum().item())
        raise DataError(
            f"{src}: {bad} feature rows contain NaN or Inf; fix the model/inputs "
            "or drop those samples (--skip-nonfinite)"
        )
    return h, y


#: tests set this to run the device (torch) reduction on the CPU and compare both paths
_FORCE_TORCH_PATH = False


def _reduce_batch_torch(
    h: torch.Tensor, y: torch.Tensor, K: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch counts, class means, centred rows and per-class sums of squares (float64), on
    the batch's device: the GPU path."""
    h = h.to(torch.float64)
    cnt = torch.bincount(y, minlength=K)
    sums = torch.zeros(K, h.shape[1], dtype=torch.float64, device=h.device)
    sums.index_add_(0, y, h)
    bmeans = sums / cnt.clamp_min(1).to(torch.float64)[:, None]
    centred = h - bmeans[y]
    bss = torch.zeros(K, dtype=torch.float64, device=h.device)
    bss.index_add_(0, y, (centred * centred).sum(dim=1))
    return cnt, bmeans, centred, bss


def _reduce_batch_numpy(
    h: torch.Tensor, y: torch.Tensor, K: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same reduction as :func:`_reduce_batch_torch` with numpy on the CPU, where its
    elementwise kernels measured 2–8× faster than torch's (this is the hot loop of
    ``measure`` on feature files); results are handed back as zero-copy tensors."""
    hn = h.numpy() if h.dtype in (torch.float32, torch.float64) else h.double().numpy()
    yn = y.numpy()
    owned = hn.dtype != np.float64
    hn = hn.astype(np.float64, copy=False)  # a private copy unless already float64 (shared)
    cnt = np.bincount(yn, minlength=K)
    sums = torch.zeros(K, hn.shape[1], dtype=torch.float64)
    sums.index_add_(0, y, torch.from_numpy(hn))
    bmeans = sums.numpy() / np.maximum(cnt, 1)[:, None]
    if owned:
        hn -= bmeans[yn]  # centre in place: the float64 copy is ours
        centred = hn
    else:
        centred = hn - bmeans[yn]
    bss = np.bincount(yn, weights=np.einsum("ij,ij->i", centred, centred), minlength=K)
    return (
        torch.from_numpy(cnt.astype(np.int64)),
        torch.from_numpy(bmeans),
        torch.from_numpy(centred),
        torch.from_numpy(bss.astype(np.float64)),
    )


def _gram(X: torch.Tensor) -> torch.Tensor:
    """``XᵀX`` in float64.  On the CPU numpy's ``X.T @ X`` runs a symmetric rank-k update
    (syrk: half the flops of a general GEMM, measured 2× faster than torch's matmul here);
    on a GPU the matmul stays on the device."""
    if X.device.type == "cpu":
        Xn = X.numpy()
        return torch.from_numpy(Xn.T @ Xn)
    return X.T @ X


class ClassStats:
    """Per-class counts, means, pooled within-class scatter and per-class sum of squares.

    Parameters
    ----------
    num_classes:
        ``K``; labels must lie in ``0..K-1``.
    dim:
        feature dimension ``d``.
    device:
        where the float64 states live (``"cpu"`` by default; ``"cuda"`` accumulates on the
        GPU so batches need not be copied to the host).
    source:
        a name used in error messages (a file path, usually).
    """

    #: the names of :data:`STATES`, in order
    states = tuple(st.name for st in STATES)

    def __init__(
        self,
        num_classes: int,
        dim: int,
        device: str | torch.device | None = None,
        *,
        source: str = "features",
    ) -> None:
        if int(num_classes) < 1:
            raise UsageError(f"{source}: num_classes must be at least 1, got {num_classes}")
        if int(dim) < 1:
            raise UsageError(f"{source}: feature dimension must be at least 1, got {dim}")
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.device = torch.device(device or "cpu")
        self.source = source
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> ClassStats:
        """Restore the empty state."""
        K, d = self.num_classes, self.dim
        for st in STATES:
            setattr(
                self, f"_{st.name}", torch.zeros(st.shape(K, d), dtype=st.dtype, device=self.device)
            )
        self._memo: dict[Any, Any] = {}
        return self

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
        return int(self._counts.sum().item())

    # The numpy views below are computed once per state and read-only.
    @property
    def counts(self) -> np.ndarray:
        """``n_k`` as an int64 numpy array (K,)."""
        return self._frozen("counts", lambda: self._counts.cpu().numpy())

    @property
    def means(self) -> np.ndarray:
        """Class means ``μ_k`` as a float64 numpy array (K, d); rows of empty classes are 0."""
        return self._frozen("means", lambda: self._means.cpu().numpy())

    @property
    def scatter(self) -> np.ndarray:
        """Pooled within-class scatter ``S_W = N·Σ_W`` (d, d), float64, symmetric."""

        def sym() -> np.ndarray:
            s = self._scatter.cpu().numpy()
            out = s + s.T  # symmetrise away the rounding of the accumulated GEMMs
            out *= 0.5
            return out

        return self._frozen("scatter", sym, fresh=True)

    @property
    def class_ss(self) -> np.ndarray:
        """Per-class sum of squared distances to the class mean, ``n_k σ_k²`` (K,)."""
        return self._frozen("class_ss", lambda: self._class_ss.cpu().numpy())

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
    def _check_batch(self, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return check_batch(h, y, self.num_classes, self.dim, self.source)

    def update(self, features: ArrayLike, labels: ArrayLike) -> ClassStats:
        """Fold a batch ``(features (B, d), labels (B,))`` into the statistics.

        The batch is promoted to float64 on the statistics' device, reduced two-pass
        (batch class means, then one GEMM for the centred scatter), and merged.
        """
        h = as_tensor(features, self.device)
        y = as_tensor(labels, self.device)
        h, y = self._check_batch(h, y)
        if h.shape[0] == 0:
            return self
        if self.device.type == "cpu" and not _FORCE_TORCH_PATH:
            cnt, bmeans, centred, bss = _reduce_batch_numpy(h, y, self.num_classes)
        else:
            cnt, bmeans, centred, bss = _reduce_batch_torch(h, y, self.num_classes)
        self._merge_parts(cnt, bmeans, centred, bss)
        return self

    def merge(self, other: ClassStats) -> ClassStats:
        """Combine ``other`` into ``self`` in place with the pairwise (Chan) update."""
        if not isinstance(other, ClassStats):
            raise UsageError(f"cannot merge ClassStats with {type(other).__name__}")
        if (other.num_classes, other.dim) != (self.num_classes, self.dim):
            raise DataError(
                f"cannot merge statistics of shape (K={other.num_classes}, d={other.dim}) "
                f"into (K={self.num_classes}, d={self.dim}); were they made from the same layer?"
            )
        dev = self.device
        self._merge_parts(
            other._counts.to(dev),
            other._means.to(dev),
            None,
            other._class_ss.to(dev),
            scatter=other._scatter.to(dev),
        )
        return self

    def _merge_parts(
        self,
        cnt_b: torch.Tensor,
        means_b: torch.Tensor,
        centred_b: torch.Tensor | None,
        ss_b: torch.Tensor,
        *,
        scatter: torch.Tensor | None = None,
    ) -> None:
        """Pairwise update with partition B given by counts, means, class_ss and either
        its centred rows (then ``S_W^B`` and the cross term come from ONE GEMM) or its
        scatter matrix."""
        cnt_a = self._counts
        n = cnt_a + cnt_b
        na = cnt_a.to(torch.float64)
        nb = cnt_b.to(torch.float64)
        nn_ = n.to(torch.float64)
        both = (cnt_a > 0) & (cnt_b > 0)
        delta = means_b - self._means
        w = torch.zeros_like(na)
        w[both] = na[both] * nb[both] / nn_[both]
        # new means: classes only in B take B's mean exactly, classes in neither stay 0
        frac = torch.where(n > 0, nb / nn_.clamp_min(1.0), torch.zeros_like(nb))
        self._means = self._means + delta * frac[:, None]
        idx = torch.nonzero(both).reshape(-1)
        cross = delta[idx] * w[idx].sqrt()[:, None]  # rows sqrt(c_k) δ_k: Σ c_k δδᵀ = crossᵀcross
        self._scatter += _gram(centred_b) if centred_b is not None else scatter
        if idx.numel():
            self._scatter += _gram(cross)
        self._class_ss += ss_b + w * (delta * delta).sum(dim=1)
        self._counts = n
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
        device: str | torch.device | None = None,
        source: str = "features",
    ) -> ClassStats:
        """Statistics of a whole array, folded in batches of ``batch_size`` (all at once
        when ``None``)."""
        y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
        if num_classes is None:
            if y.size == 0:
                raise DataError(f"{source}: no labels, cannot infer the number of classes")
            num_classes = int(np.max(y)) + 1
        shape = tuple(features.shape)
        if len(shape) < 1:
            raise DataError(f"{source}: features must be a 2-D array (N, d)")
        dim = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        st = cls(num_classes, dim, device=device, source=source)
        n = shape[0]
        step = n if not batch_size else int(batch_size)
        if n != y.shape[0]:
            raise DataError(f"{source}: {n} feature rows but {y.shape[0]} labels; they must match")
        for start in range(0, n, max(step, 1)):
            st.update(features[start : start + step], labels[start : start + step])
        return st

    def copy(self) -> ClassStats:
        """A deep copy."""
        out = ClassStats(self.num_classes, self.dim, self.device, source=self.source)
        for st in STATES:
            setattr(out, f"_{st.name}", getattr(self, f"_{st.name}").clone())
        return out

    def to(self, device: str | torch.device) -> ClassStats:
        """Move the states to ``device`` (in place) and return self."""
        self.device = torch.device(device)
        for st in STATES:
            setattr(self, f"_{st.name}", getattr(self, f"_{st.name}").to(self.device))
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
            a = np.asarray(arrays[st.name])
            if a.shape != st.shape(K, d):
                raise CacheError(
                    f"{source}: statistics {st.name!r} has shape {a.shape}, expected "
                    f"{st.shape(K, d)}; the cache is corrupt, re-extract it"
                )
            if a.dtype.kind not in ("iu" if st.dtype == torch.int64 else "f"):
                raise CacheError(
                    f"{source}: statistics {st.name!r} have dtype {a.dtype}; re-extract"
                )
            a = a.astype(st.numpy_dtype.newbyteorder("="), copy=False)
            if (st.dtype == torch.int64 and (a < 0).any()) or not np.isfinite(a).all():
                raise CacheError(
                    f"{source}: statistics contain negative counts or NaN/Inf; re-extract"
                )
            setattr(out, f"_{st.name}", torch.as_tensor(a))
        scatter = np.asarray(out._scatter)
        if np.array_equal(scatter[:8], scatter[:, :8].T):
            # written symmetrised (state_dict): serve it as the symmetric scatter without
            # another d×d pass; a private copy, since the tensor shares the array
            sym = np.array(scatter, dtype=np.float64)
            sym.flags.writeable = False
            out._memo["scatter"] = sym
        return out

    def flatten(self) -> torch.Tensor:
        """Every state as one float64 vector (in :data:`STATES` order), for collectives."""
        return torch.cat(
            [getattr(self, f"_{st.name}").to(torch.float64).reshape(-1) for st in STATES]
        )

    @classmethod
    def unflatten(
        cls, flat: torch.Tensor, num_classes: int, dim: int, *, source: str = "features"
    ) -> ClassStats:
        """The inverse of :meth:`flatten` (counts must be whole numbers)."""
        K, d = int(num_classes), int(dim)
        out = cls(K, d, source=source)
        flat = flat.detach().cpu().to(torch.float64)
        pos = 0
        for st in STATES:
            shape = st.shape(K, d)
            n = int(np.prod(shape))
            part = flat[pos : pos + n].reshape(shape).clone()
            pos += n
            if st.dtype == torch.int64:
                if not bool(torch.all(part == torch.round(part))):
                    raise CacheError(f"{source}: gathered {st.name} are not integers")
                part = part.to(torch.int64)
            setattr(out, f"_{st.name}", part)
        if pos != flat.numel():
            raise CacheError(f"{source}: {flat.numel()} gathered numbers, expected {pos}")
        return out

    def __repr__(self) -> str:
        return f"ClassStats(num_classes={self.num_classes}, dim={self.dim}, n={self.n})"
