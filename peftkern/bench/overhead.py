"""Host overhead: what one LoRA layer call, and one whole training step, costs on the host.

A training step calls ~100+ LoRA layers; when the host is slower than the GPU, kernels cannot help. Tensors
here are tiny (compute is negligible), so the time is Python, dispatch, autograd and launches:
  layer rows: an accelerated peft LoRA layer ("peftkern"), peft's own layer ("peft") and a bare frozen
    nn.Linear ("linear", the floor), forward+backward ("full") and forward under no_grad ("fwd"), lora_dropout 0
    and 0.1; per call, out of CHAIN calls in a row (each on the previous output) under one backward;
  step row: a tiny Llama (LoRA on every linear, dropout 0.05), forward + backward + AdamW step, peft vs
    the same model accelerated.
CPU: the thread's CPU time per call (time.thread_time). CUDA: enqueue time, the calls queued behind a long
`torch.cuda._sleep` so the device never makes the host wait. Providers alternate block by block, so machine
noise hits each alike.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

from ._check import check_op, e2e, e2e_reference
from .lora import keep_mask

BASELINES = ("peft", "linear")


@dataclasses.dataclass
class Case:
    name: str
    tokens: int = 8
    hidden: int = 64
    r: int = 8
    p: float = 0.0


LAYER_CASES = [Case("layer-p0"), Case("layer-p0.1", p=0.1)]
# A layer's time is measured as one of CHAIN calls in a row under one backward, as in a model (whose ~100+
# LoRA layers share one backward call): one layer per backward would mostly time autograd's start-up.
CHAIN = 8
ROUNDS, QUICK_ROUNDS = 21, 7  # timed blocks per provider and mode


def _peft_layer(case: Case, device):
    import peft

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(case.hidden, case.hidden)).to(device)
    model = peft.get_peft_model(base, peft.LoraConfig(r=case.r, lora_alpha=2 * case.r, lora_dropout=case.p,
                                                      target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)  # the LoRA term must not be zero for the check
    return model.train(), layer


def _enqueue_block(fn, number: int, device, sleep_s: float = 0.0) -> float:
    """Seconds per call of `fn` on the host; on CUDA queued behind a `sleep_s` device sleep, so device time
    never shows (sleep_s must outlast the block: `_calls_per_block` sizes both)."""
    if device.type != "cuda":
        # The thread's CPU time: what the host spends on the calls (one intra-op thread), without the time the OS
        # gives other processes on a shared machine, which wall time would count against whichever block ran.
        t0 = time.thread_time()
        for _ in range(number):
            fn()
        return (time.thread_time() - t0) / number
    torch.cuda.synchronize(device)
    torch.cuda._sleep(int(sleep_s * 2.0e9))  # cycles; <= 2 GHz SM clocks make it at least sleep_s long
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    dt = time.perf_counter() - t0
    torch.cuda.synchronize(device)
    return dt / number


def _calls_per_block(fns, device) -> tuple[int, float]:
    """(calls per block, device sleep in s): the slowest provider's block lasts ~2 ms on the host (~10 ms on
    CUDA, at most 100 calls: they must fit the launch queue behind the sleep), the sleep 3x that."""
    target = 0.01 if device.type == "cuda" else 0.002
    slowest = 0.0
    for fn in fns:  # synchronized wall time: an upper bound of the host time
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        slowest = max(slowest, (time.perf_counter() - t0) / 5)
    limit = 100 if device.type == "cuda" else 1 << 14
    number = max(1, min(limit, int(target / max(slowest, 1e-7))))
    return number, 3 * number * slowest


def interleaved(fns: dict, device, rounds: int) -> dict[str, dict]:
    """Per provider: host ms per call (median, p20, p80, min, max, n blocks), blocks alternating providers."""
    from ._timing import _summary

    for fn in fns.values():  # warm-up: first calls fill caches (backend choice, plans, kernels)
        for _ in range(3):
            fn()
    number, sleep_s = _calls_per_block(list(fns.values()), device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(_enqueue_block(fn, number, device, sleep_s) * 1e3)
    return {name: _summary(t) | {"calls_per_block": number} for name, t in times.items()}


def _layer_rows(case: Case, device, dtype, rounds: int, progress) -> list[dict]:
    from .. import accelerate

    progress(f"overhead {case.name}")
    _, plain = _peft_layer(case, device)
    plain.to(dtype)
    fused_model, fused = _peft_layer(case, device)
    fused.to(dtype)
    summary = accelerate(fused_model)
    linear = nn.Linear(case.hidden, case.hidden).to(device, dtype).requires_grad_(False)  # the frozen base alone
    x = torch.randn(case.tokens, case.hidden, device=device, dtype=dtype, requires_grad=True)
    layers = {"linear": linear, "peft": plain, "peftkern": fused}
    shape = dict(tokens=case.tokens, hidden=case.hidden, r=case.r, dropout=case.p, dtype=str(dtype).split(".")[-1])
    rows = {name: dict(op="overhead", case=case.name, provider=name) | shape for name in layers}
    rows["peftkern"]["fused_layers"] = f"{summary.fused_now}/{summary.lora_layers}"
    rows["peftkern"] |= _check_layer(fused, case, x)

    def chain(layer):
        y = x
        for _ in range(CHAIN):
            y = layer(y)
        return y

    def full(layer):
        return lambda: chain(layer).sum().backward()

    def fwd(layer):
        def call():
            with torch.no_grad():
                chain(layer)
        return call

    for mode, make in (("full", full), ("fwd", fwd)):
        for name, res in interleaved({n: make(layer) for n, layer in layers.items()}, device, rounds).items():
            rows[name][mode] = {k: v / CHAIN if k.endswith("_ms") else v for k, v in res.items()}
    return list(rows.values())


def _check_layer(layer, case: Case, x0) -> dict:
    """The accelerated layer's output and gradients (x, lora_A, lora_B) against fp64, with the op's own mask."""
    from ..ops.lora import draw_seed
    from ..reference import lora as ref

    w, b = layer.base_layer.weight, layer.base_layer.bias
    a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    keep = None
    if case.p > 0.0:
        from .._backend import requested_backend

        backend = requested_backend()
        backend = "triton" if backend == "auto" and x0.device.type == "cuda" else backend
        torch.manual_seed(1234)  # check_op runs the layer after the same manual_seed: the op draws this seed
        keep = keep_mask(backend, case.tokens, case.hidden, case.p, int(draw_seed(case.p)), x0.device)
    x = x0.detach().requires_grad_(True)
    reference = lambda x, w, b, a, lora_b: ref.lora_linear(x, w, b, a, lora_b, s, keep, case.p)
    return check_op(lambda: layer(x), reference, [x, w, b, a, lora_b], ["dx", "dW", "db", "dA", "dB"], seed=1234)


def _step_rows(device, dtype, rounds: int, progress) -> list[dict]:
    from .. import accelerate, projection_groups, restore
    from .e2e import Case as E2ECase
    from .e2e import build

    progress("overhead tiny-llama-step")
    case = E2ECase("tiny-llama-step", 64, 2, 172, 4, 2, 256, 16, 2, r=8, p=0.05)
    model = build(case, dtype, device)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, case.vocab, (case.batch, case.seq), device=device)
    opt = torch.optim.AdamW(params, lr=1e-5)
    reference = e2e_reference(model, ids)

    def step():
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def as_provider(fused: bool):
        def call():
            if fused:
                accelerate(model)  # a class swap per layer when needed: cheap, and outside the timed block
            else:
                restore(model)
            step()  # untimed: the first forward after accelerate forms the projection groups
        return call

    shape = dict(layers=case.layers, hidden=case.hidden, tokens=case.batch * case.seq, r=case.r, dropout=case.p,
                 dtype=str(dtype).split(".")[-1])
    summary = accelerate(model)
    checked = e2e(model, ids, reference)
    groups = len(projection_groups(model))  # formed by that first forward
    restore(model)
    times: dict[str, list[float]] = {"peft": [], "peftkern": []}
    for fused in (False, True):  # warm-up
        as_provider(fused)()
    _, sleep_s = _calls_per_block([step], device)
    for _ in range(rounds):
        for name, fused in (("peft", False), ("peftkern", True)):
            as_provider(fused)()
            times[name].append(_enqueue_block(step, 1, device, sleep_s) * 1e3)
    restore(model)
    from ._timing import _summary

    rows = []
    for name, t in times.items():
        row = dict(op="overhead", case=case.name, provider=name, full=_summary(t)) | shape
        if name == "peftkern":
            row |= checked | {"fused_layers": f"{summary.fused_now}/{summary.lora_layers}", "groups": groups}
        rows.append(row)
    return rows


def run(preset: str, dtype, device, quick: bool, timeit, peak_bytes, progress, compile_baseline: bool):
    """`peftkern bench overhead`: the preset does not change the (deliberately tiny) shapes."""
    rounds = QUICK_ROUNDS if quick else ROUNDS
    rows = []
    # One intra-op thread: host time is single-threaded anyway, and on a busy machine a parallel region waits
    # for a descheduled worker thread for a whole time slice (steps then took 50x longer, for peft alike).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for case in LAYER_CASES:
            rows += _layer_rows(case, device, dtype, rounds, progress)
        rows += _step_rows(device, dtype, rounds, progress)
    finally:
        torch.set_num_threads(threads)
    for r in rows:  # the target reads as a ratio of host times: peftkern / peft (lower is better)
        if r["provider"] == "peftkern" and "error" not in r:
            peft_row = next(p for p in rows if p["case"] == r["case"] and p["provider"] == "peft")
            r["host_ratio_vs_peft"] = {m: r[m]["median_ms"] / peft_row[m]["median_ms"]
                                       for m in ("full", "fwd") if m in r and m in peft_row}
    return rows
