"""Compression: Kronecker fits of trained weights, hybrids, adapters, distillation."""

__all__: list[str] = []
