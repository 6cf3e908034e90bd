"""The batching engine (nasrt.runtime.batcher): continuous batching gives each request exactly what it gets alone,
per-request stop conditions and sampling, max_tokens bounded by the context, cancellation within a step."""

from __future__ import annotations

import threading
import time

import pytest

from nasrt.convert import ConvertOptions, convert_checkpoint
from nasrt.errors import ConfigError
from nasrt.runtime import SamplingConfig, generate, load_model
from nasrt.runtime.batcher import CANCELLED, GROW_SLOTS, LENGTH, STOP, BatchingEngine, GenerationRequest

PROMPTS = [[5, 6, 7, 8, 9, 10], [11], [12, 13, 14], [20, 21, 22, 23, 24, 25, 26, 27, 28], [30, 31]]


@pytest.fixture(scope="module")
def model(synthetic, tmp_path_factory):
    ckpt = convert_checkpoint(synthetic, tmp_path_factory.mktemp("batcher") / "ckpt",
                              ConvertOptions(dtype="float32"), progress=False)
    return load_model(ckpt)


def _alone(model, prompt, cfg):
    return generate(model, [prompt], cfg)[0]


def test_concurrent_and_late_joiners_equal_alone(model):
    cfg = SamplingConfig(max_new_tokens=14, end_id=-1)
    started = threading.Event()
    with BatchingEngine(model, max_batch_size=4) as engine:
        first = engine.submit(GenerationRequest(PROMPTS[0], cfg, on_token=lambda _t: started.set()))
        assert started.wait(30)
        others = [engine.submit(GenerationRequest(p, cfg)) for p in PROMPTS[1:]]  # join the running batch
        got = [h.wait(60) for h in [first, *others]]
        assert engine.max_rows_seen == 4  # batched, and never more than max_batch_size rows
    assert got == [_alone(model, p, cfg) for p in PROMPTS]
    assert all(len(g) == 14 for g in got) and first.finish_reason == LENGTH


def test_cache_growth_and_rows_leaving_keep_results_exact(model):
    """Rows that outlive GROW_SLOTS (the cache is re-packed larger) and rows leaving mid-batch change nothing."""
    long = SamplingConfig(max_new_tokens=GROW_SLOTS + 20, end_id=-1)
    short = SamplingConfig(max_new_tokens=5, end_id=-1)
    with BatchingEngine(model, max_batch_size=3) as engine:
        handles = [engine.submit(GenerationRequest(p, c))
                   for p, c in ((PROMPTS[0], long), (PROMPTS[1], short), (PROMPTS[3], long))]
        got = [h.wait(120) for h in handles]
    assert got == [_alone(model, PROMPTS[0], long), _alone(model, PROMPTS[1], short), _alone(model, PROMPTS[3], long)]


def test_per_request_stops_and_sampling(model):
    greedy = SamplingConfig(max_new_tokens=12, end_id=-1)
    full = _alone(model, PROMPTS[0], greedy)
    configs = [SamplingConfig(max_new_tokens=12, end_id=full[4]),  # end id
               SamplingConfig(max_new_tokens=12, end_id=-1, stop_words=[full[6:8]]),  # token stop word
               SamplingConfig(max_new_tokens=10, top_k=0, temperature=1.0, seed=7, end_id=-1),  # seeded sampling
               greedy]
    streamed: dict[int, list[int]] = {i: [] for i in range(len(configs))}
    with BatchingEngine(model, max_batch_size=8) as engine:
        handles = [engine.submit(GenerationRequest(PROMPTS[0], c, on_token=streamed[i].append))
                   for i, c in enumerate(configs)]
        got = [h.wait(60) for h in handles]
    assert got == [_alone(model, PROMPTS[0], c) for c in configs]
    assert got[0] == full[:4] and handles[0].finish_reason == STOP
    assert handles[1].finish_reason == STOP and len(got[1]) <= 6
    assert all(streamed[i] == got[i] for i in streamed)  # stop words are never streamed


def test_max_tokens_bounded_by_context(model):
    with BatchingEngine(model, max_seq_len=16) as engine:
        h = engine.submit(GenerationRequest(list(range(3, 13)), SamplingConfig(max_new_tokens=8190, end_id=-1)))
        assert len(h.wait(60)) == 6 and h.finish_reason == LENGTH and h.max_new_tokens == 6
        with pytest.raises(ConfigError, match="16 tokens"):
            engine.submit(GenerationRequest(list(range(3, 19)), SamplingConfig(max_new_tokens=1)))
        with pytest.raises(ConfigError, match="token ids"):
            engine.submit(GenerationRequest([model.vocab_size], SamplingConfig(max_new_tokens=1)))
        with pytest.raises(ConfigError, match="max_output_len"):
            engine.submit(GenerationRequest([3], SamplingConfig(max_new_tokens=-1)))
        with pytest.raises(ConfigError, match="no tokens"):
            engine.submit(GenerationRequest([], SamplingConfig(max_new_tokens=1)))


def test_cancel_frees_the_row_within_a_step(model):
    cfg_long = SamplingConfig(max_new_tokens=100_000, end_id=-1)
    flag = threading.Event()
    with BatchingEngine(model, max_batch_size=2) as engine:
        a = engine.submit(GenerationRequest(PROMPTS[0], cfg_long))
        b = engine.submit(GenerationRequest(PROMPTS[1], cfg_long, is_cancelled=flag.is_set))
        while len(a.tokens) < 3 or len(b.tokens) < 3:
            time.sleep(0.01)
        a.cancel()
        flag.set()
        a.wait(5), b.wait(5)
        assert a.finish_reason == b.finish_reason == CANCELLED and len(a.tokens) < 1000
        short = SamplingConfig(max_new_tokens=3, end_id=-1)
        t0 = time.monotonic()
        assert engine.generate(GenerationRequest(PROMPTS[2], short), timeout=30) == _alone(model, PROMPTS[2], short)
        assert time.monotonic() - t0 < 10
        assert engine.active == 0


def test_failing_callback_cancels_only_its_request(model):
    def boom(_t):
        raise BrokenPipeError("client went away")

    cfg = SamplingConfig(max_new_tokens=6, end_id=-1)
    with BatchingEngine(model, max_batch_size=4) as engine:
        bad = engine.submit(GenerationRequest(PROMPTS[0], cfg, on_token=boom))
        good = engine.submit(GenerationRequest(PROMPTS[1], cfg))
        assert good.wait(30) == _alone(model, PROMPTS[1], cfg)
        bad.wait(30)
        assert bad.finish_reason == CANCELLED


def test_close_fails_waiting_requests(model):
    engine = BatchingEngine(model).start()
    h = engine.submit(GenerationRequest(PROMPTS[0], SamplingConfig(max_new_tokens=100_000, end_id=-1)))
    engine.close()
    with pytest.raises(Exception, match="shut down"):
        h.wait(5)
    with pytest.raises(Exception, match="shut down"):
        engine.submit(GenerationRequest(PROMPTS[0], SamplingConfig(max_new_tokens=1)))
    with pytest.raises(ConfigError, match="max_batch_size"):
        BatchingEngine(model, max_batch_size=0)


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(model, monkeypatch):
    real = model.prefill
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "prefill", flaky)
    cfg = SamplingConfig(max_new_tokens=4, end_id=-1)
    with BatchingEngine(model) as engine:
        with pytest.raises(RuntimeError, match="simulated"):
            engine.generate(GenerationRequest(PROMPTS[0], cfg), timeout=30)
        assert engine.generate(GenerationRequest(PROMPTS[0], cfg), timeout=30) == _alone(model, PROMPTS[0], cfg)
