"""``nasrt serve``: the OpenAI-compatible endpoints ``trtllm-serve`` exposes, over nasrt's reference runtime.

- :mod:`nasrt.deploy.serve.protocol` — request models (validated by pydantic) and OpenAI-style error bodies;
  responses are the ``openai`` package's own types;
- :mod:`nasrt.deploy.serve.text` — prompts (chat template) and incremental detokenization;
- :mod:`nasrt.deploy.serve.app` — the FastAPI application over a :class:`~nasrt.runtime.batcher.BatchingEngine`;
- :mod:`nasrt.deploy.serve.server` — loading the model and running uvicorn (also in a thread, for tests).
"""
