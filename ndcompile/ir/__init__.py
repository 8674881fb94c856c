"""Intermediate representation: tensor networks and the contraction programs planned from them."""

__all__: list[str] = []
