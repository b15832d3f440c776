"""An accelerated model copied the ways users copy models — pickled whole (`torch.save(model)`), replicated
by nn.DataParallel, deep-copied — still runs peftkern's ops on its own weights, and restore() undoes it."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from _lora_models import VOCAB, base_model
from _util import DEVICE

import peftkern
from peftkern.integrations import _swap

peft = pytest.importorskip("peft")


def _lora():
    return peft.get_peft_model(base_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                    init_lora_weights=False))


def _ia3():
    return peft.get_peft_model(base_model("llama"), peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                                   feedforward_modules=["down_proj"]))


def _prefix():
    model = peft.get_peft_model(base_model("llama"), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                             num_virtual_tokens=3))
    return model.train()


BUILD = {"lora": _lora, "ia3": _ia3, "prefix": _prefix}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", list(BUILD))
def test_pickle_deepcopy_and_data_parallel_replicas(method):
    model = BUILD[method]()
    plain = copy.deepcopy(model)
    peftkern.accelerate(model)
    swapped = [m for m in model.modules() if _swap.is_swapped(m)]
    assert swapped
    ids = torch.randint(0, VOCAB, (2, 7), device=DEVICE)
    want = _logits(plain, ids)
    for twin in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert sum(_swap.is_swapped(m) for m in twin.modules()) == len(swapped)
        torch.testing.assert_close(_logits(twin, ids), want, atol=2e-5, rtol=2e-5)
    for mod in swapped:  # nn.DataParallel's replicas copy the instance dict: they must run their own forward
        replica = mod._replicate_for_data_parallel()
        assert type(replica) is type(mod) and replica.forward.__self__ is replica
    assert peftkern.restore(model) == len(swapped)
    assert not any(_swap.is_swapped(m) for m in model.modules())
    torch.testing.assert_close(_logits(model, ids), want, atol=1e-6, rtol=1e-6)


def test_restore_after_libraries_wrote_forward_back():
    """peft's disable_adapter (prompt learning) and accelerate's remove_hook_from_module save `forward` and
    write the bound method back into the instance dict: restore() and pickling must still work after."""
    for method in ("lora", "prefix"):
        model = BUILD[method]()
        plain = copy.deepcopy(model)
        peftkern.accelerate(model)
        ids = torch.randint(0, VOCAB, (2, 7), device=DEVICE)
        if method == "prefix":
            with model.disable_adapter():
                pass
        for mod in model.modules():
            if _swap.is_swapped(mod) and method == "lora":
                mod.forward = mod.forward  # what remove_hook_from_module leaves behind
        twin = pickle.loads(pickle.dumps(model))
        torch.testing.assert_close(_logits(twin, ids), _logits(plain, ids), atol=2e-5, rtol=2e-5)
        peftkern.restore(model)
        assert not any("forward" in m.__dict__ for m in model.modules())
        torch.testing.assert_close(_logits(model, ids), _logits(plain, ids), atol=1e-6, rtol=1e-6)


def test_prefix_model_used_with_disable_adapter_before_accelerate_gets_the_fast_path(monkeypatch):
    import peftkern.integrations.prefix as integ

    calls = []
    real = integ.prefix_attention
    monkeypatch.setattr(integ, "prefix_attention", lambda q, k, v, pk, pv, **kw: calls.append(pk.dim()) or
                        real(q, k, v, pk, pv, **kw))
    model = _prefix()
    with model.disable_adapter():  # leaves peft's bound forward in the instance dict
        pass
    peftkern.accelerate(model)
    _logits(model, torch.randint(0, VOCAB, (2, 7), device=DEVICE))
    assert calls == [3, 3]  # the shared (Hkv, P, D) prefix: the no-concat forward ran


def test_subclasses_of_peft_layers_are_left_alone():
    from peft.tuners.lora import Linear

    class MyLora(Linear):
        pass

    model = _lora()
    for mod in model.modules():
        if type(mod) is Linear:
            mod.__class__ = MyLora
    summary = peftkern.accelerate(model)
    assert summary.patched == 0 and any("MyLora" in r for r in summary.reasons), str(summary)


def test_pickled_prefix_model_runs_in_a_fresh_process(tmp_path):
    """Unpickling imports peftkern (the fused class's module) and registers its attention function."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    model = _prefix()
    peftkern.accelerate(model)
    ids = torch.randint(0, VOCAB, (2, 7), device=DEVICE)
    want = _logits(model, ids)
    (tmp_path / "m.pkl").write_bytes(pickle.dumps((model, ids, want)))
    code = ("import pickle, sys, torch\n"
            "model, ids, want = pickle.loads(open(sys.argv[1], 'rb').read())\n"
            "with torch.no_grad():\n"
            "    got = model(input_ids=ids).logits\n"
            "torch.testing.assert_close(got, want)\n"
            "print('ok')\n")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.pkl")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
