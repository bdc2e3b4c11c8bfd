"""Generate a reply from a model folder (e.g. a run's `final/`), to see what it learned.

    python scripts/generate.py outputs/quickstart/final "reverse: kitchen"
    python scripts/generate.py outputs/quickstart/final --file data/quickstart/eval.jsonl --num 10

The prompt is rendered as a user turn with the folder's chat template (when it has one) and decoded greedily
(or sampled with --temperature) until an end-of-turn or end-of-sequence token.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import models
from nanotune.data import load_tokenizer
from nanotune.data.template import ChatTemplate


@torch.no_grad()
def generate(model, prompt_ids: list[int], stop_ids: set[int], max_new_tokens: int = 64, temperature: float = 0.0,
             generator: torch.Generator | None = None) -> list[int]:
    """Decode one token at a time (no KV cache: the whole prefix is recomputed; fine for small models)."""
    ids = torch.tensor([prompt_ids])
    new = []
    for _ in range(max_new_tokens):
        logits = model(ids)[0, -1].float()  # (vocab,)
        if temperature > 0:
            next_id = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator))
        else:
            next_id = int(logits.argmax())
        if next_id in stop_ids:
            break
        new.append(next_id)
        ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
    return new


def prompt_ids(tokenizer, template: ChatTemplate | None, text: str) -> list[int]:
    if template is None:
        return tokenizer.encode(text, add_special_tokens=True)
    return tokenizer.encode(template.render([{"role": "user", "content": text}], add_generation_prompt=True))


def stop_token_ids(tokenizer) -> set[int]:
    """EOS and the end-of-turn tokens templates use."""
    names = [tokenizer.eos_token, "<|end|>", "<|eot_id|>", "<|im_end|>", "<end_of_turn>", "</s>"]
    return {i for i in (tokenizer.token_id(n) for n in names if n) if i is not None}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an HF-format model folder with tokenizer files (e.g. outputs/quickstart/final)")
    parser.add_argument("prompt", nargs="*", help="prompts, each answered as a user turn")
    parser.add_argument("--file", help="a chat JSONL file: answer the first user turn of each row, show the reference")
    parser.add_argument("--num", type=int, default=5, help="rows of --file to answer")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    args = parser.parse_args(argv)

    model = models.from_pretrained(args.model).eval()
    tokenizer = load_tokenizer(args.model)
    template = ChatTemplate(tokenizer.chat_template, tokenizer.special_tokens_map(), tokenizer.special_tokens) \
        if tokenizer.chat_template else None
    stops = stop_token_ids(tokenizer)
    items = [(p, None) for p in args.prompt]
    if args.file:
        for line in Path(args.file).read_text().splitlines()[: args.num]:
            messages = json.loads(line)["messages"]
            items.append((messages[0]["content"], messages[1]["content"] if len(messages) > 1 else None))
    if not items:
        parser.error("give a prompt or --file")
    correct = 0
    for prompt, reference in items:
        reply = tokenizer.decode(generate(model, prompt_ids(tokenizer, template, prompt), stops,
                                          args.max_new_tokens, args.temperature))
        mark = "" if reference is None else ("  ✓" if reply.strip() == reference.strip() else f"  ✗ (expected {reference!r})")
        correct += reference is not None and reply.strip() == reference.strip()
        print(f"{prompt!r} -> {reply!r}{mark}")
    if args.file:
        print(f"{correct}/{sum(r is not None for _, r in items)} exact")


if __name__ == "__main__":
    main()
