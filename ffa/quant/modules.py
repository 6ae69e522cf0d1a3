"""Quantized modules: QuantReLU (learned step), QuantConv2d / QuantLinear (float latent weights,
quantized in forward), and quantize_model to swap them into a float network in place.

Configuration lives in plain instance attributes set once in ``__init__``; learned state (the ReLU
step ``alpha``) is a parameter or buffer, so it travels with ``state_dict``, ``.to()`` and DDP.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .functional import (
    DEFAULT_ALPHA,
    check_alpha_value,
    check_bits,
    check_relu_options,
    quant_relu,
    quantize_weight,
)

__all__ = ["QuantReLU", "QuantConv2d", "QuantLinear", "quantize_model"]

_ALPHA_MIN, _ALPHA_MAX = 1e-3, 5.0


class QuantReLU(nn.Module):
    """Quantized ReLU with a (learned) step; see :func:`ffa.quant.functional.quant_relu`.

    Args:
        bits: activation bits, 1..8 (``L = 2**bits - 1`` levels above 0).
        alpha: initial step; defaults to the released code's 1.2221, 0.6511, 0.1946 for 1, 2, 4
            bits and is required otherwise. Must be positive.
        learn_alpha: ``alpha`` is a parameter trained with the ``alpha_grad`` rule (default), or a
            fixed buffer. ``False`` reproduces the released training runs: the released
            ``QuantReLUFunction`` keeps its settings in class attributes, so every backward runs
            with the last forward's ``QuantReLU`` settings and the steps may never learn.
        ste: "inplt" (default), "idnty" or "relu": where the input gradient passes.
        alpha_grad: "mean" (default), "ae", "pact" or "min".
        rate: the step gradient's factor (0.01 in the released code).

    The step used is ``alpha`` clamped to [1e-3, 5] on the device. Each forward also projects the
    stored ``alpha`` into that range, as the released code does, through ``alpha.data`` (no host
    sync, no autograd version bump, so a module called twice before backward is fine).
    While ``torch.export`` traces the module that in-place projection is skipped (an exported
    program cannot mutate a parameter's data): the kernel's own clamp makes the forward value the
    same, and exporting leaves the stored ``alpha`` as it was.
    """

    def __init__(
        self,
        bits: int,
        alpha: float | None = None,
        *,
        learn_alpha: bool = True,
        ste: str = "inplt",
        alpha_grad: str = "mean",
        rate: float = 0.01,
    ):
        super().__init__()
        bits = check_bits(bits)
        check_relu_options(ste, alpha_grad, rate)
        if alpha is None:
            if bits not in DEFAULT_ALPHA:
                raise ValueError(
                    f"alpha is required for bits={bits} (defaults exist for bits 1, 2, 4 only)"
                )
            alpha = DEFAULT_ALPHA[bits]
        alpha = check_alpha_value(alpha)
        self.bits, self.ste, self.alpha_grad, self.rate = bits, ste, alpha_grad, float(rate)
        self.learn_alpha = bool(learn_alpha)
        init = torch.tensor([alpha], dtype=torch.float32)
        if self.learn_alpha:
            self.alpha = nn.Parameter(init)
        else:
            self.register_buffer("alpha", init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_exporting():
            self.alpha.data.clamp_(_ALPHA_MIN, _ALPHA_MAX)
        return quant_relu(
            x, self.alpha, self.bits, ste=self.ste, alpha_grad=self.alpha_grad, rate=self.rate
        )

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, learn_alpha={self.learn_alpha}, ste={self.ste!r}, "
            f"alpha_grad={self.alpha_grad!r}, rate={self.rate}"
        )


class _QuantWeight:
    """What QuantConv2d and QuantLinear share: the bit width and the quantized weight."""

    def __init__(self, *args, w_bits: int = 4, per_channel: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.w_bits = check_bits(w_bits, "w_bits")
        self.per_channel = bool(per_channel)

    def quantized_weight(self) -> torch.Tensor:
        return quantize_weight(self.weight, self.w_bits, per_channel=self.per_channel)

    def _adopt(self, float_module: nn.Module):
        """Shares ``float_module``'s parameter objects (an optimizer holding them still works)."""
        self.weight = float_module.weight
        self.bias = float_module.bias
        self.train(float_module.training)
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, w_bits={self.w_bits}, per_channel={self.per_channel}"


class QuantConv2d(_QuantWeight, nn.Conv2d):
    """``nn.Conv2d`` whose float latent weight is quantized by :func:`quantize_weight` in forward.

    Takes ``nn.Conv2d``'s arguments plus ``w_bits`` (1..8, default 4) and ``per_channel``. The bias
    stays float. ``state_dict`` keys are ``nn.Conv2d``'s; the optimizer updates the float weight
    (straight-through gradient).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: int = 4, per_channel: bool = False):
        """A QuantConv2d sharing ``conv``'s parameters (an optimizer holding them still works)."""
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
            w_bits=w_bits,
            per_channel=per_channel,
        )
        return q._adopt(conv)


class QuantLinear(_QuantWeight, nn.Linear):
    """``nn.Linear`` with a quantized float latent weight; see :class:`QuantConv2d`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int = 4, per_channel: bool = False):
        """A QuantLinear sharing ``linear``'s parameter objects."""
        q = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            w_bits=w_bits,
            per_channel=per_channel,
        )
        return q._adopt(linear)


def _skipped(name: str, skip: frozenset[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


def quantize_model(
    model: nn.Module,
    w_bits: int,
    a_bits: int | None = None,
    *,
    skip: Iterable[str] = (),
    per_channel: bool = False,
) -> nn.Module:
    """Swaps, in place, every ``nn.Conv2d`` / ``nn.Linear`` for a QuantConv2d / QuantLinear with
    ``w_bits`` and, when ``a_bits`` is given, every ``nn.ReLU`` module for a ``QuantReLU(a_bits)``.

    The quantized layers share the original parameter objects, so an optimizer built before the
    swap keeps updating them; the new ``alpha`` parameters of QuantReLU are not in such an
    optimizer (build it after the swap to train them). ReLUs called functionally (``F.relu``)
    cannot be swapped. A ReLU module used at several places stays one QuantReLU (one shared step).

    Args:
        model: the float network.
        w_bits: weight bits, 1..8.
        a_bits: activation bits for QuantReLU (1, 2 or 4: the released code's initial steps), or
            None to keep float ReLUs.
        skip: qualified module names (``model.named_modules()`` names) left in float, with
            everything below them (e.g. ``("conv1", "fc")`` keeps the first and last layers).
        per_channel: per-output-channel weight scales.

    Returns:
        ``model`` itself.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    w_bits = check_bits(w_bits, "w_bits")
    if a_bits is not None:
        a_bits = check_bits(a_bits, "a_bits")
        if a_bits not in DEFAULT_ALPHA:
            raise ValueError(
                f"a_bits must be 1, 2 or 4 (the released code's initial steps), got {a_bits}; "
                "for other widths place QuantReLU(bits, alpha=...) modules yourself"
            )
    if isinstance(skip, str):
        skip = (skip,)
    skip = frozenset(skip)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")

    swaps = []
    for name, module in model.named_modules():
        if name and _skipped(name, skip):
            continue
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if _skipped(full, skip):
                continue
            if type(child) is nn.Conv2d:
                swaps.append(
                    (module, child_name, QuantConv2d.from_float(child, w_bits, per_channel))
                )
            elif type(child) is nn.Linear:
                swaps.append(
                    (module, child_name, QuantLinear.from_float(child, w_bits, per_channel))
                )
            elif a_bits is not None and type(child) is nn.ReLU:
                swaps.append((module, child_name, QuantReLU(a_bits).to(device)))
    replaced: dict[int, nn.Module] = {}
    for parent, child_name, new in swaps:
        old = getattr(parent, child_name)
        new = replaced.setdefault(id(old), new)  # a module registered twice stays one module
        setattr(parent, child_name, new)
    return model
