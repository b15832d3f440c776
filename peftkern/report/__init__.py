"""`peftkern report`: per PEFT method at its paper-default setting, the trainable parameters, a
training-memory estimate with and without peftkern's kernels, and which peftkern kernel serves it.

Models come from transformers configs on the meta device (presets.py, or a config JSON path), built with the
real integrations (models.py): a kernel is credited only where `peftkern.accelerate` or
`peftkern.add_adapters` serves the model. estimate.py makes the rows, tracing.py the bytes saved for
backward, measure.py the `--measure` step, format.py the tables.
"""

from __future__ import annotations

import argparse
import json
import sys

from .. import _cli_args
from .estimate import memory_parts, method_row, report
from .format import fmt_bytes, format_markdown, format_measure, format_table
from .measure import measure, measure_step
from .models import (
    apply_method,
    build_model,
    eager_adapters,
    quant_state_tensors,
    quantize_4bit,
    trainable_parameters,
    use_peftkern,
    why_unavailable,
)
from .presets import (
    ADAPTERS,
    METHOD_KEYS,
    METHODS,
    PRESETS,
    Settings,
    config_summary,
    load_config,
    max_tokens,
    model_kind,
    n_blocks,
    scaled_down,
)
from .tracing import example_inputs, traced_activation_bytes, training_loss

__all__ = [
    "ADAPTERS", "METHODS", "METHOD_KEYS", "PRESETS", "Settings", "add_parser", "apply_method", "build_model",
    "config_summary", "eager_adapters", "example_inputs", "fmt_bytes", "format_markdown", "format_measure",
    "format_table", "load_config", "main", "max_tokens", "measure", "measure_step", "memory_parts", "method_row",
    "model_kind", "n_blocks", "quant_state_tensors", "quantize_4bit", "report", "scaled_down",
    "traced_activation_bytes", "trainable_parameters", "training_loss", "use_peftkern", "why_unavailable",
]


def _run(args) -> int:
    settings = Settings(lora_dropout=args.lora_dropout)
    methods = tuple(args.methods) if args.methods else METHOD_KEYS
    bad = [m for m in methods if m not in METHOD_KEYS]
    if bad:
        print(f"unknown method(s) {bad}: choose from {', '.join(METHOD_KEYS)}", file=sys.stderr)
        return 2
    try:
        rep = report(args.model, args.batch, args.seq, args.dtype, args.target, methods, settings)
    except ValueError as e:
        print(f"peftkern report: {e}", file=sys.stderr)
        return 2
    print(format_markdown(rep) if args.markdown else format_table(rep), flush=True)
    if args.measure:
        meas = measure(args.model, args.measure_batch or args.batch, args.measure_seq or args.seq, args.dtype,
                       args.device, methods, settings)
        rep["measure"] = meas
        print()
        print(format_measure(meas, markdown=args.markdown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `peftkern report` on the CLI's subparsers."""
    p = subparsers.add_parser("report", help="trainable parameters, training memory and serving kernel per PEFT method",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help=f"a preset ({', '.join(PRESETS)}) or a transformers config JSON path (built on meta)")
    p.add_argument("--batch", type=_cli_args.positive_int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq", type=_cli_args.positive_int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="bfloat16",
                   help="base model / activation dtype (default bfloat16)")
    p.add_argument("--target", choices=["cuda", "cpu"], default="cuda",
                   help="device whose dropout/attention kernels the activation estimate models (default cuda)")
    p.add_argument("--methods", nargs="+", metavar="METHOD", help=f"subset of: {', '.join(METHOD_KEYS)}")
    p.add_argument("--lora-dropout", type=float, default=Settings.lora_dropout, help="LoRA dropout (default 0.1)")
    p.add_argument("--measure", action="store_true",
                   help="also run a real training step on a scaled-down model and print estimate vs measured")
    p.add_argument("--device", type=_cli_args.device, help="device for --measure (default cuda if available)")
    p.add_argument("--measure-batch", type=_cli_args.positive_int, help="batch for --measure (default --batch)")
    p.add_argument("--measure-seq", type=_cli_args.positive_int, help="seq for --measure (default --seq)")
    p.add_argument("--json", metavar="PATH", type=_cli_args.output_path, help="also write the report as JSON")
    p.add_argument("--markdown", action="store_true", help="print markdown tables instead of text")
    p.set_defaults(fn=_run)
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="peftkern")
    add_parser(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(["report", *(sys.argv[1:] if argv is None else argv)])
    return args.fn(args)
