"""Pipeline: ``convert``/``optimize`` orchestration and output verification."""

__all__: list[str] = []
