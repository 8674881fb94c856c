"""ndcompile: a tensor-network compiler that rewrites dense Linear layers into NdLinear.

Quick use::

    import ndcompile
    converted = ndcompile.convert(model, example_input, mode="fresh")
    print(converted.report)
"""

from ndcompile.adapters import adapter_state_dict, load_adapter_state_dict, merge_adapters
from ndcompile.backend import ndcompile_backend, register_backend
from ndcompile.convert import MODES, convert, optimize, relative_error
from ndcompile.dense import to_dense
from ndcompile.errors import NdCompileError, UntraceableError
from ndcompile.export import export_onnx
from ndcompile.layers import NdLinear
from ndcompile.network import OPTIMIZERS, NetworkPlan, TensorNetwork
from ndcompile.plan import PlanChoice, plan_ndlinear
from ndcompile.report import ConversionReport, LayerReport
from ndcompile.serialize import load, save

__version__ = "0.1.0"

# torch.compile(model, backend="ndcompile") works after `import ndcompile` too (the
# entry point registers it lazily when ndcompile is installed).
register_backend()

__all__ = [
    "MODES",
    "OPTIMIZERS",
    "ConversionReport",
    "LayerReport",
    "NdCompileError",
    "NdLinear",
    "NetworkPlan",
    "PlanChoice",
    "TensorNetwork",
    "UntraceableError",
    "__version__",
    "adapter_state_dict",
    "convert",
    "export_onnx",
    "load",
    "load_adapter_state_dict",
    "merge_adapters",
    "ndcompile_backend",
    "optimize",
    "plan_ndlinear",
    "register_backend",
    "relative_error",
    "save",
    "to_dense",
]
