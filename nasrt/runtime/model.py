"""The reference network: a heterogeneous DeciLM decoder built from ``layer_configs`` of a nasrt checkpoint.

``load_model`` reads an HF dir / ModelOpt unified FP8 checkpoint (:func:`nasrt.hf_ckpt.load_hf_checkpoint`) or merges
every rank of a TensorRT-LLM checkpoint (:func:`nasrt.trtllm_ckpt.load_checkpoint`) into one layout, builds one
attention and one FFN sub-block per layer through the kind registries of :mod:`nasrt.runtime.layers`, and offers
full-recomputation logits plus the two cached steps generation needs: :meth:`ReferenceModel.prefill` and
:meth:`ReferenceModel.decode_one_token`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nasrt.arch import ModelSpec
from nasrt.errors import ConfigError, MissingDependencyError
from nasrt.runtime.layers import KVCache, Linear, LoadContext, StepContext, build_layer, rms_norm
from nasrt.runtime.rope import RopeTable
from nasrt.st_io import torch_dtype
from nasrt.tensor_map import EMBEDDING, FINAL_NORM, lm_head_rule
from nasrt.trtllm_ckpt import TrtllmCheckpoint, load_checkpoint

log = logging.getLogger(__name__)

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def _causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """``(B, 1, T, T)`` bool: causal, padding keys hidden, every query sees itself (padding rows stay finite)."""
    t = valid.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=valid.device).tril()
    mask = causal[None] & valid[:, None, :]  # (B, T, T)
    mask |= torch.eye(t, dtype=torch.bool, device=valid.device)[None]
    return mask[:, None]


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions ``(B, T)``: the index of each token among the real tokens of its row."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class ReferenceModel(nn.Module):
    """A DeciLM decoder on one device, computing in ``dtype``; logits are returned as float32."""

    def __init__(self, ckpt: TrtllmCheckpoint, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.spec: ModelSpec = ckpt.spec
        self.config: dict[str, Any] = ckpt.config
        self.device, self.dtype = device, dtype
        quant, kv_quant = ckpt.quant_algo, ckpt.kv_cache_quant_algo
        if quant not in (None, "FP8") or kv_quant not in (None, "FP8"):
            raise ConfigError(f"quantization quant_algo={quant!r} kv_cache_quant_algo={kv_quant!r} is not "
                              "supported by the reference runtime (only FP8 or none)")
        ctx = LoadContext(self.spec, ckpt.tensors, dtype, device, fp8_kv_cache=kv_quant == "FP8")
        self.embedding = ctx.tensor(EMBEDDING.trt_name())  # (V, H)
        attn, ffn = [], []
        for i, layer in enumerate(self.spec.layers):
            a, f = build_layer(ctx, i, layer)
            attn.append(a)
            ffn.append(f)
        self.attn, self.ffn = nn.ModuleList(attn), nn.ModuleList(ffn)
        self.ln_f = ctx.tensor(FINAL_NORM.trt_name())
        self.lm_head = Linear.load(ctx, lm_head_rule(self.spec), None)
        if self.spec.tie_word_embeddings and torch.equal(self.lm_head.weight, self.embedding):
            self.lm_head.weight = self.embedding  # tied: keep one copy of the (V, H) matrix
        self.eps = self.spec.norm_epsilon
        self.rope = RopeTable(self.spec.head_dim, self.spec.rope_theta, self.spec.rope_scaling, device, dtype,
                              initial=min(self.spec.max_position_embeddings, 4096))

    # ---- facts ---------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    @property
    def decode_weight_bytes(self) -> int:
        """Bytes of weights one decode step reads (all linears, norms, lm_head; one embedding row)."""
        linears = sum(m.nbytes for m in self.modules() if isinstance(m, Linear))
        norms = sum(m.norm.numel() * m.norm.element_size() for m in self.modules() if hasattr(m, "norm"))
        return linears + norms + self.ln_f.numel() * self.ln_f.element_size()

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """A static KV cache for ``batch`` sequences of up to ``max_len`` tokens (attention layers only)."""
        return KVCache(self.spec, batch, max_len, self.dtype, self.device)

    # ---- forward -------------------------------------------------------------------------------------------
    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ConfigError(f"token ids must lie in [0, {self.vocab_size}); got {int(ids.min())}..{int(ids.max())}")

    def _check_length(self, positions: torch.Tensor) -> None:
        limit = self.spec.max_position_embeddings
        if positions.numel() and int(positions.max()) >= limit:
            raise ConfigError(f"sequence needs position {int(positions.max())} but max_position_embeddings is "
                              f"{limit}")

    def _hidden(self, ids: torch.Tensor, positions: torch.Tensor, step_mask: torch.Tensor | None,
                is_causal: bool, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """Final-normed hidden states ``(B, T, H)``."""
        cos, sin = self.rope(positions)
        step = StepContext(cos, sin, step_mask, is_causal, cache, start)
        h = F.embedding(ids, self.embedding)  # (B, T, H)
        for attn, ffn in zip(self.attn, self.ffn, strict=True):
            h = ffn(attn(h, step), step)
        return rms_norm(h, self.ln_f, self.eps)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h).float()

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits ``(B, T, V)`` by full recomputation (no cache); ``attention_mask`` 1 = real token
        (left or right padding)."""
        ids = input_ids.to(self.device)
        mask = (torch.ones_like(ids, dtype=torch.bool) if attention_mask is None
                else attention_mask.to(self.device).bool())
        positions = positions_from_mask(mask)
        self._check_length(positions)
        self._check_ids(ids)
        padded = not bool(mask.all())
        h = self._hidden(ids, positions, _causal_mask(mask) if padded else None, not padded)
        return self._logits(h)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """Run left-padded prompts ``(B, T)`` into an empty ``cache``; float32 logits of the last token ``(B, V)``."""
        ids = input_ids.to(self.device)
        b, t = ids.shape
        mask = (torch.ones_like(ids, dtype=torch.bool) if attention_mask is None
                else attention_mask.to(self.device).bool())
        if not bool(mask[:, -1].all()):
            raise ValueError("prefill expects left-padded prompts (the last column must be real tokens)")
        if cache.length or t > cache.max_len:
            raise ValueError(f"prefill of {t} tokens needs an empty cache of at least that length")
        positions = positions_from_mask(mask)
        self._check_length(positions)
        self._check_ids(ids)
        padded = not bool(mask.all())
        cache.valid[:, :t] = mask
        cache.next_pos.copy_(mask.sum(-1))
        cache.length, cache.padded = t, padded
        h = self._hidden(ids, positions, _causal_mask(mask) if padded else None, not padded, cache, 0)
        return self._logits(h[:, -1])

    @torch.inference_mode()
    def decode_one_token(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Append one token per sequence ``(B,)``; float32 logits of the next token ``(B, V)``."""
        s = cache.length
        if s >= cache.max_len:
            raise ValueError(f"KV cache of {cache.max_len} slots is full")
        positions = cache.next_pos[:, None]  # (B, 1)
        self._check_length(positions)
        cache.valid[:, s] = True
        mask = cache.valid[:, None, None, : s + 1] if cache.padded else None  # (B, 1, 1, S)
        h = self._hidden(tokens.to(self.device).view(-1, 1), positions, mask, False, cache, s)
        cache.length += 1
        cache.next_pos += 1
        return self._logits(h[:, -1])


def resolve_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MissingDependencyError(f"--device {device}: no CUDA GPU is available to PyTorch here")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r} must be cpu or cuda")
    return dev


def checkpoint_format(path: str | Path) -> str:
    """``"hf"`` (what TensorRT-LLM's PyTorch backend loads: HF safetensors, BF16 or ModelOpt unified FP8) or
    ``"trtllm"`` (a nasrt / TensorRT-LLM checkpoint), from ``path/config.json``."""
    from nasrt.arch import is_trtllm_config, read_json

    cfg = read_json(Path(path) / "config.json")
    if "pretrained_config" in cfg:
        raise ConfigError(f"{path}: this is a TensorRT-LLM engine dir; the reference runtime loads the checkpoint "
                          "(or HF dir) it was built from")
    return "trtllm" if is_trtllm_config(cfg) else "hf"


def load_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu",
               dtype: str | None = None, allow_external: bool = False) -> ReferenceModel:
    """Load a model for the reference runtime: an HF DeciLM / Llama dir (BF16/FP32 or ModelOpt's unified HF FP8
    checkpoint, :mod:`nasrt.hf_ckpt`) or a nasrt / TensorRT-LLM checkpoint of any tp/pp; the format is detected from
    ``config.json`` and both become the same in-memory checkpoint.

    Args:
        checkpoint_dir: HF model dir, or a dir with a TensorRT-LLM ``config.json`` and ``rank{N}.safetensors``.
        device: ``cpu`` or ``cuda``.
        dtype: compute dtype; None = the checkpoint's ``dtype`` (FP8 weights are dequantized into it).
        allow_external: read weight files whose symlinks resolve outside ``checkpoint_dir``.
    """
    dev = resolve_device(device)
    if checkpoint_format(checkpoint_dir) == "hf":
        from nasrt.hf_ckpt import load_hf_checkpoint

        ckpt = load_hf_checkpoint(checkpoint_dir, allow_external=allow_external)
    else:
        ckpt = load_checkpoint(checkpoint_dir, allow_external=allow_external)
    name = dtype or ckpt.config.get("dtype") or "float32"
    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"--dtype {name!r} is not a compute dtype ({', '.join(COMPUTE_DTYPES)})")
    log.info("loading %s on %s in %s (%d layers, quant %s)", checkpoint_dir, dev, name, ckpt.spec.num_layers,
             ckpt.quant_algo)
    model = ReferenceModel(ckpt, dev, torch_dtype(name))
    ckpt.tensors.clear()
    return model.eval()
