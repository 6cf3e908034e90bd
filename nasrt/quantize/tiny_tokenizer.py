"""A small byte-level BPE tokenizer for synthetic checkpoints (which have random weights and a tiny vocab), so
calibration and the CLI can run on them exactly as on a real model."""

from __future__ import annotations

from pathlib import Path

from nasrt.atomic import write_json
from nasrt.textdata import calibration_texts


def write_tiny_tokenizer(out_dir: str | Path, vocab_size: int) -> Path:
    """Train a deterministic byte-level BPE of at most ``vocab_size`` tokens on the offline calibration text and
    save ``tokenizer.json`` + ``tokenizer_config.json`` into ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 260:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer (needs >= 260)")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(calibration_texts(200), trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json",
               {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                "model_max_length": 4096})
    return out
