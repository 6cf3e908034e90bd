"""``nasrt derive``: a Nemotron-NAS (DeciLM) model from a dense Llama, on a CPU — block library, replace-one KL
scoring, MIP search (the Puzzle method, decilm-architecture §9)."""

from nasrt.derive.pipeline import DeriveOptions, DeriveResult, derive

__all__ = ["DeriveOptions", "DeriveResult", "derive"]
