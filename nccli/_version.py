"""The one source of nccli's version (``pyproject.toml`` reads it at build time)."""

__version__ = "0.1.0"
