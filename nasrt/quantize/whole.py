"""``--whole_model``: ModelOpt's usual flow, the whole model in memory and one ``mtq.quantize`` over it.

Plain Llama checkpoints load as transformers' ``LlamaForCausalLM`` (exactly what ModelOpt users quantize);
Nemotron-NAS checkpoints, which transformers only knows as remote code, load as nasrt's
:class:`~nasrt.quantize.blocks.DeciCausalLM` built from the same blocks the layer-wise path uses.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from nasrt.arch import ModelSpec, read_json
from nasrt.quantize.blocks import load_whole
from nasrt.quantize.calibrate import (
    AmaxTable,
    QuantSettings,
    collect_amax,
    quantize_module,
    register_attention,
)

log = logging.getLogger(__name__)


def is_plain_llama(model_dir: str | Path) -> bool:
    cfg = read_json(Path(model_dir) / "config.json")
    return cfg.get("model_type") == "llama" and not cfg.get("block_configs")


def load_model(model_dir: str | Path, reader, spec: ModelSpec, dtype: torch.dtype) -> nn.Module:
    """The whole model in ``dtype``: transformers' Llama where possible, else nasrt's DeciLM."""
    if is_plain_llama(model_dir):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="sdpa")
        return model.eval()
    return load_whole(reader, spec, dtype)


def calibrate_whole(model_dir: str | Path, reader, spec: ModelSpec, batches: list[torch.Tensor],
                    settings: QuantSettings, dtype: torch.dtype,
                    device: torch.device | str = "cpu") -> tuple[AmaxTable, nn.Module]:
    """Calibrate the whole model at once (on ``device``); returns the amax table and the quantized model."""
    register_attention()  # import ModelOpt before the model exists (see calibrate_layerwise)
    model = load_model(model_dir, reader, spec, dtype).to(device)
    hf = hasattr(model, "config")

    def forward_loop(m: nn.Module) -> None:
        with torch.no_grad():
            for ids in batches:
                ids = ids.to(device)
                m(input_ids=ids, use_cache=False) if hf else m(ids)

    quantize_module(model, settings, forward_loop)
    return collect_amax(model), model
