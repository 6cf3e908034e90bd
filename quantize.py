#!/usr/bin/env python3
"""HF DeciLM (Nemotron-NAS) -> FP8 checkpoint via NVIDIA ModelOpt. Same flags as TensorRT-LLM's quantize.py."""

import sys

from nasrt.cli import main

if __name__ == "__main__":
    sys.exit(main(command="quantize"))
