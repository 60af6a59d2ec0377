"""Integrations with training frameworks; each module imports its framework on import.

:mod:`nccli.integrations.lightning` — :class:`~nccli.integrations.lightning.NCCallback`.
"""
