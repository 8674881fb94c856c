"""Passes over the FX graphs dynamo hands to the ``ndcompile`` backend."""

__all__: list[str] = []
