"""Every key ndcompile stores in ``node.meta`` / ``gm.meta``, in one place.

Passes communicate through graph metadata; naming the keys here keeps writers and
readers in step (a typo becomes an ``ImportError``, not a silently missing entry).
"""

__all__ = [
    "FUSED_REGION",
    "FUSED_REGIONS",
    "INLINED_LAYERS",
    "LEAD_SOURCE",
    "NODE_SHAPE",
    "NODE_SHAPE_GROWN",
    "PLAN",
    "REGION",
]

#: ``gm.meta``: list of :class:`~ndcompile.passes.fx.fuse_contractions.FusedRegion`.
FUSED_REGIONS = "ndcompile_fused"
#: ``node.meta``: the fused region a node's contraction came from.
FUSED_REGION = "ndcompile_fused_region"
#: ``gm.meta``: layers ``inline_ndlinear`` replaced by their contraction.
INLINED_LAYERS = "ndcompile_inlined"
#: ``node.meta``: ``(node, k, f)``: the node has ``f`` feature dims and its leading dims
#: are ``node.shape[:-k]``.
LEAD_SOURCE = "ndcompile_lead_source"
#: ``node.meta``: the :class:`~ndcompile.ir.network.NetworkPlan` of an emitted contraction.
PLAN = "ndcompile_plan"
#: ``node.meta``: the name of the layer or region an emitted op belongs to.
REGION = "ndcompile_region"
#: ``node.meta``: a node's shape, ``-1`` for dims that vary at run time.
NODE_SHAPE = "ndcompile_shape"
#: ``node.meta``: the shape when an input dim is grown (to find varying dims).
NODE_SHAPE_GROWN = "ndcompile_shape_b"
