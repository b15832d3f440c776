"""add_adapters finds its sites by structure on every family `peftkern report` lists (tiny configs, no
downloads): forward and backward equal the adapter's math in plain torch hooked on the sites named here by
hand, and save / load / deepcopy round-trip."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import peftkern
from peftkern.integrations.adapters import AdapterConfig, adapter_state_dict, add_adapters, load_adapters, save_adapters

t = pytest.importorskip("transformers")
D, FF, R = 48, 80, 8
_ENC = dict(hidden_size=D, intermediate_size=FF, num_hidden_layers=2, num_attention_heads=4, vocab_size=97,
            max_position_embeddings=66, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_DEC = dict(hidden_size=D, intermediate_size=FF, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=97, max_position_embeddings=64)
_T5 = dict(d_model=D, d_kv=12, d_ff=FF, num_layers=2, num_decoder_layers=1, num_heads=4, vocab_size=97,
           dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
_BERT_SITES = ("attention.output.dense", "attention", "output.dense", "intermediate")
_LLAMA_SITES = ("self_attn.o_proj", "self_attn", "mlp.down_proj", "mlp")


def _t5_sites(block):  # the decoder's FFN is layer 2 (after the cross-attention, which is not adapted)
    last = len(block.layer) - 1
    return ("layer.0.SelfAttention.o", "layer.0.SelfAttention", f"layer.{last}.DenseReluDense.wo",
            f"layer.{last}.DenseReluDense")


# family -> (config, auto class, block lists, sites per block: (attn out, attn input module, ffn out, ffn input
# module)), written out by hand: the ground truth the structural search must agree with.
FAMILIES = {
    "bert": (lambda: t.BertConfig(**_ENC), t.AutoModel, ["encoder.layer"], _BERT_SITES),
    "roberta": (lambda: t.RobertaConfig(**_ENC), t.AutoModel, ["encoder.layer"], _BERT_SITES),
    "xlm-roberta": (lambda: t.XLMRobertaConfig(**_ENC), t.AutoModel, ["encoder.layer"], _BERT_SITES),
    "electra": (lambda: t.ElectraConfig(embedding_size=32, **_ENC), t.AutoModel, ["encoder.layer"], _BERT_SITES),
    "deberta-v2": (lambda: t.DebertaV2Config(relative_attention=True, pos_att_type=["p2c", "c2p"],
                                             max_relative_positions=16, **_ENC),
                   t.AutoModel, ["encoder.layer"], _BERT_SITES),
    "llama": (lambda: t.LlamaConfig(**_DEC), t.AutoModelForCausalLM, ["model.layers"], _LLAMA_SITES),
    "mistral": (lambda: t.MistralConfig(**_DEC), t.AutoModelForCausalLM, ["model.layers"], _LLAMA_SITES),
    "qwen2": (lambda: t.Qwen2Config(**_DEC), t.AutoModelForCausalLM, ["model.layers"], _LLAMA_SITES),
    "qwen3": (lambda: t.Qwen3Config(head_dim=16, **_DEC), t.AutoModelForCausalLM, ["model.layers"], _LLAMA_SITES),
    "gpt2": (lambda: t.GPT2Config(n_embd=D, n_inner=FF, n_layer=2, n_head=4, n_positions=64, vocab_size=97,
                                  bos_token_id=1, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
             t.AutoModelForCausalLM, ["transformer.h"], ("attn.c_proj", "attn", "mlp.c_proj", "mlp")),
    "t5": (lambda: t.T5Config(**_T5), t.AutoModelForSeq2SeqLM, ["encoder.block", "decoder.block"], _t5_sites),
    "mt5": (lambda: t.MT5Config(**_T5), t.AutoModelForSeq2SeqLM, ["encoder.block", "decoder.block"], _t5_sites),
}


def _build(family):
    make_config, auto, _, _ = FAMILIES[family]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return auto.from_config(make_config()).eval()


def _run(model, family):
    """(output, loss) on a fixed batch."""
    ids = torch.randint(2, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    if FAMILIES[family][1] is t.AutoModel:
        out = model(input_ids=ids).last_hidden_state
        return out, out.square().mean()
    res = model(input_ids=ids, labels=ids)
    return res.logits, res.loss


def _reference(model, family, params, placement, scaling, act):
    """Hooks on `model` (no peftkern adapters) computing the adapters in plain torch from `params`
    (adapter name -> tensor, as adapter_state_dict names them)."""
    _, _, lists, sites = FAMILIES[family]
    for list_name in lists:
        for i, block in enumerate(model.get_submodule(list_name)):
            attn_out, attn_in, ffn_out, ffn_in = sites(block) if callable(sites) else sites
            for out_path, in_path in ((attn_out, attn_in), (ffn_out, ffn_in)):
                name = f"{list_name}.{i}.{out_path}.adapter."
                wd, bd, wu, bu = (params[name + k] for k in ("down_weight", "down_bias", "up_weight", "up_bias"))

                def adapter(x, wd=wd, bd=bd, wu=wu, bu=bu):
                    return scaling * F.linear(act(F.linear(x, wd, bd)), wu, bu)

                seen = {}
                if placement == "parallel":
                    block.get_submodule(in_path).register_forward_pre_hook(
                        lambda m, a, kw, seen=seen: seen.update(x=a[0] if a else next(iter(kw.values()))),
                        with_kwargs=True)
                    block.get_submodule(out_path).register_forward_hook(
                        lambda m, a, y, seen=seen, f=adapter: y + f(seen.pop("x")))
                else:
                    block.get_submodule(out_path).register_forward_hook(lambda m, a, y, f=adapter: y + f(y))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("placement,act,activation", [("houlsby", F.gelu, "gelu"), ("parallel", F.silu, "silu")])
def test_family_matches_plain_torch_and_round_trips(family, placement, act, activation, tmp_path):
    model = _build(family)
    config = AdapterConfig(bottleneck=R, placement=placement, activation=activation, scaling=0.7,
                           sites=("attn", "ffn"))
    add_adapters(model, config)
    blocks = sum(len(model.get_submodule(n)) for n in FAMILIES[family][2])
    state = adapter_state_dict(model)
    assert len(state) == blocks * 2 * 4
    with torch.no_grad():
        for p in state.values():
            p.normal_(0, 0.3)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in state.items()}
    ref_model = _build(family)
    ref_model.requires_grad_(False)
    _reference(ref_model, family, leaves, placement, 0.7, act)  # KeyError here: a site is not where it should be

    with peftkern.use_backend("torch"):
        out, loss = _run(model, family)
        loss.backward()
    want, want_loss = _run(ref_model, family)
    want_loss.backward()
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    for k, p in state.items():
        torch.testing.assert_close(p.grad, leaves[k].grad, rtol=1e-4, atol=1e-6, msg=k)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in state), "the base must stay frozen"

    save_adapters(model, tmp_path)
    fresh = _build(family)
    load_adapters(fresh, tmp_path)
    twin = copy.deepcopy(model)  # the parallel capture hooks point at the copy's own adapters
    with torch.no_grad(), peftkern.use_backend("torch"):
        torch.testing.assert_close(_run(fresh, family)[0], out, rtol=0, atol=0)
        torch.testing.assert_close(_run(twin, family)[0], out, rtol=0, atol=0)
