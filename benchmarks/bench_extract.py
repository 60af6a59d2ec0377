"""Extraction throughput: `nccli.extract` against a bare forward pass of the same model.

A zoo ResNet-18 (CIFAR stem, full width 64 by default) with random weights is saved as a
checkpoint in a temporary directory, and ``--n`` synthetic CIFAR-shaped images (uint8,
``(N, 32, 32, 3)``) are written to an ``.npz``.  For each device / AMP setting it times,
in the same process (process start and imports excluded):

- bare   the images already in memory as a float32 ``(N, 3, 32, 32)`` tensor, sliced into
         batches and run through ``model(x)`` under ``torch.inference_mode()`` (and
         ``torch.autocast`` with AMP), nothing stored
- nccli  ``nccli.extract([ckpt], data.npz, ...)``: load the checkpoint, discover the
         layers, read and scale the uint8 batches, forward with hooks, float64
         statistics, write features + logits to HDF5 in the writer thread, finalize

Both get the same model, batch size and device; the best of ``--repeat`` interleaved
runs is kept.  ``ratio`` is nccli / bare throughput (1.0 = extraction costs nothing on
top of the forward pass); the median of the per-repeat ratios is less sensitive to
slow drifts of other load on a shared machine, and the process CPU time per sample (all
threads: writer, loader, statistics included) is the least sensitive of all.

    python benchmarks/bench_extract.py                      # cpu, plus cuda when present
    python benchmarks/bench_extract.py --n 1024 --device cpu
    python benchmarks/bench_extract.py --device cuda --n 20000 --batch-size 512
    python benchmarks/bench_extract.py --profile             # cProfile of one nccli run
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import platform
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import nccli
from nccli import zoo
from nccli.extract import AMP_DTYPES, extract


def make_inputs(tmp: Path, n: int, width: int, num_classes: int) -> tuple[str, Path, Path]:
    spec = f"resnet18:num_classes={num_classes},width={width}"
    torch.manual_seed(0)
    model = zoo.build(spec)
    ckpt = tmp / "resnet18.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    y = (np.arange(n) % num_classes).astype(np.int64)
    data = tmp / "images.npz"
    np.savez(data, x=x, y=y)
    return spec, ckpt, data


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(
    model: torch.nn.Module, x: torch.Tensor, batch_size: int, device: torch.device, amp: str
) -> tuple[float, float]:
    """Wall and process CPU seconds of one pass over ``x`` (in host memory), nothing kept."""
    dtype = AMP_DTYPES[amp]
    autocast = (
        torch.autocast(device_type="cuda", dtype=dtype)
        if device.type == "cuda" and dtype is not None
        else contextlib.nullcontext()
    )
    sync(device)
    w, c = time.perf_counter(), time.process_time()
    with torch.inference_mode(), autocast:
        for s in range(0, x.shape[0], batch_size):
            out = model(x[s : s + batch_size].to(device, non_blocking=True))
        del out
    sync(device)
    return time.perf_counter() - w, time.process_time() - c


def nccli_extract(
    spec: str,
    ckpt: Path,
    data: Path,
    out: Path,
    batch_size: int,
    device: str,
    amp: str,
    limit: int | None = None,
    num_workers: int = 0,
) -> tuple[float, float]:
    """Wall and process CPU seconds (all threads) of one ``nccli.extract`` call."""
    w, c = time.perf_counter(), time.process_time()
    extract(
        [ckpt],
        str(data),
        arch=spec,
        out_dir=out,
        batch_size=batch_size,
        device=device,
        amp=amp,
        overwrite=True,
        limit=limit,
        num_workers=num_workers,
        progress=False,
        distributed=False,
        normalize="none",  # uint8 images: x/255, as the bare forward feeds them
    )
    return time.perf_counter() - w, time.process_time() - c


def run_setting(
    spec: str,
    ckpt: Path,
    data: Path,
    tmp: Path,
    device: str,
    amp: str,
    batch_size: int,
    repeat: int,
    num_workers: int,
) -> dict[str, float | str | int]:
    dev = torch.device(device)
    model = zoo.build(spec)
    model.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    model = model.to(dev).eval()
    z = np.load(data)
    x = torch.from_numpy(z["x"].astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
    if dev.type == "cuda":
        x = x.pin_memory()  # the fastest plain host-to-device loop
    n = int(x.shape[0])
    # warm-up: kernels, allocator, cuDNN autotuning, first HDF5 file
    bare_forward(model, x[: 2 * batch_size], batch_size, dev, amp)
    nccli_extract(spec, ckpt, data, tmp / "warm", batch_size, device, amp, limit=2 * batch_size)
    bare, ours = [], []
    for _ in range(repeat):
        bare.append(bare_forward(model, x, batch_size, dev, amp))
        ours.append(
            nccli_extract(spec, ckpt, data, tmp / "out", batch_size, device, amp, None, num_workers)
        )
    tb, tn = min(t[0] for t in bare), min(t[0] for t in ours)
    cb, cn = min(t[1] for t in bare), min(t[1] for t in ours)
    print(
        f"  {device} amp={amp} runs, wall/cpu s: "
        f"bare {', '.join(f'{w:.2f}/{c:.2f}' for w, c in bare)}; "
        f"nccli {', '.join(f'{w:.2f}/{c:.2f}' for w, c in ours)}",
        file=sys.stderr,
    )
    return {
        "device": device,
        "amp": amp,
        "n": n,
        "batch": batch_size,
        "workers": num_workers,
        "bare_s": tb,
        "nccli_s": tn,
        "bare_sps": n / tb,
        "nccli_sps": n / tn,
        "ratio": tb / tn,
        "paired": float(np.median([b[0] / o[0] for b, o in zip(bare, ours, strict=True)])),
        "bare_cpu_ms": 1e3 * cb / n,
        "nccli_cpu_ms": 1e3 * cn / n,
        "cpu_ratio": cb / cn,
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [
        f"{cpu}, {torch.get_num_threads()} torch threads",
        f"torch {torch.__version__}",
        f"nccli {nccli.__version__}",
        f"python {platform.python_version()}",
    ]
    if torch.cuda.is_available():
        parts.insert(1, torch.cuda.get_device_name(0))
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=None, help="images (default 1024 cpu, 20000 cuda)")
    ap.add_argument("--width", type=int, default=64, help="ResNet-18 base width (64 = full)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 128 cpu, 512 cuda")
    ap.add_argument("--device", default="all", help="cpu, cuda, or all (cpu + cuda if present)")
    ap.add_argument("--amp", default="off,bf16,fp16", help="AMP settings to time on CUDA")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs; best is kept")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="nccli extract --num-workers (default 0 on cpu, 2 on cuda: loading overlaps the GPU)",
    )
    ap.add_argument("--profile", action="store_true", help="cProfile one nccli run per setting")
    args = ap.parse_args(argv)

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device != "all":
            ap.error("--device cuda: CUDA is not available")
        devices.remove("cuda")
    print(f"machine: {machine()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="nccli-bench-") as td:
        tmp = Path(td)
        for device in devices:
            cuda = device.startswith("cuda")
            n = args.n or (20000 if cuda else 1024)
            bs = args.batch_size or (512 if cuda else 128)
            spec, ckpt, data = make_inputs(tmp, n, args.width, args.num_classes)
            amps = [a for a in args.amp.split(",") if a] if cuda else ["off"]
            workers = args.num_workers if args.num_workers is not None else (2 if cuda else 0)
            for amp in amps:
                row = run_setting(spec, ckpt, data, tmp, device, amp, bs, args.repeat, workers)
                rows.append(row)
                print(
                    f"  {device} amp={amp}: bare {row['bare_sps']:.0f}/s, "
                    f"nccli {row['nccli_sps']:.0f}/s, ratio {row['ratio']:.2f}",
                    file=sys.stderr,
                )
                if args.profile:
                    prof = cProfile.Profile()
                    prof.enable()
                    nccli_extract(spec, ckpt, data, tmp / "prof", bs, device, amp, None, workers)
                    prof.disable()
                    buf = io.StringIO()
                    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
                    print(buf.getvalue(), file=sys.stderr)

    print()
    print(f"ResNet-18 width {args.width}, 32x32x3 uint8 images, best of {args.repeat}")
    print(
        "| device | amp | N | batch | workers | bare forward (samples/s) "
        "| nccli extract (samples/s) "
        "| ratio | ratio, median of pairs | CPU ms/sample bare | CPU ms/sample nccli "
        "| CPU ratio |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['device']} | {r['amp']} | {r['n']} | {r['batch']} | {r['workers']} "
            f"| {r['bare_sps']:.1f} "
            f"| {r['nccli_sps']:.1f} | {r['ratio']:.2f} | {r['paired']:.2f} "
            f"| {r['bare_cpu_ms']:.2f} | {r['nccli_cpu_ms']:.2f} | {r['cpu_ratio']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
