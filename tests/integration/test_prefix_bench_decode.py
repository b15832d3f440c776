"""`peftkern bench prefix` has a decode row: one generation step with a P-token prefix and an S-token cache,
peftkern (the integration's split of peft's cache into views) vs peft's SDPA over the whole cache, beside
plain attention with no prefix (the floor); the peftkern row is checked elementwise before it is timed."""

from __future__ import annotations

import torch

from peftkern.bench import _table
from peftkern.bench import prefix as bench_prefix


def test_decode_row_is_checked_beside_peft_and_the_floor(monkeypatch):
    monkeypatch.delenv("PEFTKERN_STRICT", raising=False)
    once = lambda fn, device, quick, **kw: (fn(), {"median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0})[1]
    rows = bench_prefix.run("tiny", torch.float32, torch.device("cpu"), True, once, lambda fn, d: None,
                            lambda m: None, False)
    by = {(r["case"], r["provider"]): r for r in _table.speedups(rows, bench_prefix.BASELINES)}
    assert {c for c, _ in by} == {"train", "decode"}
    ours = by[("decode", "peftkern-torch")]
    assert ours["L"] == 1 and set(ours["check"]) == {"y"} and "error" not in ours
    assert ours["check"]["y"]["err"] <= ours["check"]["y"]["bound"]
    assert set(ours["speedup"]["fwd"]) == {"peft-sdpa", "sdpa-floor"}
    assert "bwd" not in by[("decode", "peft-sdpa")]  # inference: forward only
    assert "no prefix" in by[("decode", "sdpa-floor")]["note"]
    assert "top-left" in by[("train", "sdpa-floor")]["note"]  # the training rows keep their note
