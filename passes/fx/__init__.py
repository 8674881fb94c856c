"""Passes over torch.fx GraphModules traced from a model."""

__all__: list[str] = []
