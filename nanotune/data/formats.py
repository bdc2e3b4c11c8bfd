"""Row formats: one data row -> one text with the character ranges to train -> token ids and a per-token mask.

    text               {"text": ...}                                every token trained
    alpaca             {"instruction", "input", "output"}           the prompt masked, the output (+ EOS) trained
    prompt_completion  {"prompt", "completion"}                     the prompt masked, the completion (+ EOS) trained
    chat               {"messages": [{"role", "content"}, ...]}     rendered with the chat template; by default the
                       ShareGPT {"conversations": [{"from", "value"}]}   assistant contents + end-of-turn tokens trained
                       any row + fields_to_roles {question = "user", answer = "assistant"}

Masks are decided on characters and mapped to tokens by their offsets: a token is trained when its characters
overlap a trained range. `mask[j] = 1` means token j is a *target* (the model is trained to predict it from the
tokens before it); the first token of an example is never a target. Field names are options of each data set.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanotune.data.sources import RowError
from nanotune.data.template import ChatTemplate, TemplateError

FORMATS = ("text", "alpaca", "chat", "prompt_completion")
KNOWN_ROLES = ("system", "user", "assistant", "tool")
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # character ranges whose tokens are trained
    add_bos: bool  # prepend the tokenizer's BOS id (plain formats; chat templates write their own)
    eos_trained: bool | None  # append EOS: None = no EOS, else whether it is trained
    has_trained_turn: bool = True  # chat: some message has a role in roles_to_train (else the row is dropped)


@dataclass
class MaskOptions:
    roles_to_train: tuple = ("assistant",)
    train_on_inputs: bool = False
    train_on_eos: str = "turn"  # turn | last | all | none


class MissingFieldError(RowError):
    """A row without a field its format needs; the caller may add which format the row looks like."""


def require(row: dict, name: str, where: str, option: str):
    if name not in row:
        keys = ", ".join(map(str, row)) or "none"
        raise MissingFieldError(
            f"{where}: row has no field {name!r} (fields present: {keys}); set {option} to the right name"
        )
    return row[name]


# The fields that give each format away, with their default names, most specific first.
FORMAT_FIELDS = (
    ("chat", ("messages",)),
    ("chat", ("conversations",)),
    ("alpaca", ("instruction", "output")),
    ("prompt_completion", ("prompt", "completion")),
    ("text", ("text",)),
)


def guess_format(row: dict) -> tuple[str, tuple] | None:
    """(format, the fields that show it) for a row whose fields have a format's default names, else None."""
    for fmt, fields in FORMAT_FIELDS:
        if all(f in row for f in fields):
            return fmt, fields
    return None


def as_text(value, name: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def render_plain(row: dict, ds, opts: MaskOptions, where: str) -> Rendered:
    """text, alpaca and prompt_completion rows (no chat template)."""
    if ds.format == "text":
        text = as_text(require(row, ds.text_field, where, "text_field"), ds.text_field, where)
        return Rendered(text, [(0, len(text))], add_bos=True, eos_trained=opts.train_on_eos != "none")
    if ds.format == "alpaca":
        name = ds.instruction_field
        instruction = as_text(require(row, name, where, "instruction_field"), name, where)
        inp = as_text(row.get(ds.input_field), ds.input_field, where)
        answer = as_text(require(row, ds.output_field, where, "output_field"), ds.output_field, where)
        form = ALPACA_PROMPT_WITH_INPUT if inp.strip() else ALPACA_PROMPT
        prompt = form.format(instruction=instruction, input=inp)
    else:  # prompt_completion
        prompt = as_text(require(row, ds.prompt_field, where, "prompt_field"), ds.prompt_field, where)
        answer = as_text(require(row, ds.completion_field, where, "completion_field"), ds.completion_field, where)
    text = prompt + answer
    spans = [(0, len(text))] if opts.train_on_inputs else [(len(prompt), len(text))]
    return Rendered(text, spans, add_bos=True, eos_trained=opts.train_on_eos != "none")


def role_map_of(ds) -> dict:
    """ShareGPT speakers (human, gpt) are mapped unless the data set's role_map says otherwise."""
    return {**({} if ds.fields_to_roles else SHAREGPT_ROLES), **ds.role_map}


def chat_messages(row: dict, ds, where: str, known_roles: set, role_map: dict) -> list[dict]:
    """The row's conversation as [{"role", "content"}], with role_map and system_prompt applied."""
    if ds.fields_to_roles:
        messages = [
            {"role": role, "content": as_text(require(row, name, where, "fields_to_roles"), name, where)}
            for name, role in ds.fields_to_roles.items()
        ]
    else:
        name = ds.messages_field or ("messages" if "messages" in row or "conversations" not in row else "conversations")
        turns = require(row, name, where, "messages_field")
        if not isinstance(turns, list):
            raise RowError(f"{where}: field {name!r} must be a list of messages, got {type(turns).__name__}")
        sharegpt = name == "conversations" and not ds.messages_field
        role_key = "from" if sharegpt and ds.role_field == "role" else ds.role_field
        content_key = "value" if sharegpt and ds.content_field == "content" else ds.content_field
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise RowError(f"{where}: message {i} must be an object, got {type(turn).__name__}")
            role = require(turn, role_key, f"{where}: message {i}", "role_field")
            content = as_text(require(turn, content_key, f"{where}: message {i}", "content_field"), content_key, where)
            messages.append({"role": role, "content": content})
    for i, m in enumerate(messages):
        role = role_map.get(m["role"], m["role"])
        if role not in known_roles:
            raise RowError(
                f"{where}: unknown role {m['role']!r} in message {i}; known roles: {', '.join(sorted(known_roles))}; "
                f"map it with role_map = {{{m['role']} = \"assistant\"}} (or another role)"
            )
        m["role"] = role
    if ds.system_prompt and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": ds.system_prompt})
    return messages


# ShareGPT speakers, mapped unless a data set's role_map says otherwise
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def render_chat(messages: list[dict], template: ChatTemplate, opts: MaskOptions, where: str) -> Rendered:
    try:
        text, spans = template.render_with_spans(messages)
    except TemplateError as e:
        raise RowError(f"{where}: {e}") from None
    if opts.train_on_inputs:
        return Rendered(text, [(0, len(text))], add_bos=False, eos_trained=None)
    trained_turns = [s for s in spans if s.role in opts.roles_to_train]
    if not trained_turns:  # e.g. a conversation with no assistant turn: nothing to learn from it
        return Rendered(text, [], add_bos=False, eos_trained=None, has_trained_turn=False)
    ranges = [s.content for s in trained_turns]
    if opts.train_on_eos == "turn":
        ranges += [s.end_of_turn for s in trained_turns if s.end_of_turn]
    elif opts.train_on_eos == "last" and trained_turns and trained_turns[-1].end_of_turn:
        ranges.append(trained_turns[-1].end_of_turn)
    elif opts.train_on_eos == "all":
        ranges += [s.end_of_turn for s in spans if s.end_of_turn]
    return Rendered(text, ranges, add_bos=False, eos_trained=None)


def token_ranges(encoding, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[first, last + 1) token ranges covering the character ranges `spans` of an encoded text.

    A token is in a range when its characters overlap it (so " The" after "[/INST]" is trained when the answer
    starts at "T"). Characters that belong to no token are skipped inward."""
    out = []
    for s, e in spans:
        a = None
        for c in range(s, e):
            a = encoding.char_to_token(c)
            if a is not None:
                break
        if a is None:
            continue
        b = None
        for c in range(e - 1, s - 1, -1):
            b = encoding.char_to_token(c)
            if b is not None:
                break
        out.append((a, b + 1))
    return out
