"""The TensorRT-LLM engine path: ``nasrt build`` (trtllm-build with a profile) and the engine runner.

Neither step can be imitated on a CPU: without TensorRT-LLM 1.2 both stop with :class:`MissingDependencyError`
before writing anything, naming the package, the version and the GPU they need.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil

from nasrt.errors import MissingDependencyError

TRTLLM_VERSION = "1.2"
INSTALL_HINT = (
    "install TensorRT-LLM 1.2.x (the last line with trtllm-build and the engine runtime): "
    "`pip install tensorrt-llm==1.2.1` with NVIDIA's package index as an extra index (see TensorRT-LLM's "
    "installation guide) on Linux x86-64/aarch64 with CUDA, or use NVIDIA's NGC Triton TensorRT-LLM container "
    "(tritonserver:<release>-trtllm-python-py3) of a 1.2.x release "
    "(PyPI's tensorrt-llm is only a placeholder without NVIDIA's index)"
)


def trtllm_version() -> str | None:
    """The installed ``tensorrt_llm`` version, or None when it is not importable."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return None
    for dist in ("tensorrt_llm", "tensorrt-llm"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def require_trtllm(what: str, gpu: str, need_cli: bool = False) -> str:
    """Return the TensorRT-LLM version or raise :class:`MissingDependencyError` explaining what is needed."""
    version = trtllm_version()
    missing = []
    if version is None:
        missing.append("the Python package tensorrt_llm is not importable")
    if need_cli and shutil.which("trtllm-build") is None:
        missing.append("trtllm-build is not on PATH")
    if missing:
        raise MissingDependencyError(f"{what} needs TensorRT-LLM {TRTLLM_VERSION}.x and {gpu}, but "
                                     f"{' and '.join(missing)}; {INSTALL_HINT}. Nothing was written.")
    if version != "unknown" and not version.startswith(TRTLLM_VERSION + "."):
        raise MissingDependencyError(f"{what} needs TensorRT-LLM {TRTLLM_VERSION}.x (engine format and trtllm-build "
                                     f"flags of that line), found {version}; {INSTALL_HINT}")
    return version
