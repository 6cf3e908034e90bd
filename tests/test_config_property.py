"""Property test (issue 12 acceptance): generated ``config.json`` values for the fields nasrt reads (any JSON type,
NaN / inf, negative, huge) given to convert, inspect and plan. Every outcome is success (plan: 0 or 1 = does not
fit) or exit 2 with exactly one ``nasrt <command>: error:`` line; never a traceback, never a hang (a per-case
alarm), never memory beyond a bound (peak RSS growth over the whole run)."""

from __future__ import annotations

import contextlib
import json
import math
import resource
import shutil
import signal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nasrt.cli import main
from nasrt.config_schema import HF_ATTENTION_FIELDS, HF_FFN_FIELDS, HF_FIELDS

PER_CASE_SECONDS = 20
RSS_GROWTH_LIMIT_KIB = 768 * 1024

_scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2, 3, 8, 64, 576, 4096, 10**9, 2**63, 2**31 - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e-300, 64.9, 0.5, 4.0, 1e308]),
    st.text(max_size=6), st.sampled_from(["", "64", "false", "llama", "nemotron-nas", "silu", "two"]),
    # plausible values reach deeper: past the type checks into the architecture model and the planners
    st.integers(min_value=1, max_value=16), st.integers(min_value=1, max_value=16),
    st.sampled_from([1.0, 2.0, 1.3125, 2.625, 5.25, 1e-5, 500000.0, 32, 128, 1003, 2048]),
)
json_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)

#: Paths of the fields nasrt reads: every top-level HF field, and the block sub-block fields of layers 0 and 5.
FIELD_PATHS = sorted(HF_FIELDS) + [f"block_configs.{i}.{sub}.{key}" for i in (0, 5)
                                   for sub, fields in (("attention", HF_ATTENTION_FIELDS), ("ffn", HF_FFN_FIELDS))
                                   for key in fields] + ["block_configs.3", "block_configs.4.ffn"]


def _apply(cfg: dict, path: str, value) -> None:
    """Set ``path`` to ``value``; skipped when an earlier change removed the parent (e.g. ``block_configs``)."""
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    node = cfg
    try:
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    except (KeyError, IndexError, TypeError):
        pass


@contextlib.contextmanager
def _deadline(seconds: int):
    def on_alarm(signum, frame):
        raise TimeoutError(f"case ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def workdir(synthetic, tmp_path_factory):
    d = tmp_path_factory.mktemp("prop")
    shutil.copytree(synthetic, d / "model")
    return d


@pytest.fixture(scope="module")
def rss_budget():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start
    assert grown < RSS_GROWTH_LIMIT_KIB, f"peak RSS grew by {grown} KiB over the property run"


def _argv(command: str, model, out) -> list[str]:
    return {"convert": ["convert", "--model_dir", str(model), "--output_dir", str(out)],
            "inspect": ["inspect", str(model)],
            "plan": ["plan", "--model", str(model)]}[command]


@pytest.mark.parametrize("command", ["convert", "inspect", "plan"])
@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(changes=st.lists(st.tuples(st.sampled_from(FIELD_PATHS), json_values), min_size=1, max_size=3))
def test_generated_config_values(command, changes, workdir, rss_budget, capsys):
    model, out = workdir / "model", workdir / "out"
    original = (model / "config.json").read_text()
    cfg = json.loads(original)
    for path, value in changes:
        _apply(cfg, path, value)
    (model / "config.json").write_text(json.dumps(cfg))  # NaN / Infinity written as the bare literals
    try:
        with _deadline(PER_CASE_SECONDS):
            rc = main(_argv(command, model, out))
        captured = capsys.readouterr()
    finally:
        (model / "config.json").write_text(original)
        shutil.rmtree(out, ignore_errors=True)
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err + captured.out
    if rc == 2:
        errors = [ln for ln in lines if ln.startswith(f"nasrt {command}: error: ")]
        assert len(errors) == 1 and len([ln for ln in lines if not ln.startswith("[nasrt]")]) == 1, captured.err
    else:
        assert rc in ((0, 1) if command == "plan" else (0,)), (rc, changes, captured.err)
        assert not [ln for ln in lines if "error" in ln.lower()], captured.err


_dims = st.fixed_dictionaries({
    "hidden_size": st.one_of(st.integers(1, 1 << 18), st.sampled_from([64, 128, 8192])),
    "num_attention_heads": st.one_of(st.integers(1, 1 << 13), st.sampled_from([1, 8, 64])),
    "num_hidden_layers": st.one_of(st.integers(1, 10_000), st.just(8)),
    "vocab_size": st.one_of(st.integers(1, 1 << 23), st.just(1003)),
    "max_position_embeddings": st.one_of(st.integers(1, 1 << 27), st.just(4096)),
})
_block = st.fixed_dictionaries({
    "n_heads_in_group": st.one_of(st.integers(1, 1 << 13), st.sampled_from([1, 2, 8])),
    "ffn_mult": st.one_of(st.floats(1e-6, 100.0), st.sampled_from([1.0, 5.25, 1e-4])),
})


@pytest.mark.parametrize("command", ["convert", "inspect", "plan"])
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(dims=_dims, block=_block, layer=st.integers(0, 7))
def test_generated_dimensions(command, dims, block, layer, workdir, rss_budget, capsys):
    """Well-typed but arbitrary (often nonsense or huge) dimensions: past the type checks into the architecture
    model, the converter's checks and the planner's arithmetic."""
    model, out = workdir / "model", workdir / "out"
    original = (model / "config.json").read_text()
    cfg = json.loads(original)
    cfg.update(dims)
    if cfg["block_configs"][layer]["attention"].get("n_heads_in_group"):
        cfg["block_configs"][layer]["attention"]["n_heads_in_group"] = block["n_heads_in_group"]
    if cfg["block_configs"][layer]["ffn"].get("ffn_mult"):
        cfg["block_configs"][layer]["ffn"]["ffn_mult"] = block["ffn_mult"]
    (model / "config.json").write_text(json.dumps(cfg))
    try:
        with _deadline(PER_CASE_SECONDS):
            rc = main(_argv(command, model, out))
        captured = capsys.readouterr()
    finally:
        (model / "config.json").write_text(original)
        shutil.rmtree(out, ignore_errors=True)
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err + captured.out
    if rc == 2:
        assert len([ln for ln in lines if ln.startswith(f"nasrt {command}: error: ")]) == 1, captured.err
    else:
        assert rc in ((0, 1) if command == "plan" else (0,)), (rc, dims, captured.err)
        if command == "inspect":
            assert "-" not in "".join(ln.split("KV cache per token:")[-1] for ln in captured.out.splitlines()
                                      if "KV cache per token:" in ln)  # never a negative KV size
