"""Layers: the NdLinear module a converted site becomes."""

__all__: list[str] = []
