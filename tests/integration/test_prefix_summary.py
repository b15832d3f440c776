"""accelerate's summary states the backend the prefix-tuning attention layers run on for the model's device."""

from __future__ import annotations

import pytest
import torch

import peftkern

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_summary_states_the_prefix_backend(backend):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                                peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with peftkern.use_backend(backend):
        summary = peftkern.accelerate(model)
    assert f"2 prefix-tuning attention layers (on {backend})" in str(summary)
