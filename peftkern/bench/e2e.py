"""End-to-end training step on a Llama-architecture model: peft vs peft + `peftkern.accelerate`.

One model (random weights from a LlamaConfig; LoRA on every linear, or prefix tuning with P virtual tokens)
is timed twice in one process: as peft builds it, then after `accelerate(model)` (and `restore` afterwards).
A step is forward + backward + AdamW step + zero_grad on random token ids; rows carry the step time ("full"),
tokens_per_s and peak memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .. import _backend
from ._check import e2e as e2e_check
from ._check import e2e_reference
from ._timing import triton_why_not


@dataclass
class Case:
    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    seq: int
    batch: int
    r: int = 16
    p: float = 0.05
    method: str = "lora"  # or "prefix": PrefixTuningConfig with r virtual tokens


# "llama-7b" and "llama-1b" both mean a ~1.1B-parameter Llama (Llama-3.2-1B's shape with a 32k vocabulary so
# the LM head does not drown the LoRA layers): bf16, batch 2 x seq 2048, no gradient checkpointing, fits 80 GB.
_ONE_B = Case("llama-1.1b", 2048, 16, 8192, 32, 8, 32000, 2048, 2)
_ONE_B_PREFIX = Case("llama-1.1b-prefix64", 2048, 16, 8192, 32, 8, 32000, 2048, 2, r=64, p=0.0, method="prefix")
_FOUR_L = Case("llama-4l", 2048, 4, 8192, 32, 8, 32000, 1024, 2)
PRESETS = {
    "llama-7b": [_ONE_B, _ONE_B_PREFIX],
    "llama-1b": [_ONE_B, _ONE_B_PREFIX],
    "tiny": [Case("tiny", 64, 2, 172, 4, 2, 256, 64, 4),
             Case("tiny-prefix16", 64, 2, 172, 4, 2, 256, 64, 4, r=16, p=0.0, method="prefix")],
}
QUICK = {
    "llama-7b": [_FOUR_L],
    "llama-1b": [_FOUR_L],
    "tiny": [Case("tiny-quick", 32, 2, 64, 4, 2, 128, 32, 2)],
}

BASELINES = ("peft",)
MIN_STEPS = 10  # timed steps per row, at least: the median and the spread rest on them


def build(case: Case, dtype, device):
    """A peft model over a random-init Llama built from a config: LoRA (r on all linears, lora_B made
    non-zero so the adapters do work) or prefix tuning (r virtual tokens, SDPA attention as peft runs it)."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=case.vocab, hidden_size=case.hidden, intermediate_size=case.intermediate,
                      num_hidden_layers=case.layers, num_attention_heads=case.heads,
                      num_key_value_heads=case.kv_heads, max_position_embeddings=case.seq)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    if case.method == "prefix":
        model.set_attn_implementation("sdpa")
        cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=case.r)
        return peft.get_peft_model(model, cfg).train()
    lora = peft.LoraConfig(r=case.r, lora_alpha=2 * case.r, lora_dropout=case.p, target_modules="all-linear")
    model = peft.get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model.train()


def _providers(device) -> dict[str, str | None]:
    """provider -> None (runs) or why it is skipped."""
    out: dict[str, str | None] = {"peft": None}
    if device.type != "cuda":
        out["peftkern-torch"] = None
    out["peftkern-triton"] = triton_why_not(device)
    return out


def run(preset: str, dtype, device, quick: bool, timeit, peak_bytes, progress, compile_baseline: bool,
        partial=None):
    """`partial(rows)`, when given, receives the rows so far after each case (a run cut off by a time limit
    keeps the cases it finished: each 1.1B case takes minutes)."""
    from ..integrations.accelerate import accelerate, restore
    from ..integrations.lora_group import projection_groups

    cases = (QUICK.get(preset) if quick else None) or PRESETS[preset]
    rows = []
    for case in cases:
        progress(f"e2e {case.name}: building the model")
        model = build(case, dtype, device)
        params = [p for p in model.parameters() if p.requires_grad]
        ids = torch.randint(0, case.vocab, (case.batch, case.seq), device=device)
        tokens = case.batch * case.seq
        init = [p.detach().clone() for p in params]  # every provider starts from the same adapter weights
        ref = e2e_reference(model, ids)  # peft's logits and gradients: each peftkern row is checked against them
        meta = dict(op="e2e", case=case.name, method=case.method, hidden=case.hidden, layers=case.layers,
                    seq=case.seq, batch=case.batch, r=case.r, dropout=case.p, dtype=str(dtype).split(".")[-1],
                    tokens=tokens, params=sum(p.numel() for p in model.parameters()),
                    trainable=sum(p.numel() for p in params))
        for name, why in _providers(device).items():
            row = dict(meta, provider=name)
            if why:
                rows.append(row | {"skipped": why})
                continue
            progress(f"e2e {case.name} {name}")
            with torch.no_grad():
                for p, p0 in zip(params, init):
                    p.copy_(p0)
            try:
                if name != "peft":
                    summary = accelerate(model)
                    row["fused_layers"] = (f"{summary.prefix_layers} attention" if case.method == "prefix"
                                           else f"{summary.fused_now}/{summary.lora_layers}")
                backend = name.split("-", 1)[1] if name != "peft" else "auto"
                with _backend.use_backend(backend):
                    row |= e2e_check(model, ids, ref) if name != "peft" else {}
                    if name != "peft":  # the check's forward formed them: the timed steps run grouped
                        row["groups"] = len(projection_groups(model))
                    row |= _measure(model, ids, params, tokens, device, quick, timeit, peak_bytes)
            except Exception as e:  # a failing provider is reported, not hidden
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            finally:
                restore(model)
            rows.append(row)
        del model, params, init, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if partial is not None:
            partial(rows)
    return rows


def _measure(model, ids, params, tokens, device, quick, timeit, peak_bytes):
    opt = torch.optim.AdamW(params, lr=1e-5)
    for p in params:
        p.grad = None

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    torch.manual_seed(1)
    first = step().item()  # also creates the optimizer state, so peak memory below is a steady-state step
    res = {"loss_first_step": first, "full": timeit(step, device, quick, min_samples=MIN_STEPS)}
    res["host"] = _host_ms(step, device)
    res["tokens_per_s"] = tokens / (res["full"]["median_ms"] / 1e3)
    res["peak_bytes"] = peak_bytes(step, device)
    return res


def _host_ms(step, device) -> dict:
    """Host time per step: from the call until `step` returns, the device idle at the start (on CUDA the
    host only enqueues; when this is near the device time, the host is what limits the step)."""
    from ._timing import _summary

    times = []
    for _ in range(MIN_STEPS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return _summary(times)
