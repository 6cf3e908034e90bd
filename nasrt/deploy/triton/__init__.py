"""Triton Inference Server deployment: model repository writer, launch command, local server helper, client.

``repository`` writes the four-model repository (``ensemble`` -> ``preprocessing`` -> ``tensorrt_llm`` ->
``postprocessing``); ``signatures`` is the one table of every model's inputs, outputs and the ensemble wiring;
``pbtxt`` renders it as ``config.pbtxt`` text; ``models/`` holds the Python-backend models written for nasrt.
``llmapi`` writes the PyTorch-backend repository (one ``tensorrt_llm`` Python model configured by ``model.yaml``).
"""
