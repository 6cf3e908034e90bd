"""The derived model as an HF ``nemotron-nas`` checkpoint: ``config.json`` with ``block_configs``, one safetensors
file under HF DeciLM names (streamed tensor by tensor), and the parent's tokenizer files."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nasrt.arch import AttnKind, FfnKind, LayerSpec, ModelSpec, from_hf_config, load_spec
from nasrt.derive.library import ffn_mult_for
from nasrt.presets import hf_config
from nasrt.quantize.blocks import hf_layer_prefix
from nasrt.st_io import write_safetensors_stream
from nasrt.tensor_map import expected_hf_tensors

#: Side files copied from the parent (tokenizer, chat template, generation defaults). Never weights or code.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
              "generation_config.json")
#: Parent config keys carried over unchanged (the rest comes from :func:`nasrt.presets.hf_config`).
CARRIED_KEYS = ("pad_token_id", "unk_token_id", "initializer_range")


def pattern_token(spec: ModelSpec, layer: LayerSpec) -> str:
    """One layer in the :mod:`nasrt.presets` pattern legend (``g3/4.0``, ``L/N`` ...)."""
    a = layer.attention
    att = {AttnKind.LINEAR: "L", AttnKind.NO_OP: "N"}.get(a.kind) or f"g{spec.num_attention_heads // a.num_kv_heads}"
    f = layer.ffn
    ffn = {FfnKind.LINEAR: "L", FfnKind.NO_OP: "N"}.get(f.kind) or repr(ffn_mult_for(f.intermediate_size,
                                                                                       spec.hidden_size))
    return f"{att}/{ffn}"


def derived_config(parent_cfg: dict[str, Any], spec: ModelSpec, layers: list[LayerSpec], dtype: str
                   ) -> dict[str, Any]:
    """The HF ``nemotron-nas`` config of ``spec``'s globals with ``layers``."""
    pattern = " ".join(f"{i}:{pattern_token(spec, la)}" for i, la in enumerate(layers))
    cfg = hf_config(pattern, hidden_size=spec.hidden_size, num_attention_heads=spec.num_attention_heads,
                    vocab_size=spec.vocab_size, rope_theta=spec.rope_theta, rope_scaling=spec.rope_dict(),
                    max_position_embeddings=spec.max_position_embeddings, bos_token_id=spec.bos_token_id,
                    eos_token_id=spec.eos_token_id, torch_dtype=dtype,
                    tie_word_embeddings=spec.tie_word_embeddings)
    cfg["rms_norm_eps"] = spec.norm_epsilon
    cfg.update({k: parent_cfg[k] for k in CARRIED_KEYS if k in parent_cfg})
    got = from_hf_config(cfg)
    if list(got.layers) != list(layers):  # the written ffn_mult / group must round back to the chosen layer
        raise RuntimeError(f"block_configs do not express the chosen layers: {got.layers} != {layers}")
    return cfg


def write_checkpoint(out_dir: Path, parent_dir: Path, parent_cfg: dict[str, Any], spec: ModelSpec,
                     layers: list[LayerSpec], dtype: torch.dtype, global_tensor: Callable[[str], torch.Tensor],
                     layer_tensors: Callable[[int], dict[str, torch.Tensor]], progress: bool = True) -> ModelSpec:
    """Write config, weights and tokenizer into ``out_dir``; returns the spec re-read from the written config.

    ``global_tensor(name)`` gives an HF global tensor, ``layer_tensors(i)`` layer ``i``'s tensors under
    layer-relative HF names. Tensors are produced and written one at a time.
    """
    import json

    dname = str(dtype).replace("torch.", "")
    cfg = derived_config(parent_cfg, spec, layers, dname)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    new_spec = load_spec(out_dir)
    expected = expected_hf_tensors(new_spec)
    specs = [(name, dtype, shape) for name, shape in expected.items()]

    def produce() -> Iterator[torch.Tensor]:
        cached: tuple[int, dict[str, torch.Tensor]] | None = None
        for name, _, _ in tqdm(specs, desc="derive: writing", unit="tensor", disable=not progress):
            if not name.startswith("model.layers."):
                yield global_tensor(name).to(dtype)
                continue
            idx = int(name.split(".")[2])
            if cached is None or cached[0] != idx:
                cached = (idx, layer_tensors(idx))
            yield cached[1][name[len(hf_layer_prefix(new_spec, idx)):]].to(dtype).contiguous()

    write_safetensors_stream(out_dir / "model.safetensors", specs, produce(), metadata={"format": "pt"})
    for side in SIDE_FILES:
        if (parent_dir / side).is_file():
            shutil.copy2(parent_dir / side, out_dir / side)
    return new_spec
