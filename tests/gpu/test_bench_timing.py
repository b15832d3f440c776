"""GPU timing in `peftkern bench`: sample floors, the spread, and the GPU recorded with the results."""

from __future__ import annotations

import pytest
import torch

from peftkern.bench import _timing

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="times CUDA events")]
DEV = torch.device("cuda")


def _ordered(t):
    return t["min_ms"] <= t["p20_ms"] <= t["median_ms"] <= t["p80_ms"] <= t["max_ms"] and t["min_ms"] > 0


def test_kernel_timing_takes_at_least_the_kernel_floor():
    x = torch.randn(1024, 1024, device=DEV)
    t = _timing.timeit(lambda: x @ x, DEV, quick=True)
    assert t["n"] >= _timing.MIN_KERNEL_SAMPLES and _ordered(t)


def test_long_calls_take_at_least_the_step_floor():
    t = _timing.timeit(lambda: torch.cuda._sleep(100_000_000), DEV, quick=True)  # ~50-100 ms per call
    assert t["n"] >= _timing.MIN_STEP_SAMPLES and _ordered(t)
    assert _timing.timeit(lambda: torch.cuda._sleep(1000), DEV, quick=True, min_samples=200)["n"] >= 200


def test_environment_records_the_gpu():
    env = _timing.environment(DEV)
    gpu = env["gpu"]
    assert gpu["name"] == torch.cuda.get_device_name(DEV) == env["device"]
    assert gpu["sm_count"] > 0 and gpu["memory_mib"] > 0
    assert isinstance(gpu["nvidia_smi"], (dict, str))  # clocks when nvidia-smi answers, else why not
    for name in ("torch", "triton", "transformers", "peft"):
        assert name in env
