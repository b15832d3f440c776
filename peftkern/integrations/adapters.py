"""Bottleneck adapters injected into Hugging Face transformers models (peft has no bottleneck adapters).

Placements (d = hidden size, r = `bottleneck`): houlsby (Houlsby et al. 2019), serial adapters after the
attention output projection and after the feed-forward output projection, before the residual add (and so
before the LayerNorm of post-LN models such as BERT); pfeiffer (Pfeiffer et al. 2021), the serial
feed-forward adapter only; parallel (He et al. 2022), beside the sublayer, fed its input, added to its
output projection's output. `sites` overrides where adapters go ("attn", "ffn").

Sites are found by structure, not class names (`block_sites`): any encoder or decoder whose blocks sit in an
nn.ModuleList and run an attention then a feed-forward of linear layers (BERT, RoBERTa, XLM-R, ELECTRA,
DeBERTa-v2, GPT-2, T5, Llama, Mistral, Qwen, ...). An adapter is a child named `adapter` of the projection
it follows, applied by a forward hook there (a parallel one also by a pre-hook capturing the sublayer
input); the base is frozen and each adapter starts as the identity. `save_adapters` writes safetensors and
a JSON config (no pickle); `load_adapters` adds the adapters when the model has none and loads strictly.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os

import torch
from torch import nn

from ..nn.adapter import BottleneckAdapter
from ..ops.adapter import ACTIVATIONS

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
SITES = ("attn", "ffn")
_DEFAULT_SITES = {"houlsby": ("attn", "ffn"), "pfeiffer": ("ffn",), "parallel": ("ffn",)}
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class AdapterConfig:
    """bottleneck: r. activation: relu | gelu | gelu_tanh | silu. scaling: s in y = res + s · adapter(x).
    sites: None for the placement's default. dtype: None for each hooked projection's dtype, or
    "float32" / "float16" / "bfloat16"."""

    bottleneck: int = 64
    placement: str = "houlsby"
    activation: str = "relu"
    scaling: float = 1.0
    sites: tuple[str, ...] | None = None
    dtype: str | None = None

    def __post_init__(self):
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck < 1:
            raise ValueError(f"bottleneck must be a positive int, got {self.bottleneck!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise TypeError(f"scaling must be a float, got {type(self.scaling).__name__}")
        self.scaling = float(self.scaling)
        if self.sites is not None:
            self.sites = tuple(self.sites)
            bad = [s for s in self.sites if s not in SITES]
            if bad or not self.sites or len(set(self.sites)) != len(self.sites):
                raise ValueError(f"sites must be distinct names from {SITES}, got {self.sites!r}")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be None or one of {tuple(_DTYPES)}, got {self.dtype!r}")

    @property
    def resolved_sites(self) -> tuple[str, ...]:
        return self.sites or _DEFAULT_SITES[self.placement]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sites"] = list(self.resolved_sites)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown AdapterConfig keys {unknown}")
        return cls(**d)


# ------------------------------------------------------------------ sites, found by structure


@dataclasses.dataclass(frozen=True)
class _Site:
    out: str  # path from the block to the output projection the adapter follows
    entry: str  # path from the block to the module whose input is the sublayer's input (feeds a parallel adapter)
    arg: str  # that input's parameter name in entry.forward, for a call that passes it by keyword


def _dims(mod: nn.Module) -> tuple[int, int] | None:
    """(in, out) of an nn.Linear or of transformers' Conv1D (GPT-2, weight stored (in, out)), else None."""
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features
    conv1d = _conv1d()
    if conv1d is not None and isinstance(mod, conv1d):
        return int(mod.weight.shape[0]), int(mod.nf)
    return None


@functools.cache
def _conv1d():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is optional
        return None
    return Conv1D


def _inside(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    common = []
    for names in zip(*parts):
        if len(set(names)) > 1:
            break
        common.append(names[0])
    return ".".join(common)


def _first_param(mod: nn.Module) -> str:
    params = list(inspect.signature(mod.forward).parameters)
    return params[0] if params else ""


def block_sites(block: nn.Module) -> dict[str, _Site] | None:
    """The adapter sites of a transformer block, from its structure alone, or None when it does not look like
    one. Its linear layers (nn.Linear, Conv1D) in module order: the last one is the feed-forward output
    projection (its out_features is the hidden size d), the one before it the feed-forward input projection
    (in_features d; an up or fused gate/up projection); the first one reads d and lies in the attention: the
    outermost sub-module holding it and neither feed-forward projection. That attention's last linear, writing
    d, is its output projection. A parallel adapter reads the attention's input (the input of the smallest
    module holding all its linears) or the feed-forward input projection's input."""
    lin = [(p, d) for p, m in block.named_modules() if (d := _dims(m)) is not None]
    if len(lin) < 4:
        return None
    (ffn_out, (mid, hidden)), (ffn_in, (fi_in, fi_out)) = lin[-1], lin[-2]
    if fi_in != hidden or fi_out % mid:
        return None
    first, (a_in, _) = lin[0]
    parts = first.split(".")
    attn = next((pre for i in range(1, len(parts)) if not _inside(ffn_out, pre := ".".join(parts[:i]))
                 and not _inside(ffn_in, pre)), None)
    if a_in != hidden or attn is None:
        return None
    inner = [(p, d) for p, d in lin if _inside(p, attn)]
    attn_out, (_, a_out) = inner[-1]
    if len(inner) < 2 or a_out != hidden:
        return None
    entry = _common_prefix([p for p, _ in inner])
    return {"attn": _Site(attn_out, entry, _first_param(block.get_submodule(entry))),
            "ffn": _Site(ffn_out, ffn_in, _first_param(block.get_submodule(ffn_in)))}


def find_layers(model: nn.Module) -> list[tuple[str, nn.Module, dict[str, _Site]]]:
    """(name, block, sites) of every transformer block of `model`, in module order: the elements of the
    outermost nn.ModuleLists whose elements are all of one class and all have sites (`block_sites`)."""
    found = []

    def visit(prefix: str, mod: nn.Module) -> None:
        if isinstance(mod, nn.ModuleList) and len(mod) and len({type(c) for c in mod}) == 1:
            blocks = [(prefix + n, c, block_sites(c)) for n, c in mod.named_children()]
            if all(s is not None for _, _, s in blocks):
                found.extend(blocks)
                return
        for n, c in mod.named_children():
            visit(f"{prefix}{n}.", c)

    visit("", model)
    return found


def _out_features(mod: nn.Module) -> int:
    dims = _dims(mod)
    if dims is None:
        raise TypeError(f"cannot tell the output size of {type(mod).__name__}")
    return dims[1]


# ------------------------------------------------------------------ hooks (module-level functions: deepcopy-safe)


def _serial_hook(mod, args, out):
    return mod.adapter(out)


def _capture_hook(entry, args, kwargs, *, adapter, arg):
    adapter._parallel_input = args[0] if args else kwargs[arg]


def _parallel_hook(mod, args, out):
    adapter = mod.adapter
    x = adapter.__dict__.pop("_parallel_input", None)
    if x is None:
        raise RuntimeError("parallel adapter: the sublayer input was not captured (was the projection called "
                           "outside its sublayer?)")
    return adapter(x, residual=out)


_HOOKS = (_serial_hook, _capture_hook, _parallel_hook)


def _is_ours(hook) -> bool:
    return hook in _HOOKS or getattr(hook, "func", None) in _HOOKS


# ------------------------------------------------------------------ public API


def add_adapters(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Adds bottleneck adapters to every supported layer of `model` (in place), freezes everything else
    and returns the model. Trainable parameters: layers × sites × (2·d·r + r + d). Everything else is
    frozen, a task head too (a freshly initialised classifier included): unfreeze what should train
    with `module.requires_grad_(True)`; `save_adapters` saves the adapters only. On failure the model is
    left as it was."""
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
    if has_adapters(model):
        raise ValueError("the model already has peftkern adapters: call remove_adapters(model) first")
    layers = find_layers(model)
    if not layers:
        raise ValueError(f"add_adapters: no supported transformer layers in {type(model).__name__} (it looks for "
                         "an nn.ModuleList of blocks, each an attention then a feed-forward of linear layers)")
    for _, layer, sites in layers:  # every site must be adaptable before anything changes
        for site_name in config.resolved_sites:
            _out_features(layer.get_submodule(sites[site_name].out))
    flags = _grad_flags(model)
    model.requires_grad_(False)
    try:
        for _, layer, sites in layers:
            for site_name in config.resolved_sites:
                _add_one(layer, sites[site_name], config)
    except Exception:
        remove_adapters(model)
        _restore_grad_flags(model, flags)
        raise
    model._peftkern_adapter_config = config
    return model


def _grad_flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _restore_grad_flags(model: nn.Module, flags: dict[str, bool]) -> None:
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])


def _add_one(layer: nn.Module, site: _Site, config: AdapterConfig) -> None:
    out = layer.get_submodule(site.out)
    weight = out.weight
    dtype = _DTYPES[config.dtype] if config.dtype else weight.dtype
    out.adapter = BottleneckAdapter(_out_features(out), config.bottleneck, config.activation, config.scaling,
                                    device=weight.device, dtype=dtype)
    if config.placement == "parallel":
        entry = layer.get_submodule(site.entry)
        entry.register_forward_pre_hook(functools.partial(_capture_hook, adapter=out.adapter, arg=site.arg),
                                        with_kwargs=True)
        out.register_forward_hook(_parallel_hook)
    else:
        out.register_forward_hook(_serial_hook)


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, BottleneckAdapter) for m in model.modules())


def _holder(model: nn.Module) -> nn.Module | None:
    """The module add_adapters was called on: `model` or one inside it (torch.compile's `_orig_mod`,
    DDP's `module`, a peft wrapper's base model)."""
    return next((m for m in model.modules() if "_peftkern_adapter_config" in m.__dict__), None)


def adapter_config(model: nn.Module) -> AdapterConfig | None:
    holder = _holder(model)
    return None if holder is None else holder._peftkern_adapter_config


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> parameter of every adapter, named relative to the module add_adapters was called on, so
    adapters saved through a wrapper (compiled, DDP) load into the bare model and back."""
    root = _holder(model) or model
    return {f"{mn}.{pn}": p for mn, m in root.named_modules() if isinstance(m, BottleneckAdapter)
            for pn, p in m.named_parameters(recurse=False)}


def remove_adapters(model: nn.Module) -> nn.Module:
    """Removes every peftkern adapter and its hooks (the base stays frozen)."""
    for m in model.modules():
        for hooks, kw in ((m._forward_hooks, m._forward_hooks_with_kwargs),
                          (m._forward_pre_hooks, m._forward_pre_hooks_with_kwargs)):
            for hid in [h for h, fn in hooks.items() if _is_ours(fn)]:
                del hooks[hid]
                kw.pop(hid, None)
        if isinstance(getattr(m, "adapter", None), BottleneckAdapter):
            del m.adapter
        m.__dict__.pop("_peftkern_adapter_config", None)
    return model


def save_adapters(model: nn.Module, path: str | os.PathLike) -> None:
    """Writes the adapters of `model` to the folder `path`: safetensors weights and a JSON config."""
    from safetensors.torch import save_file

    config = adapter_config(model)
    state = adapter_state_dict(model)
    if config is None or not state:
        raise ValueError("the model has no peftkern adapters to save (call add_adapters first)")
    os.makedirs(path, exist_ok=True)
    weights = os.path.join(path, WEIGHTS_NAME)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, weights,
              metadata={"format": "pt", "producer": "peftkern"})
    with open(weights, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    meta = {"peftkern_adapter": config.to_dict(), "base_model_class": type(model).__name__,
            "num_adapters": len(state) // 4, "weights_sha256": digest}
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2)


def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Loads adapters saved by `save_adapters` into `model`, adding them first when it has none. Strict:
    a missing or unexpected tensor, a shape mismatch or a different config raises ValueError, and so
    does an unreadable, truncated or altered file (the weights' sha256 is checked against the config's
    where the config records one). On any failure the model is left as it was."""
    config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    meta, config = _read_config(config_path)
    current = adapter_config(model)
    if current is not None and _comparable(current) != _comparable(config):
        raise ValueError(f"the model's adapters were added with {current.to_dict()}, the saved ones with "
                         f"{config.to_dict()}: remove_adapters(model) first")
    saved, altered = _read_weights(weights_path, meta.get("weights_sha256"))
    if current is None:
        flags = _grad_flags(model)
        add_adapters(model, config)
    try:
        _copy_strict(model, saved, path, meta.get("base_model_class"), altered)
    except Exception:
        if current is None:  # leave the model as it was: no adapters, its own requires_grad flags
            remove_adapters(model)
            _restore_grad_flags(model, flags)
        raise
    return model


def _read_config(config_path: str) -> tuple[dict, AdapterConfig]:
    with open(config_path, "rb") as f:
        raw = f.read()
    try:
        meta = json.loads(raw)
    except ValueError as e:  # truncated or not JSON (UnicodeDecodeError is a ValueError too)
        raise ValueError(f"{config_path} is not valid JSON ({e}): the file is damaged; save the adapters "
                         "again") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("peftkern_adapter"), dict):
        raise ValueError(f"{config_path} is not a peftkern adapter config")
    try:
        config = AdapterConfig.from_dict(meta["peftkern_adapter"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: invalid adapter config: {e}") from None
    return meta, config


def _read_weights(weights_path: str, want_sha256) -> tuple[dict[str, torch.Tensor], str | None]:
    """The saved tensors, and why their bytes differ from the sha256 the config recorded (None: they do
    not, or no sha256 was recorded). The caller reports names and shapes first, then this."""
    from safetensors.torch import load as load_bytes

    with open(weights_path, "rb") as f:
        data = f.read()
    altered = None
    if want_sha256 is not None and hashlib.sha256(data).hexdigest() != want_sha256:
        altered = (f"{weights_path} does not match the sha256 recorded in {CONFIG_NAME} when the adapters were "
                   "saved: the file was truncated or altered since; save the adapters again")
    try:
        saved = load_bytes(data)
    except Exception as e:  # safetensors raises its own error type for a bad header or short data
        raise ValueError(f"{weights_path} is not a readable safetensors file ({type(e).__name__}: {e})"
                         f"{'; its sha256 differs from the one recorded when saved' if altered else ''}: the "
                         "file is truncated or damaged; save the adapters again") from None
    bad = sorted(k for k, v in saved.items() if not v.is_floating_point())
    if bad:
        raise ValueError(f"{weights_path}: adapter tensors {bad[:4]} are not floating point "
                         f"({saved[bad[0]].dtype}): not adapters peftkern saved")
    return saved, altered


def _comparable(config: AdapterConfig) -> dict:
    d = config.to_dict()
    d["sites"] = sorted(d["sites"])  # ("attn", "ffn") and ("ffn", "attn") place the same adapters
    return d


def _copy_strict(model: nn.Module, saved: dict[str, torch.Tensor], path, saved_from: str | None = None,
                 altered: str | None = None) -> None:
    state = adapter_state_dict(model)
    missing, unexpected = sorted(set(state) - set(saved)), sorted(set(saved) - set(state))
    if missing or unexpected:
        model_name = type(model).__name__
        origin = (f" (saved from a {saved_from}, loading into a {model_name})"
                  if saved_from and saved_from != model_name else "")
        raise ValueError(f"adapter tensors in {path} do not match the model{origin}: missing {missing[:4]}"
                         f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                         f"{'...' if len(unexpected) > 4 else ''}")
    for name, p in state.items():
        if saved[name].shape != p.shape:
            raise ValueError(f"adapter tensor {name} has shape {tuple(saved[name].shape)} in {path} but "
                             f"{tuple(p.shape)} in the model")
    if altered is not None:
        raise ValueError(altered)
    with torch.no_grad():
        for name, p in state.items():
            p.copy_(saved[name])
