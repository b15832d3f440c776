"""Timing and environment capture shared by the benchmarks."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable

import torch


def timeit(fn: Callable[[], object], device: torch.device, quick: bool = False) -> dict:
    """Median and 20th/80th percentiles in milliseconds, after warm-up, and `n` the samples behind them.

    CUDA: triton.testing.do_bench (CUDA events, L2 flushed between runs). CPU: blocks of calls (a block
    lasts >= 1 ms), at least MIN_BLOCKS of them and at least `min_run_time` in all, so the percentiles
    describe a spread, never one sample.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        q = do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2]}
    fn()  # warm-up (first calls compile / fill caches)
    number = 1
    while True:  # calls per block
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        if time.perf_counter() - t0 >= 1e-3 or number >= 1 << 16:
            break
        number *= 2
    min_run_time, per_block, spent = (0.05 if quick else 0.3), [], 0.0
    while len(per_block) < MIN_BLOCKS or (spent < min_run_time and len(per_block) < MAX_BLOCKS):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        dt = time.perf_counter() - t0
        spent += dt
        per_block.append(dt / number)
    times = sorted(per_block)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1e3
    return {"median_ms": pick(0.5), "p20_ms": pick(0.2), "p80_ms": pick(0.8), "n": len(times)}


MIN_BLOCKS, MAX_BLOCKS = 7, 500


def noisy(t: dict) -> bool:
    """The 20th-80th percentile spread is over a quarter of the median: a speedup from it is weak."""
    return (t["p80_ms"] - t["p20_ms"]) > 0.25 * t["median_ms"]


def triton_why_not(device: torch.device) -> str | None:
    """Why the triton provider is not benchmarked here: on CPU Triton only runs under its interpreter,
    a correctness tool, not something to time."""
    from .. import _backend

    if device.type == "cpu":
        return "skipped on CPU (Triton runs there only under its interpreter: a correctness tool, not a benchmark)"
    return _backend.triton_unavailable(device)


def cuda_why_not(device: torch.device) -> str | None:
    from .. import _backend

    if device.type != "cuda":
        return "needs a CUDA device"
    return _backend.cuda_unavailable(device, build_if_missing=True)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak allocation above the starting point while running fn (CUDA only; None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def git_commit() -> str:
    if os.environ.get("PEFTKERN_COMMIT"):  # set by gpu_check.sh where the tree travels without .git
        return os.environ["PEFTKERN_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    import peftkern

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "device_type": device.type,
        "commit": git_commit(),
        "peftkern": peftkern.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    for name in ("peft", "transformers"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    return env


def measure_train(call, grads, exclude, device: torch.device, quick: bool, timeit=timeit, peak_bytes=peak_bytes):
    """fwd / bwd / full timings, bytes saved for backward and peak bytes of one training step.

    call(): the forward on fixed inputs; grads: tensors whose .grad is cleared between runs;
    exclude: tensors (parameters, inputs) not counted as saved activations.
    """
    from .._memory import saved_bytes

    y = call()
    gy = torch.randn_like(y)
    res = {"y_checksum": y.float().abs().mean().item()}  # same inputs: providers must agree closely
    del y

    def clear():
        for t in grads:
            t.grad = None

    res["fwd"] = timeit(call, device, quick)
    y = call()
    res["bwd"] = timeit(lambda y=y: (clear(), y.backward(gy, retain_graph=True)), device, quick)
    del y
    res["full"] = timeit(lambda: (clear(), call().backward(gy)), device, quick)
    clear()
    res["saved_bytes"] = saved_bytes(call, exclude)
    res["peak_bytes"] = peak_bytes(lambda: (clear(), call().backward(gy)), device)
    clear()
    return res


def provider_rows(op: str, case_name: str, shape: dict, provs: dict, measure, progress) -> list[dict]:
    """One row per provider of one case: skipped (provs maps it to the reason), measured
    (measure(fn) -> fields), or failed (a failing provider is reported, not hidden)."""
    rows = []
    for name, fn in provs.items():
        row = dict(op=op, case=case_name, provider=name) | shape
        if isinstance(fn, str):
            rows.append(row | {"skipped": fn})
            continue
        progress(f"{op} {case_name} {name}")
        try:
            row |= measure(fn)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
    return rows
