"""The nccli HDF5 cache — the only code that knows its layout.

Layout, format version 2 (docs/cache-format.md; every group carries ``encoding-type`` /
``encoding-version``, the one version marker, and readers dispatch on them)::

    /                      encoding-type="nccli-cache", encoding-version="2",
                           complete, rows_done, nccli_version, created, checkpoint,
                           checkpoint_sha256, dataset, dataset_digest, split, arch, epoch,
                           step, num_classes, num_samples, torch_version, device, amp,
                           command, classifier, feature_dtype, …
    /labels                (N,) int64
    /indices               (N,) int64  (row of each sample in the dataset)
    /logits                (N, K) float32, optional
    /layers/<name>         encoding-type="nccli-layer"; attrs module, depth, role, dim, io
    /layers/<name>/features (N, d) float16|float32, chunked
    /layers/<name>/weight, /bias   parameters of that layer's module, when linear
    /layers/<name>/stats/  encoding-type="nccli-classstats": counts, means, scatter,
                           class_ss (float64) and their sha256

Modules: :mod:`~nccli.io.cache.encoding` (the (type, version) registry),
:mod:`~nccli.io.cache.elements` (each element's readers and writer),
:mod:`~nccli.io.cache.writer` (``.partial`` → rename), :mod:`~nccli.io.cache.reader`
(validating reader, ``verify``), :mod:`~nccli.io.cache.state` (skip / resume / shard
sets / ``describe``), :mod:`~nccli.io.cache.run` (the run files of ``nccli.Tracker``: one
observation per group, appended atomically).  Version-1 caches (nccli 0.1.0) are still read.
"""

from nccli.io.cache.elements import FORMAT_VERSION, stats_digest
from nccli.io.cache.encoding import IOSpec, get_spec, read_attr
from nccli.io.cache.reader import Cache, is_cache, verify_cache
from nccli.io.cache.state import (
    SHARD,
    SHARD_ATTRS,
    check_shard_set,
    describe,
    existing_matches,
    partial_resumable,
    read_shard,
    shard_path,
    stale_shards,
)
from nccli.io.cache.writer import CacheWriter, partial_path
from nccli.layers import Layer

#: the layer record the writer takes (the same type discovery makes and the reader returns)
LayerSpec = Layer

__all__ = [
    "FORMAT_VERSION",
    "SHARD",
    "SHARD_ATTRS",
    "Cache",
    "CacheWriter",
    "IOSpec",
    "Layer",
    "LayerSpec",
    "check_shard_set",
    "describe",
    "existing_matches",
    "get_spec",
    "is_cache",
    "partial_path",
    "partial_resumable",
    "read_attr",
    "read_shard",
    "shard_path",
    "stale_shards",
    "stats_digest",
    "verify_cache",
]
