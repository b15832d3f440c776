"""An accelerated peft LoRA model under DDP and FSDP2 (fully_shard) on 2 CPU ranks (gloo): the gradients and
the trained adapters equal a single-process run on the full batch.

One spawn runs both wrappers (children pay the torch/transformers import once); the torch backend is used
(the Triton interpreter is slow and adds nothing to what distribution tests).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2
STEPS = 3
LR = 0.5


def _model(seed: int = 0):
    import peft
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = tf.LlamaForCausalLM(cfg)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a live lora_B, so lora_A gets gradients from step one
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return pm


def _data():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 64, (2 * WORLD, 12), generator=g)  # same token count per rank: means average


def _train(model, ids, params, on_step=None):
    """STEPS SGD steps; returns the gradients of the first step (by parameter name)."""
    opt = torch.optim.SGD([p for _, p in params], lr=LR)
    first = None
    for step in range(STEPS):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        if step == 0:
            first = {n: _full(p.grad).clone() for n, p in params}
        opt.step()
    return first


def _full(t):
    # FSDP2 keeps sharded DTensors; gather them to compare with the single-process tensors.
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach()


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import peftkern
    from peftkern.integrations.accelerate import accelerate

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    os.environ["PEFTKERN_STRICT"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    ids = _data()[rank * 2:(rank + 1) * 2]
    results = {}
    try:
        with peftkern.use_backend("torch"):
            model = _model()
            assert accelerate(model).fused_now == 14
            ddp = DDP(model)
            params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            first = _train(ddp, ids, params)
            results["ddp"] = (first, {n: p.detach().clone() for n, p in params})

            from torch.distributed.fsdp import fully_shard

            model = _model()
            assert accelerate(model).fused_now == 14
            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            first = _train(model, ids, params)
            results["fsdp"] = (first, {n: _full(p).clone() for n, p in params})
        if rank == 0:
            _save(results, os.path.join(out_dir, "results.safetensors"))
        # Both ranks leave together: a rank tearing gloo down while its peer still talks aborts the peer.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _save(results: dict, path: str) -> None:
    """{run: ({param: first-step grad}, {param: final value})} through safetensors (no pickle)."""
    from safetensors.torch import save_file

    save_file({f"{run}/{i}/{n}": t.contiguous() for run, pair in results.items() for i, d in enumerate(pair)
               for n, t in d.items()}, path)


def _load(path) -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for key, t in load_file(str(path)).items():
        run, i, name = key.split("/", 2)
        out.setdefault(run, ({}, {}))[int(i)][name] = t
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import peftkern
    from peftkern.integrations.accelerate import accelerate

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    dist_results = _load(out / "results.safetensors")
    with peftkern.use_backend("torch"):
        model = _model()
        accelerate(model)
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        first = _train(model, _data(), params)
    return dist_results, (first, {n: p.detach().clone() for n, p in params})


def _compare(got, want):
    (g_first, g_final), (w_first, w_final) = got, want
    assert g_first.keys() == w_first.keys() and len(w_first) == 28
    for n in w_first:
        assert w_first[n].abs().max() > 0, n  # every adapter gets a gradient: the comparison means something
        torch.testing.assert_close(g_first[n], w_first[n], rtol=1e-4, atol=1e-6, msg=f"grad {n}")
        torch.testing.assert_close(g_final[n], w_final[n], rtol=1e-4, atol=1e-6, msg=f"param {n}")


def test_ddp_matches_single_process(runs):
    dist_results, single = runs
    _compare(dist_results["ddp"], single)


def test_fsdp2_matches_single_process(runs):
    dist_results, single = runs
    _compare(dist_results["fsdp"], single)
