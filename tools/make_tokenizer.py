#!/usr/bin/env python3
"""Builds kvrouter's built-in tokenizer (crates/kvrouter-frontend/assets/).

A byte-level BPE (GPT-2 style: any UTF-8 text encodes, nothing is unknown)
trained from scratch on this repository's own Markdown and Rust sources, so
the vocabulary and merges are ours (Apache-2.0, like the project) and no model
hub is involved. Special tokens follow the ChatML convention the built-in chat
template uses. Re-run after large documentation changes only if you want a
different vocabulary; the committed file is the source of truth for tests.

    python3 -m venv /tmp/tok && /tmp/tok/bin/pip install tokenizers==0.23.3
    /tmp/tok/bin/python tools/make_tokenizer.py
"""
import json
import pathlib

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "kvrouter-frontend" / "assets"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 4096


def corpus():
    files = sorted(ROOT.glob("**/*.md")) + sorted(ROOT.glob("crates/**/*.rs"))
    for f in files:
        if "target" in f.parts:
            continue
        yield f.read_text(encoding="utf-8", errors="replace")


def main():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    OUT.mkdir(parents=True, exist_ok=True)
    tok.save(str(OUT / "tokenizer.json"))
    template = (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    config = {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 32768,
        "chat_template": template,
    }
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"vocab {tok.get_vocab_size()} -> {OUT}")


if __name__ == "__main__":
    main()
