"""The tokenizer: a `tokenizers.Tokenizer` read from a model folder, plus the special tokens and chat template that
transformers keeps beside it.

    tok = load_tokenizer("models/llama-3.2-1b")     # a folder with tokenizer.json, or the tokenizer.json itself
    tok.encode("Hello")                              # list[int]; no BOS/EOS added (chat templates write their own)
    tok.bos_id, tok.eos_id, tok.pad_id, tok.chat_template

A model folder in HF format keeps the vocabulary and merges in tokenizer.json, and the names of its special tokens
(bos/eos/pad) and its chat template in tokenizer_config.json (older folders: special_tokens_map.json; newer ones:
chat_template.jinja). This file reads all of them, so nothing of transformers is needed at run time.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer

from nanotune.config import relative_note

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be used, with the file and the fix."""


class Tokenizer:
    """A thin wrapper of `tokenizers.Tokenizer` with the special tokens of the model folder."""

    def __init__(self, backend: _HFTokenizer, special: dict[str, str | None], chat_template: str | None, source: str):
        self.backend = backend
        self.source = source  # where it was read from, for messages
        self.chat_template = chat_template  # Jinja source, or None when the folder has none
        self.bos_token = special.get("bos_token")
        self.eos_token = special.get("eos_token")
        self.unk_token = special.get("unk_token")
        self._pad_token_config = special.get("pad_token")  # what a chat template sees, as in transformers
        # No pad token (Llama 3 has none): reuse EOS. Padding slots are never trained, so the id only has to exist.
        self.pad_token = special.get("pad_token") or self.eos_token
        self.bos_id = self.token_id(self.bos_token)
        self.eos_id = self.token_id(self.eos_token)
        self.pad_id = self.token_id(self.pad_token)
        if self.pad_id is None:
            self.pad_id = 0
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        # Strings of every special added token (e.g. <|eot_id|>, <end_of_turn>, <|im_end|>): an end-of-turn marker
        # in a rendered chat is the first of these after the message content.
        self.special_tokens = sorted(
            {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
            | {t for t in (self.bos_token, self.eos_token, self.pad_token, self.unk_token) if t}
        )

    def token_id(self, token: str | None) -> int | None:
        if not token:
            return None
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (e.g. "<|im_start|>") become their ids;
        `add_special_tokens=True` also applies the tokenizer's post-processor (which adds BOS for many models)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str]):
        """`tokenizers.Encoding`s (ids and character offsets) of many texts, without the post-processor."""
        return self.backend.encode_batch(texts, add_special_tokens=False)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def special_tokens_map(self) -> dict[str, str]:
        """The names a chat template sees (bos_token, eos_token, ...), as transformers passes them."""
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
                 "pad_token": self._pad_token_config}
        return {k: v for k, v in names.items() if v is not None}

    def fingerprint(self) -> str:
        """A hash of everything that changes token ids or masks: the cache key uses it."""
        h = hashlib.sha256(self.backend.to_str().encode())
        h.update(json.dumps([self.special_tokens_map(), self.pad_token, self.chat_template]).encode())
        return h.hexdigest()

    def to_state(self) -> tuple:
        """Picklable state, to rebuild the tokenizer in a worker process."""
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
                   "pad_token": self._pad_token_config}
        return self.backend.to_str(), special, self.chat_template, self.source

    @classmethod
    def from_state(cls, state: tuple) -> "Tokenizer":
        text, special, chat_template, source = state
        return cls(_HFTokenizer.from_str(text), special, chat_template, source)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read tokenizer.json (+ tokenizer_config.json, special_tokens_map.json, chat_template.jinja) from a folder,
    or a tokenizer.json file and the config files beside it."""
    if not str(path):
        raise TokenizerError("no tokenizer given: set model.tokenizer (a folder with tokenizer.json) or model.path")
    path = Path(path)
    if not path.exists():
        raise TokenizerError(
            f"the tokenizer folder {path} does not exist{relative_note(path)}; set model.tokenizer or model.path to a "
            "folder with tokenizer.json (download a model with: python scripts/download.py ORG/NAME --out DIR)"
        )
    if path.is_dir():
        folder, file = path, path / "tokenizer.json"
    else:
        folder, file = path.parent, path
    if not file.is_file():
        hint = "; sentencepiece-only models (tokenizer.model) must be converted to tokenizer.json first"
        raise TokenizerError(f"no tokenizer.json at {file}{hint if (folder / 'tokenizer.model').exists() else ''}")
    try:
        backend = _HFTokenizer.from_file(str(file))
    except Exception as e:  # the Rust error text names the problem
        raise TokenizerError(f"{file} is not a valid tokenizer.json: {e}") from None

    config = read_json(folder / "tokenizer_config.json")
    special_map = read_json(folder / "special_tokens_map.json")
    special: dict[str, str | None] = {}
    for name in SPECIAL_TOKEN_NAMES:
        # tokenizer_config.json wins over special_tokens_map.json, as in transformers
        value = config.get(name, special_map.get(name))
        special[name] = token_content(value)

    # Special tokens that are named in the config files but missing from tokenizer.json are added, so that a
    # template writing them gets one id and not a spelling in pieces.
    additional = config.get("additional_special_tokens", special_map.get("additional_special_tokens", []))
    extra = [token_content(t) for t in additional]
    for info in config.get("added_tokens_decoder", {}).values():
        if info.get("special"):
            extra.append(info.get("content"))
    known = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing = [t for t in dict.fromkeys(extra + list(special.values())) if t and t not in known]
    missing = [t for t in missing if backend.token_to_id(t) is None]
    if missing:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

    return Tokenizer(backend, special, read_chat_template(folder, config), str(path))


def token_content(value) -> str | None:
    # a special token is written either as its string or as a serialised AddedToken {"content": ..., ...}
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_chat_template(folder: Path, config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if template is None and (folder / "chat_template.json").is_file():
        template = read_json(folder / "chat_template.json").get("chat_template")
    return template


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
