"""The ``ndcompile`` command line (``convert``, ``inspect``, ``bench``)."""

__all__: list[str] = []
