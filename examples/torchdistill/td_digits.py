"""Data and models of the torchdistill example, registered with torchdistill.

The same data and network as ``examples/faqd_digits.py`` (imported from it): scikit-learn's 1,797
real 8x8 handwritten digits (bundled, no download), a fixed stratified 80/20 split, upsampled to
32x32 and standardized; a small CNN whose ``layer1``/``layer2``/``layer3`` give 16x16, 8x8 and 4x4
feature maps.

- ``DigitsDataset(split, max_shift)``: (image [1, 32, 32], label) pairs; the YAML builds it with
  ``!import_call`` (random translations of up to ``max_shift`` pixels, from torch's global RNG that
  torchdistill's ``set_seed`` seeds, for training).
- model keys ``digits_cnn`` (float) and ``digits_cnn_quant`` (``ffa.quant.quantize_model``: every
  conv with ``w_bits``-bit weights, ReLUs quantized to ``a_bits`` when given, the classifier float).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchdistill.models.registry import register_model

from ffa.quant import quantize_model

_spec = importlib.util.spec_from_file_location(
    "faqd_digits", Path(__file__).resolve().parent.parent / "faqd_digits.py"
)
faqd_digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(faqd_digits)


@functools.lru_cache(maxsize=1)
def _data():
    return faqd_digits.load_digits_32()  # (x_train, y_train, x_test, y_test)


class DigitsDataset(Dataset):
    """scikit-learn's digits at 32x32: ``split`` "train" (1,437 images) or "test" (360)."""

    def __init__(self, split="train", max_shift=0):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        x_train, y_train, x_test, y_test = _data()
        self.x, self.y = (x_train, y_train) if split == "train" else (x_test, y_test)
        self.max_shift = int(max_shift)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i]
        if self.max_shift > 0:
            m = self.max_shift
            pad = F.pad(x, (m,) * 4, value=float(x.min()))
            dy, dx = torch.randint(0, 2 * m + 1, (2,)).tolist()
            x = pad[:, dy : dy + x.shape[1], dx : dx + x.shape[2]]
        return x, self.y[i]


@register_model(key="digits_cnn")
def digits_cnn(width=16, num_classes=10):
    return faqd_digits.DigitsCNN(width, num_classes)


@register_model(key="digits_cnn_quant")
def digits_cnn_quant(width=16, num_classes=10, w_bits=4, a_bits=None):
    return quantize_model(
        faqd_digits.DigitsCNN(width, num_classes), w_bits=w_bits, a_bits=a_bits, skip=("fc",)
    )
