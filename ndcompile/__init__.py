"""ndcompile: a tensor-network compiler that rewrites dense Linear layers into NdLinear.

Quick use::

    import ndcompile
    converted = ndcompile.convert(model, example_input, mode="fresh")
    print(converted.report)
"""

from ndcompile.convert import MODES, convert, optimize, relative_error
from ndcompile.errors import NdCompileError
from ndcompile.layers import NdLinear
from ndcompile.network import OPTIMIZERS, NetworkPlan, TensorNetwork
from ndcompile.report import ConversionReport, LayerReport

__version__ = "0.1.0"

__all__ = [
    "MODES",
    "OPTIMIZERS",
    "ConversionReport",
    "LayerReport",
    "NdCompileError",
    "NdLinear",
    "NetworkPlan",
    "TensorNetwork",
    "__version__",
    "convert",
    "optimize",
    "relative_error",
]
