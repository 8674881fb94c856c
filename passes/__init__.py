"""Graph passes of ndcompile: each takes a GraphModule and returns a ``PassResult``."""

from ndcompile.passes.dce import dead_code_elimination
from ndcompile.passes.emit import emit_ndlinear, set_submodule
from ndcompile.passes.find_linear import LinearSite, find_linear_sites
from ndcompile.passes.inline_ndlinear import inline_ndlinear
from ndcompile.passes.rewrite_ndlinear import rewrite_ndlinear

__all__ = [
    "LinearSite",
    "dead_code_elimination",
    "emit_ndlinear",
    "find_linear_sites",
    "inline_ndlinear",
    "rewrite_ndlinear",
    "set_submodule",
]
