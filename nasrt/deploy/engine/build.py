"""``nasrt build``: check a TensorRT-LLM checkpoint against a build profile, plan its memory, run trtllm-build.

Order of work: (real build: a TensorRT-LLM release with the engine path) -> profile -> output dir (new, not inside
the checkpoint) -> checkpoint (config, rank files, quantization, mapping against the profile) -> ``nasrt check``
(TensorRT-LLM 1.2's loading rules, headers only) -> planner (refuse a profile that does not fit unless ``force``)
-> command line -> (dry run: stop) -> TensorRT-LLM and GPU present -> trtllm-build run inside a temporary sibling of
the output dir (its timing cache ``model.cache`` lands in its working directory), ``nasrt_build.json``, rename into
place. Nothing is written before the last step, so a missing TensorRT-LLM leaves no trace.
"""

from __future__ import annotations

import datetime
import json
import logging
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nasrt
from nasrt.arch import ModelSpec, from_trtllm_config, is_trtllm_config, read_json
from nasrt.atomic import atomic_output_dir, write_json
from nasrt.deploy.check import check_dir, require_clean
from nasrt.deploy.engine import check_engine_path, require_trtllm
from nasrt.deploy.plan import GPUS, Plan, PlanRequest, plan_memory, request_defaults
from nasrt.deploy.profiles import Profile, load_profile, trtllm_build_argv
from nasrt.errors import CheckpointError, ConfigError, MissingDependencyError, NasrtError

log = logging.getLogger(__name__)

RECORD_NAME = "nasrt_build.json"


@dataclass
class BuildResult:
    """What ``build_engine`` decided and did."""

    profile: Profile
    plan: Plan
    argv: list[str]  # with the final output dir
    output_dir: Path
    built: bool = False
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


def check_checkpoint(ckpt_dir: Path, profile: Profile) -> tuple[dict[str, Any], ModelSpec]:
    """The checkpoint must be a complete TensorRT-LLM checkpoint with the profile's quantization and layout."""
    cfg_path = ckpt_dir / "config.json"
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"--checkpoint_dir {ckpt_dir} is not a directory")
    cfg = read_json(cfg_path)
    if not is_trtllm_config(cfg):
        raise CheckpointError(f"{cfg_path} is not a TensorRT-LLM checkpoint config (an HF model dir?); "
                              "run `nasrt convert` (and `nasrt quantize` for FP8) first")
    spec = from_trtllm_config(cfg, str(cfg_path))
    quant = cfg.get("quantization") or {}
    where = f"profile {profile.name} ({profile.path})"
    for key, want in (("quant_algo", profile.quant_algo), ("kv_cache_quant_algo", profile.kv_cache_quant_algo)):
        have = quant.get(key)
        if have != want:
            hint = ("; quantize it with `nasrt quantize` first" if want == "FP8" else
                    "; use an FP8 profile (e.g. h100x1-fp8) or convert without quantization")
            what = "an FP8" if have == "FP8" else f"a {cfg.get('dtype', 'unquantized')} (unquantized)"
            raise CheckpointError(f"{where} needs quantization.{key} = {json.dumps(want)} but {cfg_path} has "
                                  f"{json.dumps(have)} ({what} checkpoint){hint}")
    mapping = cfg.get("mapping") or {}
    tp, pp = int(mapping.get("tp_size") or 1), int(mapping.get("pp_size") or 1)
    world = int(mapping.get("world_size", tp * pp))
    if (tp, pp) != (profile.tp_size, profile.pp_size) or world != tp * pp:
        raise CheckpointError(f"{where} needs tp {profile.tp_size} x pp {profile.pp_size} = world size "
                              f"{profile.world_size}, but {cfg_path} mapping is tp {tp} x pp {pp} (world_size "
                              f"{world}); re-run `nasrt convert --tp_size {profile.tp_size} --pp_size "
                              f"{profile.pp_size}`")
    missing = [f"rank{r}.safetensors" for r in range(world) if not (ckpt_dir / f"rank{r}.safetensors").is_file()]
    if missing:
        raise CheckpointError(f"{ckpt_dir}: missing rank file(s) {missing} (mapping world_size {world})")
    if profile.max_seq_len > spec.max_position_embeddings:
        log.warning("%s: max_seq_len %d exceeds the model's max_position_embeddings %d", where,
                    profile.max_seq_len, spec.max_position_embeddings)
    return cfg, spec


def check_output_dir(ckpt: Path, out: Path, overwrite: bool) -> None:
    """The engine dir must not exist (unless ``overwrite``) and must not be, or lie inside, the checkpoint dir
    (both paths already resolved)."""
    if out == ckpt or ckpt in out.parents:
        raise ConfigError(f"--output_dir {out} is {'the' if out == ckpt else 'inside the'} --checkpoint_dir {ckpt}; "
                          "write the engine elsewhere (inputs are never modified)")
    if out in ckpt.parents:
        raise ConfigError(f"--checkpoint_dir {ckpt} is inside --output_dir {out}; replacing the output would delete "
                          "the checkpoint")
    if out.exists() and not overwrite:
        raise ConfigError(f"--output_dir {out} already exists (pass --overwrite to replace it)")


def plan_for_profile(ckpt_dir: Path, spec: ModelSpec, profile: Profile) -> Plan:
    """The planner for the profile's GPU, batch x sequence and engine limits, with the checkpoint's dtypes."""
    d = request_defaults(ckpt_dir)
    req = PlanRequest(gpu=profile.gpu, tp=profile.tp_size, pp=profile.pp_size, dtype=d["dtype"],
                      kv_cache_dtype=d["kv_cache_dtype"], batch=profile.max_batch_size, seq=profile.max_seq_len,
                      max_num_tokens=profile.max_num_tokens, kv_fraction=profile.kv_cache_free_gpu_memory_fraction,
                      tokens_per_block=profile.tokens_per_block,
                      use_parallel_embedding=d["use_parallel_embedding"],
                      embedding_sharding_dim=d["embedding_sharding_dim"])
    return plan_memory(spec, req)


def check_gpus(profile: Profile) -> None:
    """The local machine must show enough CUDA GPUs, with FP8 support for FP8 profiles."""
    gpu = GPUS[profile.gpu]
    need = f"{profile.world_size} x {gpu.name} ({gpu.note})"
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        raise MissingDependencyError(f"nasrt build needs PyTorch with CUDA and {need}") from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < profile.world_size:
        raise MissingDependencyError(f"profile {profile.name} needs {need}; this machine shows {count} CUDA GPU(s). "
                                     "Nothing was written.")
    if "FP8" in (profile.quant_algo, profile.kv_cache_quant_algo):
        cap = torch.cuda.get_device_capability(0)
        if cap < (8, 9):
            raise MissingDependencyError(f"profile {profile.name} builds FP8 kernels, which need compute capability "
                                         f">= 8.9 (Ada/Hopper); GPU 0 is sm {cap[0]}.{cap[1]}")


def build_engine(checkpoint_dir: str | Path, profile: str | Path | Profile, output_dir: str | Path, *,
                 dry_run: bool = False, force: bool = False, overwrite: bool = False) -> BuildResult:
    """Check, plan and (unless ``dry_run``) build the engine of ``checkpoint_dir`` with ``profile``."""
    if not dry_run:  # a TensorRT-LLM release without the engine path: say so before any other work
        check_engine_path("nasrt build")
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    ckpt, out = Path(checkpoint_dir).resolve(), Path(output_dir).resolve()
    check_output_dir(ckpt, out, overwrite)
    cfg, spec = check_checkpoint(ckpt, prof)
    require_clean(check_dir(ckpt, "checkpoint"), f"--checkpoint_dir {ckpt}")
    plan = plan_for_profile(ckpt, spec, prof)
    if not plan.fits:
        if not force:
            raise ConfigError(f"profile {prof.name} ({prof.path}) does not fit according to the planner: "
                              f"{plan.reason}. Pass --force to build anyway.")
        log.warning("building despite the planner (--force): %s", plan.reason)
    result = BuildResult(prof, plan, trtllm_build_argv(prof, ckpt, out), out)
    if dry_run:
        try:
            check_engine_path("nasrt build")
        except MissingDependencyError as exc:
            log.warning("the printed command will not run on this machine: %s", exc)
        return result
    gpu = GPUS[prof.gpu]
    version = require_trtllm("nasrt build", f"{prof.world_size} x {gpu.name} GPU(s)", need_cli=True)
    check_gpus(prof)
    with atomic_output_dir(out, overwrite, inputs=(ckpt,)) as tmp:
        argv = trtllm_build_argv(prof, ckpt, tmp)
        log.info("running %s", shlex.join(argv))
        log_path = tmp / "build.log"
        with open(log_path, "w", encoding="utf-8") as fh:
            # cwd: trtllm-build writes its timing cache (model.cache) into the working directory
            proc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, check=False, cwd=tmp)
        if proc.returncode:
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise NasrtError(f"trtllm-build failed with exit code {proc.returncode}; last output:\n{tail}")
        from nasrt.deploy.engine.runner import validate_engine_dir

        validate_engine_dir(tmp)
        result.record = {
            "nasrt_version": nasrt.__version__,
            "tensorrt_llm_version": version,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "checkpoint_dir": str(ckpt.resolve()),
            "checkpoint_producer": cfg.get("producer"),
            "command": result.argv,
            "profile": prof.record(),
            "plan": {"gpu": plan.gpu.name, "fits": plan.fits, "reason": plan.reason,
                     "max_kv_tokens": plan.max_kv_tokens, "max_batch": plan.max_batch, "forced": not plan.fits},
        }
        write_json(tmp / RECORD_NAME, result.record)
    result.built = True
    return result
