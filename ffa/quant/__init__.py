"""ffa.quant: low-bit fake quantization for label-free QAT (FAQD).

- :func:`quantize_weight`: the paper's weight quantizers (1, 2, 4 bits; 3, 5-8 generalized), per
  tensor or per output channel, straight-through gradient.
- :class:`QuantReLU` / :func:`quant_relu`: the quantized ReLU with a learned step.
- :func:`fake_quantize`: torch's affine fake quantization (and LSQ), without host syncs.
- :class:`QuantConv2d`, :class:`QuantLinear`, :func:`quantize_model`: QAT modules.

Every quantizer is a fused C++ (CPU) / CUDA kernel behind a ``torch.ops.ffa`` op with custom
autograd; it runs under ``torch.compile(fullgraph=True)``.
"""

from .. import _ops as _ffa_ops  # noqa: F401  (loads ffa._C, which registers the ops)
from . import _ops  # noqa: F401  (fake kernels and autograd)
from .functional import fake_quantize, quant_relu, quantize_weight
from .modules import QuantConv2d, QuantLinear, QuantReLU, quantize_model

__all__ = [
    "quantize_weight",
    "QuantReLU",
    "fake_quantize",
    "QuantConv2d",
    "QuantLinear",
    "quantize_model",
    "quant_relu",
]
