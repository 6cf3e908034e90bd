"""An engine dir as trtllm-build 1.2 writes it: ``config.json`` = {version, pretrained_config, build_config} and one
non-empty ``rank{N}.engine`` per rank of the mapping (reference trtllm-checkpoint-format.md section 8)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from nasrt.deploy.check import Report
from nasrt.deploy.check import trtllm_schema as S
from nasrt.deploy.check.checkpoint import config_problems
from nasrt.deploy.engine import has_engine_path

_RANK_ENGINE = re.compile(r"^rank(\d+)\.engine$")


def _positive(build: dict[str, Any], key: str) -> int | None:
    v = build.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else None


def check_engine(engine_dir: str | Path) -> Report:
    engine_dir = Path(engine_dir)
    report = Report("engine", engine_dir)
    cfg_path = engine_dir / "config.json"
    cfg = report.read_json(cfg_path)
    if cfg is None:
        return report
    for key in S.ENGINE_SECTIONS:
        if key not in cfg:
            report.add(cfg_path, key, "missing (trtllm-build 1.2 writes version, pretrained_config, build_config)")
    version = cfg.get("version")
    if version is not None and (not isinstance(version, str) or not version.startswith(("1.2.", "1.3.0rc"))
                                or not has_engine_path(version)):
        report.add(cfg_path, "version", f"{version!r}: not built by TensorRT-LLM 1.2 (engines are tied to the "
                   "TensorRT-LLM version that built them)")
    pretrained, build = cfg.get("pretrained_config"), cfg.get("build_config")
    layout = None
    if isinstance(pretrained, dict):
        layout = config_problems(pretrained, str(cfg_path), report, "pretrained_config.")
    elif pretrained is not None:
        report.add(cfg_path, "pretrained_config", "must be an object")
    if isinstance(build, dict):
        for key in S.BUILD_CONFIG_LIMITS:
            if _positive(build, key) is None:
                report.add(cfg_path, f"build_config.{key}", f"{build.get(key)!r}: must be a positive integer")
        seq, inp = _positive(build, "max_seq_len"), _positive(build, "max_input_len")
        if seq and inp and inp > seq:
            report.add(cfg_path, "build_config.max_input_len", f"{inp} exceeds max_seq_len {seq}")
        if not isinstance(build.get("plugin_config"), dict):
            report.add(cfg_path, "build_config.plugin_config", "missing or not an object")
    elif build is not None:
        report.add(cfg_path, "build_config", "must be an object")
    if layout is None:
        return report
    world = layout[0] * layout[1]
    for rank in range(world):
        path = engine_dir / f"rank{rank}.engine"
        if not path.is_file():
            report.add(path, path.name, f"engine file missing (mapping world_size {world})")
        elif path.stat().st_size == 0:
            report.add(path, path.name, "empty engine file (an interrupted build?)")
    for f in sorted(engine_dir.iterdir()):
        m = _RANK_ENGINE.match(f.name)
        if m and int(m.group(1)) >= world:
            report.add(f, f.name, f"engine file beyond mapping world_size {world}")
    return report
