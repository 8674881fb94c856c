"""Graph passes of ndcompile: each takes a GraphModule and returns a ``PassResult``."""

from ndcompile.passes.dce import dead_code_elimination
from ndcompile.passes.eliminate_transposes import eliminate_transposes
from ndcompile.passes.emit import emit_ndlinear, set_submodule
from ndcompile.passes.find_linear import LinearSite, find_linear_sites
from ndcompile.passes.fuse_contractions import FusedRegion, fuse_contractions
from ndcompile.passes.inline_ndlinear import inline_ndlinear
from ndcompile.passes.linear_regions import annotate_shapes
from ndcompile.passes.rewrite_ndlinear import rewrite_ndlinear

__all__ = [
    "FusedRegion",
    "LinearSite",
    "annotate_shapes",
    "dead_code_elimination",
    "eliminate_transposes",
    "emit_ndlinear",
    "find_linear_sites",
    "fuse_contractions",
    "inline_ndlinear",
    "rewrite_ndlinear",
    "set_submodule",
]
