"""Tensor- and pipeline-parallel layout: which slice of which source tensor each rank holds, and the inverse.

Sharding is expressed as :class:`Piece` lists (contiguous slices of source tensors, concatenated along dim 0
or, for ROW splits, a single slice along dim 1), so the converter reads exactly one rank's bytes through
safetensors' lazy slices and the runtime can merge ranks back with :func:`merge_tp`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from nasrt.arch import ModelSpec
from nasrt.errors import ShardingError
from nasrt.tensor_map import Split, TensorRule


@dataclass(frozen=True)
class Mapping:
    """Tensor x pipeline parallel layout (TensorRT-LLM ``Mapping``, cp = 1)."""

    tp_size: int = 1
    pp_size: int = 1

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp_size

    def pp_rank(self, rank: int) -> int:
        return rank // self.tp_size

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint ``mapping`` in the minimal form TensorRT-LLM 1.2's ``Mapping(**d)`` accepts (it has no
        ``**kwargs``: no ``auto_parallel``; the attention / MoE sizes are derived from tp, which is what
        ``attn_tp_size * attn_cp_size == tp_size * cp_size`` needs)."""
        return {"world_size": self.world_size, "gpus_per_node": 8, "cp_size": 1, "tp_size": self.tp_size,
                "pp_size": self.pp_size}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Mapping:
        return cls(int(d.get("tp_size") or 1), int(d.get("pp_size") or 1))


def pp_layers(num_layers: int, pp_size: int, pp_rank: int) -> list[int]:
    """Global layer indices of a pipeline stage: contiguous blocks, the first ``L % pp`` stages get one extra."""
    if pp_size > num_layers:
        raise ShardingError(f"--pp_size {pp_size} exceeds the {num_layers} layers of the model")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return list(range(start, start + base + (1 if pp_rank < extra else 0)))


@dataclass(frozen=True)
class Piece:
    """Rows/cols ``[start, stop)`` of ``source`` along ``dim``; positions past the source's end are zeros."""

    source: str
    dim: int
    start: int
    stop: int


def _even(n: int, tp: int, rank: int, what: str) -> tuple[int, int]:
    if n % tp:
        raise ShardingError(f"{what}: size {n} is not divisible by --tp_size {tp}")
    step = n // tp
    return rank * step, (rank + 1) * step


def kv_head_range(kv: int, tp: int, rank: int, what: str) -> tuple[int, int]:
    """KV heads ``[first, last)`` on ``rank``; one duplicated head when tp > kv."""
    if kv % tp == 0:
        per = kv // tp
        return rank * per, (rank + 1) * per
    if tp % kv == 0:
        head = rank // (tp // kv)
        return head, head + 1
    raise ShardingError(f"{what}: {kv} KV heads and --tp_size {tp} do not divide one another")


def tp_pieces(rule: TensorRule, sources: list[str], shapes: list[tuple[int, ...]], spec: ModelSpec,
              kv_heads: int | None, tp: int, rank: int, *, parallel_embedding: bool = False,
              embedding_sharding_dim: int = 0) -> list[Piece]:
    """The pieces of ``rule``'s sources that TP rank ``rank`` holds, in output order."""
    what = sources[0]
    split = rule.split
    if split is Split.EMBEDDING:
        split = Split.REPLICATE if not parallel_embedding else (Split.VOCAB if embedding_sharding_dim == 0
                                                                 else Split.ROW)
    if split is Split.REPLICATE or tp == 1 and split is not Split.QKV:
        return [Piece(s, 0, 0, shape[0]) for s, shape in zip(sources, shapes, strict=True)]
    if split is Split.COLUMN:
        return [Piece(what, 0, *_even(shapes[0][0], tp, rank, what))]
    if split is Split.ROW:
        return [Piece(what, 1, *_even(shapes[0][1], tp, rank, what))]
    if split is Split.VOCAB:
        rows = math.ceil(shapes[0][0] / tp)
        return [Piece(what, 0, rank * rows, (rank + 1) * rows)]
    # QKV
    hd, nh = spec.head_dim, spec.num_attention_heads
    if nh % tp:
        raise ShardingError(f"{what}: the model's {nh} attention heads are not divisible by --tp_size {tp}")
    q0, q1 = _even(nh, tp, rank, what)
    k0, k1 = kv_head_range(int(kv_heads), tp, rank, what.replace("q_proj", "k_proj"))
    return [Piece(sources[0], 0, q0 * hd, q1 * hd), Piece(sources[1], 0, k0 * hd, k1 * hd),
            Piece(sources[2], 0, k0 * hd, k1 * hd)]


def piece_shape(pieces: list[Piece], shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """Shape of the tensor assembled from ``pieces`` (``shapes`` = full source shapes)."""
    first = shapes[pieces[0].source]
    if pieces[0].dim == 1:
        return (first[0], pieces[0].stop - pieces[0].start)
    return (sum(p.stop - p.start for p in pieces), *first[1:])


def assemble(pieces: list[Piece], read) -> torch.Tensor:
    """Build a rank tensor; ``read(source, dim, start, stop)`` returns the in-range slice."""
    parts = []
    for p in pieces:
        t = read(p.source, p.dim, p.start, p.stop)
        want = p.stop - p.start
        if t.shape[p.dim] < want:  # zero padding past the end (lm_head / parallel embedding)
            pad_shape = list(t.shape)
            pad_shape[p.dim] = want - t.shape[p.dim]
            t = torch.cat([t, torch.zeros(pad_shape, dtype=t.dtype)], dim=p.dim)
        parts.append(t)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def merge_tp(rule: TensorRule, shards: list[torch.Tensor], spec: ModelSpec, kv_heads: int | None, *,
             parallel_embedding: bool = False, embedding_sharding_dim: int = 0) -> torch.Tensor:
    """Invert :func:`tp_pieces`: the unsharded TensorRT-LLM tensor from every TP rank's shard."""
    tp = len(shards)
    split = rule.split
    if split is Split.EMBEDDING:
        split = Split.REPLICATE if not parallel_embedding else (Split.VOCAB if embedding_sharding_dim == 0
                                                                 else Split.ROW)
    if split is Split.REPLICATE or tp == 1:
        return shards[0]
    if split is Split.COLUMN:
        return torch.cat(shards, dim=0)
    if split is Split.ROW:
        return torch.cat(shards, dim=1)
    if split is Split.VOCAB:
        return torch.cat(shards, dim=0)[: spec.vocab_size]
    hd = spec.head_dim
    q_rows = spec.q_size // tp
    kv = int(kv_heads)
    kv_rows = (kv // tp if kv % tp == 0 else 1) * hd
    qs = [s[:q_rows] for s in shards]
    ks = [s[q_rows:q_rows + kv_rows] for s in shards]
    vs = [s[q_rows + kv_rows:] for s in shards]
    if kv % tp:  # duplicated heads: keep the first rank of every group
        step = tp // kv
        ks, vs = ks[::step], vs[::step]
    return torch.cat(qs + ks + vs, dim=0)
