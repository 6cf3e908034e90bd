"""FP8 post-training quantization with NVIDIA ModelOpt, calibrated layer by layer (see :mod:`.pipeline`)."""

from nasrt.quantize.pipeline import QuantizeOptions, QuantizeResult, quantize_checkpoint

__all__ = ["QuantizeOptions", "QuantizeResult", "quantize_checkpoint"]
