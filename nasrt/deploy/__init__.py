"""Deployment: everything after the checkpoint is written.

- :mod:`nasrt.deploy.plan` — memory planner (will this model, precision, batch × sequence fit this GPU);
- :mod:`nasrt.deploy.profiles` — build profiles (``build/``) and plugin presets (``plugins/``);
- :mod:`nasrt.deploy.engine` — the engine path (TensorRT-LLM 1.2.x: ``trtllm-build``, ``ModelRunnerCpp``);
- :mod:`nasrt.deploy.pytorch` — TensorRT-LLM's PyTorch backend: the LLM-API argument tables and the planner-sized
  ``trtllm-serve`` config (``nasrt serve-config``);
- :mod:`nasrt.deploy.triton` — Triton model repositories, their Python models, server helper and client;
- :mod:`nasrt.deploy.serve` — ``nasrt serve``, the OpenAI-compatible API of ``trtllm-serve`` on the reference runtime.
"""
