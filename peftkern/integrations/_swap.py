"""Patching by class swap: an accelerated instance gets a subclass of its peft class whose methods are
peftkern's, and `restore` gives it its class back. Unlike a bound method in the instance dict, the
subclass pickles by name (`torch.save(model)`), is what nn.DataParallel replicas run (they copy the
instance dict, so a bound method would still call the original module), and deepcopy keeps it.

The subclasses are built on first use (peft is imported lazily); pickle finds them through this module's
`__getattr__`."""

from __future__ import annotations

from collections.abc import Callable

_FACTORIES: dict[str, Callable[[], tuple[type, dict]]] = {}  # name -> () -> (peft base class, methods)
_CLASSES: dict[str, type] = {}


def register(name: str, factory: Callable[[], tuple[type, dict]]) -> None:
    _FACTORIES[name] = factory


def fused_class(name: str) -> type:
    cls = _CLASSES.get(name)
    if cls is None:
        base, methods = _FACTORIES[name]()
        for key, fn in methods.items():
            # A bound copy left in an instance dict pickles as getattr(obj, fn.__name__): make that the
            # method's own name, which resolves to the right function on either class.
            fn.__name__ = key
        # __qualname__ is what pickle looks up here; __name__ stays peft's, so reprs and peft's
        # get_layer_status read as before.
        cls = type(base.__name__, (base,), {**methods, "__module__": __name__, "__qualname__": name,
                                            "_peftkern_base": base})
        _CLASSES[name] = cls
    return cls


def base_class(obj) -> type:
    """The peft class `obj` runs as (its class, or the one a fused class was made from)."""
    return getattr(type(obj), "_peftkern_base", type(obj))


def fused_functions() -> set:
    return {f for cls in _CLASSES.values() for k, f in vars(cls).items() if callable(f) and not k.startswith("__")}


def is_swapped(obj, name: str | None = None) -> bool:
    cls = type(obj)
    return cls in _CLASSES.values() and (name is None or cls is _CLASSES.get(name))


def swap(obj, name: str) -> None:
    obj.__class__ = fused_class(name)


def unswap(obj) -> bool:
    """Give a swapped instance its peft class back; False if it was not swapped. Instance-dict copies of
    the fused methods go too: some libraries save `obj.forward` and write it back (peft's
    disable_adapter for prompt learning, accelerate's remove_hook_from_module)."""
    if not is_swapped(obj):
        return False
    fused = fused_functions()
    for key, value in list(vars(obj).items()):
        if getattr(value, "__func__", None) in fused:
            del obj.__dict__[key]
    obj.__class__ = type(obj)._peftkern_base
    return True


def __getattr__(name: str):
    if name in _FACTORIES:
        return fused_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
