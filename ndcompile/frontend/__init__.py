"""Front end: capture a model (torch.fx), propagate shapes, find its Linear sites."""

__all__: list[str] = []
