#!/usr/bin/env python3
"""HF DeciLM (Nemotron-NAS) -> TensorRT-LLM checkpoint. Same flags as TensorRT-LLM's example script."""

import sys

from nasrt.cli import main

if __name__ == "__main__":
    sys.exit(main(command="convert"))
