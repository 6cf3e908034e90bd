"""Layer-wise calibration: one decoder block at a time, read from the HF safetensors, fed the cached hidden
states of the calibration set, calibrated with ModelOpt, its outputs passed on to the next block.

Peak memory is one block plus the calibration activations; activations above ``max_memory_bytes`` are kept
on disk. ModelOpt's "max" calibration does not quantize during the calibration pass, so the hidden states
handed on are the unquantized ones, exactly as in a whole-model ``mtq.quantize``.
"""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from nasrt.arch import AttnKind, FfnKind, ModelSpec
from nasrt.quantize.blocks import hf_layer_prefix, load_block, rotary
from nasrt.quantize.calibrate import (
    AmaxTable,
    QuantSettings,
    collect_amax,
    quantize_module,
    register_attention,
)
from nasrt.quantize.gptq import RoundedWeights
from nasrt.quantize.recipes import (
    RECIPES,
    Recipe,
    apply_recipe,
    attach_input_stats,
    linear_units,
)
from nasrt.st_io import SafetensorsReader
from nasrt.tensor_map import EMBEDDING, FINAL_NORM, lm_head_rule

log = logging.getLogger(__name__)

DEFAULT_MAX_MEMORY_BYTES = 2 << 30


class ActivationStore:
    """Hidden states of every calibration batch, in memory or (when large) as safetensors files on disk."""

    def __init__(self, total_bytes: int, max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
                 spill_dir: str | Path | None = None):
        self.on_disk = total_bytes > max_memory_bytes
        self._mem: dict[int, torch.Tensor] = {}
        self._dir: Path | None = None
        if self.on_disk:
            self._dir = Path(tempfile.mkdtemp(prefix="nasrt-calib-", dir=spill_dir))
            log.info("calibration activations (%.2f GiB) are kept on disk in %s", total_bytes / 2**30, self._dir)

    def put(self, idx: int, t: torch.Tensor) -> None:
        if self._dir is None:
            self._mem[idx] = t
        else:
            save_file({"h": t.contiguous()}, str(self._dir / f"{idx}.safetensors"))

    def get(self, idx: int) -> torch.Tensor:
        if self._dir is None:
            return self._mem[idx]
        return load_file(str(self._dir / f"{idx}.safetensors"))["h"]

    def close(self) -> None:
        self._mem.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


class _Head(nn.Module):
    """Final norm + lm_head, calibrated after the last block when ``--quantize_lm_head``."""

    def __init__(self, norm: torch.Tensor, lm_head: torch.Tensor, eps: float):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.norm = LlamaRMSNorm(norm.shape[0], eps=eps)
        self.norm.weight = nn.Parameter(norm, requires_grad=False)
        self.lm_head = nn.Linear(lm_head.shape[1], lm_head.shape[0], bias=False)
        self.lm_head.weight = nn.Parameter(lm_head, requires_grad=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))


def _private(reader):
    """A reader of its own for one block. safetensors serves tensors straight from memory-mapped files; the pages a
    block touched stay mapped (and count as resident) while any reader holding the map lives, so each block gets
    a fresh reader that dies with it."""
    return SafetensorsReader(reader.dir) if isinstance(reader, SafetensorsReader) else reader


def _run_once(module: nn.Module, settings: QuantSettings, store: ActivationStore, n: int, call,
              keep_outputs: bool, device: torch.device, on_start=None) -> None:
    """``mtq.quantize(module)`` whose forward loop feeds every cached batch and (optionally) stores the outputs.

    ``on_start(m)`` (e.g. attaching statistics hooks to the converted module) runs first and returns hook handles,
    removed at the end of the loop."""
    calls = []

    def forward_loop(m: nn.Module) -> None:
        if calls:
            raise RuntimeError("ModelOpt ran the calibration loop twice; layer-wise outputs would be stale")
        calls.append(1)
        handles = on_start(m) if on_start else []
        try:
            with torch.no_grad():
                for j in range(n):
                    out = call(m, store.get(j).to(device))
                    if keep_outputs:
                        store.put(j, out.cpu())
        finally:
            for h in handles:
                h.remove()

    quantize_module(module, settings, forward_loop)


def calibrate_layerwise(reader, spec: ModelSpec, batches: list[torch.Tensor], settings: QuantSettings,
                        dtype: torch.dtype, max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
                        spill_dir: str | Path | None = None, progress: bool = True,
                        device: torch.device | str = "cpu", recipe: Recipe | None = None,
                        record: dict | None = None, rounded: RoundedWeights | None = None) -> AmaxTable:
    """Calibrate every block of the HF checkpoint behind ``reader`` in turn; returns the amax table.

    Blocks run on ``device``; the cached hidden states stay on the CPU (or disk) between blocks. ``recipe``
    (default: ModelOpt's ``max``) rewrites each block's amax values right after its calibration, while the block
    and its input statistics are still in memory; per-unit choices are added to ``record``; a GPTQ recipe writes
    each block's FP8 codes to ``rounded``.
    """
    recipe = recipe or RECIPES["max"]
    device = torch.device(device)
    register_attention()  # import ModelOpt now: its import-time tracebacks must not pin a block's frame
    elem = torch.empty((), dtype=dtype).element_size()
    total = sum(b.numel() for b in batches) * spec.hidden_size * elem
    store = ActivationStore(total, max_memory_bytes, spill_dir)
    table: AmaxTable = {}
    try:
        emb = reader.get(EMBEDDING.hf_names()[0]).to(dtype)
        for j, ids in enumerate(batches):
            store.put(j, F.embedding(ids, emb))
        del emb
        rope = rotary(spec).to(device)
        pos_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def position_embeddings(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            s = h.shape[1]
            if s not in pos_cache:
                pos_cache[s] = rope(h, torch.arange(s, device=h.device).unsqueeze(0))
            return pos_cache[s]

        for i in tqdm(range(spec.num_layers), desc="calibrating blocks", unit="block", disable=not progress):
            layer = spec.layers[i]
            if layer.attention.kind is AttnKind.NO_OP and layer.ffn.kind is FfnKind.NO_OP:
                continue  # identity block: nothing to calibrate, hidden states unchanged
            block = load_block(_private(reader), spec, i, dtype).to(device)
            prefix, units = hf_layer_prefix(spec, i), linear_units(spec, i)
            stats: dict = {}

            def on_start(m: nn.Module, prefix=prefix, units=units, stats=stats) -> list:
                if not recipe.needs_stats:
                    return []
                found, handles = attach_input_stats(m, prefix, units, recipe)
                stats.update(found)
                return handles

            _run_once(block, settings, store, len(batches), lambda m, h: m(h, position_embeddings(h)), True,
                      device, on_start)
            amax = collect_amax(block, prefix)
            rec = apply_recipe(amax, block, prefix, units, stats, recipe, rounded)
            if rounded is not None:
                rounded.flush()
            if record is not None:
                record.update(rec)
            table.update(amax)
            del block
            gc.collect()  # the block (and the file pages it mapped) go before the next one is read
        if settings.quantize_lm_head:
            head = _Head(reader.get(FINAL_NORM.hf_names()[0]).to(dtype),
                         reader.get(lm_head_rule(spec).hf_names()[0]).to(dtype), spec.norm_epsilon).to(device)
            _run_once(head, settings, store, len(batches), lambda m, h: m(h), False, device)
            table.update(collect_amax(head))
    finally:
        store.close()
    return table
