"""peftkern._memory.saved_bytes: what autograd keeps for backward, also what an op packs under its own
saved_tensors_hooks (PyTorch runs only the innermost pair) and not what a graph freed during the forward saved."""

from __future__ import annotations

import torch

from peftkern._memory import SavedTensors, saved_bytes


def test_counts_each_storage_once_and_leaves_out_excluded():
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    # linear saves x and w; exp saves its output; the product saves exp's output and a view of x again
    n = saved_bytes(lambda: (torch.nn.functional.linear(x, w).exp() * x[:, :16]).sum())
    assert n == x.nbytes + w.nbytes + 64 * 16 * 4
    assert saved_bytes(lambda: (torch.nn.functional.linear(x, w).exp() * x[:, :16]).sum(), [w]) == n - w.nbytes


def test_sees_what_an_op_packs_under_its_own_hooks():
    """An inner pair hides the tensors from an outer hook: they count when the inner hook keeps a tensor, and not
    when it keeps something else (a recipe to rebuild the tensor in backward)."""
    x = torch.randn(128, requires_grad=True)
    outer = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: outer.append(t) or t, lambda t: t), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        (x.exp() * x).sum()
    assert outer == []  # the PyTorch behaviour the counter works around

    def keeps(t):
        return t

    def rebuilds(t):
        return ("recipe", t.shape)

    def op(pack):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda p: p if torch.is_tensor(p) else x.exp()):
            return (x.exp() * x).sum()  # saves exp(x) (as mul's input) and x

    assert saved_bytes(lambda: op(keeps)) == 2 * x.nbytes
    assert saved_bytes(lambda: op(rebuilds)) == 0
    assert saved_bytes(lambda: op(keeps), [x]) == x.nbytes


def test_graph_freed_during_the_forward_is_not_counted():
    """peft's DoRA computes B·A through a graph it then detaches: what that graph saved is freed at once."""
    x = torch.randn(256, requires_grad=True)

    def fn(detach):
        scale = (x.exp() * x).sum()  # exp saves its output, the product exp(x) and x
        return (x.sin() * (scale.detach() if detach else scale)).sum()  # sin saves x; the product the 0-d scale

    assert saved_bytes(lambda: fn(detach=True)) == x.nbytes + 4
    assert saved_bytes(lambda: fn(detach=False)) == 3 * x.nbytes + 4  # + exp(x) and sin(x) (scale needs grad)


def test_nested_counters_and_restore():
    x = torch.randn(32, requires_grad=True)
    push = torch._C._autograd._push_saved_tensors_default_hooks
    with SavedTensors() as outer:
        with SavedTensors() as inner:
            y = x.exp().exp().sum()  # each exp saves its output
        assert inner.nbytes() == outer.nbytes() == 2 * x.nbytes
        del y
        assert outer.nbytes() == 0  # the graph is gone
    assert torch._C._autograd._push_saved_tensors_default_hooks is push
