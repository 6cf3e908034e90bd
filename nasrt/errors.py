"""Exceptions raised for user errors. Every message names the offending file, tensor, layer or flag."""

from __future__ import annotations


class NasrtError(Exception):
    """Base class of every error nasrt reports to a user (the CLI prints it without a traceback)."""


class ConfigError(NasrtError):
    """A config.json (HF or TensorRT-LLM) that nasrt cannot accept."""


class CheckpointError(NasrtError):
    """Missing, truncated or inconsistent weight files or tensors."""


class ShardingError(NasrtError):
    """A tensor/pipeline-parallel layout that this model cannot be split into."""


class OutputExistsError(NasrtError):
    """The output directory exists and ``--overwrite`` was not given."""


class MissingDependencyError(NasrtError):
    """An optional tool (TensorRT-LLM, a GPU, ...) is needed for this step and is not available."""
