"""Which kernel runs an ffa op: the native one (C++/CUDA) or the portable one (torch ops).

Each op's portable kernel is registered as its CompositeExplicitAutograd kernel: the dispatcher
runs it for every device without a native kernel of that op (CUDA when ffa was built without
nvcc, MPS, XPU, ROCm, ...), while CPU and CUDA native kernels keep priority. Such a run warns
once per process and device type (:class:`PortablePathWarning`).

``FFA_BACKEND=portable`` (read at every call) runs the portable kernels on every device, CPU
included: a router registered at the BackendSelect key, which every call reaches after autograd
and before the backend kernel (also in inference mode and from compiled graphs), sends the call
there. Unset, empty, ``native`` or ``auto``: the default routing. Meta and fake tensors always
take the fake kernels.
"""

from __future__ import annotations

import os
import warnings

import torch

__all__ = ["PortablePathWarning", "backend", "register_portable"]

_lib = torch.library.Library("ffa", "IMPL")
_BELOW_BACKEND_SELECT = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.BackendSelect)
_BACKENDS = ("native", "auto", "portable")
_warned: set[str] = set()


class PortablePathWarning(UserWarning):
    """An ffa op ran on its portable kernel (torch ops) because its device has no native kernel."""


def backend() -> str:
    """``"portable"`` when FFA_BACKEND forces the portable kernels, else ``"native"``."""
    value = os.environ.get("FFA_BACKEND", "").strip().lower()
    if value in ("", "native", "auto"):
        return "native"
    if value == "portable":
        return value
    raise ValueError(f"FFA_BACKEND must be one of {_BACKENDS} or unset, got {value!r}")


def _why(device: torch.device) -> str:
    if device.type == "cuda":
        return (
            "ffa was built without its CUDA kernels (nvcc was not found at build time, or "
            "FFA_CUDA=OFF). For the fused kernels, install nvcc (the `nvidia-cuda-nvcc` wheel "
            "works, or a CUDA toolkit) and reinstall ffa with `pip install --no-build-isolation .`"
        )
    return f"ffa's fused kernels exist for CPU and CUDA only, not for {device.type}"


def _warn_once(name: str, device: torch.device) -> None:
    if device.type in _warned:
        return
    _warned.add(device.type)
    warnings.warn(
        f"ffa::{name} runs on its portable path on {device.type} (PyTorch ops, row-blocked: "
        f"correct, slower than the fused kernels): {_why(device)}. `python -m ffa.info` shows "
        "what was built and which implementation each op uses.",
        PortablePathWarning,
        stacklevel=3,
    )


def _device(args) -> torch.device:
    return next(a.device for a in args if isinstance(a, torch.Tensor))


def register_portable(name: str, kernel) -> None:
    """Registers ``kernel`` (the op's signature, torch ops only) as ``ffa::name``'s portable
    kernel: the default for devices without a native kernel, and every device's under
    ``FFA_BACKEND=portable``."""
    op = getattr(torch.ops.ffa, name).default

    def run(*args):
        # A native kernel is opaque to autocast; the torch ops inside this one must be too (under
        # autocast, their matmuls would run in bfloat16/float16).
        with torch._C._DisableAutocast():
            return kernel(*args)

    def default_kernel(*args):
        _warn_once(name, _device(args))
        return run(*args)

    def router(keyset, *args):
        if backend() == "portable" and _device(args).type != "meta":
            return run(*args)
        return op.redispatch(keyset & _BELOW_BACKEND_SELECT, *args)

    _lib.impl(name, default_kernel, "CompositeExplicitAutograd")
    _lib.impl(name, router, "BackendSelect", with_keyset=True)
