"""Dead-code elimination that also drops submodules and attributes left unused."""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

__all__ = ["dead_code_elimination"]


def dead_code_elimination(gm: fx.GraphModule) -> PassResult:
    """Remove unused nodes, then unused submodules, then recompile.

    Returns:
        ``PassResult(gm, modified)``; ``modified`` is True if anything was removed.
    """
    modified = gm.graph.eliminate_dead_code()
    before = {name for name, _ in gm.named_modules()}
    gm.delete_all_unused_submodules()
    modified |= before != {name for name, _ in gm.named_modules()}
    if modified:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified)
