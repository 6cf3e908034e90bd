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
from nasrt.errors import CheckpointError
from nasrt.quantize.blocks import load_whole
from nasrt.quantize.calibrate import (
    AmaxTable,
    QuantSettings,
    collect_amax,
    quantize_module,
    register_attention,
)
from nasrt.quantize.gptq import RoundedWeights
from nasrt.quantize.recipes import RECIPES, Recipe, all_units, apply_recipe, attach_input_stats

log = logging.getLogger(__name__)


#: Weight files that are pickles (loading one can run arbitrary code): never opened.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickle_only(model_dir: str | Path) -> None:
    """Refuse a directory without safetensors weights before anything (transformers included) could unpickle
    its ``pytorch_model.bin``."""
    path = Path(model_dir)
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES) if path.is_dir() else []
        hint = f"; {pickles} are pickle files and are never loaded" if pickles else ""
        raise CheckpointError(f"{path}: no *.safetensors weight files{hint} (convert them to safetensors first)")


def is_plain_llama(model_dir: str | Path) -> bool:
    cfg = read_json(Path(model_dir) / "config.json")
    return cfg.get("model_type") == "llama" and not cfg.get("block_configs")


def load_model(model_dir: str | Path, reader, spec: ModelSpec, dtype: torch.dtype) -> nn.Module:
    """The whole model in ``dtype``: transformers' Llama where possible, else nasrt's DeciLM."""
    if is_plain_llama(model_dir):
        from transformers import AutoModelForCausalLM

        refuse_pickle_only(model_dir)
        # use_safetensors=True: transformers must never fall back to a pickle file
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="sdpa",
                                                     use_safetensors=True, local_files_only=True,
                                                     trust_remote_code=False)
        return model.eval()
    return load_whole(reader, spec, dtype)


def calibrate_whole(model_dir: str | Path, reader, spec: ModelSpec, batches: list[torch.Tensor],
                    settings: QuantSettings, dtype: torch.dtype, device: torch.device | str = "cpu",
                    recipe: Recipe | None = None, record: dict | None = None,
                    rounded: RoundedWeights | None = None) -> tuple[AmaxTable, nn.Module]:
    """Calibrate the whole model at once (on ``device``); returns the amax table (rewritten by ``recipe`` as in
    the layer-wise path) and the quantized model."""
    recipe = recipe or RECIPES["max"]
    register_attention()  # import ModelOpt before the model exists (see calibrate_layerwise)
    model = load_model(model_dir, reader, spec, dtype).to(device)
    hf = hasattr(model, "config")
    units = all_units(spec)
    stats: dict = {}

    def forward_loop(m: nn.Module) -> None:
        handles = []
        if recipe.needs_stats:
            found, handles = attach_input_stats(m, "", units, recipe)
            stats.update(found)
        with torch.no_grad():
            for ids in batches:
                ids = ids.to(device)
                m(input_ids=ids, use_cache=False) if hf else m(ids)
        for h in handles:
            h.remove()

    quantize_module(model, settings, forward_loop)
    table = collect_amax(model)
    rec = apply_recipe(table, model, "", units, stats, recipe, rounded)
    if rounded is not None:
        rounded.flush()
    if record is not None:
        record.update(rec)
    return table, model
