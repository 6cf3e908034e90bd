"""Read a TensorRT-LLM ``DeciLMForCausalLM`` checkpoint and merge its ranks back into one unsharded set.

The result uses TensorRT-LLM names with *global* layer indices, exactly what a ``tp_size=1, pp_size=1``
conversion writes, so every consumer (reference runtime, inspector, FP8 checks) sees one layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nasrt.arch import ModelSpec, from_trtllm_config, read_json
from nasrt.convert import ConvertOptions, stage_rules
from nasrt.errors import CheckpointError
from nasrt.sharding import Mapping, merge_tp, pp_layers
from nasrt.st_io import SafetensorsReader
from nasrt.tensor_map import ACT_SCALE, KV_SCALE, WEIGHT_SCALE

#: ModelOpt spellings accepted on load, as TensorRT-LLM's ``from_checkpoint`` renames them.
MODELOPT_RENAMES = ((".mlp.", ".ffn."), (".attn_replacing_linear.", ".attention."), (".mlp_replacing_linear.", ".ffn."))
#: Replicated per-module tensors that ride along with quantized weights.
REPLICATED_SUFFIXES = (WEIGHT_SCALE, ACT_SCALE, KV_SCALE, "kv_cache_rcp_scaling_factor",
                       "k_cache_scaling_factor", "v_cache_scaling_factor")
_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.")


@dataclass
class TrtllmCheckpoint:
    """An unsharded checkpoint: config, spec and tensors named ``transformer.layers.<global>...``."""

    config: dict[str, Any]
    spec: ModelSpec
    tensors: dict[str, torch.Tensor] = field(repr=False)

    @property
    def quant_algo(self) -> str | None:
        return (self.config.get("quantization") or {}).get("quant_algo")

    @property
    def kv_cache_quant_algo(self) -> str | None:
        return (self.config.get("quantization") or {}).get("kv_cache_quant_algo")


def _canonical(name: str) -> str:
    for old, new in MODELOPT_RENAMES:
        name = name.replace(old, new)
    return name


def _globalize(name: str, layers: list[int]) -> str:
    m = _LAYER.match(name)
    if not m:
        return name
    local = int(m.group(1))
    if local >= len(layers):
        raise CheckpointError(f"tensor {name!r}: local layer {local} beyond the stage's {len(layers)} layers")
    return f"transformer.layers.{layers[local]}." + name[m.end():]


def load_checkpoint(ckpt_dir: str | Path, allow_external: bool = False) -> TrtllmCheckpoint:
    """Load ``config.json`` + every ``rank{N}.safetensors`` and merge them (exact inverse of the sharding);
    ``allow_external``: rank files may be symlinks that resolve outside ``ckpt_dir``."""
    ckpt_dir = Path(ckpt_dir)
    cfg_path = ckpt_dir / "config.json"
    cfg = read_json(cfg_path)
    spec = from_trtllm_config(cfg, str(cfg_path))
    mapping = Mapping.from_dict(cfg.get("mapping") or {})
    opts = ConvertOptions(tp_size=mapping.tp_size, pp_size=mapping.pp_size,
                          use_parallel_embedding=bool(cfg.get("use_parallel_embedding")),
                          embedding_sharding_dim=int(cfg.get("embedding_sharding_dim") or 0))
    readers: dict[int, dict[str, torch.Tensor]] = {}
    for rank in range(mapping.world_size):
        path = ckpt_dir / f"rank{rank}.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{path}: rank file missing (mapping says world_size {mapping.world_size})")
        reader = SafetensorsReader(ckpt_dir, pattern=path.name, allow_external=allow_external)
        layers = pp_layers(spec.num_layers, mapping.pp_size, mapping.pp_rank(rank))
        readers[rank] = {_globalize(_canonical(n), layers): reader.get(n) for n in reader.names()}

    tensors: dict[str, torch.Tensor] = {}
    used: set[tuple[int, str]] = set()
    for pp_rank in range(mapping.pp_size):
        ranks = [pp_rank * mapping.tp_size + t for t in range(mapping.tp_size)]
        for rule, glob, _local in stage_rules(spec, mapping, ranks[0]):
            name = rule.trt_name(glob)
            shards = []
            for r in ranks:
                if name not in readers[r]:
                    raise CheckpointError(f"{ckpt_dir}/rank{r}.safetensors: tensor {name!r} is missing "
                                          f"(layer_configs in config.json require it)")
                shards.append(readers[r][name])
                used.add((r, name))
            layer = spec.layers[glob] if glob is not None else None
            merged = merge_tp(rule, shards, spec, layer.attention.num_kv_heads if layer else None,
                              parallel_embedding=opts.use_parallel_embedding,
                              embedding_sharding_dim=opts.embedding_sharding_dim)
            tensors[name] = merged
        for r in ranks:
            for name, t in readers[r].items():
                if (r, name) in used:
                    continue
                if name.rsplit(".", 1)[-1] in REPLICATED_SUFFIXES:
                    tensors.setdefault(name, t)
                    used.add((r, name))
                else:
                    raise CheckpointError(f"{ckpt_dir}/rank{r}.safetensors: unexpected tensor {name!r} "
                                          "(not produced by any layer variant in config.json)")
    _check_shapes(spec, tensors, ckpt_dir)
    return TrtllmCheckpoint(cfg, spec, tensors)


def _check_shapes(spec: ModelSpec, tensors: dict[str, torch.Tensor], where: Path) -> None:
    from nasrt.tensor_map import EMBEDDING, FINAL_NORM, hf_shapes, layer_rules, lm_head_rule

    checks = [(EMBEDDING, None), (FINAL_NORM, None), (lm_head_rule(spec), None)]
    checks += [(rule, i) for i, la in enumerate(spec.layers) for rule in layer_rules(la)]
    for rule, glob in checks:
        layer = spec.layers[glob] if glob is not None else None
        shapes = hf_shapes(rule, spec, layer)
        want = (sum(s[0] for s in shapes), *shapes[0][1:])
        got = tuple(tensors[rule.trt_name(glob)].shape)
        if got != want:
            raise CheckpointError(f"{where}: tensor {rule.trt_name(glob)!r} is {list(got)} but config.json "
                                  f"implies {list(want)}")
