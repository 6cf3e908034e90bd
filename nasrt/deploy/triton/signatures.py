"""Inputs and outputs of every model in the repository, and how the ensemble wires them.

Names and data types follow tensorrtllm_backend's ``inflight_batcher_llm`` (TensorRT-LLM 1.2: ``min_tokens`` and
``seed``, no ``min_length`` / ``random_seed``). Both ``tensorrt_llm`` variants (the C++ ``tensorrtllm`` backend and
nasrt's CPU reference model) use :data:`LLM_INPUTS` / :data:`LLM_OUTPUTS`, so they are interchangeable.
nasrt additions: the optional ``apply_chat_template`` ensemble input (``APPLY_CHAT_TEMPLATE`` in preprocessing).
"""

from __future__ import annotations

from nasrt.deploy.triton.pbtxt import Step, TensorSig


def _scalar(name: str, dtype: str, optional: bool = True) -> TensorSig:
    """A per-request scalar as the C++ backend declares it: ``dims [1]`` reshaped to ``[]``."""
    return TensorSig(name, dtype, (1,), optional=optional, reshape=())


PREPROCESSING_INPUTS = (
    TensorSig("QUERY", "TYPE_STRING", (1,)),
    TensorSig("REQUEST_OUTPUT_LEN", "TYPE_INT32", (1,)),
    TensorSig("BAD_WORDS_DICT", "TYPE_STRING", (-1,), optional=True),
    TensorSig("STOP_WORDS_DICT", "TYPE_STRING", (-1,), optional=True),
    TensorSig("END_ID", "TYPE_INT32", (1,), optional=True),
    TensorSig("PAD_ID", "TYPE_INT32", (1,), optional=True),
    TensorSig("APPLY_CHAT_TEMPLATE", "TYPE_BOOL", (1,), optional=True),
)
PREPROCESSING_OUTPUTS = (
    TensorSig("INPUT_ID", "TYPE_INT32", (-1,)),
    TensorSig("REQUEST_INPUT_LEN", "TYPE_INT32", (1,)),
    TensorSig("BAD_WORDS_IDS", "TYPE_INT32", (2, -1)),
    TensorSig("STOP_WORDS_IDS", "TYPE_INT32", (2, -1)),
    TensorSig("OUT_END_ID", "TYPE_INT32", (1,)),
    TensorSig("OUT_PAD_ID", "TYPE_INT32", (1,)),
)

LLM_INPUTS = (
    TensorSig("input_ids", "TYPE_INT32", (-1,), optional=True, ragged=True),
    _scalar("input_lengths", "TYPE_INT32", optional=False),
    _scalar("request_output_len", "TYPE_INT32", optional=False),
    _scalar("end_id", "TYPE_INT32"),
    _scalar("pad_id", "TYPE_INT32"),
    _scalar("streaming", "TYPE_BOOL"),
    TensorSig("stop_words_list", "TYPE_INT32", (2, -1), optional=True, ragged=True),
    TensorSig("bad_words_list", "TYPE_INT32", (2, -1), optional=True, ragged=True),
    _scalar("beam_width", "TYPE_INT32"),
    _scalar("runtime_top_k", "TYPE_INT32"),
    _scalar("runtime_top_p", "TYPE_FP32"),
    _scalar("temperature", "TYPE_FP32"),
    _scalar("len_penalty", "TYPE_FP32"),
    _scalar("repetition_penalty", "TYPE_FP32"),
    _scalar("presence_penalty", "TYPE_FP32"),
    _scalar("frequency_penalty", "TYPE_FP32"),
    _scalar("min_tokens", "TYPE_INT32"),
    _scalar("seed", "TYPE_UINT64"),
    _scalar("exclude_input_in_output", "TYPE_BOOL"),
)
LLM_OUTPUTS = (
    TensorSig("output_ids", "TYPE_INT32", (-1, -1)),
    TensorSig("sequence_length", "TYPE_INT32", (-1,)),
)

POSTPROCESSING_INPUTS = (
    TensorSig("TOKENS_BATCH", "TYPE_INT32", (-1, -1)),
    TensorSig("SEQUENCE_LENGTH", "TYPE_INT32", (-1,)),
)
POSTPROCESSING_OUTPUTS = (TensorSig("OUTPUT", "TYPE_STRING", (-1,)),)

ENSEMBLE_INPUTS = (
    TensorSig("text_input", "TYPE_STRING", (1,)),
    TensorSig("max_tokens", "TYPE_INT32", (1,)),
    TensorSig("bad_words", "TYPE_STRING", (-1,), optional=True),
    TensorSig("stop_words", "TYPE_STRING", (-1,), optional=True),
    TensorSig("end_id", "TYPE_INT32", (1,), optional=True),
    TensorSig("pad_id", "TYPE_INT32", (1,), optional=True),
    TensorSig("top_k", "TYPE_INT32", (1,), optional=True),
    TensorSig("top_p", "TYPE_FP32", (1,), optional=True),
    TensorSig("temperature", "TYPE_FP32", (1,), optional=True),
    TensorSig("length_penalty", "TYPE_FP32", (1,), optional=True),
    TensorSig("repetition_penalty", "TYPE_FP32", (1,), optional=True),
    TensorSig("presence_penalty", "TYPE_FP32", (1,), optional=True),
    TensorSig("frequency_penalty", "TYPE_FP32", (1,), optional=True),
    TensorSig("min_tokens", "TYPE_INT32", (1,), optional=True),
    TensorSig("seed", "TYPE_UINT64", (1,), optional=True),
    TensorSig("beam_width", "TYPE_INT32", (1,), optional=True),
    TensorSig("stream", "TYPE_BOOL", (1,), optional=True),
    TensorSig("exclude_input_in_output", "TYPE_BOOL", (1,), optional=True),
    TensorSig("apply_chat_template", "TYPE_BOOL", (1,), optional=True),
)
ENSEMBLE_OUTPUTS = (TensorSig("text_output", "TYPE_STRING", (-1,)),)

ENSEMBLE_STEPS = (
    Step("preprocessing",
         input_map={"QUERY": "text_input", "REQUEST_OUTPUT_LEN": "max_tokens", "BAD_WORDS_DICT": "bad_words",
                    "STOP_WORDS_DICT": "stop_words", "END_ID": "end_id", "PAD_ID": "pad_id",
                    "APPLY_CHAT_TEMPLATE": "apply_chat_template"},
         output_map={"INPUT_ID": "_INPUT_ID", "REQUEST_INPUT_LEN": "_REQUEST_INPUT_LEN",
                     "BAD_WORDS_IDS": "_BAD_WORDS_IDS", "STOP_WORDS_IDS": "_STOP_WORDS_IDS",
                     "OUT_END_ID": "_PREPROCESSOR_END_ID", "OUT_PAD_ID": "_PREPROCESSOR_PAD_ID"}),
    Step("tensorrt_llm",
         input_map={"input_ids": "_INPUT_ID", "input_lengths": "_REQUEST_INPUT_LEN",
                    "request_output_len": "max_tokens", "end_id": "_PREPROCESSOR_END_ID",
                    "pad_id": "_PREPROCESSOR_PAD_ID", "stop_words_list": "_STOP_WORDS_IDS",
                    "bad_words_list": "_BAD_WORDS_IDS", "runtime_top_k": "top_k", "runtime_top_p": "top_p",
                    "temperature": "temperature", "len_penalty": "length_penalty",
                    "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
                    "frequency_penalty": "frequency_penalty", "min_tokens": "min_tokens", "seed": "seed",
                    "beam_width": "beam_width", "streaming": "stream",
                    "exclude_input_in_output": "exclude_input_in_output"},
         output_map={"output_ids": "_TOKENS_BATCH", "sequence_length": "_SEQUENCE_LENGTH"}),
    Step("postprocessing",
         input_map={"TOKENS_BATCH": "_TOKENS_BATCH", "SEQUENCE_LENGTH": "_SEQUENCE_LENGTH"},
         output_map={"OUTPUT": "text_output"}),
)


# ---- llmapi (PyTorch backend) repository: TensorRT-LLM triton_backend/all_models/llmapi/tensorrt_llm/config.pbtxt --
def _opt(name: str, dtype: str, dims: tuple[int, ...] = (1,)) -> TensorSig:
    return TensorSig(name, dtype, dims, optional=True)


#: Inputs of upstream's llmapi ``tensorrt_llm`` model (names, types, dims as its config.pbtxt declares them).
LLMAPI_INPUTS = (
    TensorSig("text_input", "TYPE_STRING", (-1,)),
    _opt("image_url", "TYPE_STRING", (-1,)),
    _opt("streaming", "TYPE_BOOL"),
    _opt("sampling_param_best_of", "TYPE_INT32"),
    _opt("sampling_param_temperature", "TYPE_FP32"),
    _opt("sampling_param_top_k", "TYPE_INT32"),
    _opt("sampling_param_top_p", "TYPE_FP32"),
    _opt("sampling_param_frequency_penalty", "TYPE_FP32"),
    _opt("sampling_param_presence_penalty", "TYPE_FP32"),
    _opt("sampling_param_max_tokens", "TYPE_INT32"),
    _opt("sampling_param_stop", "TYPE_STRING", (-1,)),
    _opt("sampling_param_seed", "TYPE_UINT64"),
    _opt("sampling_param_exclude_input_from_output", "TYPE_BOOL"),
    _opt("sampling_param_return_perf_metrics", "TYPE_BOOL"),
    _opt("return_finish_reason", "TYPE_BOOL"),
    _opt("return_stop_reason", "TYPE_BOOL"),
    _opt("return_cumulative_logprob", "TYPE_BOOL"),
    _opt("stop", "TYPE_BOOL"),
    _opt("lora_id", "TYPE_UINT64"),
    _opt("lora_name", "TYPE_STRING"),
    _opt("lora_path", "TYPE_STRING"),
    _opt("lora_ckpt_source", "TYPE_STRING"),
)
#: Outputs of upstream's llmapi ``tensorrt_llm`` model (LLM ``RequestOutput`` fields and perf metrics).
LLMAPI_OUTPUTS = (
    TensorSig("text_output", "TYPE_STRING", (-1,)),
    TensorSig("finish_reason", "TYPE_STRING", (-1,)),
    TensorSig("stop_reason", "TYPE_STRING", (-1,)),
    TensorSig("cumulative_logprob", "TYPE_FP32", (-1,)),
    TensorSig("kv_cache_reused_block", "TYPE_INT32", (-1,)),
    TensorSig("kv_cache_missed_block", "TYPE_INT32", (-1,)),
    TensorSig("kv_cache_alloc_new_blocks", "TYPE_INT32", (-1,)),
    TensorSig("kv_cache_alloc_total_blocks", "TYPE_INT32", (-1,)),
    TensorSig("kv_cache_hit_rate", "TYPE_FP32", (-1,)),
    TensorSig("arrival_time_ns", "TYPE_INT64", (1,)),
    TensorSig("first_scheduled_time_ns", "TYPE_INT64", (1,)),
    TensorSig("first_token_time_ns", "TYPE_INT64", (1,)),
    TensorSig("last_token_time_ns", "TYPE_INT64", (1,)),
    TensorSig("acceptance_rate", "TYPE_FP32", (1,)),
    TensorSig("total_accepted_draft_tokens", "TYPE_INT32", (1,)),
    TensorSig("total_draft_tokens", "TYPE_INT32", (1,)),
)
