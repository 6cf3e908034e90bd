#!/usr/bin/env python3
"""Generate text from a nasrt checkpoint (PyTorch reference runtime) or a TensorRT-LLM engine; TRT-LLM run.py flags."""

import sys

from nasrt.cli import main

if __name__ == "__main__":
    sys.exit(main(command="run"))
