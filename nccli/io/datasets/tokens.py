"""Token data for language models: sequences of token ids, from an array or a text file.

:func:`open_tokens` reads, by the file's bytes (never its extension):

- a ``.npy`` array, memory-mapped after numpy has checked its header against the file's
  size (``allow_pickle=False``): ``(S, T)`` token ids, S sequences of T tokens, or a 1-D
  stream cut into sequences of ``seq_len``;
- a ``.npz`` file: its member ``input_ids``, ``tokens``, ``token_ids`` or ``ids`` (or its
  only member), read by :func:`nccli.io.h5safe.npz_member` (stored members memory-mapped,
  deflated ones within a bound);
- anything else as UTF-8 text (at most :data:`TEXT_LIMIT` bytes), tokenized by the
  ``tokenize`` callable the caller passes (the model's own tokenizer) into one stream,
  cut into sequences of ``seq_len`` tokens; the tokens after the last whole sequence are
  left out (counted).

Token ids must be integers (not bool, not float); :func:`scan` checks them against the
vocabulary (``0 <= id < vocab``), hashes their values (int64, little-endian) and counts
the samples: every position ``t < T-1`` of a sequence is one, labelled with the token at
``t+1``; with a pad id, positions whose own token or next token is the pad are left out.
This module imports numpy only.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nccli.errors import DataError, UsageError
from nccli.io._util import check_input_file, file_sha256, one_line
from nccli.io.h5safe import npz_member

__all__ = ["NPZ_KEYS", "TEXT_LIMIT", "TokenScan", "Tokens", "open_tokens", "scan"]

#: the largest text file tokenized (it is read and tokenized whole)
TEXT_LIMIT = 256 << 20
#: ``.npz`` members taken as token ids, in this order
NPZ_KEYS = ("input_ids", "tokens", "token_ids", "ids")
#: rows (sequences) checked and hashed at a time
SCAN_ROWS = 4096


@dataclass
class Tokens:
    """``ids`` (S, T) integer token ids (possibly a memory map) and where they came from."""

    ids: Any
    path: Path
    kind: str  # "npy", "npz:<member>", "text"
    seq_len: int | None = None  # --seq-len, when the sequences were cut from a stream
    cut_tokens: int = 0  # tokens after the last whole sequence, left out
    file_sha256: str | None = None  # text: the file's digest (its tokens are hashed too)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.ids.shape[0]), int(self.ids.shape[1])

    def describe(self) -> str:
        S, T = self.shape
        how = f", cut into --seq-len {self.seq_len}" if self.seq_len else ""
        return f"tokens {self.path} ({self.kind}{how}): {S} sequences of {T} tokens"


def _stream_to_sequences(stream: np.ndarray, seq_len: int, where: str) -> tuple[np.ndarray, int]:
    S = stream.shape[0] // seq_len
    if S == 0:
        raise DataError(
            f"{where}: {stream.shape[0]} tokens make no sequence of --seq-len {seq_len}; "
            "use a smaller --seq-len or more text"
        )
    return stream[: S * seq_len].reshape(S, seq_len), int(stream.shape[0] - S * seq_len)


def _npz_ids(path: Path) -> tuple[Any, str]:
    try:
        with zipfile.ZipFile(path) as zf:
            keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            key = next((k for k in NPZ_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise DataError(
                    f"{path}: holds {', '.join(keys) or 'no arrays'}; nccli takes the token "
                    f"ids from a member named {', '.join(NPZ_KEYS)} (or the only member)"
                )
            return npz_member(path, zf, key), f"npz:{key}"
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({one_line(exc, 100)})") from None


def _npy_ids(path: Path) -> Any:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(
            f"{path}: not a readable .npy array ({one_line(exc, 100)}); the file is "
            "truncated, forged or holds Python objects"
        ) from None


def _text_ids(path: Path, tokenize: Callable[[str], Sequence[int]] | None) -> np.ndarray:
    if tokenize is None:
        raise UsageError(f"{path}: a text file needs the model's tokenizer")
    size = path.stat().st_size
    if size > TEXT_LIMIT:
        raise DataError(
            f"{path}: {size} bytes of text; nccli tokenizes at most {TEXT_LIMIT} bytes at "
            "once: tokenize it yourself and pass the token ids as .npy"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: neither a .npy/.npz array nor UTF-8 text (byte {exc.start} is not "
            "UTF-8); pass token ids as .npy or a UTF-8 text file"
        ) from None
    return np.asarray(tokenize(text), dtype=np.int64).reshape(-1)


def open_tokens(
    spec: str,
    *,
    seq_len: int | None = None,
    tokenize: Callable[[str], Sequence[int]] | None = None,
    max_len: int | None = None,
) -> Tokens:
    """The token sequences of ``spec`` (module docstring).  ``tokenize`` turns text into
    ids (the model's tokenizer); ``max_len`` (the model's positions) is named in the
    message that asks for ``--seq-len``."""
    path = Path(spec)
    check_input_file(path, "token data")
    if not path.exists():
        raise DataError(f"{path}: no such token file")
    with open(path, "rb") as f:
        magic = f.read(8)
    limit = f" (at most the model's {max_len} positions)" if max_len else ""
    if magic.startswith(b"\x93NUMPY") or magic.startswith(b"PK"):
        ids, kind = (_npy_ids(path), "npy") if magic[:1] == b"\x93" else _npz_ids(path)
        digest = None
    else:
        if seq_len is None:
            raise UsageError(
                f"--data {spec}: a text file is tokenized and cut into sequences of "
                f"--seq-len tokens, which changes every number; pass --seq-len N{limit}"
            )
        ids, kind, digest = _text_ids(path, tokenize), "text", file_sha256(path)
    if ids.dtype.kind not in "iu":
        raise DataError(
            f"{path}: token ids have dtype {ids.dtype}; they must be integers (int32, "
            "int64, uint16, ...)"
        )
    cut = 0
    if ids.ndim == 1:
        if seq_len is None:
            raise UsageError(
                f"--data {spec}: a 1-D array of {ids.shape[0]} tokens is one stream; pass "
                f"--seq-len N to cut it into sequences{limit}"
            )
        ids, cut = _stream_to_sequences(ids, seq_len, str(path))
    elif ids.ndim != 2:
        raise DataError(
            f"{path}: token ids of shape {ids.shape}; expected (sequences, tokens) or a 1-D stream"
        )
    elif seq_len is not None and kind != "text":
        raise UsageError(
            f"--seq-len {seq_len}: {path} holds sequences already ({ids.shape[0]} of "
            f"{ids.shape[1]} tokens); --seq-len cuts only a text file or a 1-D stream"
        )
    if ids.shape[0] < 1 or ids.shape[1] < 2:
        raise DataError(
            f"{path}: {ids.shape[0]} sequences of {ids.shape[1]} tokens; a next-token sample "
            "needs sequences of at least 2 tokens"
        )
    return Tokens(ids, path, kind, seq_len, cut, digest)


@dataclass
class TokenScan:
    """What one pass over the ids found: their digest, and the samples of each sequence."""

    sha256: str
    kept: np.ndarray  # (S,) samples (positions with a label) of each sequence
    pad_left_out: int  # positions left out because they or their label are the pad id


def scan(tokens: Tokens, vocab: int, pad_id: int | None, where: str) -> TokenScan:
    """Check every id against ``vocab``, hash the values and count the samples."""
    ids = tokens.ids
    S, T = tokens.shape
    h = hashlib.sha256(f"nccli-tokens-1|{S}x{T}|".encode())
    kept = np.empty(S, dtype=np.int64)
    dropped = 0
    for lo in range(0, S, SCAN_ROWS):
        a = np.asarray(ids[lo : lo + SCAN_ROWS])
        lo_id, hi_id = int(a.min()), int(a.max())
        if lo_id < 0 or hi_id >= vocab:
            bad = lo_id if lo_id < 0 else hi_id
            r, c = np.argwhere(a == bad)[0]
            raise DataError(
                f"{where}: token id {bad} at sequence {lo + int(r)}, position {int(c)} is "
                f"outside the model's vocabulary of {vocab} tokens (0..{vocab - 1}); are "
                "these the token ids of this model's tokenizer?"
            )
        h.update(np.ascontiguousarray(a, dtype="<i8").tobytes())
        if pad_id is None:
            kept[lo : lo + len(a)] = T - 1
        else:
            keep = (a[:, :-1] != pad_id) & (a[:, 1:] != pad_id)
            kept[lo : lo + len(a)] = keep.sum(axis=1)
            dropped += int(keep.size - keep.sum())
    return TokenScan(h.hexdigest(), kept, dropped)
