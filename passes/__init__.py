"""Graph passes of ndcompile: each takes a GraphModule and returns a ``PassResult``."""

from ndcompile.passes.fx.dce import dead_code_elimination
from ndcompile.passes.fx.eliminate_transposes import eliminate_transposes
from ndcompile.passes.fx.emit import emit_ndlinear, set_submodule
from ndcompile.passes.fx.fuse_contractions import FusedRegion, fuse_contractions
from ndcompile.passes.fx.inline_ndlinear import inline_ndlinear
from ndcompile.passes.fx.rewrite_ndlinear import rewrite_ndlinear
from ndcompile.passes.regions.analysis import annotate_shapes

__all__ = [
    "FusedRegion",
    "annotate_shapes",
    "dead_code_elimination",
    "eliminate_transposes",
    "emit_ndlinear",
    "fuse_contractions",
    "inline_ndlinear",
    "rewrite_ndlinear",
    "set_submodule",
]
