"""Render Triton ``config.pbtxt`` text (protobuf text format of ``inference.ModelConfig``).

Only the fields nasrt writes are modelled. The text is rendered by hand so that writing a repository needs no
``tritonclient``; the tests parse every file with Triton's own ``ModelConfig`` protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Triton data types nasrt uses, with their numpy dtype names (used by the Python models and the tests).
NUMPY_DTYPES: dict[str, str] = {
    "TYPE_BOOL": "bool",
    "TYPE_INT32": "int32",
    "TYPE_INT64": "int64",
    "TYPE_UINT64": "uint64",
    "TYPE_FP32": "float32",
    "TYPE_STRING": "object",
}


@dataclass(frozen=True)
class TensorSig:
    """One model input or output as declared in ``config.pbtxt``."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    optional: bool = False
    reshape: tuple[int, ...] | None = None
    ragged: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in NUMPY_DTYPES:
            raise ValueError(f"tensor {self.name!r}: unsupported Triton data type {self.dtype!r}")


@dataclass(frozen=True)
class Step:
    """One ensemble step: ``input_map`` model input -> ensemble tensor, ``output_map`` model output -> tensor."""

    model_name: str
    input_map: dict[str, str]
    output_map: dict[str, str]


@dataclass
class ModelConfig:
    """The subset of Triton's ``ModelConfig`` that nasrt writes."""

    name: str
    max_batch_size: int | None  # None: not written (the llmapi model sets it from model.yaml)
    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]
    backend: str | None = None
    platform: str | None = None
    decoupled: bool | None = None
    dynamic_batching: bool = False
    preferred_batch_size: int | None = None
    max_queue_delay_us: int | None = None
    max_queue_size: int | None = None
    instance_count: int | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    steps: tuple[Step, ...] = ()

    def render(self) -> str:
        """The ``config.pbtxt`` text."""
        out = [f"name: {quote(self.name)}"]
        if self.backend:
            out.append(f"backend: {quote(self.backend)}")
        if self.platform:
            out.append(f"platform: {quote(self.platform)}")
        if self.max_batch_size is not None:
            out.append(f"max_batch_size: {int(self.max_batch_size)}")
        if self.decoupled is not None:
            out.append(f"model_transaction_policy {{\n  decoupled: {str(self.decoupled).lower()}\n}}")
        if self.dynamic_batching:
            out.append(self._dynamic_batching())
        out.append(_tensor_list("input", self.inputs))
        out.append(_tensor_list("output", self.outputs))
        if self.instance_count is not None:
            out.append(f"instance_group [\n  {{\n    count: {int(self.instance_count)}\n    kind: KIND_CPU\n  }}\n]")
        for key, value in self.parameters.items():
            out.append(f"parameters {{\n  key: {quote(key)}\n  value: {{\n    string_value: {quote(value)}\n  }}\n}}")
        if self.steps:
            out.append(_ensemble(self.steps))
        return "\n".join(out) + "\n"

    def _dynamic_batching(self) -> str:
        body = []
        if self.preferred_batch_size is not None:
            body.append(f"  preferred_batch_size: [ {int(self.preferred_batch_size)} ]")
        if self.max_queue_delay_us is not None:
            body.append(f"  max_queue_delay_microseconds: {int(self.max_queue_delay_us)}")
        if self.max_queue_size is not None:
            body.append(f"  default_queue_policy {{\n    max_queue_size: {int(self.max_queue_size)}\n  }}")
        return "dynamic_batching {\n" + "\n".join(body) + ("\n" if body else "") + "}"


def quote(text: str) -> str:
    """A protobuf text-format string literal."""
    escaped = (text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
               .replace("\t", "\\t"))
    return f'"{escaped}"'


def _tensor(sig: TensorSig) -> str:
    lines = [f"name: {quote(sig.name)}", f"data_type: {sig.dtype}", f"dims: [ {', '.join(map(str, sig.dims))} ]"]
    if sig.reshape is not None:
        lines.append(f"reshape: {{ shape: [ {', '.join(map(str, sig.reshape))} ] }}")
    if sig.optional:
        lines.append("optional: true")
    if sig.ragged:
        lines.append("allow_ragged_batch: true")
    return "  {\n" + "".join(f"    {line}\n" for line in lines) + "  }"


def _tensor_list(kind: str, sigs: tuple[TensorSig, ...]) -> str:
    return f"{kind} [\n" + ",\n".join(_tensor(s) for s in sigs) + "\n]"


def _ensemble(steps: tuple[Step, ...]) -> str:
    parts = []
    for step in steps:
        lines = [f"      model_name: {quote(step.model_name)}", "      model_version: -1"]
        lines += [f"      input_map {{\n        key: {quote(k)}\n        value: {quote(v)}\n      }}"
                  for k, v in step.input_map.items()]
        lines += [f"      output_map {{\n        key: {quote(k)}\n        value: {quote(v)}\n      }}"
                  for k, v in step.output_map.items()]
        parts.append("    {\n" + "\n".join(lines) + "\n    }")
    return "ensemble_scheduling {\n  step [\n" + ",\n".join(parts) + "\n  ]\n}"
