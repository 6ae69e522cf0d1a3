"""ffa: fused kernels for feature-affinity knowledge distillation and low-bit QAT."""

# `quant` too: `import ffa` registers every op's fake kernel, autograd and portable kernel
from . import quant, reference
from ._backend import PortablePathWarning
from ._ops import ops
from .distill import FAQDLoss, FeatureHooks
from .functional import fast_feature_affinity_loss, feature_affinity_loss
from .modules import FastFeatureAffinityLoss, FeatureAffinityLoss

__version__ = "0.1.0"

__all__ = [
    "feature_affinity_loss",
    "fast_feature_affinity_loss",
    "FeatureAffinityLoss",
    "FastFeatureAffinityLoss",
    "FAQDLoss",
    "FeatureHooks",
    "PortablePathWarning",
    "ops",
    "quant",
    "reference",
]
