"""ferry: fine-tune a transformer, export it to ONNX, prove parity, serve it."""

__version__ = "0.1.0"
