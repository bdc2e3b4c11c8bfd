"""Generate the quickstart task: reverse a short word, as chat rows, plus a character-level tokenizer.

    python scripts/make_quickstart_data.py          # rewrites data/quickstart/ (deterministic)

A tiny Llama learns this in a minute on two CPU cores, and a person can see at a glance whether it did:
    user: "reverse: kitchen"   ->   assistant: "nehctik"
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE

OUT = Path(__file__).resolve().parents[1] / "data" / "quickstart"
SPECIAL = ["<pad>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|end|>"]
CHARS = list(string.ascii_lowercase + string.digits + " :.,!?-'\n")
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def make_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
        rows.append({"messages": [{"role": "user", "content": f"reverse: {word}"},
                                  {"role": "assistant", "content": word[::-1]}]})
    return rows


def make_tokenizer() -> Tokenizer:
    """One token per character: BPE with no merges splits text into single characters."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<pad>"))
    tokenizer.add_special_tokens(SPECIAL)
    tokenizer.decoder = decoders.Fuse()
    return tokenizer


def main() -> None:
    rng = random.Random(0)
    (OUT / "tokenizer").mkdir(parents=True, exist_ok=True)
    for name, n in [("train.jsonl", 4000), ("eval.jsonl", 200)]:
        with open(OUT / name, "w") as f:
            for row in make_rows(n, rng):
                f.write(json.dumps(row) + "\n")
    make_tokenizer().save(str(OUT / "tokenizer" / "tokenizer.json"))
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "chat_template": TEMPLATE,
              "model_max_length": 1024, "add_bos_token": False}
    (OUT / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
