"""Analysis lifting connected linear regions of a graph into tensor networks."""

__all__: list[str] = []
