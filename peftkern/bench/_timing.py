"""Timing and environment capture shared by the benchmarks."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable

import torch


def timeit(fn: Callable[[], object], device: torch.device, quick: bool = False) -> dict:
    """Median and 20th/80th percentiles in milliseconds, after warm-up.

    CUDA: triton.testing.do_bench (CUDA events, L2 flushed between runs). CPU:
    torch.utils.benchmark's adaptive loop.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        q = do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2]}
    from torch.utils.benchmark import Timer

    fn()  # warm-up (first calls compile / fill caches)
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=0.05 if quick else 0.3
    )
    times = sorted(m.times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1e3
    return {"median_ms": m.median * 1e3, "p20_ms": pick(0.2), "p80_ms": pick(0.8)}


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
