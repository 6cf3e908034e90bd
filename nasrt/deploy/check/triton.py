"""A Triton model repository against what the C++ ``tensorrtllm`` backend (TensorRT-LLM 1.2) and Triton need:
every parameter the backend reads unconditionally, no unfilled ``${...}``, parameter values it can convert, the
ensemble wiring, and batch / beam limits consistent with the engine the repository points to."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from nasrt.arch import read_json
from nasrt.deploy.check import Report
from nasrt.deploy.check import trtllm_schema as S
from nasrt.deploy.check.textproto import Message, first, parameters, parse
from nasrt.errors import NasrtError

_PLACEHOLDER = re.compile(r"\$\{[^}]*\}")


def _int(v: Any) -> int | None:
    try:
        return int(str(v))
    except ValueError:
        return None


def _names(msg: Message, kind: str) -> dict[str, bool]:
    """Tensor name -> optional, for ``input`` / ``output``."""
    return {str(first(t, "name", "")): str(first(t, "optional", "false")) == "true"
            for t in msg.get(kind, []) if isinstance(t, dict)}


def _placeholders(path: Path, text: str, params: dict[str, str], report: Report) -> None:
    in_params = set()
    for key, value in params.items():
        for ph in _PLACEHOLDER.findall(value):
            report.add(path, f"parameters.{key}", f"unfilled placeholder {ph} (the backend treats it as unset)")
            in_params.add(ph)
    for lineno, line in enumerate(text.splitlines(), 1):
        for ph in _PLACEHOLDER.findall(line):
            if ph not in in_params:
                report.add(path, f"line {lineno}", f"unfilled placeholder {ph}")


def _cpp_parameters(path: Path, params: dict[str, str], report: Report) -> None:
    for key, why in S.TRITON_REQUIRED.items():
        if key not in params:
            report.add(path, f"parameters.{key}", f"missing: the backend reads it unconditionally ({why}); model "
                       f"load fails with 'Cannot find parameter with name: {key}'")
        elif not params[key] and key not in S.TRITON_MAY_BE_EMPTY:
            report.add(path, f"parameters.{key}", "empty")
    for key in S.TRITON_FORBIDDEN:
        if key in params:
            report.add(path, f"parameters.{key}", "no longer supported (the backend throws; use executor_worker_path)")
    for key, choices in S.TRITON_CHOICES.items():
        if key in params and not _PLACEHOLDER.search(params[key]) and params[key] not in choices:
            report.add(path, f"parameters.{key}", f"{params[key]!r} is not one of {', '.join(map(repr, choices))}")
    for key in S.TRITON_BOOL_PARAMS:
        if key in params and not _PLACEHOLDER.search(params[key]) and params[key] not in S.TRITON_BOOL_VALUES:
            report.add(path, f"parameters.{key}", f"{params[key]!r}: 'Cannot convert to a boolean' (use true/false)")
    for key in S.TRITON_INT_PARAMS:
        if key in params and not _PLACEHOLDER.search(params[key]) and _int(params[key]) is None:
            report.add(path, f"parameters.{key}", f"{params[key]!r} is not an integer")
    for key in S.TRITON_FLOAT_PARAMS:
        if key in params and not _PLACEHOLDER.search(params[key]):
            try:
                float(params[key])
            except ValueError:
                report.add(path, f"parameters.{key}", f"{params[key]!r} is not a number")


def _engine_limits(path: Path, msg: Message, params: dict[str, str], report: Report,
                   record: dict[str, Any]) -> None:
    engine = params.get("gpt_model_path", "")
    if not engine or _PLACEHOLDER.search(engine):
        return
    cfg_path = Path(engine) / "config.json"
    if not cfg_path.is_file():
        report.add(path, "parameters.gpt_model_path", f"{engine}: no engine config.json there ('Decoder (GPT) model "
                   "path ... does not exist')")
        return
    cfg = report.read_json(cfg_path, "parameters.gpt_model_path", path)
    if cfg is None:
        return
    build = cfg.get("build_config") if isinstance(cfg.get("build_config"), dict) else {}
    mb, eb = _int(first(msg, "max_batch_size", 0)), build.get("max_batch_size")
    if isinstance(eb, int) and mb is not None and mb > eb:
        report.add(path, "max_batch_size", f"{mb} exceeds the engine's build-time max_batch_size {eb} ({cfg_path})")
    beam, ebeam = _int(params.get("max_beam_width", "1")), build.get("max_beam_width", 1)
    if isinstance(ebeam, int) and beam is not None and beam > ebeam:
        report.add(path, "parameters.max_beam_width", f"{beam} exceeds the engine's max_beam_width {ebeam}")
    mapping = (cfg.get("pretrained_config") or {}).get("mapping") or {}
    world = mapping.get("world_size")
    if "world_size" in record and isinstance(world, int) and record["world_size"] != world:
        report.add(path, "world_size", f"the repository was written for world size {record['world_size']} but the "
                   f"engine has {world} ranks (launch one tritonserver per rank)")


def _ensemble(path: Path, msg: Message, models: dict[str, Message], report: Report) -> None:
    sched = first(msg, "ensemble_scheduling", {})
    steps = sched.get("step", []) if isinstance(sched, dict) else []
    if not steps:
        report.add(path, "ensemble_scheduling", "no steps")
        return
    available = set(_names(msg, "input"))
    batch = _int(first(msg, "max_batch_size", 0)) or 0
    for n, step in enumerate(steps):
        name = str(first(step, "model_name", ""))
        where = f"ensemble_scheduling.step[{n}] ({name})"
        if name not in models:
            report.add(path, where, f"model {name!r} is not in the repository")
            continue
        target = models[name]
        inputs, outputs = _names(target, "input"), _names(target, "output")
        mapped = {}
        for entry in step.get("input_map", []):
            key, value = str(first(entry, "key", "")), str(first(entry, "value", ""))
            mapped[key] = value
            if key not in inputs:
                report.add(path, f"{where}.input_map.{key}", f"{name} has no input {key!r}")
            if value not in available:
                report.add(path, f"{where}.input_map.{key}", f"tensor {value!r} is neither an ensemble input nor an "
                           "output of an earlier step")
        for key, optional in inputs.items():
            if not optional and key not in mapped:
                report.add(path, f"{where}.input_map", f"required input {key!r} of {name} is not mapped")
        for entry in step.get("output_map", []):
            key, value = str(first(entry, "key", "")), str(first(entry, "value", ""))
            if key not in outputs:
                report.add(path, f"{where}.output_map.{key}", f"{name} has no output {key!r}")
            available.add(value)
        sub_batch = _int(first(target, "max_batch_size", 0)) or 0
        if batch > sub_batch:
            report.add(path, "max_batch_size", f"{batch} exceeds {name}'s max_batch_size {sub_batch} (Triton refuses "
                       "the ensemble)")
    for out in _names(msg, "output"):
        if out not in available:
            report.add(path, f"output.{out}", "no step produces it")


def check_repository(repo: str | Path) -> Report:
    repo = Path(repo)
    report = Report("triton", repo)
    record: dict[str, Any] = {}
    if (repo / "nasrt_repository.json").is_file():
        try:
            record = read_json(repo / "nasrt_repository.json")
        except NasrtError as exc:
            report.add(repo / "nasrt_repository.json", "nasrt_repository.json", str(exc))
    models: dict[str, Message] = {}
    texts: dict[str, tuple[Path, str]] = {}
    for cfg_path in sorted(repo.glob("*/config.pbtxt")):
        try:
            text = cfg_path.read_text(encoding="utf-8")
            models[cfg_path.parent.name] = parse(text, str(cfg_path))
            texts[cfg_path.parent.name] = (cfg_path, text)
        except (OSError, UnicodeDecodeError, NasrtError) as exc:
            report.add(cfg_path, "config.pbtxt", f"cannot be read: {exc}")
    if not models and report.ok:
        report.add(repo, "repository", "no */config.pbtxt")
    for name, msg in models.items():
        path, text = texts[name]
        params = parameters(msg)
        _placeholders(path, text, params, report)
        declared = str(first(msg, "name", name))
        if declared != name:
            report.add(path, "name", f"{declared!r} differs from the directory name {name!r}")
        backend, platform = first(msg, "backend"), first(msg, "platform")
        if backend == "tensorrtllm":
            _cpp_parameters(path, params, report)
            _engine_limits(path, msg, params, report, record)
        if platform == "ensemble":
            _ensemble(path, msg, models, report)
        if name in S.TOKENIZER_MODELS:
            tok = params.get("tokenizer_dir")
            if tok is None:
                report.add(path, "parameters.tokenizer_dir", "missing: the model cannot load its tokenizer")
            elif not _PLACEHOLDER.search(tok) and not Path(tok).is_dir():
                report.add(path, "parameters.tokenizer_dir", f"{tok}: not a directory")
        if backend == "python" and not (path.parent / "1" / "model.py").is_file():
            report.add(path, "backend", "python backend without 1/model.py")
        for key in ("preferred_batch_size",):
            dyn = first(msg, "dynamic_batching", {})
            for v in (dyn.get(key, []) if isinstance(dyn, dict) else []):
                mb = _int(first(msg, "max_batch_size", 0))
                if _int(v) is not None and mb is not None and _int(v) > mb:
                    report.add(path, f"dynamic_batching.{key}", f"{v} exceeds max_batch_size {mb}")
    return report
