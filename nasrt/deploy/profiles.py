"""Engine build profiles (``build/*.json``) and plugin presets (``plugins/*.json``), checked against trtllm-build 1.2.

A profile names the target GPU, the quantization the checkpoint must carry, the parallel layout, the engine limits
(``max_seq_len`` always explicit: trtllm-build would deduce 131072 for these models) and a plugin preset. Every
profile/preset field other than the few nasrt-only ones is a trtllm-build flag of the same name, and its value is
checked against :data:`TRTLLM_BUILD_FLAGS` (shared/reference/trtllm-checkpoint-format.md section 7; plugin choices as
in TensorRT-LLM 1.2's ``PluginConfig``). A user adds a profile or a preset by adding a file.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nasrt.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
PROFILE_DIR = REPO_ROOT / "build"
PLUGIN_DIR = REPO_ROOT / "plugins"


@dataclass(frozen=True)
class Flag:
    """One trtllm-build 1.2 flag: ``int`` (>= minimum), ``choice`` (one of ``choices``), ``path`` or ``switch``
    (a store-true flag: a profile value ``true`` emits the bare flag, ``false`` omits it)."""

    kind: str
    choices: tuple[str, ...] = ()
    minimum: int = 1
    default: str = ""


_ONOFF = ("enable", "disable")
_DTYPES = ("float16", "bfloat16", "float32")

#: trtllm-build 1.2 flags nasrt may emit, with the values trtllm-build accepts (reference doc section 7).
TRTLLM_BUILD_FLAGS: dict[str, Flag] = {
    "checkpoint_dir": Flag("path"),
    "output_dir": Flag("path"),
    "max_batch_size": Flag("int", default="2048"),
    "max_input_len": Flag("int", default="1024"),
    "max_seq_len": Flag("int", default="deduced: 131072 for these models"),
    "max_num_tokens": Flag("int", default="8192"),
    "opt_num_tokens": Flag("int"),
    "max_beam_width": Flag("int", default="1"),
    "kv_cache_type": Flag("choice", ("continuous", "paged", "disabled"), default="paged"),
    "gemm_plugin": Flag("choice", ("auto", *_DTYPES, "fp8", "disable"), default="disable"),
    "gpt_attention_plugin": Flag("choice", ("auto", *_DTYPES, "disable"), default="auto"),
    "remove_input_padding": Flag("choice", _ONOFF, default="enable"),
    "context_fmha": Flag("choice", _ONOFF, default="enable"),
    "use_paged_context_fmha": Flag("choice", _ONOFF, default="enable"),
    "use_fp8_context_fmha": Flag("choice", _ONOFF, default="enable"),
    "use_fused_mlp": Flag("choice", _ONOFF, default="enable"),
    "reduce_fusion": Flag("choice", _ONOFF, default="disable"),
    "multiple_profiles": Flag("choice", _ONOFF, default="disable"),
    "tokens_per_block": Flag("int", default="32"),
    "logits_dtype": Flag("choice", ("float16", "float32")),
    "workers": Flag("int", default="1"),
    "weight_streaming": Flag("switch"),
    "strip_plan": Flag("switch"),
    "fast_build": Flag("switch"),
    "gather_context_logits": Flag("switch"),
    "gather_generation_logits": Flag("switch"),
    "gather_all_token_logits": Flag("switch"),
}

#: Flags a plugin preset may set (the rest belong to the profile).
PLUGIN_FLAGS = ("gemm_plugin", "gpt_attention_plugin", "remove_input_padding", "context_fmha",
                "use_paged_context_fmha", "use_fp8_context_fmha", "use_fused_mlp", "reduce_fusion",
                "multiple_profiles", "tokens_per_block")
#: Profile fields that are not trtllm-build flags.
PROFILE_META = ("description", "gpu", "quantization", "tp_size", "pp_size", "plugins",
                "kv_cache_free_gpu_memory_fraction")
PROFILE_REQUIRED = ("gpu", "quantization", "tp_size", "pp_size", "max_batch_size", "max_input_len", "max_seq_len",
                    "max_num_tokens", "kv_cache_type", "plugins")
#: Flags nasrt sets itself (never from a file).
_RESERVED = ("checkpoint_dir", "output_dir")
_QUANT_KEYS = {"quant_algo": (None, "FP8"), "kv_cache_quant_algo": (None, "FP8")}


@dataclass(frozen=True)
class Profile:
    """A validated build profile with its plugin preset resolved."""

    name: str
    path: Path
    gpu: str
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    tp_size: int
    pp_size: int
    build_flags: dict[str, Any]  # profile's own trtllm-build flags, file order
    plugin_preset: str
    plugin_path: Path
    plugin_flags: dict[str, Any]
    kv_cache_free_gpu_memory_fraction: float = 0.9
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def max_batch_size(self) -> int:
        return int(self.build_flags["max_batch_size"])

    @property
    def max_seq_len(self) -> int:
        return int(self.build_flags["max_seq_len"])

    @property
    def max_input_len(self) -> int:
        return int(self.build_flags["max_input_len"])

    @property
    def max_num_tokens(self) -> int:
        return int(self.build_flags["max_num_tokens"])

    @property
    def tokens_per_block(self) -> int:
        return int(self.plugin_flags.get("tokens_per_block", self.build_flags.get("tokens_per_block", 32)))

    @property
    def flags(self) -> dict[str, Any]:
        """Every trtllm-build flag of this profile (profile first, then preset)."""
        return {**self.build_flags, **self.plugin_flags}

    def record(self) -> dict[str, Any]:
        """What an engine dir keeps about the profile that built it."""
        return {"name": self.name, "path": str(self.path), "profile": self.raw,
                "plugins": {"name": self.plugin_preset, "path": str(self.plugin_path), "flags": self.plugin_flags}}


def _read(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} file not found") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} must be a JSON object")
    return data


def check_flag(path: Path, key: str, value: Any) -> None:
    """Raise :class:`ConfigError` naming ``path`` and ``key`` unless trtllm-build 1.2 accepts ``--key value``."""
    flag = TRTLLM_BUILD_FLAGS.get(key)
    if flag is None or key in _RESERVED:
        close = difflib.get_close_matches(key, [k for k in TRTLLM_BUILD_FLAGS if k not in _RESERVED], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{path}: field {key!r} is not a trtllm-build 1.2 flag that nasrt passes{hint}")
    if flag.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or value < flag.minimum:
            raise ConfigError(f"{path}: field {key!r} = {value!r} must be an integer >= {flag.minimum}")
    elif flag.kind == "choice":
        if value not in flag.choices:
            raise ConfigError(f"{path}: field {key!r} = {value!r} is not accepted by trtllm-build 1.2 "
                              f"(allowed: {', '.join(flag.choices)})")
    elif flag.kind == "switch" and not isinstance(value, bool):
        raise ConfigError(f"{path}: field {key!r} = {value!r} must be true or false (a switch flag)")


def load_plugin_preset(name_or_path: str | Path, search: tuple[Path, ...] = (PLUGIN_DIR,)) -> tuple[Path, dict]:
    """Load ``plugins/<name>.json`` (or a path) and validate every field as a trtllm-build plugin flag."""
    path = _resolve(name_or_path, search, "plugin preset")
    data = _read(path, "plugin preset")
    flags = {}
    for key, value in data.items():
        if key == "description":
            continue
        if key not in PLUGIN_FLAGS:
            close = difflib.get_close_matches(key, PLUGIN_FLAGS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{path}: field {key!r} is not a plugin flag of trtllm-build 1.2{hint}")
        check_flag(path, key, value)
        flags[key] = value
    return path, flags


def _resolve(name_or_path: str | Path, search: tuple[Path, ...], what: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".json" or p.is_file() or len(p.parts) > 1:
        return p
    for d in search:
        cand = d / f"{p.name}.json"
        if cand.is_file():
            return cand
    known = sorted({f.stem for d in search if d.is_dir() for f in d.glob("*.json")})
    raise ConfigError(f"{what} {str(name_or_path)!r} not found in {', '.join(map(str, search))} "
                      f"(known: {', '.join(known) or 'none'}); pass a name or a .json path")


def list_profiles(directory: Path = PROFILE_DIR) -> list[str]:
    return sorted(f.stem for f in directory.glob("*.json"))


def load_profile(name_or_path: str | Path) -> Profile:
    """Load and validate ``build/<name>.json`` (or a path); errors name the file and the field."""
    from nasrt.deploy.plan import GPUS  # the planner owns the GPU table

    path = _resolve(name_or_path, (PROFILE_DIR,), "build profile")
    data = _read(path, "build profile")
    missing = [k for k in PROFILE_REQUIRED if k not in data]
    if missing:
        raise ConfigError(f"{path}: missing required field(s) {missing} (max_seq_len must always be explicit)")
    if data["gpu"] not in GPUS:
        raise ConfigError(f"{path}: field 'gpu' = {data['gpu']!r} is not a known GPU ({', '.join(GPUS)})")
    quant = data["quantization"]
    if not isinstance(quant, dict) or set(quant) - set(_QUANT_KEYS):
        raise ConfigError(f"{path}: field 'quantization' must be an object with keys {sorted(_QUANT_KEYS)}")
    for key, allowed in _QUANT_KEYS.items():
        if quant.get(key) not in allowed:
            raise ConfigError(f"{path}: field 'quantization.{key}' = {quant.get(key)!r} (allowed: null, 'FP8')")
    for key in ("tp_size", "pp_size"):
        v = data[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{path}: field {key!r} = {v!r} must be an integer >= 1")
    frac = data.get("kv_cache_free_gpu_memory_fraction", 0.9)
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1:
        raise ConfigError(f"{path}: field 'kv_cache_free_gpu_memory_fraction' = {frac!r} must be in (0, 1]")
    build_flags = {}
    for key, value in data.items():
        if key in PROFILE_META:
            continue
        check_flag(path, key, value)
        build_flags[key] = value
    if build_flags["kv_cache_type"] != "paged":
        raise ConfigError(f"{path}: field 'kv_cache_type' = {build_flags['kv_cache_type']!r}: nasrt profiles use "
                          "'paged' (in-flight batching and per-kv-count KV pools need it)")
    if build_flags["max_input_len"] > build_flags["max_seq_len"]:
        raise ConfigError(f"{path}: field 'max_input_len' = {build_flags['max_input_len']} exceeds "
                          f"max_seq_len = {build_flags['max_seq_len']}")
    gpu = GPUS[data["gpu"]]
    if "FP8" in (quant.get("quant_algo"), quant.get("kv_cache_quant_algo")) and gpu.sm < (8, 9):
        raise ConfigError(f"{path}: FP8 needs compute capability >= 8.9, but field 'gpu' = {gpu.name!r} "
                          f"is sm {gpu.sm[0]}.{gpu.sm[1]}")
    search = (path.parent.parent / "plugins", PLUGIN_DIR)
    preset = data["plugins"]
    if not isinstance(preset, str):
        raise ConfigError(f"{path}: field 'plugins' = {preset!r} must name a preset in plugins/")
    try:
        plugin_path, plugin_flags = load_plugin_preset(preset, search)
    except ConfigError as exc:
        raise ConfigError(f"{path}: field 'plugins': {exc}") from None
    overlap = sorted(set(plugin_flags) & set(build_flags))
    if overlap:
        raise ConfigError(f"{path}: field(s) {overlap} are also set by plugin preset {plugin_path}; set them once")
    if plugin_flags.get("use_fp8_context_fmha") == "enable" and quant.get("quant_algo") != "FP8":
        raise ConfigError(f"{path}: plugin preset {plugin_path.name} enables use_fp8_context_fmha but the profile's "
                          "quantization.quant_algo is not FP8")
    check_flag_combination(path, {**build_flags, **plugin_flags}, quant)
    return Profile(name=path.stem, path=path, gpu=data["gpu"], quant_algo=quant.get("quant_algo"),
                   kv_cache_quant_algo=quant.get("kv_cache_quant_algo"), tp_size=data["tp_size"],
                   pp_size=data["pp_size"], build_flags=build_flags, plugin_preset=plugin_path.stem,
                   plugin_path=plugin_path, plugin_flags=plugin_flags, kv_cache_free_gpu_memory_fraction=float(frac),
                   description=str(data.get("description", "")), raw=data)


#: Flags trtllm-build 1.2 refuses, ignores or overrides for DeciLM: flag -> (refused value, why).
REFUSED_FLAGS: dict[str, tuple[Any, str]] = {
    "gather_generation_logits": (True, "deprecated in trtllm-build 1.2 (generation logits are a runtime option); "
                                       "use gather_context_logits or request logits at run time"),
    "reduce_fusion": ("enable", "trtllm-build 1.2 forces it off unless the architecture is Llama/Gemma2/Medusa "
                                "with tp > 1, so it is always off for DeciLM"),
}


def check_flag_combination(path: Path, flags: dict[str, Any], quant: dict[str, Any]) -> None:
    """Combinations trtllm-build 1.2 refuses or silently ignores (defaults as in :data:`TRTLLM_BUILD_FLAGS`)."""
    for key, (value, why) in REFUSED_FLAGS.items():
        if flags.get(key) == value:
            raise ConfigError(f"{path}: field {key!r} = {value!r}: {why}")
    if flags.get("multiple_profiles") == "enable" and "opt_num_tokens" in flags:
        raise ConfigError(f"{path}: field 'opt_num_tokens' is ignored by trtllm-build 1.2 when multiple_profiles is "
                          "enabled; drop one of them")
    fp8_fmha = flags.get("use_fp8_context_fmha", TRTLLM_BUILD_FLAGS["use_fp8_context_fmha"].default) == "enable"
    paged = flags.get("use_paged_context_fmha", TRTLLM_BUILD_FLAGS["use_paged_context_fmha"].default) == "enable"
    if fp8_fmha and paged and quant.get("quant_algo") == "FP8" and quant.get("kv_cache_quant_algo") != "FP8":
        raise ConfigError(f"{path}: use_fp8_context_fmha with use_paged_context_fmha needs an FP8 KV cache, but "
                          "quantization.kv_cache_quant_algo is not FP8; set use_fp8_context_fmha to disable or quantize "
                          "the KV cache (nasrt quantize --kv_cache_dtype fp8)")


def trtllm_build_argv(profile: Profile, checkpoint_dir: str | Path, output_dir: str | Path,
                      executable: str = "trtllm-build") -> list[str]:
    """The exact trtllm-build command line for ``profile`` (every value re-checked against the flag table)."""
    argv = [executable, "--checkpoint_dir", str(checkpoint_dir), "--output_dir", str(output_dir)]
    for key, value in profile.flags.items():
        check_flag(profile.path, key, value)
        if TRTLLM_BUILD_FLAGS[key].kind == "switch":
            if value:
                argv.append(f"--{key}")
            continue
        argv += [f"--{key}", str(value)]
    return argv
