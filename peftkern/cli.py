"""The `peftkern` command: bench, report, info, build."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import time

from . import _cli_args

OPS = ("lora", "adapter", "ia3", "prefix", "dora", "qlora", "e2e", "overhead")


def _bench(args) -> int:
    import warnings

    import torch

    # peft 0.21 on transformers 5.24 warns about transformers' own deprecations (is_gradient_checkpointing,
    # past_key_values) while the baselines run: not the user's to act on, and not peftkern's path.
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`(is_gradient_checkpointing|past_key_values)` is deprecated")

    from .bench import _table, _timing

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    preset = args.preset or ("llama-7b" if device.type == "cuda" else "tiny")
    compile_baseline = args.compile if args.compile is not None else device.type == "cuda"
    env = _timing.environment(device)
    print(f"peftkern bench: {', '.join(args.ops)} on {env['device']} ({device.type}), {dtype}, preset {preset}"
          f"{' (quick)' if args.quick else ''}, commit {env['commit']}", flush=True)
    start = time.time()

    def progress(msg):
        print(f"  [{time.time() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    rows = []

    def save_json(these=None):
        with open(args.json, "w") as f:
            json.dump({"env": env, "preset": preset, "quick": args.quick, "rows": rows if these is None else these},
                      f, indent=1)

    for op in args.ops:
        mod = importlib.import_module(f"peftkern.bench.{op}")
        extra = {}
        if args.json and "partial" in inspect.signature(mod.run).parameters:  # long ops save after each case
            done = list(rows)
            extra["partial"] = lambda part, done=done, mod=mod: save_json(
                done + _table.speedups([dict(r) for r in part], mod.BASELINES))
        op_rows = mod.run(preset, dtype, device, args.quick, _timing.timeit, _timing.peak_bytes, progress,
                          compile_baseline, **extra)
        rows += _table.speedups(op_rows, mod.BASELINES)
        print(_table.table(op_rows, mod.BASELINES), flush=True)
        if args.json:
            save_json()  # after every op: a run cut off by a time limit keeps what it measured
    if args.plot:
        from .bench._plot import plot

        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        save_json()
        print(f"wrote {args.json}")
    errors = [r for r in rows if "error" in r]
    return 1 if errors else 0


def _info(args) -> int:
    import torch

    import peftkern

    from . import _backend, _ext, _host_ext

    print(f"peftkern {peftkern.__version__}  torch {torch.__version__} (CUDA {torch.version.cuda})")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    print(f"requested backend: {_backend.requested_backend()}  (PEFTKERN_BACKEND / peftkern.use_backend)")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for dev in devices:
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        print(f"{dev.type} ({name}):")
        print("  torch : yes")
        why = _backend.triton_unavailable(dev)
        print(f"  triton: {'yes' if why is None else 'no - ' + why}")
        why = _backend.cuda_unavailable(dev, build_if_missing=False)
        print(f"  cuda  : {'yes' if why is None else 'no - ' + why}")
    print("CUDA extension:", json.dumps(_ext.status(), indent=1, default=str))
    print("CPU host extension (built on first use):", json.dumps(_host_ext.status(), indent=1, default=str))
    return 0


def _build(args) -> int:
    from . import _ext

    path = _ext.build(force=args.force, verbose=args.verbose)
    print(f"built {path}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="peftkern", description="Fused kernels for PEFT: benchmarks and tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="benchmark peftkern against peft, eager, torch.compile and the base layer")
    b.add_argument("ops", nargs="*", help=f"which ops: {', '.join(OPS)} or all (default: all)")
    b.add_argument("--device", type=_cli_args.device, help="cpu or cuda (default: cuda if available)")
    b.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="activation dtype")
    b.add_argument("--preset", choices=["llama-7b", "llama-1b", "tiny"], help="shapes (default by device)")
    b.add_argument("--quick", action="store_true", help="fewer repetitions and smaller CPU shapes")
    b.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="include torch.compile of peft's layer (default: on CUDA only)")
    b.add_argument("--json", type=_cli_args.output_path,
                   help="write results (with device, commit, versions) to this path")
    b.add_argument("--plot", type=_cli_args.output_path,
                   help="write a PNG of the speedups (needs matplotlib: peftkern[plot])")
    b.set_defaults(fn=_bench)
    i = sub.add_parser("info", help="versions, backends available and why not")
    i.set_defaults(fn=_info)
    bl = sub.add_parser("build", help="compile the CUDA extension into the cache (needs nvcc, not a GPU)")
    bl.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build exists")
    bl.add_argument("--verbose", action="store_true")
    bl.set_defaults(fn=_build)
    from . import report

    report.add_parser(sub)
    args = ap.parse_args(argv)
    if args.cmd == "bench":
        bad = [o for o in args.ops if o not in (*OPS, "all")]
        if bad:
            ap.error(f"unknown op(s) {bad}: choose from {', '.join(OPS)} or all")
        if not args.ops or "all" in args.ops:
            args.ops = list(OPS)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
