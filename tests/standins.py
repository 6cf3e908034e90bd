"""Stand-ins for TensorRT-LLM in tests: an importable ``tensorrt_llm`` package reporting a chosen version (with
dist-info metadata, as pip installs it) and a ``trtllm-build`` executable that records its cwd and argv and lays
out an engine dir like trtllm-build 1.2 (placeholder rank files, its timing cache ``model.cache`` in its cwd)."""

from __future__ import annotations

import stat
import sys
from pathlib import Path


def write_trtllm_package(root: Path, version: str) -> Path:
    """``root/tensorrt_llm`` (``__version__``) + ``root/tensorrt_llm-<version>.dist-info``; put ``root`` on the path."""
    pkg = root / "tensorrt_llm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f'__version__ = "{version}"\nraise ImportError("stand-in: never imported")\n')
    dist = root / f"tensorrt_llm-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tensorrt_llm\nVersion: {version}\n")
    (dist / "RECORD").write_text("")
    return root


TRTLLM_BUILD = '''#!{python}
import json, os, sys
from pathlib import Path

args = sys.argv[1:]
def value(flag):
    return args[args.index(flag) + 1]

out, ckpt = Path(value("--output_dir")), Path(value("--checkpoint_dir"))
Path("model.cache").write_text("timing cache")  # trtllm-build saves it in the working directory
cfg = json.loads((ckpt / "config.json").read_text())
build = {{k: int(value("--" + k)) for k in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens",
                                            "max_beam_width")}}
build["plugin_config"] = {{}}
out.mkdir(parents=True, exist_ok=True)
(out / "config.json").write_text(json.dumps({{"version": "1.2.1", "pretrained_config": cfg, "build_config": build}}))
for r in range(cfg["mapping"]["world_size"]):
    (out / f"rank{{r}}.engine").write_bytes(b"engine")
(out / "standin_record.json").write_text(json.dumps({{"cwd": os.getcwd(), "argv": sys.argv}}))
'''


def write_trtllm_build(bin_dir: Path) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "trtllm-build"
    exe.write_text(TRTLLM_BUILD.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return exe
