"""Generated CPU kernels for NdLinear layers (compiled on first use, cached per machine).

See :mod:`ndcompile.kernels.kron2` for the fused two-mode kernel and
:mod:`ndcompile.kernels.build` for how kernels are built and turned off.
"""

from ndcompile.kernels.build import KernelBuildWarning, kernels_enabled
from ndcompile.kernels.kron2 import fused_kron2, use_fused

__all__ = ["KernelBuildWarning", "fused_kron2", "kernels_enabled", "use_fused"]
