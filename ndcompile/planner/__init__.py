"""Planner: choose how a contraction runs (mode grouping, order, layout) by a measured cost."""

__all__: list[str] = []
