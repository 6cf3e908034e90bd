"""Deployment on TensorRT-LLM's PyTorch backend: trtllm-serve config and the LLM-API argument tables."""
