"""Load the model for ``nasrt serve`` and run the application with uvicorn, in the foreground (the command;
SIGINT / SIGTERM shut it down gracefully) or on a background thread (tests, benchmarks)."""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nasrt.deploy.serve.app import ServedModel, create_app
from nasrt.errors import ConfigError
from nasrt.runtime.batcher import BatchingEngine
from nasrt.runtime.model import load_model
from nasrt.runtime.text import check_vocab, has_tokenizer, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    model_dir: str | None = None
    checkpoint_dir: str | None = None
    tokenizer_dir: str | None = None
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 8
    max_seq_len: int | None = None
    device: str = "cpu"
    dtype: str | None = None
    allow_external: bool = False

    def check(self) -> None:
        if bool(self.model_dir) == bool(self.checkpoint_dir):
            raise ConfigError("give exactly one of --model_dir (HF / unified FP8 checkpoint) and --checkpoint_dir "
                              "(nasrt / TensorRT-LLM checkpoint)")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port!r} must be a TCP port in 1-65535")
        if isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, int) \
                or self.max_batch_size < 1:
            raise ConfigError(f"--max_batch_size {self.max_batch_size!r} must be an integer >= 1")
        if self.max_seq_len is not None and (isinstance(self.max_seq_len, bool) or not isinstance(self.max_seq_len, int)
                                             or self.max_seq_len < 2):
            raise ConfigError(f"--max_seq_len {self.max_seq_len!r} must be an integer >= 2")
        source = Path(self.model_dir or self.checkpoint_dir)
        if not (source / "config.json").is_file():
            flag = "--model_dir" if self.model_dir else "--checkpoint_dir"
            raise ConfigError(f"{flag} {source}: no config.json there")
        tok = Path(self.tokenizer_dir) if self.tokenizer_dir else source
        if not has_tokenizer(tok):
            raise ConfigError(f"{'--tokenizer_dir' if self.tokenizer_dir else 'the model dir'} {tok} has no "
                              "tokenizer files; pass --tokenizer_dir <HF model dir>")

    def check_address(self) -> None:
        """The address can be listened on (checked before the model is loaded, which takes a while)."""
        try:
            with socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((self.host, self.port))
        except OSError as exc:
            raise ConfigError(f"--host {self.host} --port {self.port}: cannot listen there ({exc.strerror or exc})") \
                from None

    @property
    def name(self) -> str:
        return self.served_model_name or Path(self.model_dir or self.checkpoint_dir).resolve().name


def load_served_model(opts: ServeOptions) -> ServedModel:
    """Model, tokenizer and a started :class:`BatchingEngine` for ``opts`` (checked first)."""
    opts.check()
    started = time.monotonic()
    # one loader for both: the reference runtime reads HF dirs (BF16 / ModelOpt unified FP8) and nasrt checkpoints
    model = load_model(opts.model_dir or opts.checkpoint_dir, device=opts.device, dtype=opts.dtype,
                       allow_external=opts.allow_external)
    tokenizer = load_tokenizer(opts.tokenizer_dir or opts.model_dir or opts.checkpoint_dir)
    check_vocab(tokenizer, model.spec)
    engine = BatchingEngine(model, max_batch_size=opts.max_batch_size, max_seq_len=opts.max_seq_len).start()
    log.info("loaded %s in %.1f s: context %d tokens, max_batch_size %d", opts.name, time.monotonic() - started,
             engine.context, opts.max_batch_size)
    return ServedModel(engine, tokenizer, opts.name, int(time.time()))


def _config(served: ServedModel, host: str, port: int):
    import uvicorn

    return uvicorn.Config(create_app(served), host=host, port=port, log_level="warning", access_log=False,
                          timeout_graceful_shutdown=5)


def serve_forever(served: ServedModel, host: str, port: int) -> None:
    """Run until SIGINT / SIGTERM (uvicorn's graceful shutdown), then stop the engine."""
    import uvicorn

    server = uvicorn.Server(_config(served, host, port))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the signal it shut down for; the shutdown is already done
        pass
    except SystemExit:  # uvicorn exits when it cannot bind; reported below
        pass
    finally:
        served.engine.close()
    if not server.started:
        raise ConfigError(f"could not serve on {host}:{port} (in use, or not an address of this machine?)")
    log.info("server on %s:%d stopped", host, port)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    """Poll ``url``/health until it answers 200 (True), ``proc`` exits or ``timeout`` seconds pass (False)."""
    import requests

    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.3)
    return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def background_server(served: ServedModel, host: str = "127.0.0.1", port: int | None = None,
                      timeout: float = 30.0) -> Iterator[str]:
    """Serve ``served`` on a thread; yields the base URL (``http://host:port``); stops server and engine after."""
    import uvicorn

    server = uvicorn.Server(_config(served, host, port or free_port(host)))
    thread = threading.Thread(target=server.run, name="nasrt-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ConfigError(f"the server did not start on {host}:{server.config.port}")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(15)
        served.engine.close()
