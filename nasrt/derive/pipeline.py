"""``nasrt derive`` end to end: fit the block library layer by layer, score every candidate (replace-one KL),
solve the MIP, measure held-out perplexity of the result and two baselines, write the HF checkpoint and report.

Per-layer results live in a work directory beside the output (``.NAME.derive-partial``), so an interrupted run
continues where it stopped; it is removed once the output is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from nasrt.arch import AttnKind, FfnKind, LayerSpec, ModelSpec, from_hf_config, read_json
from nasrt.atomic import atomic_output_dir
from nasrt.convert import validate_source
from nasrt.derive.candidates import (
    ORDER_KEY,
    build_block,
    candidate_tensors,
    fitted_key,
    layer_tensors,
    parent_state,
    sub_names,
)
from nasrt.derive.fit import ChannelStats, LeastSquares, distill
from nasrt.derive.library import (
    DEFAULT_FFN_RATIOS,
    SUBBLOCKS,
    Candidate,
    Costs,
    Target,
    candidate_costs,
    ffn_mult_for,
    global_costs,
    layer_library,
    spec_costs,
)
from nasrt.derive.score import Head, Positions, replace_one_kl, run_block
from nasrt.derive.search import BUDGET_KEYS, Option, SearchError, solve
from nasrt.derive.write import write_checkpoint
from nasrt.errors import CheckpointError, ConfigError
from nasrt.quantize.calib_data import load_calibration_texts, load_tokenizer
from nasrt.st_io import SafetensorsReader, torch_dtype
from nasrt.tensor_map import EMBEDDING, FINAL_NORM, lm_head_rule
from nasrt.textdata import eval_text

log = logging.getLogger(__name__)

#: Upper bound of ``--bld_steps`` (keeps a CPU run of SmolLM2 within minutes) and the fit batches BLD trains on.
MAX_BLD_STEPS = 500
BLD_BATCHES = 4
#: Sequences per forward slice in the fitting pass.
FIT_BATCH = 8
WORK_VERSION = 3


@dataclass(frozen=True)
class DeriveOptions:
    budget: dict[str, float] = field(default_factory=lambda: {"params": 0.85, "kv": 0.6})
    ffn_ratios: tuple[float, ...] = DEFAULT_FFN_RATIOS
    no_linear: bool = False
    tp: int = 1
    calib_dataset: str | None = None
    calib_size: int = 32
    calib_seq_len: int = 128
    score_size: int = 8
    score_seq_len: int = 64
    eval_chars: int = 6000
    eval_seq_len: int = 256
    bld_steps: int = 0
    bld_lr: float = 1e-4
    dtype: str = "auto"
    target: Target = Target()
    tokenizer_dir: str | None = None
    plot: bool = True


@dataclass
class DeriveResult:
    output_dir: Path
    report: dict[str, Any]
    table: str = ""


# ---- work directory (resumable per-layer results) ---------------------------------------------------------------

class WorkDir:
    """Per-layer results of one set of inputs and settings; a different fingerprint starts afresh."""

    def __init__(self, path: Path, fingerprint: dict[str, Any]):
        self.path = path
        stamp = path / "settings.json"
        if path.exists():
            try:
                same = json.loads(stamp.read_text()) == fingerprint
            except (OSError, ValueError):
                same = False
            if not same:
                log.warning("%s holds results of other inputs or settings; starting afresh", path)
                shutil.rmtree(path)
            else:
                log.info("resuming from %s", path)
        path.mkdir(parents=True, exist_ok=True)
        if not stamp.exists():
            stamp.write_text(json.dumps(fingerprint, indent=1))

    def _replace(self, rel: str, write) -> None:
        dst = self.path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp")
        write(tmp)
        os.replace(tmp, dst)

    def save(self, rel: str, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
        self._replace(rel, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p), meta))

    def load(self, rel: str) -> dict[str, torch.Tensor] | None:
        p = self.path / rel
        return load_file(str(p)) if p.is_file() else None

    def meta(self, rel: str) -> dict[str, str]:
        from safetensors import safe_open

        with safe_open(str(self.path / rel), framework="pt") as fh:
            return fh.metadata() or {}

    def save_json(self, rel: str, obj: Any) -> None:
        self._replace(rel, lambda p: p.write_text(json.dumps(obj)))

    def load_json(self, rel: str) -> Any:
        p = self.path / rel
        return json.loads(p.read_text()) if p.is_file() else None

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def work_dir_for(output_dir: Path) -> Path:
    return output_dir.parent / f".{output_dir.name}.derive-partial"


def _fingerprint(model_dir: Path, opts: DeriveOptions) -> dict[str, Any]:
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".json"))
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    layerwise = {k: v for k, v in asdict(opts).items()
                 if k in ("ffn_ratios", "no_linear", "tp", "calib_dataset", "calib_size", "calib_seq_len",
                          "score_size", "score_seq_len", "bld_steps", "bld_lr", "tokenizer_dir")}
    return {"version": WORK_VERSION, "model_dir": str(model_dir.resolve()), "files": h.hexdigest(),
            "settings": json.loads(json.dumps(layerwise))}


# ---- data --------------------------------------------------------------------------------------------------------

def token_windows(tokenizer, texts: list[str], count: int, seq_len: int, what: str) -> torch.Tensor:
    """``count`` windows of ``seq_len`` tokens cut from the texts joined by EOS (no padding)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    need, stream = count * seq_len, []
    for t in texts:
        stream.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        stream.append(eos)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ConfigError(f"{what}: the calibration text holds {len(stream)} tokens, {need} needed "
                          f"({count} x {seq_len}); use a larger --calib_dataset or smaller sizes")
    return torch.tensor(stream[:need], dtype=torch.long).view(count, seq_len)


def eval_windows(tokenizer, text: str, seq_len: int) -> list[torch.Tensor]:
    """Non-overlapping windows exactly as :func:`nasrt.eval.perplexity` with ``stride = max_seq_len`` scores them."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = [torch.tensor(ids[s:s + seq_len], dtype=torch.long) for s in range(0, max(len(ids) - 1, 1), seq_len)]
    return [w for w in out if len(w) >= 2]


# ---- phase 1: fit ------------------------------------------------------------------------------------------------

def _fit_layer(spec: ModelSpec, i: int, lib: dict[str, list[Candidate]], parent: dict[str, torch.Tensor],
               h: torch.Tensor, hs: torch.Tensor, opts: DeriveOptions, pos: Positions
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Fit layer ``i``'s candidates on the parent's hidden states ``h`` (fit set); returns the fitted tensors and
    the parent's outputs for the fit set and the score set ``hs``."""
    la = spec.layers[i]
    hid = spec.hidden_size
    P = build_block(spec, i, la, parent)
    new = [c for sub in SUBBLOCKS for c in lib[sub] if not c.is_parent]
    lin_a = LeastSquares(hid, hid) if any(c.sub == "attention" and c.attn.kind is AttnKind.LINEAR for c in new) \
        else None
    lin_f = LeastSquares(hid, hid) if any(c.sub == "ffn" and c.ffn.kind is FfnKind.LINEAR for c in new) else None
    chan = ChannelStats(la.ffn.intermediate_size) if any(
        c.sub == "ffn" and c.ffn.kind is FfnKind.MLP for c in new) else None
    bld: dict[str, list] = {"attention": [], "ffn": []}
    outs = []
    with torch.no_grad():
        for k in range(0, h.shape[0], FIT_BATCH):
            x = h[k:k + FIT_BATCH]
            keep = opts.bld_steps > 0 and k // FIT_BATCH < BLD_BATCHES
            if P.self_attn is not None:
                n = P.input_layernorm(x)
                a = P.self_attn(hidden_states=n, attention_mask=None, position_embeddings=pos(x))[0]
                if lin_a is not None:
                    lin_a.add(n, a)
                if keep:
                    bld["attention"].append(((n,), a))
                x = x + a
            if P.mlp is not None:
                n2 = P.post_attention_layernorm(x)
                if la.ffn.kind is FfnKind.MLP:
                    act = P.mlp.act_fn(P.mlp.gate_proj(n2)) * P.mlp.up_proj(n2)
                    if chan is not None:
                        chan.add(act)
                    f = P.mlp.down_proj(act)
                else:
                    f = P.mlp(n2)
                if lin_f is not None:
                    lin_f.add(n2, f)
                if keep:
                    bld["ffn"].append(((n2,), f))
                x = x + f
            outs.append(x)
    fitted: dict[str, torch.Tensor] = {}
    for c in new:
        if c.sub == "attention" and c.attn.kind is AttnKind.LINEAR:
            fitted[fitted_key(c, "self_attn.linear_attn.weight")] = lin_a.solve()
        if c.sub == "ffn" and c.ffn.kind is FfnKind.LINEAR:
            fitted[fitted_key(c, "mlp.linear_mlp.weight")] = lin_f.solve()
    if chan is not None:
        fitted[ORDER_KEY] = chan.order(parent["mlp.down_proj.weight"])
    if opts.bld_steps > 0:
        _distill_layer(spec, i, lib, new, parent, fitted, bld, opts, pos)
    return fitted, torch.cat(outs), run_block(P, hs, pos)


def _distill_layer(spec, i, lib, new, parent, fitted, bld, opts, pos) -> None:
    """BLD of every trainable candidate of layer ``i``; the trained tensors go into ``fitted``."""
    calls = {"attention": lambda m, n: m.self_attn(hidden_states=n, attention_mask=None,
                                                   position_embeddings=pos(n))[0],
             "ffn": lambda m, n: m.mlp(n)}
    for c in new:
        kind = c.attn.kind if c.sub == "attention" else c.ffn.kind
        if kind.value == "no_op" or not bld[c.sub]:
            continue
        other = lib["ffn" if c.sub == "attention" else "attention"][0]
        state = {k: v.clone() for k, v in {**candidate_tensors(spec, i, c, parent, fitted),
                                           **candidate_tensors(spec, i, other, parent, fitted)}.items()}
        block = build_block(spec, i, c.layer(spec.layers[i]), state)
        inputs, targets = zip(*bld[c.sub], strict=True)
        before, after = distill(block, list(inputs), list(targets), opts.bld_steps, opts.bld_lr, calls[c.sub])
        log.debug("layer %d %s %s: BLD normalised MSE %.4g -> %.4g", i, c.sub, c.name, before, after)
        sd = block.state_dict()
        for rel in sub_names(spec, i, c):
            if not rel.endswith("layernorm.weight"):
                fitted[fitted_key(c, rel)] = sd[rel].detach().clone()


def fit_phase(work: WorkDir, model_dir: Path, spec: ModelSpec, libs, fit_h0: torch.Tensor, score_h0: torch.Tensor,
              opts: DeriveOptions, pos: Positions, progress: bool) -> None:
    start, h = 0, fit_h0
    if (work.path / "stream.safetensors").is_file():
        start = int(work.meta("stream.safetensors")["next_layer"])
        h = work.load("stream.safetensors")["fit"]
        hs = work.load(f"parent_h/{start}.safetensors")["h"]
    else:
        hs = score_h0
        work.save("parent_h/0.safetensors", {"h": hs})
    for i in tqdm(range(start, spec.num_layers), desc="derive: fitting blocks", unit="layer",
                  disable=not progress, initial=start, total=spec.num_layers):
        parent = parent_state(model_dir, spec, i)
        fitted, h, hs = _fit_layer(spec, i, libs[i], parent, h, hs, opts, pos)
        work.save(f"fit/{i}.safetensors", fitted)
        work.save(f"parent_h/{i + 1}.safetensors", {"h": hs})
        work.save("stream.safetensors", {"fit": h}, {"next_layer": str(i + 1)})


# ---- phase 2: replace-one scores ---------------------------------------------------------------------------------

def _head(model_dir: Path, spec: ModelSpec) -> Head:
    reader = SafetensorsReader(model_dir)
    head = Head(reader.get(FINAL_NORM.hf_names()[0]).to(torch.float32, copy=True),
                reader.get(lm_head_rule(spec).hf_names()[0]).to(torch.float32, copy=True), spec.norm_epsilon)
    reader.close()
    return head


def _parent_loader(model_dir: Path, spec: ModelSpec):
    return lambda j: build_block(spec, j, spec.layers[j], parent_state(model_dir, spec, j))


def score_layer(spec: ModelSpec, i: int, lib: dict[str, list[Candidate]], parent: dict[str, torch.Tensor],
                fitted: dict[str, torch.Tensor], hs: torch.Tensor, parent_final: torch.Tensor, loader, head: Head,
                pos: Positions) -> dict[str, dict[str, float]]:
    """Replace-one KL of every candidate of layer ``i`` (the parent's own sub-blocks score 0)."""
    la = spec.layers[i]
    cands = [c for sub in SUBBLOCKS for c in lib[sub] if not c.is_parent]
    outs = []
    for c in cands:
        other = lib["ffn" if c.sub == "attention" else "attention"][0]
        attn, ffn = (c, other) if c.sub == "attention" else (other, c)
        block = build_block(spec, i, c.layer(la), layer_tensors(spec, i, attn, ffn, parent, fitted))
        outs.append(run_block(block, hs, pos))
    kls = replace_one_kl(i, spec.num_layers, outs, parent_final, loader, head, pos)
    scores: dict[str, dict[str, float]] = {sub: {lib[sub][0].name: 0.0} for sub in SUBBLOCKS}
    for c, kl in zip(cands, kls, strict=True):
        scores[c.sub][c.name] = kl
    return scores


def score_phase(work: WorkDir, model_dir: Path, spec: ModelSpec, libs, head: Head, pos: Positions,
                progress: bool) -> list[dict[str, dict[str, float]]]:
    parent_final = work.load(f"parent_h/{spec.num_layers}.safetensors")["h"]
    loader = _parent_loader(model_dir, spec)
    out = []
    for i in tqdm(range(spec.num_layers), desc="derive: replace-one KL", unit="layer", disable=not progress):
        scores = work.load_json(f"scores/{i}.json")
        if scores is None:
            hs = work.load(f"parent_h/{i}.safetensors")["h"]
            scores = score_layer(spec, i, libs[i], parent_state(model_dir, spec, i),
                                 work.load(f"fit/{i}.safetensors"), hs, parent_final, loader, head, pos)
            work.save_json(f"scores/{i}.json", scores)
        out.append(scores)
    return out


# ---- phase 3: search ---------------------------------------------------------------------------------------------

def _cost_vector(c: Costs, keys: tuple[str, ...]) -> tuple[float, ...]:
    return tuple({"params": c.params, "kv": c.kv_heads, "time": c.time_s}[k] for k in keys)


def search_phase(spec: ModelSpec, libs, scores, budget: dict[str, float], target: Target
                 ) -> tuple[list[tuple[Candidate, Candidate]], dict[str, float]]:
    """The chosen (attention, ffn) candidate of every layer and the budgets' absolute limits."""
    keys = tuple(k for k in BUDGET_KEYS if k in budget)
    parent, glob = spec_costs(spec, target), global_costs(spec, target)
    limits = {"params": budget.get("params", 1) * parent.params - glob.params,
              "kv": budget.get("kv", 1) * parent.kv_heads,
              "time": budget.get("time", 1) * parent.time_s - glob.time_s}
    groups, where = [], []
    for i, lib in enumerate(libs):
        for sub in SUBBLOCKS:
            groups.append([Option(scores[i][sub][c.name], _cost_vector(candidate_costs(spec, i, c, target), keys))
                           for c in lib[sub]])
            where.append((i, sub))
    try:
        picks = solve(groups, tuple(limits[k] for k in keys))
    except SearchError as exc:
        text = ",".join(f"{k}={v:g}" for k, v in budget.items())
        raise SearchError(f"--budget {text}: {exc}") from None
    chosen: dict[int, dict[str, Candidate]] = {}
    for (i, sub), k in zip(where, picks, strict=True):
        chosen.setdefault(i, {})[sub] = libs[i][sub][k]
    return [(chosen[i]["attention"], chosen[i]["ffn"]) for i in range(spec.num_layers)], \
        {k: limits[k] for k in keys}


def baselines(spec: ModelSpec, libs, kv_frac: float) -> dict[str, list[tuple[Candidate, Candidate]] | None]:
    """Two naive architectures at the same KV budget: attention removed in the last layers; the same KV head
    count in every attention layer (the largest that fits). None where the library cannot express one."""
    parent = [(lib["attention"][0], lib["ffn"][0]) for lib in libs]
    limit = kv_frac * sum(spec.kv_heads_per_layer)
    out: dict[str, list[tuple[Candidate, Candidate]] | None] = {}
    removed = list(parent)
    kv = sum(spec.kv_heads_per_layer)
    for i in reversed(range(spec.num_layers)):
        if kv <= limit + 1e-9:
            break
        noop = next((c for c in libs[i]["attention"] if c.attn.kind is AttnKind.NO_OP), None)
        if spec.layers[i].has_kv_cache and noop is not None:
            removed[i] = (noop, parent[i][1])
            kv -= spec.layers[i].attention.num_kv_heads
    out["attention_removed_last"] = removed if kv <= limit + 1e-9 else None
    out["kv_merged_uniform"] = None
    counts = sorted({c.attn.num_kv_heads for lib in libs for c in lib["attention"]
                     if c.attn.kind is AttnKind.ATTENTION}, reverse=True)
    for k in counts:
        arch = []
        for i, lib in enumerate(libs):
            if not spec.layers[i].has_kv_cache:
                arch.append(parent[i])
                continue
            c = next((c for c in lib["attention"] if c.name == f"kv{k}"), None)
            if c is None:
                break
            arch.append((c, parent[i][1]))
        if len(arch) == len(libs) and sum(a.attn.num_kv_heads or 0 for a, _ in arch
                                          if a.attn.kind is AttnKind.ATTENTION) <= limit + 1e-9:
            out["kv_merged_uniform"] = arch
            break
    return out


def arch_spec(spec: ModelSpec, arch: list[tuple[Candidate, Candidate]]) -> ModelSpec:
    from dataclasses import replace

    return replace(spec, layers=tuple(LayerSpec(a.attn, f.ffn) for a, f in arch))


# ---- phase 4: held-out perplexity --------------------------------------------------------------------------------

def perplexities(work: WorkDir, model_dir: Path, spec: ModelSpec, variants: dict[str, list], windows, emb,
                 head: Head, pos: Positions, progress: bool) -> dict[str, float]:
    """Perplexity of each variant on ``windows``, layer by layer (one parent layer in memory)."""
    streams = {v: [F.embedding(w[None], emb) for w in windows] for v in variants}
    for i in tqdm(range(spec.num_layers), desc="derive: held-out perplexity", unit="layer", disable=not progress):
        parent, fitted = parent_state(model_dir, spec, i), work.load(f"fit/{i}.safetensors")
        blocks: dict[tuple[str, str], Any] = {}
        for v, arch in variants.items():
            a, f = arch[i]
            if (a.name, f.name) not in blocks:
                blocks[a.name, f.name] = build_block(spec, i, LayerSpec(a.attn, f.ffn),
                                                     layer_tensors(spec, i, a, f, parent, fitted))
            block = blocks[a.name, f.name]
            with torch.no_grad():
                streams[v] = [block(x, pos(x)) for x in streams[v]]
    out = {}
    count = sum(len(w) - 1 for w in windows)
    for v in variants:
        nll = sum(head.nll(x[0, :-1], w[1:]) for x, w in zip(streams[v], windows, strict=True))
        out[v] = math.exp(nll / count)
    return out


# ---- the command -------------------------------------------------------------------------------------------------

def _validate(model_dir: Path, spec: ModelSpec, opts: DeriveOptions) -> None:
    if opts.tp < 1 or spec.num_attention_heads % opts.tp or spec.hidden_size % opts.tp:
        raise ConfigError(f"--tp {opts.tp}: must divide num_attention_heads {spec.num_attention_heads} and "
                          f"hidden_size {spec.hidden_size}")
    if not 0 <= opts.bld_steps <= MAX_BLD_STEPS:
        raise ConfigError(f"--bld_steps {opts.bld_steps} must lie in [0, {MAX_BLD_STEPS}]")
    for name, v in (("--calib_size", opts.calib_size), ("--calib_seq_len", opts.calib_seq_len),
                    ("--score_size", opts.score_size), ("--score_seq_len", opts.score_seq_len),
                    ("--eval_seq_len", opts.eval_seq_len), ("--batch", opts.target.batch),
                    ("--seq", opts.target.seq)):
        if v < 1:
            raise ConfigError(f"{name} {v} must be >= 1")
    longest = max(opts.calib_seq_len, opts.score_seq_len, opts.eval_seq_len)
    if longest > spec.max_position_embeddings:
        raise ConfigError(f"sequence length {longest} exceeds max_position_embeddings {spec.max_position_embeddings}")
    for i, la in enumerate(spec.layers):
        if la.ffn.kind is FfnKind.MLP:
            try:
                ffn_mult_for(la.ffn.intermediate_size, spec.hidden_size)
            except ConfigError as exc:
                raise ConfigError(f"{model_dir}: layer {i}: {exc}") from None
            if la.ffn.intermediate_size % opts.tp:
                raise ConfigError(f"--tp {opts.tp}: layer {i}'s FFN width {la.ffn.intermediate_size} is not divisible")
        if la.has_kv_cache and la.attention.num_kv_heads % opts.tp and opts.tp % la.attention.num_kv_heads:
            raise ConfigError(f"--tp {opts.tp}: layer {i}'s {la.attention.num_kv_heads} KV heads do not shard")


def _fractions(c: Costs, parent: Costs) -> dict[str, float]:
    return {"params": c.params / parent.params, "kv": c.kv_heads / max(parent.kv_heads, 1),
            "time": c.time_s / parent.time_s}


def derive(model_dir: str | Path, output_dir: str | Path, opts: DeriveOptions = DeriveOptions(),
           overwrite: bool = False, progress: bool = True) -> DeriveResult:
    """Derive a Nemotron-NAS model from the HF checkpoint ``model_dir`` into ``output_dir``."""
    from nasrt.derive.report import build_report, write_report

    t0 = time.perf_counter()
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    parent_cfg = read_json(model_dir / "config.json")
    spec = from_hf_config(parent_cfg, str(model_dir / "config.json"))
    _validate(model_dir, spec, opts)
    reader = SafetensorsReader(model_dir)
    validate_source(reader, spec)
    src_dtype = reader.dtype(EMBEDDING.hf_names()[0])
    if src_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise CheckpointError(f"{model_dir}: weights are {src_dtype}; derive needs a float checkpoint")
    out_dtype = src_dtype if opts.dtype == "auto" else torch_dtype(opts.dtype)
    libs = [layer_library(spec, i, opts.ffn_ratios, opts.no_linear, opts.tp) for i in range(spec.num_layers)]
    zero = [{sub: {c.name: 0.0 for c in lib[sub]} for sub in SUBBLOCKS} for lib in libs]
    search_phase(spec, libs, zero, opts.budget, opts.target)  # an infeasible budget fails now, not after scoring

    tokenizer = load_tokenizer(opts.tokenizer_dir or model_dir)
    need = (opts.calib_size * opts.calib_seq_len + opts.score_size * opts.score_seq_len)
    texts = load_calibration_texts(opts.calib_dataset, need // 40 + 16)
    windows = token_windows(tokenizer, texts, opts.calib_size + opts.score_size,
                            max(opts.calib_seq_len, opts.score_seq_len), "--calib_dataset")
    fit_ids = windows[:opts.calib_size, :opts.calib_seq_len]
    score_ids = windows[opts.calib_size:, :opts.score_seq_len]
    held_out = eval_text(opts.eval_chars) if opts.eval_chars > 0 else ""
    ev = eval_windows(tokenizer, held_out, opts.eval_seq_len) if held_out else []
    if max(int(windows.max()), max((int(w.max()) for w in ev), default=0)) >= spec.vocab_size:
        raise ConfigError(f"tokenizer {opts.tokenizer_dir or model_dir} produces ids outside vocab_size "
                          f"{spec.vocab_size}")
    disjoint = all(t not in held_out for t in texts) if held_out else None

    with atomic_output_dir(output_dir, overwrite, inputs=(model_dir,)) as tmp:
        work = WorkDir(work_dir_for(output_dir), _fingerprint(model_dir, opts))
        emb = reader.get(EMBEDDING.hf_names()[0]).to(torch.float32, copy=True)
        pos = Positions(spec)
        timings = {}
        t = time.perf_counter()
        fit_phase(work, model_dir, spec, libs, F.embedding(fit_ids, emb), F.embedding(score_ids, emb), opts, pos,
                  progress)
        timings["fit_s"] = time.perf_counter() - t
        head = _head(model_dir, spec)
        t = time.perf_counter()
        scores = score_phase(work, model_dir, spec, libs, head, pos, progress)
        timings["score_s"] = time.perf_counter() - t
        t = time.perf_counter()
        chosen, limits = search_phase(spec, libs, scores, opts.budget, opts.target)
        timings["search_s"] = time.perf_counter() - t
        derived = arch_spec(spec, chosen)
        parent_costs = spec_costs(spec, opts.target)
        kv_frac = opts.budget.get("kv", _fractions(spec_costs(derived, opts.target), parent_costs)["kv"])
        variants: dict[str, list] = {"parent": [(lib["attention"][0], lib["ffn"][0]) for lib in libs],
                                     "derived": chosen}
        base = baselines(spec, libs, kv_frac)
        variants.update({f"baseline_{k}": v for k, v in base.items() if v is not None})
        ppl: dict[str, float] = {}
        if ev:
            t = time.perf_counter()
            ppl = perplexities(work, model_dir, spec, variants, ev, emb, head, pos, progress)
            timings["eval_s"] = time.perf_counter() - t
        del emb, head
        t = time.perf_counter()
        glob_reader = SafetensorsReader(model_dir)
        written = write_checkpoint(
            tmp, model_dir, parent_cfg, spec, [LayerSpec(a.attn, f.ffn) for a, f in chosen], out_dtype,
            lambda name: glob_reader.get(name),
            lambda i: layer_tensors(spec, i, chosen[i][0], chosen[i][1], parent_state(model_dir, spec, i),
                                    work.load(f"fit/{i}.safetensors")), progress)
        glob_reader.close()
        timings["write_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t0
        report = build_report(
            spec=spec, derived=written, libs=libs, scores=scores, chosen=chosen, budget=opts.budget, limits=limits,
            target=opts.target, variants={k: arch_spec(spec, v) for k, v in variants.items()}, perplexity=ppl,
            data={"calibration": opts.calib_dataset or "pydoc_data.topics (calibration slice)",
                  "fit_tokens": [opts.calib_size, opts.calib_seq_len],
                  "score_tokens": [opts.score_size, opts.score_seq_len],
                  "eval": "pydoc_data.topics (held-out slice)", "eval_chars": len(held_out),
                  "eval_tokens": sum(len(w) for w in ev), "eval_disjoint_from_calibration": disjoint},
            options={"no_linear": opts.no_linear, "tp": opts.tp, "ffn_ratios": list(opts.ffn_ratios),
                     "bld_steps": opts.bld_steps, "dtype": str(out_dtype).replace("torch.", "")},
            timings=timings, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            parent_dir=str(model_dir))
        table = write_report(tmp, report, written, plot_png=opts.plot, display=str(output_dir))
    work.remove()
    return DeriveResult(output_dir, report, table)

