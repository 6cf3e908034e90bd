"""Start and stop a real Triton server (2.51, bundled in PyPI's ``nvidia-pytriton``) on loopback, on a CPU machine.

Only the Python backend exists in that bundle, so it serves ``nasrt triton --reference`` repositories (and the
tests). Recipe: copy the bundled server without its per-Python stubs, add the stub of the running Python,
point ``LD_LIBRARY_PATH`` at the bundled libraries and this Python's libdir, put this Python's ``bin/`` first on
``PATH`` (the stub imports numpy and nasrt from there), pick free loopback ports, start in a new session,
poll ``/v2/health/ready``; tear down with SIGTERM, then SIGKILL of the process group, and clean ``/dev/shm``.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from pathlib import Path

import nasrt
from nasrt.errors import ConfigError, MissingDependencyError, NasrtError

log = logging.getLogger(__name__)

#: default seconds to wait for ``/v2/health/ready`` (model loads are slow on a busy CPU machine)
DEFAULT_READY_TIMEOUT_S = 600.0
#: seconds between progress reports while waiting
PROGRESS_EVERY_S = 10.0


def bundled_tritonserver() -> tuple[Path, Path]:
    """(``pytriton/tritonserver`` folder, ``nvidia_pytriton.libs`` folder) of the installed nvidia-pytriton."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("a local Triton server needs the PyPI package nvidia-pytriton==0.7.0 "
                                     "(it bundles tritonserver 2.51): pip install nvidia-pytriton==0.7.0")
    pkg = Path(list(spec.submodule_search_locations)[0])
    server, libs = pkg / "tritonserver", pkg.parent / "nvidia_pytriton.libs"
    if not (server / "bin" / "tritonserver").is_file():
        raise MissingDependencyError(f"{server}/bin/tritonserver not found: reinstall nvidia-pytriton==0.7.0")
    return server, libs


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (Triton cannot bind port 0 itself)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def check_ports(ports: dict[str, int | None]) -> None:
    """Every given port (``flag -> port``; None = pick a free one) is a TCP port in 1-65535, all distinct."""
    seen: dict[int, str] = {}
    for flag, port in ports.items():
        if port is None:
            continue
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ConfigError(f"{flag} {port!r} must be a TCP port in 1-65535")
        if port in seen:
            raise ConfigError(f"{flag} {port} is also {seen[port]}: each server port must differ")
        seen[port] = flag


class LocalTritonServer:
    """A tritonserver process on 127.0.0.1 serving ``repository``; use as a context manager."""

    def __init__(self, repository: str | Path, http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, ready_timeout: float = DEFAULT_READY_TIMEOUT_S,
                 log_file: str | Path | None = None):
        self.repository = Path(repository).resolve()
        check_ports({"--http_port": http_port, "--grpc_port": grpc_port, "--metrics_port": metrics_port})
        if isinstance(ready_timeout, bool) or not isinstance(ready_timeout, (int, float)) \
                or not math.isfinite(ready_timeout) or ready_timeout <= 0:
            raise ConfigError(f"--serve_timeout {ready_timeout!r} must be a number of seconds > 0")
        ports = free_ports(3)
        self.http_port = http_port or ports[0]
        self.grpc_port = grpc_port or ports[1]
        self.metrics_port = metrics_port or ports[2]
        self.ready_timeout = ready_timeout
        self._log_file = Path(log_file) if log_file else None
        self._workdir: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._shm_prefix = f"nasrt{os.getpid()}x{uuid.uuid4().hex[:8]}_"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        if self._log_file is not None:
            return self._log_file
        if self._workdir is None:
            raise NasrtError("the server was never started")
        return self._workdir / "tritonserver.log"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, NasrtError):
            return "(no log)"

    def _prepare(self) -> Path:
        server, _libs = bundled_tritonserver()
        work = Path(tempfile.mkdtemp(prefix="nasrt-tritonserver-"))
        copy = work / "tritonserver"
        shutil.copytree(server, copy, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            shutil.rmtree(work, ignore_errors=True)
            raise MissingDependencyError(f"nvidia-pytriton has no Python-backend stub for Python {version} ({stub})")
        shutil.copy2(stub, copy / "backends" / "python" / stub.name)
        self._workdir = work
        return copy

    def _env(self) -> dict[str, str]:
        _server, libs = bundled_tritonserver()
        env = dict(os.environ)
        lib_paths = [str(libs), sysconfig.get_config_var("LIBDIR") or ""]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [*lib_paths, env.get("LD_LIBRARY_PATH", "")] if p)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        project = str(Path(nasrt.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in [project, env.get("PYTHONPATH", "")] if p)
        return env

    def command(self, server_dir: Path) -> list[str]:
        return [str(server_dir / "bin" / "tritonserver"), f"--model-repository={self.repository}",
                f"--backend-directory={server_dir / 'backends'}", f"--cache-directory={server_dir / 'caches'}",
                "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
                "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
                "--exit-timeout-secs=5", f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}"]

    def start(self) -> LocalTritonServer:
        """Start the server and wait until ``/v2/health/ready`` (raises with the log tail on failure)."""

        if not self.repository.is_dir():
            raise NasrtError(f"model repository {self.repository} does not exist")
        server_dir = self._prepare()
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "wb") as logf:
                self._proc = subprocess.Popen(self.command(server_dir), stdout=logf, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, env=self._env(), start_new_session=True)
            return self._wait_ready()
        except BaseException:  # Ctrl-C / SIGTERM while waiting: no server process or copy is left behind
            self.stop()
            raise

    def _wait_ready(self) -> LocalTritonServer:
        import requests

        log.info("tritonserver pid %d on %s, log %s; waiting up to %.0f s for it to be ready", self._proc.pid,
                 self.url, self.log_path, self.ready_timeout)
        started = time.monotonic()
        deadline = started + self.ready_timeout
        next_report = started + PROGRESS_EVERY_S
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                tail = self.log_tail()
                self.stop()
                raise NasrtError(f"tritonserver exited with code {code} before it was ready:\n{tail}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    log.info("tritonserver ready after %.1f s", time.monotonic() - started)
                    return self
            if time.monotonic() >= next_report:
                next_report += PROGRESS_EVERY_S
                log.info("tritonserver not ready yet after %.0f s of %.0f (%s); last log line: %s",
                         time.monotonic() - started, self.ready_timeout, self.models_state(),
                         self.log_tail(1).strip() or "(none)")
            time.sleep(0.5)
        tail = self.log_tail()
        self.stop()
        raise NasrtError(f"tritonserver not ready after {self.ready_timeout:.0f} s (raise --serve_timeout on a busy "
                         f"machine):\n{tail}")

    def models_state(self) -> str:
        """``name: STATE`` of every model in the repository (Triton's repository index), or why not known."""
        import requests

        try:
            index = requests.post(f"{self.url}/v2/repository/index", timeout=2).json()
        except (requests.RequestException, ValueError):
            return "HTTP endpoint not up yet"
        if not isinstance(index, list):
            return "model states unknown"
        return ", ".join(f"{m.get('name')}: {m.get('state') or 'UNKNOWN'}" for m in index if isinstance(m, dict))

    def stop(self) -> None:
        """SIGTERM, wait up to 15 s, then SIGKILL the whole process group; remove shared memory and the copy."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver pid %d ignored SIGTERM; killing its process group", proc.pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # leftover Python-backend stubs share the group
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for path in glob.glob(f"/dev/shm/{self._shm_prefix}*"):
            with contextlib.suppress(OSError):
                os.remove(path)
        if self._workdir is not None:  # the server copy (and the default log inside it)
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> LocalTritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
