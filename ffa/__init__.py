"""ffa: fused kernels for feature-affinity knowledge distillation and low-bit QAT."""

import sys as _sys

from ._backend import PortablePathWarning

__version__ = "0.1.0"


def _running_info() -> bool:
    """Whether this process is ``python -m ffa.info`` (runpy imports the package first)."""
    argv = getattr(_sys, "orig_argv", [])
    return "-mffa.info" in argv or any(
        a == "-m" and argv[i + 1 : i + 2] == ["ffa.info"] for i, a in enumerate(argv)
    )


try:
    from ._ops import ops
except ImportError:
    # A native module that does not load (torch upgraded after the build, a missing library) is
    # what `python -m ffa.info` must be able to report: there, and only there, import no further.
    if not _running_info():
        raise
else:
    # `quant` too: `import ffa` registers every op's fake kernel, autograd and portable kernel
    from . import quant, reference
    from .distill import FAQDLoss, FeatureHooks
    from .functional import fast_feature_affinity_loss, feature_affinity_loss
    from .modules import FastFeatureAffinityLoss, FeatureAffinityLoss


def show_config() -> str:
    """What ffa is running, as text for bug reports: the report of ``python -m ffa.info``.

    Versions (ffa, the torch it was built against and the running one, Python), the CPU kernels'
    instruction set and BLAS, threads, whether CUDA kernels were built and load, the GPUs, and for
    each ``torch.ops.ffa`` op and device the implementation that runs (native or portable).
    """
    from .info import show_config as _show_config  # imported on use: ``python -m ffa.info`` runs it

    return _show_config()


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
    "show_config",
]
