"""ffa inside torchdistill configs: importing this module registers ffa with torchdistill.

A torchdistill YAML loads it with its top-level ``dependencies`` key::

    dependencies:
      - name: 'ffa.integrations.torchdistill'

and then uses these keys:

- ``ffa.FALoss`` (mid-level loss): exact FA / FFA over ``feature_pairs`` read from the io_dicts
  (:class:`FALoss`);
- ``ffa.FeatureAffinityLoss``, ``ffa.FastFeatureAffinityLoss`` (low-level losses): ffa's loss
  modules, for torchdistill's ``SimpleLossWrapper``;
- ``ffa.AffinityLoss`` (mid-level loss): a drop-in for torchdistill's ``AffinityLoss`` in
  O(B C HW) memory (:class:`AffinityLoss`);
- ``ffa.FAAdapters`` (auxiliary model wrapper): trainable 1x1 adapters on student features
  (:class:`FAAdapters`).

Importing it without torchdistill raises an ImportError that says how to install it.
"""

from __future__ import annotations

try:
    from torchdistill.losses.registry import register_low_level_loss, register_mid_level_loss
    from torchdistill.models.registry import register_auxiliary_model_wrapper
    from torchdistill.models.util import wrap_if_distributed
    from torchdistill.models.wrapper import AuxiliaryModelWrapper
except Exception as e:  # missing, or failing to import (a torchvision built for another torch
    # raises RuntimeError, not ImportError): either way the fix is an install.
    raise ImportError(
        "ffa.integrations.torchdistill needs torchdistill (>= 1.1.5, which needs torch >= 2.12 "
        "and torchvision >= 0.27): pip install 'torchdistill>=1.1.5' (or pip install "
        f"'ffa[torchdistill]'). Importing it failed with: {e!r}"
    ) from e

from ..modules import FastFeatureAffinityLoss, FeatureAffinityLoss
from . import _torchdistill_core as _core
from ._torchdistill_core import ADAPTER_PREFIX, channel_affinity_loss

__all__ = [
    "ADAPTER_PREFIX",
    "AffinityLoss",
    "FAAdapters",
    "FALoss",
    "FastFeatureAffinityLoss",
    "FeatureAffinityLoss",
    "KEYS",
    "channel_affinity_loss",
]


@register_mid_level_loss(key="ffa.FALoss")
class FALoss(_core.FALoss):
    __doc__ = _core.FALoss.__doc__


@register_mid_level_loss(key="ffa.AffinityLoss")
class AffinityLoss(_core.AffinityLoss):
    __doc__ = _core.AffinityLoss.__doc__


@register_auxiliary_model_wrapper(key="ffa.FAAdapters")
class FAAdapters(_core.FAAdapters, AuxiliaryModelWrapper):
    # torchdistill calls secondary_forward only on instances of its AuxiliaryModelWrapper.
    __doc__ = _core.FAAdapters.__doc__
    _wrap = staticmethod(wrap_if_distributed)


register_low_level_loss(key="ffa.FeatureAffinityLoss")(FeatureAffinityLoss)
register_low_level_loss(key="ffa.FastFeatureAffinityLoss")(FastFeatureAffinityLoss)

#: The registry keys this module adds, by torchdistill registry.
KEYS = {
    "mid_level_loss": ("ffa.FALoss", "ffa.AffinityLoss"),
    "low_level_loss": ("ffa.FeatureAffinityLoss", "ffa.FastFeatureAffinityLoss"),
    "auxiliary_model_wrapper": ("ffa.FAAdapters",),
}
