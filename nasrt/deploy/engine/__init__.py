"""The TensorRT-LLM engine path: ``nasrt build`` (trtllm-build with a profile) and the engine runner.

Neither step can be imitated on a CPU: without TensorRT-LLM 1.2 both stop with :class:`MissingDependencyError`
before writing anything, naming the package, the version and the GPU they need.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shutil
from pathlib import Path

from nasrt.errors import MissingDependencyError

TRTLLM_VERSION = "1.2"
INSTALL_HINT = (
    "install TensorRT-LLM 1.2.x (the last line with trtllm-build and the engine runtime): "
    "`pip install tensorrt-llm==1.2.1` with NVIDIA's package index as an extra index (see TensorRT-LLM's "
    "installation guide) on Linux x86-64/aarch64 with CUDA, or use NVIDIA's NGC Triton TensorRT-LLM container "
    "(tritonserver:<release>-trtllm-python-py3) of a 1.2.x release "
    "(PyPI's tensorrt-llm is only a placeholder without NVIDIA's index)"
)


#: The last release with the engine path (trtllm-build, ``tensorrt_llm/models/nemotron_nas``, ``ModelRunnerCpp``,
#: the Triton C++ backend); later ones are PyTorch-backend only (reference triton-trtllm.md section 8b).
LAST_ENGINE_RELEASE = (1, 3, 0, "rc", 20)
PYTORCH_HINT = (
    "TensorRT-LLM {version} has no engine path (trtllm-build, the DeciLM engine model and ModelRunnerCpp were "
    "removed after 1.3.0rc20); serve the HF checkpoint (or nasrt's --export_format hf FP8 checkpoint) with the "
    "PyTorch backend instead: `nasrt serve-config` writes the trtllm-serve configuration, then "
    "`trtllm-serve <HF dir> --config <yaml>`; or install tensorrt-llm==1.2.1 (`pip install nasrt[engine]`) "
    "for the engine path"
)
_VERSION_RE = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?(?:\.?(rc|a|b|dev|post)\.?(\d+))?")
_VERSION_LINE = re.compile(r"""^__version__\s*=\s*["']([^"']+)["']""", re.M)


def parse_version(text: str) -> tuple[int, int, int, str, int] | None:
    """``"1.3.0rc20"`` -> ``(1, 3, 0, "rc", 20)``; a final release sorts after its pre-releases (``"~"``)."""
    m = _VERSION_RE.match(text.strip())
    if not m:
        return None
    major, minor, patch, tag, num = m.groups()
    if tag in (None, "post"):
        tag, num = "~", num if tag == "post" else 0
    return int(major), int(minor), int(patch or 0), tag, int(num or 0)


def has_engine_path(version: str) -> bool:
    """True for releases that still ship the engine path (<= 1.3.0rc20); unparsable versions are given the
    benefit of the doubt."""
    parsed = parse_version(version)
    return parsed is None or parsed <= LAST_ENGINE_RELEASE


def trtllm_version() -> str | None:
    """The installed ``tensorrt_llm`` version (package metadata, else the ``__version__`` line of its
    ``version.py`` / ``__init__.py`` read as text: importing TensorRT-LLM initialises CUDA), or None when absent."""
    spec = importlib.util.find_spec("tensorrt_llm")
    if spec is None:
        return None
    for dist in ("tensorrt_llm", "tensorrt-llm"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    for folder in spec.submodule_search_locations or []:
        for name in ("version.py", "__init__.py"):
            try:
                m = _VERSION_LINE.search((Path(folder) / name).read_text(encoding="utf-8", errors="replace"))
            except OSError:
                continue
            if m:
                return m.group(1)
    return "unknown"


def check_engine_path(what: str) -> str | None:
    """The installed version, or :class:`MissingDependencyError` when it is a release without the engine path."""
    version = trtllm_version()
    if version not in (None, "unknown") and not has_engine_path(version):
        raise MissingDependencyError(f"{what} needs the TensorRT-LLM engine path (1.2.x, up to 1.3.0rc20): "
                                     + PYTORCH_HINT.format(version=version))
    return version


def require_trtllm(what: str, gpu: str, need_cli: bool = False) -> str:
    """Return the TensorRT-LLM version or raise :class:`MissingDependencyError` explaining what is needed."""
    version = check_engine_path(what)
    missing = []
    if version is None:
        missing.append("the Python package tensorrt_llm is not importable")
    if need_cli and shutil.which("trtllm-build") is None:
        missing.append("trtllm-build is not on PATH")
    if missing:
        raise MissingDependencyError(f"{what} needs TensorRT-LLM {TRTLLM_VERSION}.x and {gpu}, but "
                                     f"{' and '.join(missing)}; {INSTALL_HINT}. Nothing was written.")
    if version != "unknown" and not version.startswith(TRTLLM_VERSION + ".") \
            and not version.startswith("1.3.0rc"):
        raise MissingDependencyError(f"{what} needs TensorRT-LLM {TRTLLM_VERSION}.x (engine format and trtllm-build "
                                     f"flags of that line), found {version}; {INSTALL_HINT}")
    return version
