"""The memory planner: weights and KV cache per GPU, and how many tokens fit.

Weights are counted tensor by tensor from the converter's own per-rank plan (:func:`nasrt.convert.plan_rank`, i.e.
the shapes of :mod:`nasrt.tensor_map` after :mod:`nasrt.sharding`), so duplicated K/V heads (tp > kv), lm_head row
padding (V % tp != 0), the replicated embedding and every norm are counted exactly as a rank file holds them. FP8:
every quantized linear is 1 byte per element plus two float32 scales; embedding, lm_head and norms stay 16-bit; each
attention layer adds a float32 KV-cache scale. KV bytes per token come from attention-impl layers only
(:meth:`nasrt.arch.ModelSpec.kv_bytes_per_token`, ``ceil(kv/tp)`` heads per rank).

What is left of the GPU after weights, the activation estimate and the runtime reserve is the free memory; the
TensorRT-LLM runtime gives ``kv_cache_free_gpu_memory_fraction`` (0.9) of it to the paged KV cache. That fixes the
maximum number of tokens in the KV cache and the maximum batch at a sequence length.

Two backends (``PlanRequest.backend``): ``engine`` (``trtllm-build`` engine, TensorRT-LLM <= 1.2/1.3.0rc20) and
``pytorch`` (every current release: the PyTorch backend loading the HF / ModelOpt FP8 checkpoint). The PyTorch
backend holds the same tensors per rank (its weight mapper duplicates K/V heads when tp > kv, like the converter),
keeps one KV block pool per distinct KV-head count with no KV for linear / no-op attention layers, sizes its
activations by a profiling forward of ``max_num_tokens`` tokens, and additionally reserves the memory pool of its
CUDA graphs (decode steps captured up to ``cuda_graph_config.max_batch_size``, here the planned batch).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nasrt.arch import ModelSpec, from_hf_config, is_trtllm_config, read_json
from nasrt.atomic import atomic_output_file, check_output_file
from nasrt.config_schema import show
from nasrt.convert import ConvertOptions, plan_rank, resolve_dtype
from nasrt.errors import ConfigError, NasrtError
from nasrt.sharding import Mapping, pp_layers
from nasrt.tensor_map import UNQUANTIZED_BY_DEFAULT

log = logging.getLogger(__name__)

GiB = 1024**3
MiB = 1024**2


@dataclass(frozen=True)
class Gpu:
    """A GPU kind: total memory as ``nvidia-smi`` reports it and its compute capability."""

    name: str
    memory_mib: int
    sm: tuple[int, int]
    note: str = ""

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MiB


#: Known GPUs (``nvidia-smi`` "memory.total"). A user adds one by adding a row.
GPUS: dict[str, Gpu] = {g.name: g for g in (
    Gpu("h100-80gb", 81559, (9, 0), "H100 SXM/PCIe 80 GB HBM3"),
    Gpu("h100-94gb", 95830, (9, 0), "H100 NVL 94 GB"),
    Gpu("h200-141gb", 143771, (9, 0), "H200 141 GB HBM3e"),
    Gpu("a100-80gb", 81920, (8, 0), "A100 80 GB (no FP8)"),
    Gpu("a100-40gb", 40960, (8, 0), "A100 40 GB (no FP8)"),
    Gpu("l40s-48gb", 46068, (8, 9), "L40S 48 GB GDDR6"),
    Gpu("l4-24gb", 23034, (8, 9), "L4 24 GB"),
)}

#: Runtime reserve, stated (not measured): CUDA context + driver, TensorRT-LLM runtime buffers (cuBLAS workspace,
#: sampling, decoder state), and NCCL / custom all-reduce buffers when more than one GPU is used.
RESERVE_CUDA_CONTEXT = 512 * MiB
RESERVE_RUNTIME = 1024 * MiB
RESERVE_MULTI_GPU = 512 * MiB
#: PyTorch backend, stated (not measured): torch's CUDA caching-allocator slack and its runtime buffers (cuBLAS /
#: cuBLASLt workspaces, sampler, scheduler and decoder state) in place of the engine runtime's RESERVE_RUNTIME, and a
#: fixed part of the CUDA-graph pool (graph objects, padding buffers) on top of the captured decode activations.
RESERVE_PYTORCH_RUNTIME = 1536 * MiB
RESERVE_CUDA_GRAPHS = 256 * MiB
BACKENDS = ("engine", "pytorch")

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1}
WEIGHT_DTYPES = ("bfloat16", "float16", "float32", "fp8")
KV_DTYPES = ("auto", "bfloat16", "float16", "float32", "fp8")
FP8_SCALE_BYTES = 4  # one float32 [1] tensor


@dataclass(frozen=True)
class PlanRequest:
    """What to plan for. ``dtype`` ``fp8`` = FP8 linears with 16-bit embedding/lm_head/norms."""

    gpu: str = "h100-80gb"
    tp: int = 1
    pp: int = 1
    dtype: str = "bfloat16"
    kv_cache_dtype: str = "auto"  # auto: fp8 when dtype is fp8, else dtype
    batch: int = 1
    seq: int = 4096
    max_num_tokens: int = 8192
    kv_fraction: float = 0.9
    tokens_per_block: int = 32
    use_parallel_embedding: bool = False
    embedding_sharding_dim: int = 0
    backend: str = "engine"  # "engine" (trtllm-build) or "pytorch" (PyTorch backend, HF / ModelOpt FP8 checkpoint)

    @property
    def kv_dtype(self) -> str:
        if self.kv_cache_dtype != "auto":
            return self.kv_cache_dtype
        return self.dtype


@dataclass
class RankPlan:
    """One GPU (global rank): its layers, weights and KV bytes per token."""

    rank: int
    layers: list[int]
    params: int
    weight_bytes: int
    kv_heads: int  # sum over the stage's attention layers of ceil(kv/tp)
    kv_bytes_per_token: float
    activation_bytes: int
    reserve_bytes: int
    free_bytes: int
    kv_budget_bytes: int
    max_kv_tokens: int | None  # None: the stage has no attention layer (no KV cache)
    cuda_graph_bytes: int = 0  # PyTorch backend: the CUDA-graph memory pool


@dataclass
class Plan:
    """The planner's answer for one request."""

    request: PlanRequest
    gpu: Gpu
    num_params: int
    head_dim: int
    kv_heads_total: int
    ranks: list[RankPlan]
    fits: bool
    reason: str
    max_kv_tokens: int | None
    max_batch: int | None
    per_layer_params: list[int] = field(repr=False)
    per_layer_kv_heads: list[int] = field(repr=False)

    @property
    def worst(self) -> RankPlan:
        """The rank with the least room (it decides the fit)."""
        return min(self.ranks, key=lambda r: r.free_bytes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["gpu"] = dataclasses.asdict(self.gpu)
        return d


def _stage_spec(spec: ModelSpec, layers: list[int]) -> ModelSpec:
    return dataclasses.replace(spec, layers=tuple(spec.layers[i] for i in layers))


def rank_weights(spec: ModelSpec, req: PlanRequest, rank: int) -> tuple[int, int]:
    """(elements, bytes) of ``rank``'s weights, tensor by tensor from the converter's sharding plan."""
    opts = ConvertOptions(tp_size=req.tp, pp_size=req.pp, use_parallel_embedding=req.use_parallel_embedding,
                          embedding_sharding_dim=req.embedding_sharding_dim)
    fp8 = req.dtype == "fp8"
    base = 2 if fp8 else DTYPE_BYTES[req.dtype]
    elems = nbytes = 0
    for planned, rule, _glob in plan_rank(spec, opts, rank):
        n = math.prod(planned.shape)
        elems += n
        if fp8 and rule.linear and rule.linear not in UNQUANTIZED_BY_DEFAULT:
            nbytes += n + 2 * FP8_SCALE_BYTES  # float8 weight + weights/activation scaling factors
            if rule.linear == "attention.qkv" and req.kv_dtype == "fp8":
                nbytes += FP8_SCALE_BYTES  # kv_cache_scaling_factor
        else:
            nbytes += n * base
    return elems, nbytes


def activation_bytes(spec: ModelSpec, req: PlanRequest, batch: int) -> int:
    """Estimated activation memory of one rank (stated, not measured).

    Per token in flight (``max_num_tokens``): residual, normed input and attention output (3H), the local qkv rows,
    the fused gate|up output and the SwiGLU product (3 * I_max/tp), in the 16-bit activation dtype; plus float32
    logits of ``batch`` sequences over the rank's ceil(V/tp) vocabulary rows.
    """
    act = 2 if req.dtype == "fp8" else DTYPE_BYTES[req.dtype]
    tp = req.tp
    kv_max = max((math.ceil(kv / tp) for kv in spec.kv_heads_per_layer), default=0)
    i_max = max((la.ffn.intermediate_size or 0) for la in spec.layers) // tp
    qkv = (spec.num_attention_heads // tp + 2 * kv_max) * spec.head_dim
    per_token = (3 * spec.hidden_size + qkv + 3 * i_max) * act
    logits = batch * math.ceil(spec.vocab_size / tp) * 4
    return req.max_num_tokens * per_token + logits


def reserve_bytes(req: PlanRequest) -> int:
    world = req.tp * req.pp
    runtime = RESERVE_PYTORCH_RUNTIME if req.backend == "pytorch" else RESERVE_RUNTIME
    return RESERVE_CUDA_CONTEXT + runtime + (RESERVE_MULTI_GPU if world > 1 else 0)


def cuda_graph_bytes(spec: ModelSpec, req: PlanRequest) -> int:
    """PyTorch backend: the CUDA-graph pool (stated): the activations of the largest captured decode step (``batch``
    tokens, the :func:`activation_bytes` formula with ``max_num_tokens = batch``) plus :data:`RESERVE_CUDA_GRAPHS`;
    0 for the engine backend (its CUDA graphs are off by default)."""
    if req.backend != "pytorch":
        return 0
    return RESERVE_CUDA_GRAPHS + activation_bytes(spec, dataclasses.replace(req, max_num_tokens=req.batch), req.batch)


def check_request(req: PlanRequest) -> Gpu:
    if req.gpu not in GPUS:
        raise ConfigError(f"--gpu {req.gpu!r} is not known (known: {', '.join(GPUS)})")
    if req.dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"--dtype {req.dtype!r} must be one of {', '.join(WEIGHT_DTYPES)}")
    if req.kv_cache_dtype not in KV_DTYPES:
        raise ConfigError(f"--kv_cache_dtype {req.kv_cache_dtype!r} must be one of {', '.join(KV_DTYPES)}")
    for flag, value in (("--tp", req.tp), ("--pp", req.pp), ("--batch", req.batch), ("--seq", req.seq),
                        ("--max_num_tokens", req.max_num_tokens), ("tokens_per_block", req.tokens_per_block)):
        if value < 1:
            raise ConfigError(f"{flag} {value} must be >= 1")
    if not 0 < req.kv_fraction <= 1:
        raise ConfigError(f"--kv_fraction {req.kv_fraction} must be in (0, 1]")
    if req.backend not in BACKENDS:
        raise ConfigError(f"--backend {req.backend!r} must be one of {', '.join(BACKENDS)}")
    gpu = GPUS[req.gpu]
    if "fp8" in (req.dtype, req.kv_dtype) and gpu.sm < (8, 9):
        raise ConfigError(f"--gpu {gpu.name} (sm {gpu.sm[0]}.{gpu.sm[1]}) has no FP8; FP8 needs sm >= 8.9")
    return gpu


def plan_memory(spec: ModelSpec, req: PlanRequest) -> Plan:
    """Weights and KV cache per GPU for ``req``, the token capacity, and a fit / no-fit verdict with its reason."""
    gpu = check_request(req)
    mapping = Mapping(req.tp, req.pp)
    kv_elem = DTYPE_BYTES[req.kv_dtype]
    ranks: list[RankPlan] = []
    for rank in range(mapping.world_size):
        layers = pp_layers(spec.num_layers, req.pp, mapping.pp_rank(rank))
        stage = _stage_spec(spec, layers)
        params, wbytes = rank_weights(spec, req, rank)
        kv_heads = sum(math.ceil(kv / req.tp) for kv in stage.kv_heads_per_layer)
        kv_tok = stage.kv_bytes_per_token(kv_elem, req.tp)
        act = activation_bytes(stage, req, req.batch)
        res = reserve_bytes(req)
        graphs = cuda_graph_bytes(stage, req)
        free = gpu.memory_bytes - wbytes - act - res - graphs
        budget = max(0, int(free * req.kv_fraction))
        tokens = int(budget // kv_tok) // req.tokens_per_block * req.tokens_per_block if kv_tok else None
        ranks.append(RankPlan(rank, layers, params, wbytes, kv_heads, kv_tok, act, res, free, budget, tokens, graphs))

    token_caps = [r.max_kv_tokens for r in ranks if r.max_kv_tokens is not None]
    max_tokens = min(token_caps) if token_caps else None
    blocks_per_seq = math.ceil(req.seq / req.tokens_per_block)
    max_batch = None if max_tokens is None else (max_tokens // req.tokens_per_block) // blocks_per_seq
    worst = min(ranks, key=lambda r: r.free_bytes)
    need = req.batch * req.seq
    where = f"{mapping.world_size} x {gpu.name}" if mapping.world_size > 1 else f"one {gpu.name}"
    if worst.free_bytes <= 0:
        fits = False
        graphs = f" + CUDA graphs {worst.cuda_graph_bytes / GiB:.2f} GiB" if worst.cuda_graph_bytes else ""
        reason = (f"rank {worst.rank}: weights {worst.weight_bytes / GiB:.2f} GiB + activations "
                  f"{worst.activation_bytes / GiB:.2f} GiB + reserve {worst.reserve_bytes / GiB:.2f} GiB{graphs} exceed the "
                  f"{gpu.memory_bytes / GiB:.2f} GiB of {gpu.name}; use more GPUs (tp/pp) or FP8 weights")
    elif max_tokens is not None and max_tokens < need:
        fits = False
        reason = (f"the KV cache holds {max_tokens} tokens per {gpu.name} but batch {req.batch} x seq {req.seq} "
                  f"needs {need} (max batch at seq {req.seq}: {max_batch}); lower the batch or sequence length, "
                  "use an FP8 KV cache or more GPUs")
    else:
        fits = True
        cap = "unlimited (no attention layer)" if max_tokens is None else f"{max_tokens} tokens"
        reason = (f"fits on {where}: KV cache {cap} >= batch {req.batch} x seq {req.seq} = {need}"
                  + ("" if max_batch is None else f"; max batch at seq {req.seq}: {max_batch}"))
    return Plan(request=req, gpu=gpu, num_params=spec.num_params, head_dim=spec.head_dim,
                kv_heads_total=sum(spec.kv_heads_per_layer),
                ranks=ranks, fits=fits, reason=reason, max_kv_tokens=max_tokens, max_batch=max_batch,
                per_layer_params=[spec.layer_params(i) for i in range(spec.num_layers)],
                per_layer_kv_heads=[la.attention.num_kv_heads or 0 for la in spec.layers])


def smallest_tp(spec: ModelSpec, req: PlanRequest, candidates: tuple[int, ...] = (1, 2, 4, 8)) -> int | None:
    """The smallest tensor-parallel size (pp unchanged) at which ``req`` fits, or None."""
    for tp in candidates:
        try:
            if plan_memory(spec, dataclasses.replace(req, tp=tp)).fits:
                return tp
        except NasrtError:  # e.g. heads not divisible by tp
            continue
    return None


def request_defaults(path: str | Path) -> dict[str, Any]:
    """Plan defaults implied by a TensorRT-LLM checkpoint / engine dir (dtype, KV dtype, tp, pp); {} for HF dirs."""
    p = Path(path)
    cfg = read_json(p / "config.json" if p.is_dir() else p)
    build = cfg.get("build_config") or {}
    if not isinstance(build, dict):
        raise ConfigError(f"{p}: build_config = {show(build)} must be a JSON object")
    cfg = cfg.get("pretrained_config", cfg)
    if not is_trtllm_config(cfg):  # HF dir: the dtype `nasrt convert --dtype auto` would write
        return {"dtype": resolve_dtype("auto", from_hf_config(cfg, str(p)))}
    quant = cfg.get("quantization") or {}
    base = cfg.get("dtype", "bfloat16")
    mapping = cfg.get("mapping") or {}
    out: dict[str, Any] = {
        "dtype": "fp8" if quant.get("quant_algo") == "FP8" else base,
        "kv_cache_dtype": "fp8" if quant.get("kv_cache_quant_algo") == "FP8" else base,
        "tp": int(mapping.get("tp_size") or 1), "pp": int(mapping.get("pp_size") or 1),
        "use_parallel_embedding": bool(cfg.get("use_parallel_embedding")),
        "embedding_sharding_dim": int(cfg.get("embedding_sharding_dim") or 0),
    }
    if quant.get("quant_algo") not in (None, "FP8"):
        raise ConfigError(f"{p}: quant_algo {quant['quant_algo']!r} is not planned by nasrt (only FP8 or none)")
    for key in ("max_batch_size", "max_seq_len", "max_num_tokens"):
        value = build.get(key)
        if value is None:
            continue
        if type(value) is not int or value < 1:
            raise ConfigError(f"{p}: build_config.{key} = {show(value)} must be a positive integer")
        out[{"max_batch_size": "batch", "max_seq_len": "seq"}.get(key, key)] = value
    return out


def render(plan: Plan) -> str:
    """A human-readable report that shows how every number was derived."""
    r, g = plan.request, plan.gpu
    lines = [
        f"model: {plan.num_params:,} parameters ({plan.num_params / 1e9:.2f} B), "
        f"{len(plan.per_layer_params)} layers, {plan.kv_heads_total} KV heads over attention layers",
        f"target: {r.tp * r.pp} x {g.name} ({g.memory_mib} MiB = {g.memory_bytes / GiB:.2f} GiB each), tp {r.tp}, "
        f"pp {r.pp}, weights {r.dtype}, KV cache {r.kv_dtype}, backend {r.backend}",
        f"request: batch {r.batch} x seq {r.seq} = {r.batch * r.seq} tokens; max_num_tokens {r.max_num_tokens}; "
        f"KV fraction {r.kv_fraction}; tokens_per_block {r.tokens_per_block}",
    ]
    for rp in plan.ranks:
        kv = (f"{rp.kv_heads} KV heads x 2 (K,V) x {plan.head_dim} x {DTYPE_BYTES[r.kv_dtype]} B "
              f"= {rp.kv_bytes_per_token / 1024:.2f} KiB/token")
        tokens = "no KV cache" if rp.max_kv_tokens is None else f"{rp.max_kv_tokens:,} tokens"
        lines += [
            f"rank {rp.rank} (layers {rp.layers[0]}-{rp.layers[-1]}):",
            f"  weights      {rp.weight_bytes / GiB:8.2f} GiB  ({rp.params:,} elements after sharding)",
            f"  activations  {rp.activation_bytes / GiB:8.2f} GiB  (estimate for {r.max_num_tokens} tokens in flight)",
            f"  reserve      {rp.reserve_bytes / GiB:8.2f} GiB  (CUDA context, "
            f"{'PyTorch runtime and allocator' if r.backend == 'pytorch' else 'runtime buffers'}"
            f"{', NCCL' if r.tp * r.pp > 1 else ''})",
            *([f"  CUDA graphs  {rp.cuda_graph_bytes / GiB:8.2f} GiB  (decode steps captured up to batch {r.batch}: "
               f"their activations + {RESERVE_CUDA_GRAPHS // MiB} MiB)"] if rp.cuda_graph_bytes else []),
            f"  free         {rp.free_bytes / GiB:8.2f} GiB -> KV cache {rp.kv_budget_bytes / GiB:.2f} GiB "
            f"({r.kv_fraction:g} of free)",
            f"  KV/token     {kv} -> {tokens}",
        ]
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(f"verdict: {verdict}: {plan.reason}")
    return "\n".join(lines)


def plot_plan(plan: Plan, path: str | Path, title: str = "", overwrite: bool = False,
              inputs: tuple[str | Path | None, ...] = (), flag: str = "--plot") -> Path:
    """Write a PNG of per-layer parameters and KV heads, atomically (:func:`nasrt.atomic.atomic_output_file`:
    an existing file only with ``overwrite``, never a directory or a path inside ``inputs``)."""
    path = check_output_file(path, overwrite, inputs, flag)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = list(range(len(plan.per_layer_params)))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 6), sharex=True)
    try:
        ax1.bar(idx, [p / 1e6 for p in plan.per_layer_params], color="tab:blue")
        ax1.set_ylabel("parameters (M)")
        ax1.set_title(title or f"{plan.num_params / 1e9:.2f} B parameters, {plan.kv_heads_total} KV heads")
        ax2.bar(idx, plan.per_layer_kv_heads, color="tab:orange")
        ax2.set_ylabel("KV heads")
        ax2.set_xlabel("layer")
        fig.tight_layout()
        with atomic_output_file(path, overwrite, inputs, flag) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return path
