"""Reading a cache: :class:`Cache` validates a file before anything trusts it.

Opening a cache checks, in order: a regular file that is readable HDF5 with nothing
pointing outside it (:func:`nccli.io.h5safe.open_input`), an nccli root, a root encoding
this nccli reads (:mod:`nccli.io.cache.encoding`), ``complete``, and the layout of every
element (shapes of every dataset against the root's ``num_samples``/``num_classes``, and
what each declares against what the file stores).  Arrays are read on demand, each
guarded: labels in range (a bounded chunk at a time), parameters finite, statistics
checksummed (:mod:`nccli.io.cache.elements`).  Any failure of h5py on a damaged file
becomes one :class:`~nccli.errors.CacheError` naming the file and what was being read.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from nccli.errors import CacheError, DataError, NCError
from nccli.io._util import one_line
from nccli.io.cache.elements import ROOT, declared_vs_stored, read_stats
from nccli.io.cache.encoding import IOSpec, get_spec, read_attr, read_elem, unsupported, versions
from nccli.io.h5safe import iter_rows, open_input
from nccli.layers import Layer
from nccli.stats import ClassStats

__all__ = ["Cache", "is_cache", "verify_cache"]


@contextlib.contextmanager
def _reading(where: str, what: str) -> Iterator[None]:
    """One CacheError for a damaged file: h5py reports damage with whatever its C layer hit
    (OSError, RuntimeError, KeyError, ValueError, even AttributeError on a dangling link)."""
    try:
        yield
    except NCError:
        raise
    except Exception as exc:  # noqa: BLE001 - any h5py failure on a damaged file
        raise CacheError(
            f"{where}: cannot read {what} ({one_line(exc, 120)}); the cache is corrupt, "
            "re-extract it"
        ) from None


class Cache:
    """A validated, read-only nccli cache (one file).

    ``layers`` maps group names to :class:`~nccli.layers.Layer` records in depth order;
    ``version`` is the format version of the file (``"1"`` or ``"2"``)."""

    layers: dict[str, Layer]
    version: str

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        where = str(self.path)
        if self.path.name.endswith(".partial"):
            raise CacheError(
                f"{where}: this is an unfinished cache (extraction was interrupted); "
                "finish it with `nccli extract --resume` or delete it"
            )
        if not self.path.exists():
            raise DataError(f"{where}: no such file")
        try:
            self.h5 = open_input(self.path, "cache", error=CacheError)
        except OSError as exc:
            raise CacheError(
                f"{where}: not a readable HDF5 file ({exc}); it may be truncated or corrupt, "
                "re-extract it"
            ) from None
        try:
            self._validate(where)
        except Exception:
            self.h5.close()
            raise

    def _validate(self, where: str) -> None:
        f = self.h5
        spec = get_spec(f)
        if spec.type == "nccli-run":  # nccli.io.cache.run
            raise CacheError(
                f"{where}: is a run file (the observations of an nccli.Tracker), not a "
                "single-checkpoint cache; nccli measure and compare read it"
            )
        if spec.type != ROOT and read_attr(f, "format") != ROOT:
            raise CacheError(
                f"{where}: not an nccli cache (root attribute encoding-type is missing)"
            )
        if spec not in (IOSpec(ROOT, v) for v in versions(ROOT)):
            sv = read_attr(f, "schema_version")
            raise unsupported(f, where, ROOT, "" if sv is None else f" (schema_version {sv!r})")
        if not read_attr(f, "complete", False):
            raise CacheError(
                f"{where}: the cache is marked incomplete; re-run `nccli extract --resume`"
            )
        self.version = spec.version
        with _reading(where, "the layer layout"):
            self.layers = read_elem(f, ROOT, where)
        if not self.layers:
            raise CacheError(f"{where}: the cache holds no layers; re-extract")

    # -- metadata
    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes as plain Python values."""
        return {k: read_attr(self.h5, k) for k in self.h5.attrs}

    @property
    def num_samples(self) -> int:
        return int(read_attr(self.h5, "num_samples"))

    @property
    def num_classes(self) -> int:
        return int(read_attr(self.h5, "num_classes"))

    def labels(self) -> np.ndarray:
        """All labels (N,), read and validated against ``num_classes`` a bounded chunk at a
        time (their size was checked against the file when it was opened)."""
        K = self.num_classes
        with _reading(str(self.path), "/labels"):
            ds = self.h5["labels"]
            out = np.empty(ds.shape, dtype=np.int64)
            for start, y in iter_rows(ds):
                if y.size and (y.min() < 0 or y.max() >= K):
                    raise CacheError(
                        f"{self.path}: /labels contains values outside 0..{K - 1}; "
                        "the cache is corrupt, re-extract it"
                    )
                out[start : start + len(y)] = y
        return out

    def _read(self, key: str, sl: Any) -> np.ndarray:
        with _reading(str(self.path), f"/{key}"):
            return np.asarray(self.h5[key][sl])

    def weight(self, layer: str) -> tuple[np.ndarray, np.ndarray | None] | None:
        """``(W, b)`` of the layer's module (float64), or None if it is not linear."""
        g = f"layers/{layer}"
        with _reading(str(self.path), f"/{g}"):
            if "weight" not in self.h5[g]:
                return None
            has_bias = "bias" in self.h5[g]
            for key in ("weight", "bias") if has_bias else ("weight",):
                declared_vs_stored(self.h5[f"{g}/{key}"], str(self.path), f"/{g}/{key}")
        W = self._read(f"{g}/weight", ()).astype(np.float64)
        b = self._read(f"{g}/bias", ()).astype(np.float64) if has_bias else None
        if not np.isfinite(W).all() or (b is not None and not np.isfinite(b).all()):
            raise CacheError(f"{self.path}: /{g}/weight or bias contains NaN/Inf")
        if b is not None and b.shape != (W.shape[0],):
            raise CacheError(
                f"{self.path}: /{g}/bias has shape {b.shape}, expected ({W.shape[0]},)"
            )
        return W, b

    def stats(self, layer: str) -> ClassStats:
        """The statistics stored at extraction time."""
        with _reading(str(self.path), f"the statistics of layer {layer!r}"):
            g = self.h5[f"layers/{layer}"]
            if "stats" not in g:
                raise CacheError(
                    f"{self.path}: layer {layer!r} has no stored statistics; use --recompute"
                )
            st = read_stats(g, str(self.path), self.num_classes, self.layers[layer].dim)
        if st.dim != self.layers[layer].dim or st.num_classes != self.num_classes:
            raise CacheError(f"{self.path}: statistics of {layer!r} do not match the layer shape")
        if st.n != self.num_samples:
            raise CacheError(
                f"{self.path}: statistics of {layer!r} count {st.n} samples, the cache holds "
                f"{self.num_samples}; the cache is corrupt, re-extract it"
            )
        return st

    def iter_features(
        self, layer: str, chunk_rows: int = 8192
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(features, labels)`` chunks in row order; memory is one chunk."""
        key = f"layers/{layer}/features"
        with _reading(str(self.path), f"/{key}"):
            present = key in self.h5
        if not present:
            raise CacheError(
                f"{self.path}: layer {layer!r} was cached without features (statistics only, "
                "the default for language models), and nc4, acc, ncc_acc and --recompute "
                "stream them again; measure other metrics (-m nc1,nc2,nc3) or re-extract "
                "with --store-features"
            )
        N = self.num_samples
        for start in range(0, N, chunk_rows):
            sl = slice(start, min(N, start + chunk_rows))
            yield self._read(key, sl), self._read("labels", sl)

    def close(self) -> None:
        self.h5.close()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """``max|a-b|`` relative to the larger magnitude of the two arrays (0 when equal)."""
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    scale = max(float(np.abs(a).max()), float(np.abs(b).max())) if a.size else 0.0
    return 0.0 if diff == 0.0 else diff / scale


def verify_cache(
    path: str | os.PathLike[str], *, deep: bool = False, chunk_rows: int = 8192, rtol: float = 1e-8
) -> list[str]:
    """Check a finished cache end to end; one line per layer, a CacheError at the first fault.

    Checks the schema and every dataset's shape (:class:`Cache`), the label range, each
    layer's parameters (finite, fitting shapes) and statistics (the stored ``sha256``,
    shapes, finiteness), and that each layer's class counts equal the histogram of
    ``/labels``.  ``deep`` also recomputes every layer's statistics from its cached
    features and compares them with the stored ones (relative ``rtol``).  The error names
    the file and the layer.
    """
    lines: list[str] = []
    where = str(path)
    try:
        with Cache(path) as c:
            labels = c.labels()
            K = c.num_classes
            hist = np.bincount(labels, minlength=K)
            for name, info in c.layers.items():
                at = f"{where}: layer {name!r}"
                c.weight(name)
                done: list[str] = []
                if not info.has_stats:
                    lines.append(f"{name}: no stored statistics (measure uses --recompute)")
                    continue
                st = c.stats(name)
                signed = c.version != "1" or "sha256" in c.h5[f"layers/{name}/stats"].attrs
                done.append("checksum" if signed else "no checksum (written by an older nccli)")
                if not np.array_equal(st.counts, hist):
                    raise CacheError(
                        f"{at}: the statistics count {st.counts.tolist()} samples per class but "
                        f"/labels holds {hist.tolist()}; the cache is corrupt, re-extract it"
                    )
                done.append("class counts")
                if deep and "features" in info.stored:
                    fresh = ClassStats(K, info.dim, source=f"{where}:/layers/{name}/features")
                    try:
                        for h, y in c.iter_features(name, chunk_rows):
                            fresh.update(h, y)
                    except DataError as exc:
                        if isinstance(exc, CacheError):
                            raise
                        raise CacheError(
                            f"{at}: the cached features are unusable ({one_line(exc, 120)}); "
                            "the cache is corrupt, re-extract it"
                        ) from None
                    for state in ClassStats.states:
                        a, b = getattr(fresh, state), getattr(st, state)
                        rel = _max_rel_diff(a.astype(np.float64), b.astype(np.float64))
                        if rel > rtol:
                            raise CacheError(
                                f"{at}: the stored statistics ({state}) differ from the cached "
                                f"features by {rel:.2g} (relative); the cache is corrupt, "
                                "re-extract it"
                            )
                    done.append("recomputed from features")
                elif deep:
                    done.append("no features to recompute")
                lines.append(f"{name}: ok ({', '.join(done)})")
    except NCError:
        raise
    except Exception as exc:  # noqa: BLE001 - any h5py failure on a damaged file
        raise CacheError(
            f"{where}: cannot read the cache ({one_line(exc, 120)}); it is corrupt, re-extract it"
        ) from None
    return lines


def is_cache(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is an HDF5 file that claims to be (or is laid out as) a cache.

    A cache whose root attributes were damaged still counts, so that the reader explains
    what is wrong instead of treating it as a plain features file.
    """
    if os.path.isdir(path):
        return False
    try:
        # root attributes only: the reader that opens the file next walks its contents
        f = open_input(path, "input", contents=False)
    except NCError:
        raise  # a FIFO, no file descriptors left, a link out of the file: say so
    except Exception:  # noqa: BLE001 - not HDF5, unreadable, truncated
        return False
    with f:
        try:
            return (
                read_attr(f, "format") == ROOT
                or read_attr(f, "encoding-type") == ROOT
                or ("layers" in f and "features" not in f)
            )
        except Exception:  # noqa: BLE001 - a damaged root: let Cache explain what is wrong
            return True
