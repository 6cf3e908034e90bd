"""nasrt: Nemotron-NAS to TensorRT-LLM toolkit."""
__version__ = "0.1.0"
