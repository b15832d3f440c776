"""Fine-tune a small Llama-architecture model with peft (LoRA or prefix tuning), with and without peftkern.

The model is built from a LlamaConfig (no download) and trained character by character on the text file in
examples/data/. Both runs start from the same weights and see the same batches; they alternate step by step
so a busy machine slows both alike. LoRA dropout masks come from different generators (peft's nn.Dropout vs
the op's seeded mask), so the two loss curves agree closely but not bit for bit; with --dropout 0 (and with
prefix tuning, which has no dropout) they agree to rounding.

    python examples/finetune.py                           # LoRA on CPU, a few seconds per 10 steps
    python examples/finetune.py --method prefix           # prefix tuning, 16 virtual tokens
    python examples/finetune.py --device cuda --hidden 1024 --layers 8 --seq 512 --batch 8 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


class CharTokenizer:
    """One token per distinct character of the training text."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


def batches(data: torch.Tensor, seq: int, batch: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        yield torch.stack([data[s:s + seq] for s in starts.tolist()])


def build(vocab: int, args, device, dtype):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 32),
                      num_key_value_heads=max(1, args.hidden // 64), max_position_embeddings=args.seq)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    if args.method == "prefix":
        return peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                  num_virtual_tokens=args.virtual_tokens))
    lora = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout,
                           target_modules="all-linear")
    # peft keeps adapters in fp32 on a half-precision base (autocast_adapter_dtype=True, its default).
    return peft.get_peft_model(model, lora)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.join(HERE, "data", "tiny_corpus.txt"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--method", default="lora", choices=["lora", "prefix"])
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--virtual-tokens", type=int, default=16, help="prefix length (prefix tuning)")
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto", help="peftkern backend: auto, torch, triton or cuda")
    args = ap.parse_args(argv)

    import peftkern
    from peftkern.integrations.accelerate import accelerate

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    with open(args.data, encoding="utf-8") as f:
        text = f.read()
    tok = CharTokenizer(text)
    data = tok.encode(text)
    plain = build(len(tok.chars), args, device, dtype)
    fast = copy.deepcopy(plain)
    summary = accelerate(fast)
    method = (f"prefix tuning, {args.virtual_tokens} virtual tokens" if args.method == "prefix"
              else f"LoRA r={args.rank} on all linears")
    print(f"model: Llama hidden={args.hidden} layers={args.layers} vocab={len(tok.chars)} (characters), "
          f"{method}; {sum(p.numel() for p in plain.parameters() if p.requires_grad):,} "
          f"trainable parameters; {args.device} {args.dtype}")
    print(f"peftkern: {summary}")

    runs = {"peft": plain, "peft+peftkern": fast}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=args.lr) for k, m in runs.items()}
    times = {k: [] for k in runs}
    losses = {k: [] for k in runs}

    def step(name, ids):
        model, opt = runs[name], opts[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times[name].append(time.perf_counter() - t0)
        losses[name].append(loss.item())

    print(f"{'step':>5} {'loss peft':>10} {'loss +peftkern':>15} {'ms/step peft':>13} {'ms/step +peftkern':>18}")
    with peftkern.use_backend(args.backend):
        for i, ids in enumerate(batches(data, args.seq, args.batch, args.steps, args.seed), start=1):
            ids = ids.to(device)
            for name in runs:
                step(name, ids)
            if i % args.log_every == 0 or i == args.steps:
                w = slice(max(0, i - args.log_every), i)
                ms = {k: 1e3 * sorted(v[w])[len(v[w]) // 2] for k, v in times.items()}  # median of the window
                lo = {k: sum(v[w]) / len(v[w]) for k, v in losses.items()}
                print(f"{i:>5} {lo['peft']:>10.4f} {lo['peft+peftkern']:>15.4f} {ms['peft']:>13.1f} "
                      f"{ms['peft+peftkern']:>18.1f}", flush=True)

    skip = min(3, args.steps - 1)  # first steps warm up (allocator, Triton compiles)
    med = {k: sorted(v[skip:])[len(v[skip:]) // 2] * 1e3 for k, v in times.items()}
    toks = args.batch * args.seq
    print(f"median step: peft {med['peft']:.1f} ms, peft+peftkern {med['peft+peftkern']:.1f} ms "
          f"({med['peft'] / med['peft+peftkern']:.2f}x; {toks / med['peft+peftkern'] * 1e3:,.0f} tokens/s)")
    print(f"loss {losses['peft+peftkern'][0]:.3f} -> {sum(losses['peft+peftkern'][-5:]) / 5:.3f} (mean of last 5)")

    fast.eval()
    with torch.no_grad():
        ids = tok.encode("The keeper ").to(device)[None]
        for _ in range(60):
            nxt = fast(input_ids=ids[:, -args.seq:]).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    print("sample:", repr(tok.decode(ids[0].tolist())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
