"""``nasrt check``: TensorRT-LLM 1.2 compatibility of a checkpoint dir, an engine dir or a Triton repository.

Metadata only (config files and safetensors headers, never tensor data). Each target has its module
(:mod:`.checkpoint`, :mod:`.engine`, :mod:`.triton`); the rules TensorRT-LLM applies are tables in
:mod:`.trtllm_schema`. A check returns a :class:`Report` of :class:`Problem` s; :func:`require_clean` turns a
report with problems into one :class:`~nasrt.errors.CheckpointError` (used by build, convert and quantize).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nasrt.errors import CheckpointError, ConfigError, NasrtError

TARGETS = ("checkpoint", "engine", "triton")


@dataclass(frozen=True)
class Problem:
    """One incompatibility: the file, the key or tensor it concerns, and what TensorRT-LLM would do."""

    where: str
    what: str
    message: str

    def line(self) -> str:
        return f"{self.where}: {self.what}: {self.message}"


@dataclass
class Report:
    target: str
    path: Path
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, where: str | Path, what: str, message: str) -> None:
        self.problems.append(Problem(str(where), what, message))

    def read_json(self, path: Path, what: str = "config.json", where: str | Path | None = None) -> dict[str, Any] | None:
        """The JSON at ``path``, or ``None`` with the reason added as a problem of ``what`` at ``where`` (``path``)."""
        from nasrt.arch import read_json

        try:
            return read_json(path)
        except NasrtError as exc:
            self.add(path if where is None else where, what, str(exc))
            return None

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "path": str(self.path), "ok": self.ok,
                "problems": [asdict(p) for p in self.problems]}


def detect(path: str | Path) -> str:
    """``checkpoint`` / ``engine`` / ``triton`` from the directory's contents."""
    from nasrt.arch import read_json

    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{p}: not a directory")
    cfg_path = p / "config.json"
    if cfg_path.is_file():
        cfg = read_json(cfg_path)
        if "pretrained_config" in cfg or "build_config" in cfg:
            return "engine"
        if "architecture" in cfg or "layer_configs" in cfg or "mapping" in cfg:
            return "checkpoint"
        raise ConfigError(f"{cfg_path}: neither a TensorRT-LLM checkpoint nor an engine config (an HF model dir? "
                          "run `nasrt convert` first)")
    if any(c.is_file() for c in p.glob("*/config.pbtxt")):
        return "triton"
    raise ConfigError(f"{p}: no config.json (checkpoint / engine dir) and no */config.pbtxt (Triton repository)")


def check_dir(path: str | Path, target: str | None = None) -> Report:
    """Check ``path`` as ``target`` (detected when None)."""
    target = target or detect(path)
    if target == "checkpoint":
        from nasrt.deploy.check.checkpoint import check_checkpoint

        return check_checkpoint(path)
    if target == "engine":
        from nasrt.deploy.check.engine import check_engine

        return check_engine(path)
    if target == "triton":
        from nasrt.deploy.check.triton import check_repository

        return check_repository(path)
    raise ConfigError(f"unknown check target {target!r} (one of {', '.join(TARGETS)})")


def require_clean(report: Report, what: str, shown: int = 5, temporary: bool = False) -> None:
    """Raise one :class:`CheckpointError` listing the report's problems (the first ``shown``); ``temporary``: the
    checked dir is an output about to be discarded (no ``nasrt check`` hint)."""
    if report.ok:
        return
    lines = [p.line() for p in report.problems]
    more = f"; ... and {len(lines) - shown} more" if len(lines) > shown else ""
    hint = "" if temporary else f" (`nasrt check {report.path}` lists them)"
    raise CheckpointError(f"{what}: {len(lines)} TensorRT-LLM 1.2 incompatibilit{'y' if len(lines) == 1 else 'ies'}"
                          f"{hint}: " + "; ".join(lines[:shown]) + more)
