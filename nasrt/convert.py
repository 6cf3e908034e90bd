"""HF DeciLM / Llama safetensors -> TensorRT-LLM ``DeciLMForCausalLM`` checkpoint, streamed rank by rank.

The converter never builds a network: it plans every rank tensor from :mod:`nasrt.tensor_map` and
:mod:`nasrt.sharding`, validates all source names and shapes before writing, then streams one tensor at a time
(read one TP slice -> cast -> write) into ``rank{N}.safetensors``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import nasrt
from nasrt.arch import ModelSpec, from_hf_config, read_json
from nasrt.atomic import atomic_output_dir, write_json
from nasrt.errors import CheckpointError
from nasrt.sharding import Mapping, Piece, assemble, piece_shape, pp_layers, tp_pieces
from nasrt.st_io import FileRange, SafetensorsReader, torch_dtype, write_safetensors_stream
from nasrt.tensor_map import (
    EMBEDDING,
    FINAL_NORM,
    TensorRule,
    expected_hf_tensors,
    hf_shapes,
    layer_rules,
    lm_head_rule,
)

log = logging.getLogger(__name__)

#: (global layer or None for lm_head, TRT linear module) -> {scale suffix: float32 [1] tensor}
Scales = dict[tuple[int | None, str], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class ConvertOptions:
    dtype: str = "auto"
    tp_size: int = 1
    pp_size: int = 1
    use_parallel_embedding: bool = False
    embedding_sharding_dim: int = 0

    @property
    def mapping(self) -> Mapping:
        return Mapping(self.tp_size, self.pp_size)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    pieces: tuple[Piece, ...]
    shape: tuple[int, ...]


def resolve_dtype(requested: str, spec: ModelSpec) -> str:
    """``auto`` -> the HF ``torch_dtype``; float32 then becomes float16 as in TensorRT-LLM's ``infer_dtype``."""
    if requested != "auto":
        torch_dtype(requested)
        return requested
    dtype = spec.torch_dtype if spec.torch_dtype in ("float16", "bfloat16", "float32") else "bfloat16"
    if dtype == "float32":
        log.info("--dtype auto: HF float32 becomes float16 (as TensorRT-LLM does); pass --dtype float32 to keep it")
        dtype = "float16"
    return dtype


def validate_source(reader, spec: ModelSpec) -> None:
    """Every tensor the spec needs is present with the right shape, and nothing is left unconsumed."""
    expected = expected_hf_tensors(spec)
    names = set(reader.names())
    missing = [n for n in expected if n not in names]
    if missing:
        raise CheckpointError(f"{getattr(reader, 'dir', 'source')}: missing tensor(s) {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''} (expected from config.json)")
    for name, shape in expected.items():
        got = reader.shape(name)
        if tuple(got) != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {list(got)} but config.json implies {list(shape)}")
    reader.check_floating(expected)
    extra = sorted(n for n in names - set(expected)
                   if not n.endswith("rotary_emb.inv_freq") and not (spec.tie_word_embeddings and n == "lm_head.weight"))
    if extra:
        raise CheckpointError(f"tensor(s) {extra[:5]} are not used by the layer variants in config.json")


def stage_rules(spec: ModelSpec, mapping: Mapping, rank: int) -> list[tuple[TensorRule, int | None, int | None]]:
    """(rule, global layer, local layer) for every tensor of ``rank``'s pipeline stage."""
    pp_rank = mapping.pp_rank(rank)
    layers = pp_layers(spec.num_layers, mapping.pp_size, pp_rank)
    out: list[tuple[TensorRule, int | None, int | None]] = []
    if pp_rank == 0:
        out.append((EMBEDDING, None, None))
    for local, glob in enumerate(layers):
        out.extend((rule, glob, local) for rule in layer_rules(spec.layers[glob]))
    if pp_rank == mapping.pp_size - 1:
        out.append((FINAL_NORM, None, None))
        out.append((lm_head_rule(spec), None, None))
    return out


def plan_rank(spec: ModelSpec, opts: ConvertOptions, rank: int) -> list[tuple[PlannedTensor, TensorRule, int | None]]:
    """Every tensor of ``rank``: name, the source pieces it is assembled from, and its shape."""
    mapping = opts.mapping
    tp, tp_rank = mapping.tp_size, mapping.tp_rank(rank)
    plan = []
    for rule, glob, local in stage_rules(spec, mapping, rank):
        layer = spec.layers[glob] if glob is not None else None
        sources = rule.hf_names(glob)
        shapes = hf_shapes(rule, spec, layer)
        pieces = tp_pieces(rule, sources, shapes, spec, layer.attention.num_kv_heads if layer else None, tp,
                           tp_rank, parallel_embedding=opts.use_parallel_embedding,
                           embedding_sharding_dim=opts.embedding_sharding_dim)
        shape = piece_shape(pieces, dict(zip(sources, shapes, strict=True)))
        plan.append((PlannedTensor(rule.trt_name(local), tuple(pieces), shape), rule, glob))
    return plan


def check_layout(spec: ModelSpec, opts: ConvertOptions) -> None:
    """Fail early (before any output exists) if the model cannot be split as asked."""
    if opts.tp_size < 1 or opts.pp_size < 1:
        raise CheckpointError(f"--tp_size {opts.tp_size} / --pp_size {opts.pp_size} must be >= 1")
    if opts.embedding_sharding_dim not in (0, 1):
        raise CheckpointError(f"--embedding_sharding_dim {opts.embedding_sharding_dim} must be 0 or 1")
    for rank in range(opts.mapping.world_size):
        plan_rank(spec, opts, rank)


def trtllm_config(spec: ModelSpec, opts: ConvertOptions, dtype: str,
                  quantization: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg = spec.to_trtllm_config(dtype, opts.mapping.to_dict(), quantization,
                                opts.use_parallel_embedding, opts.embedding_sharding_dim)
    cfg["producer"] = {"name": "nasrt", "version": nasrt.__version__}
    return cfg


def write_rank(reader, spec: ModelSpec, opts: ConvertOptions, dtype: str, rank: int, out_dir: Path,
               scales: Scales | None = None, kv_scales: dict[int, torch.Tensor] | None = None,
               progress: bool = True) -> Path:
    """Stream one ``rank{N}.safetensors``. FP8 weights in ``reader`` stay FP8; ``scales`` add FP8 factors."""
    target = torch_dtype(dtype)
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    jobs: list[tuple[tuple[Piece, ...] | None, torch.Tensor | None]] = []
    for planned, rule, glob in plan_rank(spec, opts, rank):
        src_dtype = reader.dtype(planned.pieces[0].source)
        out_dtype = src_dtype if src_dtype == torch.float8_e4m3fn else target
        specs.append((planned.name, out_dtype, planned.shape))
        jobs.append((planned.pieces, None))
        key = (glob, rule.linear)
        if scales and rule.linear and key in scales:
            prefix = planned.name.rsplit(".weight", 1)[0]
            for suffix, value in scales[key].items():
                value = value.detach().to(torch.float32).reshape(1)
                specs.append((f"{prefix}.{suffix}", torch.float32, (1,)))
                jobs.append((None, value))
        if kv_scales and glob is not None and rule.linear == "attention.qkv" and glob in kv_scales:
            prefix = planned.name.rsplit(".qkv.weight", 1)[0]
            value = kv_scales[glob].detach().to(torch.float32).reshape(1)
            specs.append((f"{prefix}.kv_cache_scaling_factor", torch.float32, (1,)))
            jobs.append((None, value))

    def produce():
        for pieces, value in tqdm(jobs, desc=f"rank{rank}", unit="tensor", disable=not progress, leave=False):
            if value is not None:
                yield value
                continue
            ranges = _file_ranges(reader, pieces, target)
            if ranges is not None:  # unchanged bytes: copied file to file by the writer
                yield ranges
                continue
            # no local name for the tensor: the suspended generator must not keep the previous one alive
            yield _cast(assemble(list(pieces), reader.read), target)

    path = out_dir / f"rank{rank}.safetensors"
    write_safetensors_stream(path, specs, produce(), metadata={"format": "pt"})
    return path


def _file_ranges(reader, pieces: tuple[Piece, ...], target: torch.dtype) -> list[FileRange] | None:
    """The pieces as byte ranges of the source files, when the output is exactly those bytes (no cast, no
    padding, no column slice); None otherwise or for in-memory readers."""
    byte_range = getattr(reader, "byte_range", None)
    if byte_range is None:
        return None
    out = []
    for p in pieces:
        if reader.dtype(p.source) not in (target, torch.float8_e4m3fn):
            return None
        r = byte_range(p.source, p.dim, p.start, p.stop)
        if r is None:
            return None
        out.append(r)
    return out


def _cast(t: torch.Tensor, target: torch.dtype) -> torch.Tensor:
    """Cast to the checkpoint dtype; FP8 weights stay FP8, a tensor already in ``target`` is not copied."""
    return t if t.dtype in (torch.float8_e4m3fn, target) else t.to(target)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent: int) -> None:
    """Pool initializer: the worker exits as soon as the converting process dies, even by SIGKILL, so that nothing
    keeps writing into its temporary directory (Linux: ``PR_SET_PDEATHSIG``; everywhere: a parent-pid watchdog)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # no libc prctl: the watchdog remains
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="nasrt-parent-watchdog", daemon=True).start()


def run_in_workers(fn, jobs: list, workers: int, progress: bool = True) -> None:
    """Run ``fn(job)`` for every job in ``workers`` spawned processes that die with this one. Any failure -- an
    error in a worker, a worker killed (e.g. out of memory), KeyboardInterrupt or SIGTERM here -- kills the other
    workers at once, so nothing keeps writing, and is re-raised (a dead worker as :class:`CheckpointError`)."""
    # spawn, not fork: forking a process that already runs torch/safetensors threads can deadlock
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_die_with_parent, initargs=(os.getpid(),))
    try:
        futures = [pool.submit(fn, job) for job in jobs]
        for fut in tqdm(as_completed(futures), total=len(futures), desc="ranks", disable=not progress):
            fut.result()
    except BaseException as exc:
        procs = list((getattr(pool, "_processes", None) or {}).values())
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.kill()
        pool.shutdown(wait=True, cancel_futures=True)
        if isinstance(exc, BrokenProcessPool):
            codes = sorted({p.exitcode for p in procs if p.exitcode})
            raise CheckpointError(f"a conversion worker died (exit code {', '.join(map(str, codes)) or '?'}; out of "
                                  "memory? try fewer --workers); nothing was written") from None
        raise
    pool.shutdown(wait=True)


def _worker(args: tuple[str, dict[str, Any], ConvertOptions, str, int, str, bool, bool]) -> int:
    model_dir, cfg, opts, dtype, rank, out_dir, progress, allow_external = args
    write_rank(SafetensorsReader(model_dir, allow_external=allow_external), from_hf_config(cfg), opts, dtype, rank,
               Path(out_dir),
               progress=progress)
    return rank


def convert_checkpoint(model_dir: str | Path, output_dir: str | Path, opts: ConvertOptions = ConvertOptions(),
                       workers: int = 1, overwrite: bool = False, progress: bool = True,
                       allow_external: bool = False) -> Path:
    """Convert an HF checkpoint directory into a TensorRT-LLM checkpoint directory (atomically).

    ``allow_external``: read weight files whose symlinks resolve outside ``model_dir`` (``--allow_external_files``).
    """
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    hf_cfg = read_json(cfg_path)
    spec = from_hf_config(hf_cfg, str(cfg_path))
    dtype = resolve_dtype(opts.dtype, spec)
    check_layout(spec, opts)
    reader = SafetensorsReader(model_dir, allow_external=allow_external)
    validate_source(reader, spec)
    world = opts.mapping.world_size
    log.info("converting %s (%d layers) -> %s: dtype %s, tp %d, pp %d", model_dir, spec.num_layers, output_dir,
             dtype, opts.tp_size, opts.pp_size)
    with atomic_output_dir(output_dir, overwrite, inputs=(model_dir,)) as tmp:
        write_json(tmp / "config.json", trtllm_config(spec, opts, dtype))
        if workers > 1 and world > 1:
            jobs = [(str(model_dir), hf_cfg, opts, dtype, r, str(tmp), False, allow_external) for r in range(world)]
            run_in_workers(_worker, jobs, min(workers, world), progress)
        else:
            for rank in range(world):
                write_rank(reader, spec, opts, dtype, rank, tmp, progress=progress)
        check_output(tmp, output_dir)
    return Path(output_dir)


def check_output(tmp: Path, output_dir: str | Path) -> None:
    """``nasrt check`` of a just-written checkpoint (headers only) before it is renamed into place."""
    from nasrt.deploy.check import check_dir, require_clean

    require_clean(check_dir(tmp, "checkpoint"), f"output {output_dir} (not written)", temporary=True)
