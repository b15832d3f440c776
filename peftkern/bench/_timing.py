"""Timing and environment capture shared by the benchmarks."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable

import torch

# GPU sample floors: every kernel row rests on >= MIN_KERNEL_SAMPLES timed calls; a call that takes
# STEP_MS or longer (a whole training step, or the torch reference at full size) on >= MIN_STEP_SAMPLES.
MIN_KERNEL_SAMPLES, MIN_STEP_SAMPLES, STEP_MS = 50, 10, 50.0
MIN_BLOCKS, MAX_BLOCKS = 7, 500  # CPU: blocks of calls


def timeit(fn: Callable[[], object], device: torch.device, quick: bool = False, min_samples: int | None = None) -> dict:
    """Median, 20th/80th percentiles, min and max in milliseconds after warm-up, and `n`, the samples behind
    them (the spread is part of the result: `noisy` flags a wide one).

    CUDA: one CUDA-event pair per call, L2 flushed before each (as triton.testing.do_bench does), for
    about 100 ms (40 quick) and at least `min_samples` calls (default: MIN_KERNEL_SAMPLES, or
    MIN_STEP_SAMPLES when one call takes STEP_MS or more). CPU: blocks of calls (a block lasts >= 1 ms),
    at least MIN_BLOCKS of them and at least `min_run_time` in all, so the percentiles describe a spread,
    never one sample.
    """
    if device.type == "cuda":
        return _cuda_timeit(fn, device, quick, min_samples)
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
    while len(per_block) < max(MIN_BLOCKS, min_samples or 0) or (spent < min_run_time and len(per_block) < MAX_BLOCKS):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        dt = time.perf_counter() - t0
        spent += dt
        per_block.append(dt / number)
    return _summary([t * 1e3 for t in per_block])


def _summary(times_ms: list[float]) -> dict:
    times = sorted(times_ms)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]
    return {"median_ms": pick(0.5), "p20_ms": pick(0.2), "p80_ms": pick(0.8), "min_ms": times[0],
            "max_ms": times[-1], "n": len(times)}


def _cuda_timeit(fn, device: torch.device, quick: bool, min_samples: int | None) -> dict:
    warmup_ms, rep_ms = (10.0, 40.0) if quick else (25.0, 100.0)
    with torch.cuda.device(device):
        flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device)  # > any GPU's L2
        fn()  # first call: compiles, autotunes, allocates
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        est, calls = 0.0, 0
        while calls < 5 and (calls == 0 or est * calls < 50.0):  # estimate: 1 call if long, else up to 5
            flush.zero_()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            est = (est * calls + start.elapsed_time(end)) / (calls + 1)
            calls += 1
        est = max(est, 1e-3)
        floor = min_samples or (MIN_STEP_SAMPLES if est >= STEP_MS else MIN_KERNEL_SAMPLES)
        n = max(floor, min(int(rep_ms / est), 10_000))
        for _ in range(max(0, int(warmup_ms / est) - calls)):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        del flush
        return _summary([s.elapsed_time(e) for s, e in zip(starts, ends)])


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
    if device.type == "cuda":
        env["gpu"] = gpu_info(device)
    return env


_SMI_FIELDS = ("name", "driver_version", "memory.total", "clocks.sm", "clocks.max.sm", "clocks.mem",
               "clocks.max.mem", "power.limit", "temperature.gpu", "clocks_throttle_reasons.active")


def gpu_info(device: torch.device) -> dict:
    """The GPU behind the numbers: name, compute capability, SMs and memory from torch; driver, clocks
    (current and max, MHz), power limit and throttle reasons from nvidia-smi when it can be read."""
    props = torch.cuda.get_device_properties(device)
    info: dict = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                  "sm_count": props.multi_processor_count, "memory_mib": props.total_memory // 2**20}
    for key in ("clock_rate", "memory_clock_rate"):  # kHz, where this torch exposes them
        if getattr(props, key, None):
            info[key.replace("rate", "mhz")] = getattr(props, key) // 1000
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        out = subprocess.run(["nvidia-smi", f"--id={index}", f"--query-gpu={','.join(_SMI_FIELDS)}",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
        if out.returncode != 0:
            raise RuntimeError((out.stderr or out.stdout).strip()[:200])
        values = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]
        info["nvidia_smi"] = dict(zip(_SMI_FIELDS, values))
    except (OSError, subprocess.SubprocessError, RuntimeError, IndexError) as e:
        info["nvidia_smi"] = f"unreadable: {type(e).__name__}: {e}"[:200]
    return info


def measure_train(call, grads, exclude, device: torch.device, quick: bool, timeit=timeit, peak_bytes=peak_bytes):
    """fwd / bwd / full timings, bytes saved for backward and peak bytes of one training step.

    call(): the forward on fixed inputs; grads: tensors whose .grad is cleared between runs;
    exclude: tensors (parameters, inputs) not counted as saved activations. Correctness is not judged
    here: `provider_rows` checks every peftkern provider elementwise (bench/_check.py) first.
    """
    from .._memory import saved_bytes

    y = call()
    gy = torch.randn_like(y)
    res = {}
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


def provider_rows(op: str, case_name: str, shape: dict, provs: dict, measure, progress, *, check) -> list[dict]:
    """One row per provider of one case: skipped (provs maps it to the reason), measured
    (measure(fn) -> fields), or failed (a failing provider is reported, not hidden).

    check(name, fn) -> row fields: every peftkern provider is checked elementwise against a high-precision
    result on the same inputs before it is timed ("check" per tensor; "error" when a tensor fails the rule,
    which makes it an error row: no speedup, and `peftkern bench` exits 1). Baselines are not checked."""
    rows = []
    for name, fn in provs.items():
        row = dict(op=op, case=case_name, provider=name) | shape
        if isinstance(fn, str):
            rows.append(row | {"skipped": fn})
            continue
        progress(f"{op} {case_name} {name}")
        try:
            if name.startswith("peftkern"):
                row |= check(name, fn)
                _free()
            row |= measure(fn)  # timed even when the check failed: the numbers help find the fault
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:300] if "error" not in row else row["error"]
        rows.append(row)
    return rows


def _free() -> None:
    """Return the reference's memory (fp64 copies, attention scores) before timing."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
