"""The ``tritonserver`` launch command for a repository: one process (MPI rank) per engine rank.

World size 1: a plain ``tritonserver``. World size W = tp * pp > 1: ``mpirun --allow-run-as-root`` with W
``-n 1 tritonserver ...`` segments separated by ``:``, as tensorrtllm_backend's ``launch_triton_server.py`` does:
every rank gets ``--disable-auto-complete-config`` and its own Python-backend shared-memory prefix; ranks > 0
load only ``tensorrt_llm`` (explicit model control), since only rank 0 serves requests.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

DEFAULT_TRITONSERVER = "/opt/tritonserver/bin/tritonserver"
LLM_MODEL = "tensorrt_llm"


def launch_command(repository: str | Path, world_size: int, tritonserver: str = DEFAULT_TRITONSERVER,
                   http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002) -> list[str]:
    """argv that starts Triton on ``repository`` for an engine of ``world_size`` ranks."""
    if world_size < 1:
        raise ValueError(f"world size must be at least 1, got {world_size}")
    ports = [f"--http-port={http_port}", f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}"]
    repo = f"--model-repository={Path(repository)}"
    if world_size == 1:
        return [tritonserver, repo, *ports]
    argv = ["mpirun", "--allow-run-as-root"]
    for rank in range(world_size):
        if rank:
            argv.append(":")
        argv += ["-n", "1", tritonserver, repo, *ports, "--disable-auto-complete-config",
                 f"--backend-config=python,shm-region-prefix-name=prefix{rank}_"]
        if rank:
            argv += ["--model-control-mode=explicit", f"--load-model={LLM_MODEL}"]
    return argv


#: tensorrtllm_backend's launcher inside NVIDIA's Triton TensorRT-LLM container (``tritonserver:<yy.mm>-trtllm-python-py3``).
CONTAINER_LAUNCH_SCRIPT = "/app/scripts/launch_triton_server.py"


def launch_script_path() -> str:
    """The launcher's absolute path: ``$TRITON_TRTLLM_LAUNCH_SCRIPT`` when set (a local checkout of
    ``triton_backend/scripts``), else the container's path."""
    env = os.environ.get("TRITON_TRTLLM_LAUNCH_SCRIPT")
    return str(Path(env).resolve()) if env else CONTAINER_LAUNCH_SCRIPT


def launch_script_command(repository: str | Path, world_size: int) -> list[str]:
    """The equivalent call of tensorrtllm_backend's own launcher script, by absolute path (it is not in the
    current directory of whoever runs the printed command)."""
    return ["python3", launch_script_path(), f"--world_size={world_size}",
            f"--model_repo={Path(repository).resolve()}"]


def format_command(argv: list[str]) -> str:
    return shlex.join(argv)
