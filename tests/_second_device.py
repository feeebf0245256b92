"""A second device, emulated on the CPU, for checking where a batch's tensors live.

CI has no GPU, so the CUDA path cannot run there; what can be checked is the property the GPU
path rests on. Every tensor gets a mark: "on the device" for what the model's forward pass
returns, for what `.to(device)` or a factory with `device=` makes, and for any result of an op
that read a marked tensor; `.cpu()` takes the mark off. Then:

- `problems` lists what would raise on a real GPU: `.numpy()` of a device tensor, and an op
  mixing device tensors with host tensors of one or more dimensions (except a device tensor
  indexed with host indices, which CUDA allows);
- `transfers` lists every value that leaves the device (`.cpu()`, `.tolist()`, `int()`, ...),
  with the catalog function that asked for it, so a test can hold them to a known list.
"""

from __future__ import annotations

import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import catalog

_READS = {"tolist", "item", "__int__", "__float__", "__bool__", "__index__", "__array__", "numpy"}
_INDEXING = {"__getitem__", "__setitem__", "index_select", "gather", "index_put_"}
_MARK = "_on_emulated_device"
# What makes a tensor on the device it is told (`device=`), or moves one there (`.to(device)`).
_FACTORIES = {"to", "as_tensor", "tensor", "arange", "linspace", "logspace", "eye", "zeros", "ones", "full",
              "empty", "rand", "randn", "randint", "tril_indices", "triu_indices", "zeros_like", "ones_like",
              "full_like", "empty_like"}


@dataclass(frozen=True)
class Transfer:
    how: str  # cpu, tolist, __int__, ...
    site: str  # file:function in catalog/ that asked
    numel: int


def on_device(value) -> bool:
    return isinstance(value, torch.Tensor) and getattr(value, _MARK, False)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


_PACKAGE = str(Path(catalog.__file__).resolve().parent)


def _site() -> str:
    frames = [f for f in traceback.extract_stack()[:-2] if str(Path(f.filename).resolve()).startswith(_PACKAGE)]
    return f"{Path(frames[-1].filename).name}:{frames[-1].name}" if frames else "outside catalog"


def _names_a_device(args, kwargs) -> bool:
    return "device" in kwargs and kwargs["device"] is not None or any(
        isinstance(a, (str, torch.device)) for a in args[1:])


def _new_object(result, args):
    """On the CPU, `.cpu()` and `.to(device)` return their own tensor; a real move makes a new one,
    and so must the emulation, or the mark would land on (or stay on) the other side's tensor."""
    return result.view(result.shape) if args and result is args[0] else result


class SecondDevice(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.transfers: list[Transfer] = []
        self.problems: list[str] = []
        self.watching = True

    @contextmanager
    def unwatched(self):
        """Ops inside pass through unmarked and unchecked (e.g. the model's own forward pass)."""
        self.watching = False
        try:
            yield
        finally:
            self.watching = True

    def put(self, value):
        """Mark a tensor, or every tensor in a (nested) container, as on the device; returns it."""
        for tensor in _tensors(value):
            setattr(tensor, _MARK, True)
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.watching:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        inputs = list(_tensors(list(args) + list(kwargs.values())))
        marked = [on_device(t) for t in inputs]
        if name == "cpu" or name in _READS:
            if marked and marked[0]:
                self.transfers.append(Transfer(name, _site(), inputs[0].numel()))
                if name == "numpy":
                    self.problems.append(f"{_site()}: .numpy() of a device tensor (needs .cpu() first)")
            return _new_object(func(*args, **kwargs), args) if name == "cpu" else func(*args, **kwargs)
        if any(marked):
            # CUDA indexes a device tensor with host indices, but not a host tensor with device ones.
            host = [t for t, m in zip(inputs, marked) if not m and t.dim() > 0]
            if name in _INDEXING and marked[0]:
                host = []
            if host:
                self.problems.append(f"{_site()}: {name} mixes device tensors with a host tensor of shape "
                                     f"{tuple(host[0].shape)}")
        result = func(*args, **kwargs)
        if name == "to":
            result = _new_object(result, args)
        if any(marked) or (name in _FACTORIES and _names_a_device(args, kwargs)):
            self.put(result)
        return result
