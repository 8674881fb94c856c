"""ndcompile: a tensor-network compiler that rewrites dense Linear layers into NdLinear.

Quick use::

    import ndcompile
    converted = ndcompile.convert(model, example_input, mode="fresh")
    print(converted.report)
"""

from ndcompile.backends.dense import to_dense
from ndcompile.backends.dynamo import ndcompile_backend, register_backend
from ndcompile.backends.onnx import export_onnx
from ndcompile.backends.pretrained import from_pretrained
from ndcompile.backends.serialize import load, save
from ndcompile.compress.adapters import adapter_state_dict, load_adapter_state_dict, merge_adapters
from ndcompile.compress.distill import distill
from ndcompile.errors import NdCompileError, UntraceableError
from ndcompile.frontend.inputs import ExampleInputs
from ndcompile.ir.network import OPTIMIZERS, NetworkPlan, TensorNetwork
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.pipeline.convert import MODES, convert, relative_error
from ndcompile.pipeline.graph_rewrite import optimize
from ndcompile.pipeline.options import ConvertOptions
from ndcompile.pipeline.weights import empty_weights
from ndcompile.planner.plan import PlanChoice, plan_ndlinear
from ndcompile.report import ConversionReport, LayerReport

__version__ = "0.1.0"

# torch.compile(model, backend="ndcompile") works after `import ndcompile` too (the
# entry point registers it lazily when ndcompile is installed).
register_backend()

__all__ = [
    "MODES",
    "OPTIMIZERS",
    "ConversionReport",
    "ConvertOptions",
    "ExampleInputs",
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
    "distill",
    "empty_weights",
    "export_onnx",
    "from_pretrained",
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
