"""Write docs/config.md from the config dataclasses in nanotune/config.py (their defaults and trailing comments).

    python scripts/config_docs.py          # rewrite docs/config.md
    python scripts/config_docs.py --check  # exit 1 if docs/config.md is out of date (a test runs this)
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanotune import config as C  # noqa: E402

HEADER = """# Configuration reference

A run is configured by one TOML file; every key below can also be set on the command line as
`--section.key=value` (top-level keys as `--key=value`), e.g.

```bash
python nanotune/train.py configs/quickstart.toml --train.max_steps=100 --optim.lr=1e-3 --output_dir=outputs/try
```

Values are parsed as TOML (`--lora.targets=['q_proj','v_proj']`, `--data.packing=false`), falling back to a string.
Unknown keys and values of the wrong type stop the run before anything is loaded, naming the key and the closest
valid one. The resolved config is written to `<output_dir>/config.toml`.

Names from other tools are understood in errors: `learning_rate`, `gradient_accumulation_steps`, `sequence_len`,
`sample_packing`, `num_epochs`, `lora_r`, ... stop the run with the nanotune key that means the same
(`optim.lr`, `train.grad_accum_steps`, `data.seq_len`, ...), and a typo in any section names the closest key of every
section (`--optim.lerning_rate=1e-4` suggests `optim.lr`).

## Relative paths

Relative paths in a config (`model.path`, `model.tokenizer`, `data.chat_template`, data set paths, `output_dir`,
`data.cache_dir`) are resolved against the **current directory**, as on the command line, not against the folder of
the config file: the bundled configs name `data/...`, `models-hf/...` and `outputs/...` and are run from the
repository root (`python nanotune/train.py configs/quickstart.toml`). A path the run reads that does not exist stops
it before anything is loaded, naming the folder it was resolved against, and says so when the path exists next to
the config file instead. Write absolute paths to run a config from anywhere.

This file is generated from `nanotune/config.py` by `python scripts/config_docs.py`; a test checks it is current.
"""


def comments(cls) -> dict[str, str]:
    """field name -> the comment that ends its line in the source, or the comment lines just above it."""
    out, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        if re.match(r"\s+#", line):
            above.append(line.strip().lstrip("#").strip())
            continue
        m = re.match(r"\s+(\w+): [^=]+=[^#]*(?:#\s*(.*))?$", line)
        if m:
            out[m.group(1)] = m.group(2) or " ".join(above)
        above = []
    return out


def default(f) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if dataclasses.is_dataclass(value):
        return ""
    return C.toml_value(value)


def table(cls, prefix: str) -> list[str]:
    notes = comments(cls)
    hints = typing.get_type_hints(cls)
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        note = notes.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{prefix}{f.name}` | `{default(f)}` | {note} |")
    return rows


def render() -> str:
    lines = [HEADER, "## Top level", ""] + table(C.Config, "")
    hints = typing.get_type_hints(C.Config)
    for f in dataclasses.fields(C.Config):
        section = hints[f.name]
        if not dataclasses.is_dataclass(section):
            continue
        doc = (section.__doc__ or "").strip()
        lines += ["", f"## [{f.name}]", ""]
        if doc and not doc.startswith(section.__name__ + "("):
            lines += [doc, ""]
        lines += table(section, f"{f.name}.")
        for (sec, key), item_cls in C.LIST_ITEM_TYPES.items():
            if sec == f.name and key == "datasets":
                lines += ["", f"### [[{sec}.datasets]] and [[{sec}.eval_datasets]]", "",
                          "Each data set is a table of its own:", ""]
                lines += table(item_cls, "")
    return "\n".join(lines) + "\n"


def main() -> int:
    target = ROOT / "docs" / "config.md"
    text = render()
    undocumented = [line.split("`")[1] for line in text.splitlines() if line.startswith("| `") and line.endswith("|  |")]
    if undocumented:
        print(f"keys without a meaning (add a comment to the field in nanotune/config.py): {', '.join(undocumented)}")
        return 1
    if "--check" in sys.argv:
        if not target.is_file() or target.read_text() != text:
            print("docs/config.md is out of date: run python scripts/config_docs.py")
            return 1
        return 0
    target.write_text(text)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
