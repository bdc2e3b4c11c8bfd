"""Rebuild data/gsm8k/tokenizer: a small byte-level BPE trained on GSM8K's training questions and answers.

    python scripts/make_gsm8k_tokenizer.py     # writes data/gsm8k/tokenizer/{tokenizer.json,tokenizer_config.json}

The tokenizer is for small models trained from scratch on GSM8K (configs/gsm8k.toml). Training is deterministic
(one thread, fixed input order), so the output is byte-identical on every run. The chat template is ChatML-like:

    <|bos|><|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ["RAYON_NUM_THREADS"] = "1"  # merges are counted in parallel otherwise; one thread keeps ties stable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 4096

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def texts(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            yield row["question"]
            yield row["answer"]


def build(train_file: Path) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(train_file), trainer=trainer)
    return tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", default=str(ROOT / "data/gsm8k/train.jsonl"))
    parser.add_argument("--out", default=str(ROOT / "data/gsm8k/tokenizer"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    build(Path(args.train)).save(str(out / "tokenizer.json"))
    config = {
        "bos_token": "<|bos|>",
        "eos_token": "<|im_end|>",  # generation stops at the end of the assistant turn
        "pad_token": "<|pad|>",
        "unk_token": None,
        "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {out}/tokenizer.json and tokenizer_config.json (vocab {VOCAB_SIZE})")


if __name__ == "__main__":
    main()
