"""A TensorRT-LLM checkpoint dir against TensorRT-LLM 1.2's loading rules: ``config.json`` against the ``Mapping``,
``QuantConfig`` and ``DeciConfig`` constructors, and per rank the exact tensor set (names, shapes, dtypes) that
``DeciLMForCausalLM`` declares, derived from nasrt's own plan (:func:`nasrt.convert.plan_rank`), from headers only.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any

from nasrt.arch import ModelSpec, from_trtllm_config
from nasrt.deploy.check import Report
from nasrt.deploy.check import trtllm_schema as S
from nasrt.errors import NasrtError

_RANK_FILE = re.compile(r"^rank(\d+)\.safetensors$")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def mapping_problems(mapping: Any, where: str, report: Report, key: str = "mapping") -> tuple[int, int] | None:
    """Emulate ``Mapping(**mapping)`` of 1.2: keywords, integer values, derived sizes and its consistency checks.
    Returns (tp, pp) when usable."""
    if not isinstance(mapping, dict):
        report.add(where, key, f"must be an object of Mapping keywords, got {type(mapping).__name__}")
        return None
    for k in mapping:
        if k not in S.MAPPING_KEYWORDS:
            report.add(where, f"{key}.{k}", f"not a keyword of TensorRT-LLM 1.2's Mapping.__init__ (TypeError before "
                       f"any weight is read; allowed: {', '.join(S.MAPPING_KEYWORDS)})")
    m = {**S.MAPPING_KEYWORDS, **{k: v for k, v in mapping.items() if k in S.MAPPING_KEYWORDS}}
    bad = [k for k in S.MAPPING_INTS if not _is_int(m[k])]
    for k in bad:
        report.add(where, f"{key}.{k}", f"must be an integer, got {m[k]!r}")
    if bad:
        return None
    tp, pp, cp, world = m["tp_size"], m["pp_size"], m["cp_size"], m["world_size"]
    if min(tp, pp, cp) < 1:
        report.add(where, key, f"tp_size {tp}, pp_size {pp}, cp_size {cp} must be >= 1")
        return None
    if cp != 1:
        report.add(where, f"{key}.cp_size", f"{cp}: context parallelism is not supported by the DeciLM engine model")
    if world != tp * pp * cp:
        report.add(where, f"{key}.world_size", f"{world} != tp_size {tp} * pp_size {pp} * cp_size {cp} "
                   "(Mapping: 'world_size must equal to tp_size * pp_size * cp_size'; absent means 1)")
    cluster = 1 if m["moe_cluster_size"] == -1 else m["moe_cluster_size"]
    moe_tp, moe_ep = m["moe_tp_size"], m["moe_ep_size"]
    if moe_tp == -1 and moe_ep == -1:
        moe_tp, moe_ep = tp // max(cluster, 1), 1
    elif moe_tp == -1:
        moe_tp = tp // max(moe_ep * cluster, 1)
    elif moe_ep == -1:
        moe_ep = tp // max(moe_tp * cluster, 1)
    if moe_tp * moe_ep * cluster != tp:
        report.add(where, f"{key}.moe_tp_size", f"moe_tp_size {moe_tp} * moe_ep_size {moe_ep} * moe_cluster_size "
                   f"{cluster} != tp_size {tp} (Mapping: 'must equal to moe_world_size')")
    atp, acp = m["attn_tp_size"], m["attn_cp_size"]
    if atp == -1 and acp == -1:
        atp, acp = tp, cp
    elif atp == -1:
        atp = tp * cp // max(acp, 1)
    elif acp == -1:
        acp = tp * cp // max(atp, 1)
    if atp * acp != tp * cp:
        report.add(where, f"{key}.attn_tp_size", f"attn_tp_size {atp} * attn_cp_size {acp} != tp_size {tp} * cp_size "
                   f"{cp} (Mapping: 'tp_size * cp_size must equal to attn_tp_size * attn_cp_size'); write "
                   f"attn_tp_size = tp_size or leave it out")
    return tp, pp


def quantization_problems(quant: Any, where: str, report: Report, key: str = "quantization") -> dict[str, Any]:
    """Emulate ``QuantConfig(**quantization)``: its field names, and the algorithms the DeciLM loader supports."""
    if quant is None:
        return {}
    if not isinstance(quant, dict):
        report.add(where, key, f"must be an object of QuantConfig fields, got {type(quant).__name__}")
        return {}
    for k in quant:
        if k not in S.QUANT_CONFIG_KEYWORDS:
            report.add(where, f"{key}.{k}", f"not a field of TensorRT-LLM 1.2's QuantConfig (TypeError; allowed: "
                       f"{', '.join(S.QUANT_CONFIG_KEYWORDS)})")
    if quant.get("quant_algo") not in S.DECILM_QUANT_ALGOS:
        report.add(where, f"{key}.quant_algo", f"{quant.get('quant_algo')!r} is not supported by the DeciLM engine "
                   "loader (null or 'FP8')")
    if quant.get("kv_cache_quant_algo") not in S.DECILM_KV_CACHE_QUANT_ALGOS:
        report.add(where, f"{key}.kv_cache_quant_algo", f"{quant.get('kv_cache_quant_algo')!r} is not supported by "
                   "the DeciLM engine loader (null or 'FP8')")
    excl = quant.get("exclude_modules")
    if excl is not None and (not isinstance(excl, list) or not all(isinstance(p, str) for p in excl)):
        report.add(where, f"{key}.exclude_modules", f"must be null or a list of fnmatch patterns, got {excl!r}")
    return quant


def deci_problems(cfg: dict[str, Any], where: str, report: Report, prefix: str = "") -> None:
    """``DeciConfig(**cfg)``: required keywords, exactly one of layer_configs / block_configs, the layer schema."""
    if cfg.get("architecture") != S.ARCHITECTURE:
        report.add(where, f"{prefix}architecture", f"{cfg.get('architecture')!r}: the engine model is "
                   f"{S.ARCHITECTURE!r} (MODEL_MAP)")
    for k in S.DECI_CONFIG_REQUIRED:
        if k not in cfg:
            report.add(where, f"{prefix}{k}", "missing (a required DeciConfig keyword: TypeError)")
    if cfg.get("dtype") not in S.CHECKPOINT_DTYPES:
        report.add(where, f"{prefix}dtype", f"{cfg.get('dtype')!r} is not one of {', '.join(S.CHECKPOINT_DTYPES)}")
    if "logits_dtype" in cfg and cfg["logits_dtype"] not in S.LOGITS_DTYPES:
        report.add(where, f"{prefix}logits_dtype", f"{cfg['logits_dtype']!r} is not one of {', '.join(S.LOGITS_DTYPES)}")
    has_lc, has_bc = cfg.get("layer_configs") is not None, cfg.get("block_configs") is not None
    if has_lc and has_bc:
        report.add(where, f"{prefix}layer_configs", "given together with block_configs (DeciConfig asserts one)")
    if not has_lc:
        if not has_bc:
            report.add(where, f"{prefix}layer_configs", "missing: every layer would become attention + MLP with the "
                       "global fallbacks")
        return
    lcs, n = cfg["layer_configs"], cfg.get("num_hidden_layers")
    if not isinstance(lcs, list):
        report.add(where, f"{prefix}layer_configs", f"must be a list, got {type(lcs).__name__}")
        return
    if len(lcs) != n:
        report.add(where, f"{prefix}layer_configs", f"{len(lcs)} entries for num_hidden_layers {n!r} (DeciConfig "
                   "asserts equal length)")
    for i, lc in enumerate(lcs):
        name = f"{prefix}layer_configs[{i}]"
        if not isinstance(lc, dict) or set(S.LAYER_CONFIG_KEYS) - set(lc):
            report.add(where, name, "needs both 'attention' and 'ffn' (DeciLayerConfig.from_dict)")
            continue
        for part, keys in S.LAYER_CONFIG_KEYS.items():
            sub = lc[part]
            if not isinstance(sub, dict):
                report.add(where, f"{name}.{part}", f"must be an object, got {type(sub).__name__}")
                continue
            for k in sub:
                if k not in keys:
                    report.add(where, f"{name}.{part}.{k}", f"not a field ({', '.join(keys)})")
            impl = sub.get("impl", S.LAYER_IMPLS[part][0])
            if impl not in S.LAYER_IMPLS[part]:
                report.add(where, f"{name}.{part}.impl", f"{impl!r} is not one of {', '.join(S.LAYER_IMPLS[part])}")
    _derived_lists(cfg, lcs, where, report, prefix)


def _derived_lists(cfg: dict[str, Any], lcs: list[Any], where: str, report: Report, prefix: str) -> None:
    """``layer_types`` / ``num_kv_heads_per_layer`` (what the C++ runtime reads) must agree with layer_configs."""
    try:
        types = [lc["attention"].get("impl", "attention") for lc in lcs]
        kvs = [lc["attention"].get("num_key_value_heads") or cfg.get("num_key_value_heads")
               or cfg.get("num_attention_heads") for lc, t in zip(lcs, types, strict=True) if t == "attention"]
    except (AttributeError, KeyError, TypeError):
        return
    if "layer_types" in cfg and cfg["layer_types"] != types:
        report.add(where, f"{prefix}layer_types", "disagrees with layer_configs (the C++ runtime reads layer_types)")
    if "num_kv_heads_per_layer" in cfg and cfg["num_kv_heads_per_layer"] != kvs:
        report.add(where, f"{prefix}num_kv_heads_per_layer", f"{cfg['num_kv_heads_per_layer']!r} disagrees with "
                   f"layer_configs {kvs!r} (the C++ runtime sizes the KV cache from it)")


def config_problems(cfg: dict[str, Any], where: str, report: Report, prefix: str = "") -> tuple[int, int] | None:
    """Every ``config.json`` rule; returns (tp, pp) when the mapping is usable."""
    deci_problems(cfg, where, report, prefix)
    quantization_problems(cfg.get("quantization"), where, report, f"{prefix}quantization")
    if "mapping" not in cfg:
        report.add(where, f"{prefix}mapping", "missing (trtllm-build would assume a single rank)")
        return None
    return mapping_problems(cfg["mapping"], where, report, f"{prefix}mapping")


# ---- tensors ----------------------------------------------------------------------------------------------
def excluded(module: str, patterns: list[str] | None) -> bool:
    """``QuantConfig`` exclusion: fnmatchcase on the TensorRT-LLM module name; null = the built-in defaults."""
    pats = S.DEFAULT_EXCLUDE_MODULES if patterns is None else patterns
    return any(fnmatch.fnmatchcase(module, p) for p in pats)


def expected_tensors(spec: ModelSpec, cfg: dict[str, Any], tp: int, pp: int,
                     rank: int) -> tuple[dict[str, tuple[tuple[int, ...], str]], set[str]]:
    """name -> (shape, safetensors dtype) that rank ``rank`` must hold, and the names it may hold besides."""
    from nasrt.convert import ConvertOptions, plan_rank

    quant = cfg.get("quantization") or {}
    fp8 = quant.get("quant_algo") == "FP8"
    kv_fp8 = quant.get("kv_cache_quant_algo") == "FP8"
    dtype = S.ST_DTYPES[cfg["dtype"]]
    opts = ConvertOptions(cfg["dtype"], tp, pp, use_parallel_embedding=bool(cfg.get("use_parallel_embedding")),
                          embedding_sharding_dim=int(cfg.get("embedding_sharding_dim") or 0))
    want: dict[str, tuple[tuple[int, ...], str]] = {}
    optional: set[str] = set()
    scale = (S.SCALE_SHAPE, S.SCALE_ST_DTYPE)
    for planned, rule, _glob in plan_rank(spec, opts, rank):
        module = planned.name.rsplit(".weight", 1)[0]
        quantized = fp8 and rule.linear is not None and not excluded(module, quant.get("exclude_modules"))
        want[planned.name] = (planned.shape, S.FP8_ST_DTYPE if quantized else dtype)
        if quantized:
            want[f"{module}.weights_scaling_factor"] = scale
            want[f"{module}.activation_scaling_factor"] = scale
        if kv_fp8 and rule.linear == "attention.qkv":
            attn = module.rsplit(".qkv", 1)[0]
            want[f"{attn}.kv_cache_scaling_factor"] = scale
            optional.update(f"{attn}.{s}" for s in (*S.OPTIONAL_KV_TENSORS, *S.SPLIT_KV_SCALES))
    return want, optional


def _canonical(name: str) -> str:
    from nasrt.trtllm_ckpt import MODELOPT_RENAMES

    for old, new in MODELOPT_RENAMES:
        name = name.replace(old, new)
    return name


def rank_problems(path: Path, want: dict[str, tuple[tuple[int, ...], str]], optional: set[str],
                  report: Report) -> None:
    """Missing, unexpected, wrong-shape and wrong-dtype tensors of one rank file, from its header."""
    from nasrt.st_io import DTYPE_TO_ST, SafetensorsReader

    try:  # header only: safe_open parses the header, nothing reads tensor bytes
        reader = SafetensorsReader(path.parent, pattern=path.name)
        have = {}
        for n in reader.names():
            have[_canonical(n)] = (tuple(reader.shape(n)), DTYPE_TO_ST[reader.dtype(n)])
        reader.close()
    except NasrtError as exc:
        report.add(path, path.name, str(exc))
        return
    kv_split = {n.rsplit(".", 1)[0] for n in have if n.rsplit(".", 1)[-1] in S.SPLIT_KV_SCALES}
    for name, (shape, dtype) in want.items():
        if name not in have:
            if name.endswith(".kv_cache_scaling_factor") and name.rsplit(".", 1)[0] in kv_split:
                continue  # ModelOpt's separate k/v scales (merged by max on load)
            what = ("FP8 scale" if name.endswith(("weights_scaling_factor", "activation_scaling_factor")) else
                    "KV cache scale" if name.endswith("kv_cache_scaling_factor") else "tensor")
            report.add(path, name, f"missing {what} (TensorRT-LLM: 'Required but not provided tensors')")
            continue
        got_shape, got_dtype = have[name]
        if got_shape != tuple(shape):
            report.add(path, name, f"shape {list(got_shape)}, TensorRT-LLM's module declares {list(shape)}")
        if got_dtype != dtype:
            report.add(path, name, f"dtype {got_dtype}, expected {dtype}")
    for name in sorted(set(have) - set(want) - optional):
        report.add(path, name, "unexpected tensor (no module of this rank declares it)")


def check_checkpoint(ckpt_dir: str | Path) -> Report:
    """All problems of a checkpoint dir (config first; tensors when the config can be interpreted)."""
    ckpt_dir = Path(ckpt_dir)
    report = Report("checkpoint", ckpt_dir)
    cfg_path = ckpt_dir / "config.json"
    cfg = report.read_json(cfg_path)
    if cfg is None:
        return report
    layout = config_problems(cfg, str(cfg_path), report)
    try:
        spec = from_trtllm_config(cfg, str(cfg_path))
    except NasrtError as exc:
        if report.ok:
            report.add(cfg_path, "config.json", str(exc))
        return report
    if layout is None or cfg.get("dtype") not in S.ST_DTYPES:
        return report
    tp, pp = layout
    world = tp * pp
    try:
        plans = [expected_tensors(spec, cfg, tp, pp, r) for r in range(world)]
    except NasrtError as exc:
        report.add(cfg_path, "mapping", str(exc))
        return report
    for rank, (want, optional) in enumerate(plans):
        path = ckpt_dir / f"rank{rank}.safetensors"
        if not path.is_file():
            report.add(path, path.name, f"rank file missing (mapping world_size {world})")
            continue
        rank_problems(path, want, optional, report)
    for f in sorted(ckpt_dir.iterdir()):
        m = _RANK_FILE.match(f.name)
        if m and int(m.group(1)) >= world:
            report.add(f, f.name, f"rank file beyond mapping world_size {world} (tp {tp} x pp {pp})")
    return report

