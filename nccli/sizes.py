"""Memory sizes: the ``--max-memory`` grammar, byte counts for people, the machine's memory.

Torch-free, so ``measure --max-memory`` parses without the extraction machinery
(:mod:`nccli.extract.plan` re-exports these).
"""

from __future__ import annotations

import math
import os
import re

from nccli.errors import UsageError

__all__ = ["format_bytes", "meminfo_available", "parse_size", "physical_memory"]

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str | int | float | None) -> float | None:
    """``--max-memory``: bytes, or a number with ``K M G T`` (powers of 1000) or ``KiB MiB
    GiB TiB`` (powers of 1024), a trailing ``B`` optional; ``none`` → no limit (``inf``);
    ``None`` → the default.  A UsageError for anything else."""
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    elif isinstance(text, str) and text.strip().lower() in ("none", "off", "inf"):
        return math.inf
    else:
        m = _SIZE.match(str(text))
        if m is None:
            value = -1.0
        else:
            unit = _UNITS[m.group(2).lower()]
            if m.group(3):
                unit = 1024 ** " kmgt".index(m.group(2).lower() or " ")
            value = float(m.group(1)) * unit
    if not value >= 1:
        raise UsageError(
            f"--max-memory {text!r}: give a size such as 8G, 512M, 2GiB or 1000000 (bytes), "
            "or 'none' for no limit"
        )
    return value


def format_bytes(n: float) -> str:
    """``34.4 GB``, ``512.0 MB``, ``12.3 kB`` (powers of 1000)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def meminfo_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (Linux), else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def physical_memory() -> int:
    """Bytes of physical memory (32 GiB when the system does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 32 << 30
