"""Back ends: the torch.compile backend, ONNX export, save/load, dense lowering."""

__all__: list[str] = []
