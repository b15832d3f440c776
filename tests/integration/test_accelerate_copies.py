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
