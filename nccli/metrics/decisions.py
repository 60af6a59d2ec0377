"""The second pass over the features: ``nc4``, ``acc``, ``ncc_acc`` and ``margin_min``.

For every sample the pass needs two decisions over all K classes — the classifier's
``argmax_k (w_k·h + b_k)`` and the nearest class mean ``argmin_k ||h − μ_k||`` — and the
one-vs-rest margin ``z_y − max_{k≠y} z_k``: two (N × K × d) products, the largest cost of
``measure`` when K is large.

The decisions are those of float64 arithmetic, computed in two steps on the CPU:

1. **float32 screen.** Every row ``[h − μ_G, 1]`` is scored against ``[w_k | b_k]`` and
   ``[2μ_k | −||μ_k||²]`` (``μ`` measured from ``μ_G``; the larger ``2hᵀμ_k − ||μ_k||²``,
   the nearer the mean) by two float32 GEMMs per tile of classes — the bias rides along
   as a column, so no extra pass adds it — and a running top-2 keeps the best and the
   second-best score of each row.  The float32 score ``s̃`` of any class differs from the
   exact one by at most (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1:
   inputs rounded once, ``n`` products summed in any order)

       |s̃ − s| ≤ E = 1.01 · (n + 3) · u · (||x|| · max_k ||a_k|| + max_k |c_k|) + τ,

   with ``u = 2⁻²⁴``, ``x = h − μ_G``, ``a_k`` the class's ``w_k`` (or ``2μ_k``) and ``c_k``
   its ``b_k`` (or ``||μ_k||²``), ``n`` the row length, and ``τ = n · 2⁻¹⁰⁸`` for values
   that underflow (the pass keeps every input below 2⁴⁰ in magnitude, or falls back to
   float64 for the chunk).  When the best score exceeds the
   second by more than ``2E`` the float32 winner is the exact winner, and the float64
   winner too (the 1 % slack covers float64's own rounding, ~10⁸ times smaller).
2. **float64 rescoring.** Rows whose top two are within ``2E`` (near-ties, exact ties
   included, which float64 resolves to the first index as ``argmax`` does) are recomputed
   over all classes in float64, as is every row whose margin could be the smallest
   (``m̃ − 2E ≤`` the smallest upper bound ``m̃ + 2E`` seen), so ``margin_min`` is the
   float64 value too.

On near-collapsed features almost no row needs step 2 (the top score leads by a large
fraction of ``||x||·||w||``, against ``E ≈ 6·10⁻⁵·||x||·||w||`` at d = 1024); on random
features and a random classifier under 1 % do (40 rows of 6000 at K = 5000, d = 1024).  ``screen=False``, and
any device other than the CPU, runs the whole pass in float64 (the original algorithm).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from nccli.metrics import pairwise as pw
from nccli.metrics.nc import Undefined, check_classifier
from nccli.stats import ClassStats, as_array, as_tensor, check_batch, import_torch

__all__ = ["nc4_pass"]

#: float64 (rows × class-tile) temporaries of one step of the float64 pass: the logits and
#: the distances, and their argmax/argmin scratch
_NC4_TEMPS = 4
#: the NC4 pass never uses class tiles narrower than this (rows are split instead)
_NC4_MIN_TILE = 256
#: float32 unit round-off
_U32 = 2.0**-24
#: inputs of the float32 screen stay below this magnitude (no overflow in any sum)
_SCREEN_MAX = 2.0**40
#: the screen's rows are padded to a multiple of this many columns (zeros: exact)
_PAD = 16


def _nc4_blocks(
    W: np.ndarray, mu: np.ndarray, b: np.ndarray, mu_sq: np.ndarray, t: int
) -> list[tuple]:
    """``W`` and ``μ`` in class tiles: ``(k0, W_tile, μ_tile, bias, ||μ||²)`` per tile (row
    ranges: views, no copy)."""
    K = b.size
    return [
        (k0, W[k0 : k0 + t], mu[k0 : k0 + t], b[k0 : k0 + t], mu_sq[k0 : k0 + t])
        for k0 in range(0, K, t)
    ]


def _running(best: Any, idx: Any, vals: Any, k0: int, xp: Any, largest: bool) -> tuple[Any, Any]:
    """Fold one tile into a running argmax (``largest``) or argmin with ties to the first
    index, as ``argmax``/``argmin`` over the whole row resolve them: a later tile wins only
    when strictly better."""
    if xp is np:
        j = np.argmax(vals, axis=1) if largest else np.argmin(vals, axis=1)
        v = np.take_along_axis(vals, j[:, None], axis=1)[:, 0]
    else:
        j = xp.argmax(vals, dim=1) if largest else xp.argmin(vals, dim=1)
        v = xp.gather(vals, 1, j[:, None])[:, 0]
    if best is None:
        return v, j + k0
    better = v > best if largest else v < best
    return xp.where(better, v, best), xp.where(better, j + k0, idx)


def _nc4_rows(hc: Any, blocks: list[tuple], xp: Any, y: Any = None) -> tuple[Any, ...]:
    """Classifier decision and nearest mean of the centred rows ``hc``, tile by tile, in
    float64; with the labels ``y`` also each row's one-vs-rest margin ``z_y − max_{k≠y} z_k``."""
    pred_v = pred = ncc_v = ncc = None
    n = hc.shape[0]
    inf = float("inf")
    own = (
        xp.full((n,), -inf, dtype=hc.dtype)
        if xp is np
        else xp.full((n,), -inf, dtype=hc.dtype, device=hc.device)
    )
    rest = own.clone() if xp is not np else own.copy()
    for k0, W, mu, b, mu_sq in blocks:
        logits = hc @ W.T
        logits += b
        dist = hc @ mu.T
        dist *= -2.0  # exact: then ``+ ||μ||²`` rounds as ``||μ||² - 2·prod`` does
        dist += mu_sq
        pred_v, pred = _running(pred_v, pred, logits, k0, xp, largest=True)
        ncc_v, ncc = _running(ncc_v, ncc, dist, k0, xp, largest=False)
        if y is None:
            continue
        # the true class's logit where it falls in this tile, and the best of the others
        mine = (y >= k0) & (y < k0 + logits.shape[1])
        r = xp.nonzero(mine)[0] if xp is np else xp.nonzero(mine)[:, 0]
        if r.shape[0]:
            cols = y[r] - k0
            own[r] = logits[r, cols]
            logits[r, cols] = -inf
        top = logits.max(axis=1) if xp is np else logits.max(dim=1).values
        rest = xp.maximum(rest, top)
    return (pred, ncc) if y is None else (pred, ncc, own - rest)


class _Top2:
    """Running best value, its index (first on ties) and the second-best value of each row
    over tiles of scores, all maxima."""

    def __init__(self, n: int) -> None:
        self.v1 = np.full(n, -np.inf, dtype=np.float32)
        self.v2 = self.v1.copy()
        self.i1 = np.zeros(n, dtype=np.int64)

    def fold(self, S: np.ndarray, k0: int, rows: np.ndarray) -> None:
        """Fold the tile ``S`` (rows × classes from ``k0``; overwritten)."""
        j = np.argmax(S, axis=1)
        t1 = S[rows, j]
        S[rows, j] = -np.inf
        t2 = np.max(S, axis=1)
        better = t1 > self.v1  # a later tile wins only when strictly better
        self.v2 = np.where(better, np.maximum(self.v1, t2), np.maximum(self.v2, t1))
        self.v1 = np.where(better, t1, self.v1)
        self.i1 = np.where(better, j + k0, self.i1)

    def sure(self, bound: np.ndarray) -> np.ndarray:
        """Rows whose winner leads by more than twice the scores' error ``bound``."""
        return (self.v1.astype(np.float64) - self.v2) > 2.0 * bound


def _abs_max(a: np.ndarray) -> float:
    """``max |a|`` without an ``|a|`` copy (0 for an empty array)."""
    return max(float(a.max(initial=0.0)), -float(a.min(initial=0.0)))


class _Screen:
    """The float32 screen of the module docstring: ``[W | b]`` and ``[2μ | −||μ||²]`` stacked
    per class tile, float32, rows padded with zeros."""

    def __init__(self, W: np.ndarray, mu: np.ndarray, b: np.ndarray, mu_sq: np.ndarray) -> None:
        K, d = W.shape
        self.d, self.n = d, -(-(d + 1) // _PAD) * _PAD
        present = np.isfinite(mu_sq)
        # empty classes are never the nearest mean: a score far below any real one
        q = np.where(present, mu_sq, 2.0**110)
        # Σ_i |x_i a_i| ≤ ||x||·||a_{1..d}|| + |a_{d+1}| (the last column's partner is 1)
        self.w_max = float(np.sqrt(np.einsum("ij,ij->i", W, W)).max(initial=0.0))
        self.b_max = _abs_max(b)
        self.m_max = 2.0 * float(np.sqrt(np.einsum("ij,ij->i", mu, mu))[present].max(initial=0.0))
        self.q_max = float(q[present].max(initial=0.0))
        big = max(_abs_max(W), self.b_max, 2 * _abs_max(mu))  # no K×d temporary
        self.ok = big < _SCREEN_MAX and self.q_max < _SCREEN_MAX**2
        self.c = 1.01 * (self.n + 3) * _U32
        self.tau = self.n * 2.0**-108
        self.W, self.mu, self.b, self.q, self.K = W, mu, b, q, K

    def tiles(self, t: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """``(k0, [w | b], [2μ | −q])`` per tile of ``t`` classes, float32 (t', n) each
        (two products per tile, so that each result is contiguous for ``argmax``); built
        once per pass."""
        d, out = self.d, []
        for k0 in range(0, self.K, t):
            k1 = min(self.K, k0 + t)
            A = np.zeros((k1 - k0, self.n), dtype=np.float32)
            A[:, :d] = self.W[k0:k1]
            A[:, d] = self.b[k0:k1]
            M = np.zeros((k1 - k0, self.n), dtype=np.float32)
            M[:, :d] = 2.0 * self.mu[k0:k1]  # exact scaling before and after rounding
            M[:, d] = -self.q[k0:k1]
            out.append((k0, A, M))
        return out

    def errors(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The bound ``E`` of each row's float32 logits and negated distances (docstring),
        from the rows ``x = h − μ_G`` (float64, or float32 as screened: their norms are
        raised by ``(n + 4)·u`` for the rounding of ``x`` and of the float32 sum)."""
        x = x[:, : self.d]
        x_norm = np.sqrt(np.einsum("ij,ij->i", x, x).astype(np.float64)) * (1 + (self.n + 4) * _U32)
        e_logit = self.c * (x_norm * self.w_max + self.b_max) + self.tau
        return e_logit, self.c * (x_norm * self.m_max + self.q_max) + self.tau

    def rows(self, h: np.ndarray, mu_g: np.ndarray) -> np.ndarray | None:
        """``[h − μ_G, 1, 0…]`` in float32, the difference taken in float64 and rounded
        once; ``None`` when an entry is too large for the screen."""
        x = np.zeros((h.shape[0], self.n), dtype=np.float32)
        np.subtract(h, mu_g, out=x[:, : self.d], dtype=np.float64, casting="same_kind")
        if _abs_max(x) >= _SCREEN_MAX:
            return None
        x[:, self.d] = 1.0
        return x

    def run(self, x: np.ndarray, y: np.ndarray, tiles: list) -> tuple[np.ndarray, ...]:
        """Screen the rows ``x`` (:meth:`rows`): the float32 decisions, the rows they are
        sure for, the float32 margins and their error bound."""
        n = x.shape[0]
        e_logit, e_dist = self.errors(x)
        rows = np.arange(n)
        pred, near = _Top2(n), _Top2(n)
        own = np.full(n, -np.inf, dtype=np.float32)
        buf = np.empty((n, tiles[0][1].shape[0]), dtype=np.float32)
        for k0, A, M in tiles:
            S = np.matmul(x, A.T, out=buf[:, : A.shape[0]])
            mine = (y >= k0) & (y < k0 + A.shape[0])
            own[mine] = S[rows[mine], y[mine] - k0]
            pred.fold(S, k0, rows)
            near.fold(np.matmul(x, M.T, out=S), k0, rows)
        sure = pred.sure(e_logit) & near.sure(e_dist)
        rest = np.where(pred.i1 == y, pred.v2, pred.v1)
        margin = own.astype(np.float64) - rest
        return pred.i1, near.i1, sure, margin, 2.0 * e_logit


def _centred(h: np.ndarray, mu_g: np.ndarray) -> np.ndarray:
    """``h − μ_G`` in float64 (a copy, centred in place)."""
    hc = h.astype(np.float64)
    hc -= mu_g
    return hc


def _screen_chunk(
    h: np.ndarray, x: np.ndarray, y: np.ndarray, pass_: tuple, best: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Decisions of rows ``h`` (screened as ``x``) through the float32 screen, near-ties and
    the candidates for the smallest margin rescored in float64; returns the decisions and
    the smallest margin so far (``best``: the smallest float64 margin before these rows).
    ``pass_``: the screen, its tiles, the float64 blocks and ``μ_G``."""
    screen, tiles, blocks, mu_g = pass_
    pred, ncc, sure, margin, err = screen.run(x, y, tiles)
    upper = float(np.min(margin + err)) if margin.size else np.inf
    redo = ~sure | (margin - err <= min(best, upper))
    r = np.nonzero(redo)[0]
    if r.size:
        p64, n64, gap = _nc4_rows(_centred(h[r], mu_g), blocks, np, y[r])
        pred[r], ncc[r] = p64, n64
        best = min(best, float(gap.min()))
    return pred, ncc, best


def _tile_rows(K: int, n: int, budget: int, temps: int, itemsize: int) -> tuple[int, int]:
    """Classes per tile and rows per step so that the rows × tile temporaries fit ``budget``."""
    t = min(K, max(_NC4_MIN_TILE, budget // (itemsize * temps * max(1, n))))
    return t, max(1, budget // (itemsize * temps * t))


class _Tally:
    """Counts of the pass: samples, disagreements, correct decisions, smallest margin."""

    def __init__(self) -> None:
        self.n = self.mismatch = self.correct = self.ncc_correct = 0
        self.margin = float("inf")

    def add(self, pred: np.ndarray, ncc: np.ndarray, y: np.ndarray) -> None:
        self.n += len(y)
        self.mismatch += int(np.sum(pred != ncc))
        self.correct += int(np.sum(pred == y))
        self.ncc_correct += int(np.sum(ncc == y))

    def result(self, W: np.ndarray) -> dict[str, float]:
        if self.n == 0:
            raise Undefined("no samples")
        n = self.n
        out = {"nc4": self.mismatch / n, "acc": self.correct / n, "ncc_acc": self.ncc_correct / n}
        w_norm = float(np.linalg.norm(W))
        if W.shape[0] > 1 and w_norm > 0:  # else no other class, or no scale: the registry says why
            out["margin_min"] = self.margin / w_norm
        return out


def _centred_problem(
    stats: ClassStats, weight: Any, bias: Any | None, budget: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``W``, ``μ − μ_G``, the bias of the centred features ``b + Wμ_G``, ``||μ_k − μ_G||²``
    (``inf`` for classes without samples: never the nearest) and ``μ_G``."""
    W, b = check_classifier(weight, bias, stats.num_classes, stats.dim, stats.source)
    K = W.shape[0]
    b = b if b is not None else np.zeros(K)
    # distances are shift-invariant: measure them from μ_G so a large common offset of the
    # features does not eat the digits that separate the classes
    mu_g = stats.global_mean("global")
    mu = stats.means - mu_g
    step = max(1, budget // (8 * max(1, stats.dim)))  # row blocks: no second K×d array
    mu_sq = np.concatenate(
        [np.sum(mu[s : s + step] * mu[s : s + step], axis=1) for s in range(0, K, step)]
    )
    mu_sq[stats.counts == 0] = np.inf
    # logits of centred features: W(h - μ_G) + (b + W μ_G) is the same affine map
    return W, mu, b + W @ mu_g, mu_sq, mu_g


def nc4_pass(
    batches: Iterable[tuple[Any, Any]],
    stats: ClassStats,
    weight: Any,
    bias: Any | None = None,
    *,
    device: Any = None,
    budget: int = pw.TILE_BYTES,
    screen: bool = True,
) -> dict[str, float]:
    """Second chunked pass: ``nc4``, ``acc``, ``ncc_acc`` and ``margin_min`` (the smallest
    one-vs-rest margin ``(z_{y_i} − max_{k≠y_i} z_k) / ||W||_F``, ``z = W h_i + b``).

    ``nc4`` is the fraction of samples whose classifier decision ``argmax_k(w_k·h + b_k)``
    differs from the nearest class mean ``argmin_k ||h - μ_k||``.  Each chunk of rows is
    multiplied by ``[W; μ]`` one tile of classes at a time, with a running argmax/argmin
    (ties to the first index, as over the whole row); the rows × tile temporaries stay
    within ``budget`` bytes (the rows of a chunk are split when a tile of
    :data:`_NC4_MIN_TILE` classes would not fit).  Distances use ``-2hᵀμ_k + ||μ_k||²``
    (``||h||²`` is the same for every k), measured from ``μ_G``.  Classes without samples
    are never the nearest mean.  The decisions and ``margin_min`` are float64's: on the CPU
    through the float32 screen of the module docstring (``screen=False``: float64 only).
    """
    on_cpu = str(getattr(device, "type", device or "cpu")).split(":")[0] == "cpu"
    torch = None if on_cpu else import_torch()  # numpy on the CPU: no torch
    dev = "cpu" if on_cpu else torch.device(device)
    W, mu, b, mu_sq, mu_g = _centred_problem(stats, weight, bias, budget)
    K = W.shape[0]
    xp = np if on_cpu else torch
    scr = _Screen(W, mu, b, mu_sq) if on_cpu and screen else None
    blocks: list[tuple] | None = None
    tiles: list = []
    rows = rows32 = 1
    tally = _Tally()
    for h, y in batches:
        h, y = (as_array(h), as_array(y)) if on_cpu else (as_tensor(h, dev), as_tensor(y, dev))
        h, y = check_batch(h, y, K, stats.dim, stats.source)
        if blocks is None:  # tiles from the first (largest) chunk and the budget
            t, rows = _tile_rows(K, h.shape[0], budget, _NC4_TEMPS, 8)
            blocks = _nc4_blocks(W, mu, b, mu_sq, t)
            if scr is not None and scr.ok:
                t32, rows32 = _tile_rows(K, h.shape[0], budget, 2, 4)
                tiles = scr.tiles(t32)
            if not on_cpu:
                blocks = [(k0, *(torch.as_tensor(a, device=dev) for a in r)) for k0, *r in blocks]
                mu_g_t = torch.as_tensor(mu_g, device=dev)
        if not on_cpu:
            hc = h.to(torch.float64) - mu_g_t
            for s in range(0, hc.shape[0], rows):
                pred, ncc, gap = (
                    v.cpu().numpy()
                    for v in _nc4_rows(hc[s : s + rows], blocks, xp, y[s : s + rows])
                )
                tally.margin = min(tally.margin, float(gap.min()))
                tally.add(pred, ncc, y[s : s + rows].cpu().numpy())
            continue
        step = rows32 if tiles else rows
        for s in range(0, h.shape[0], step):
            hs, ys = h[s : s + step], y[s : s + step]
            x = scr.rows(hs, mu_g) if tiles else None
            if x is not None:
                pred, ncc, tally.margin = _screen_chunk(
                    hs, x, ys, (scr, tiles, blocks, mu_g), tally.margin
                )
            else:
                pred, ncc, gap = _nc4_rows(_centred(hs, mu_g), blocks, np, ys)
                tally.margin = min(tally.margin, float(gap.min()))
            tally.add(pred, ncc, ys)
    return tally.result(W)
