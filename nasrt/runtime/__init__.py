"""The nasrt reference runtime: run any nasrt / TensorRT-LLM DeciLM checkpoint with PyTorch (CPU or GPU)."""

from nasrt.runtime.generate import SamplingConfig, generate
from nasrt.runtime.layers import KVCache
from nasrt.runtime.model import ReferenceModel, load_model

__all__ = ["KVCache", "ReferenceModel", "SamplingConfig", "generate", "load_model"]
