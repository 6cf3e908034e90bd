"""Python-backend models of the Triton repository, written for nasrt.

``preprocessing`` and ``postprocessing`` are self-contained (numpy + transformers only): their source is
copied verbatim into ``<repo>/<model>/1/model.py``, so a serving container does not need nasrt installed.
``reference_llm`` (engine variant) and ``llmapi_reference`` (``--backend pytorch``) import nasrt and answer with
nasrt's CPU reference runtime (the ``--reference`` repositories), both through the request loop of ``batched``.
"""
