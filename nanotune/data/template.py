"""Chat templates: render a conversation exactly as transformers' `apply_chat_template` does, and say where each
message's content and end-of-turn marker lie in the rendered text.

Rendering: a Jinja2 sandbox with the same settings and helpers as transformers (trim_blocks, lstrip_blocks,
loop controls, `raise_exception`, `tojson` without HTML escaping, `strftime_now`), and the same variables
(`messages`, `tools`, `documents`, `add_generation_prompt`, `bos_token`, `eos_token`, ...).

Finding the spans: templates trim content, rename roles ("assistant" -> "model"), insert default system prompts or
fold the system prompt into the first user turn, so the tokens of a turn cannot be found by looking for known ids.
Instead the conversation is rendered a second time with each content replaced by a placeholder that no template
changes (private-use characters, no whitespace). That render is the template's *skeleton*: fixed text with holes.
The real render must be the skeleton with each hole filled by the content, as is or trimmed; walking both texts
side by side gives the exact character span of every message. The end-of-turn marker of a message is the text after
its content up to and including the first special token (<|eot_id|>, <end_of_turn>, <|im_end|>, </s>, ...).
Skeletons depend only on the sequence of roles, so they are cached and most rows cost one render.

Templates come from downloaded repos, so a render is also bounded: the sandbox blocks attribute escapes, and every
loop iteration, call and output piece checks a per-render deadline (`MAX_RENDER_SECONDS`) and the output size. The
checks run inside the template's own code (no signals), so they work in threads and in data worker processes.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """A chat template that raised or whose output cannot be mapped back to the messages."""


@dataclass(frozen=True)
class MessageSpan:
    index: int  # position of the message in the conversation
    role: str
    content: tuple[int, int]  # [start, end) characters of the content in the rendered text
    end_of_turn: tuple[int, int] | None  # [start, end) from the content's end through the end-of-turn token


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers replaces Jinja's tojson, which escapes <, >, & for HTML; templates expect plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    # `{% generation %}...{% endgeneration %}` marks assistant text in some templates; it renders its body unchanged.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


# A real template renders a conversation in well under a millisecond; a second is a loop that will not end.
MAX_RENDER_SECONDS = 1.0
MAX_SEQUENCE_LENGTH = 1_000_000  # the longest string or list that `*` may build in a template
MAX_POWER_BITS = 4096  # the largest integer that `**` may build (a huge power runs in C and cannot be stopped)


class RenderLimitError(TemplateError):
    """A render that ran out of time or output; the message says which limit."""


class RenderBudget:
    """The deadline and the output size left to one render."""

    def __init__(self, seconds: float, max_chars: int):
        self.seconds, self.max_chars = seconds, max_chars
        self.deadline = time.monotonic() + seconds
        self.chars = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise RenderLimitError(f"rendering took longer than {self.seconds:g} s (a loop that does not end?)")

    def add_output(self, num_chars: int) -> None:
        self.chars += num_chars
        if self.chars > self.max_chars:
            raise RenderLimitError(f"the rendered text grew past {self.max_chars:,} characters")
        self.tick()


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, plus a budget checked at every loop iteration, call, `*` and `**`.

    Loops get their checks from `budgeted_loops`, which wraps the iterable of every `{% for %}` in `budgeted`
    before the template is compiled. The budget of the render in progress is per thread."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, **options):
        super().__init__(**options)
        self._local = threading.local()

    @property
    def budget(self) -> RenderBudget | None:
        return getattr(self._local, "budget", None)

    @budget.setter
    def budget(self, value: RenderBudget | None) -> None:
        self._local.budget = value

    def tick(self) -> None:
        if self.budget is not None:
            self.budget.tick()

    def budgeted(self, iterable):
        for item in iterable:
            self.tick()
            yield item

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - the sandbox's own signature
        __self.tick()
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context, operator: str, left, right):
        self.tick()
        if operator == "*":  # "x" * 10**9 allocates before any check could run
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_SEQUENCE_LENGTH:
                    raise RenderLimitError(f"`*` would build a sequence of {len(seq) * n:,} items")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            if right * math.log2(abs(left)) > MAX_POWER_BITS:
                raise RenderLimitError(f"`**` would build an integer of more than {MAX_POWER_BITS} bits")
        return super().call_binop(context, operator, left, right)


def budgeted_loops(tree: jinja2.nodes.Template) -> jinja2.nodes.Template:
    """Wrap the iterable of every for loop: `{% for x in xs %}` runs as `for x in environment.budgeted(xs)`."""
    for loop in tree.find_all(jinja2.nodes.For):
        wrapper = jinja2.nodes.EnvironmentAttribute("budgeted", lineno=loop.lineno)
        loop.iter = jinja2.nodes.Call(wrapper, [loop.iter], [], None, None, lineno=loop.lineno)
    return tree


def compile_template(source: str) -> jinja2.Template:
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(budgeted_loops(env.parse(source)))
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template line {e.lineno}: {e.message}") from None


def output_limit(messages: list[dict]) -> int:
    """The most characters a render may produce: generous for any real template (a few hundred characters of
    markup per message around the contents), far below what a runaway loop writes."""
    content = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
    return 1_000_000 + 4 * content + 10_000 * len(messages)


# Placeholders for the skeleton render: private-use code points, so no real text contains them and no filter
# (trim, capitalize of ASCII, ...) changes them.
_HOLE = "\ue000{}\ue001"
_HOLE_RE = re.compile("\ue000(\\d+)\ue001")


class ChatTemplate:
    def __init__(self, source: str, special_tokens_map: dict[str, str], special_tokens: list[str] = (),
                 name: str = "the chat template", max_seconds: float = MAX_RENDER_SECONDS):
        self.source = source
        self.name = name  # where the template came from, for errors (a file, or the tokenizer's folder)
        self.max_seconds = max_seconds
        self.template = compile_template(source)
        self.variables = dict(special_tokens_map)  # bos_token, eos_token, ... as transformers passes them
        # One pattern for all special tokens (Llama 3 has 256): the leftmost match is the end-of-turn token;
        # longest first, so that a token wins over a shorter one that is its prefix.
        tokens = sorted({t for t in special_tokens if t}, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, tokens))) if tokens else None
        self._skeletons: dict = {}
        self._turn_ends: dict = {}  # literal text after a content -> end of the end-of-turn marker in it

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools=None, **kwargs) -> str:
        """The rendered conversation; raises TemplateError with the template's own message, or when the render
        runs past its deadline or output size (see `output_limit`)."""
        env = self.template.environment
        env.budget = RenderBudget(self.max_seconds, output_limit(messages))
        try:
            pieces = []
            for piece in self.template.generate(
                messages=messages,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.variables,
                **kwargs,
            ):
                env.budget.add_output(len(piece))
                pieces.append(piece)
            return "".join(pieces)
        except RenderLimitError as e:
            raise TemplateError(f"{self.name} was stopped: {e}; use another template (data.chat_template)") from None
        except jinja2.exceptions.TemplateError as e:
            raise TemplateError(f"{self.name} raised: {e.message or e}") from None
        except Exception as e:  # templates index into messages; a bad row can make any Python error surface here
            raise TemplateError(f"{self.name} failed: {type(e).__name__}: {e}") from None
        finally:
            env.budget = None

    def render_with_spans(self, messages: list[dict]) -> tuple[str, list[MessageSpan]]:
        """Render and locate every message's content and end-of-turn marker (see the module docstring)."""
        for i, m in enumerate(messages):
            if not isinstance(m.get("content"), str):
                raise TemplateError(f"message {i} has content of type {type(m.get('content')).__name__}; need a string")
        text = self.render(messages)
        pieces = self._skeleton(messages)  # [literal, hole, literal, hole, ..., literal]
        spans = self._align(text, pieces, messages)
        if spans is None:
            spans = self._search(text, messages)
        return text, spans

    def _skeleton(self, messages: list[dict]) -> list:
        if all(len(m) == 2 for m in messages):  # only role and content: the common case, a cheaper key
            key = tuple(m["role"] for m in messages)
        else:
            key = tuple((m["role"], sorted((k, repr(v)) for k, v in m.items() if k != "content")) for m in messages)
            key = repr(key)
        pieces = self._skeletons.get(key)
        if pieces is None:
            holes = [{**m, "content": _HOLE.format(i)} for i, m in enumerate(messages)]
            parts = _HOLE_RE.split(self.render(holes))
            pieces = [int(p) if k % 2 else p for k, p in enumerate(parts)]
            if len(self._skeletons) < 4096:
                self._skeletons[key] = pieces
        return pieces

    def _align(self, text: str, pieces: list, messages: list[dict]) -> list[MessageSpan] | None:
        # Walk the skeleton's literals and holes over the real text; a hole takes the content as is or trimmed
        # (the only changes templates make to content). None when the texts do not line up.
        if not text.startswith(pieces[0]):
            return None
        pos = len(pieces[0])
        spans = []
        for k in range(1, len(pieces), 2):
            i, after = pieces[k], pieces[k + 1]
            content = messages[i]["content"]
            for candidate in (content, content.strip(), content.lstrip(), content.rstrip()):
                end = pos + len(candidate)
                if text.startswith(candidate, pos) and text.startswith(after, end):
                    break
            else:
                return None
            spans.append(MessageSpan(i, messages[i]["role"], (pos, end), self._end_of_turn(after, end)))
            pos = end + len(after)
        return spans if pos == len(text) else None

    def _search(self, text: str, messages: list[dict]) -> list[MessageSpan]:
        # Fallback for templates whose content depends on more than trimming: find each trimmed content in order.
        pos, spans = 0, []
        for i, m in enumerate(messages):
            content = m["content"].strip()
            start = text.find(content, pos)
            if start < 0:
                raise TemplateError(
                    f"cannot find message {i} ({m['role']}) in the rendered chat: the template changes message "
                    "content beyond trimming it, so the loss mask cannot be placed; use another template"
                )
            end = start + len(content)
            nxt = len(text)
            for later in messages[i + 1 :]:
                j = text.find(later["content"].strip(), end)
                if j >= 0:
                    nxt = j
                    break
            spans.append(MessageSpan(i, m["role"], (start, end), self._end_of_turn(text[end:nxt], end)))
            pos = end
        return spans

    def _end_of_turn(self, after: str, offset: int) -> tuple[int, int] | None:
        # The text from the content's end through the first special token in the literal that follows it.
        end = self._turn_ends.get(after, -1)
        if end == -1:
            match = self._special_re.search(after) if self._special_re is not None else None
            end = match.end() if match else None
            if len(self._turn_ends) < 4096:
                self._turn_ends[after] = end
        return None if end is None else (offset, offset + end)
