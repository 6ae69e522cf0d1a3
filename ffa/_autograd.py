"""The machinery that makes every ffa op differentiable in every autograd mode.

Each op gets one ``torch.autograd.Function`` (forward, setup_context, backward, jvp), registered
as the op's Autograd kernel::

    @registers_autograd("fa_loss")
    class FaLoss(torch.autograd.Function):
        setup_context / backward / jvp as staticmethods

Why not ``torch.library.register_autograd``: the Function it generates has no ``jvp`` (forward-mode
AD silently returned zero tangents), no ``setup_context`` (torch.func.grad / vjp / jacrev refused
it), and an op without an Autograd kernel (ffa's backward ops) is silently non-differentiable, so
double backward returned zeros. Here the Function is applied the way a C++ autograd kernel
records its node: at the op's own functorch level, inside the dispatcher, so reverse mode, forward
mode, torch.func transforms and torch.compile all see one definition. A mode an op cannot
support raises (:func:`no_jvp`, :func:`no_double_backward`); it never returns zeros.
"""

from __future__ import annotations

import functools
import re

import torch
import torch.autograd.forward_ad as fwAD
from torch._functorch.utils import enable_single_level_autograd_function

__all__ = ["registers_autograd", "no_jvp", "no_double_backward", "native_error_types"]

_lib = torch.library.Library("ffa", "IMPL")


def _needs_autograd(args) -> bool:
    """Reverse mode (grad mode on and an input requiring grad) or a forward-mode dual level."""
    return (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)) or (
        fwAD._current_level >= 0
    )


# The native kernels (LibTorch stable ABI) can only raise RuntimeError; the checks that mean a
# ValueError / TypeError tag their message (csrc/stable.h, FFA_CHECK_VALUE / FFA_CHECK_TYPE).
_TAGGED = re.compile(r"\[ffa:(ValueError|TypeError)\] (.*)", re.DOTALL)
_ERROR_TYPES = {"ValueError": ValueError, "TypeError": TypeError}


def native_error_types(kernel):
    """Re-raises the native kernels' tagged RuntimeErrors as ValueError / TypeError."""

    @functools.wraps(kernel)
    def wrapper(*args):
        try:
            return kernel(*args)
        except RuntimeError as e:
            m = _TAGGED.search(str(e))
            if m is None:
                raise
            raise _ERROR_TYPES[m.group(1)](m.group(2)) from None

    return wrapper


def registers_autograd(op: str):
    """Class decorator: the decorated Function becomes the Autograd kernel of ``ffa::op``.

    It provides ``forward`` (the op, run below autograd); the class defines ``setup_context``,
    ``backward`` and ``jvp`` (or raises in them).
    """
    overload = getattr(torch.ops.ffa, op).default

    def decorate(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
        def forward(*args):
            with torch._C._AutoDispatchBelowAutograd():
                if not torch._C._are_functorch_transforms_active():
                    return overload(*args)
                # Function.apply turns grad modes off for forward; under torch.func transforms the
                # op is dispatched next at the lower functorch levels, which must still record:
                # turn them back on, as functorch's own autograd.Function rule does. (Not without
                # functorch: the kernel would then see this level's dual tensors.)
                with torch.enable_grad(), fwAD._set_fwd_grad_enabled(True):
                    return overload(*args)

        function.forward = staticmethod(forward)
        setup = function.setup_context

        def setup_context(ctx, inputs, output):
            # Absent tangents and gradients of unused outputs arrive as None, not as zeros, so an
            # unsupported tangent is told apart from a missing one.
            ctx.set_materialize_grads(False)
            setup(ctx, inputs, output)

        function.setup_context = staticmethod(setup_context)
        backward = function.backward

        def backward_or_none(ctx, *grads):
            # Every output's gradient undefined (None): no gradient for any input either.
            if all(g is None for g in grads):
                return (None,) * len(ctx.needs_input_grad)
            return backward(ctx, *grads)

        function.backward = staticmethod(backward_or_none)
        # torch.autograd.Function.apply would route through functorch's custom_function_call,
        # which expects a call from Python above the dispatcher; inside an Autograd kernel the
        # single-level apply (what a C++ autograd kernel does) records the node at this level.
        # The node's class is a _SingleLevelFunction with the same methods: from torch 2.14 on the
        # apply of any autograd.Function subclass itself routes through custom_function_call under
        # torch.func transforms (as functorch's own generated single-level Functions do not).
        single = type(
            function.__name__,
            (torch.autograd.function._SingleLevelFunction,),
            {
                name: staticmethod(getattr(function, name))
                for name in ("forward", "setup_context", "backward", "jvp")
            },
        )
        apply = single.apply

        def autograd_kernel(*args):
            if not _needs_autograd(args):
                with torch._C._AutoDispatchBelowAutograd():
                    return overload(*args)
            if torch._C._are_functorch_transforms_active():
                with enable_single_level_autograd_function():
                    return apply(*args)
            return apply(*args)

        _lib.impl(op, native_error_types(autograd_kernel), "Autograd")
        return function

    return decorate


def no_jvp(op: str, what: str = "") -> NotImplementedError:
    """The error for an unsupported forward-mode derivative (torch's own wording)."""
    detail = f" {what}" if what else ""
    return NotImplementedError(
        f"ffa::{op}: forward-mode AD (jvp, torch.func.jvp/jacfwd, torch.autograd.forward_ad) is "
        f"not implemented{detail}"
    )


def no_double_backward(op: str, what: str = "") -> RuntimeError:
    """The error for an unsupported second derivative (torch's own wording)."""
    detail = f" {what}" if what else ""
    return RuntimeError(f"ffa::{op}: the derivative for {op} is not implemented{detail}")
