"""Where rows come from: local .jsonl / .json / .parquet files, or data set repos on the HF Hub.

Every row travels with the place it came from (`file:line` for JSONL, `file[item]` for a JSON list,
`file row N` for Parquet), so that an error about a row can name it. A JSONL row stays its raw line until the
process that tokenizes it parses it; with worker processes, each worker reads its own byte range of the file.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import mmap
from pathlib import Path

from nanotune.config import is_hub_repo_name, relative_note

SUFFIXES = (".jsonl", ".json", ".parquet")


class SourceError(ValueError):
    """A data file that cannot be found or read."""


class RowError(ValueError):
    """A data row that cannot be used; the message starts with where it is (file:line)."""


def resolve_files(ds, key: str) -> list[Path]:
    """The local files of one data set: the file itself, the files of a folder, or the files of an HF Hub repo.
    `key` names the data set in errors, e.g. "data.datasets[0]"."""
    if not ds.path:
        raise SourceError(f"{key}: set its path (a .jsonl/.json/.parquet file or an HF Hub repo org/name)")
    local = Path(ds.path).expanduser()
    if local.is_file():
        return [local]
    if local.is_dir():
        return select_files(sorted(p for p in local.rglob("*") if p.is_file()), local, ds)
    if not is_hub_repo_name(ds.path):
        raise SourceError(f"{key}.path = {ds.path!r} does not exist{relative_note(ds.path)} "
                          "(and is not an HF Hub repo name org/name)")
    return hub_files(ds, key)


def hub_files(ds, key: str) -> list[Path]:
    # huggingface_hub keeps a local cache, so a second run reads the files without the network
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a dependency of nanotune
        raise SourceError("reading HF Hub data sets needs huggingface-hub: pip install huggingface-hub") from None
    patterns = [ds.data_files] if ds.data_files else [f"*{s}" for s in SUFFIXES] + [f"**/*{s}" for s in SUFFIXES]
    try:
        folder = snapshot_download(ds.path, repo_type="dataset", revision=ds.revision or None, allow_patterns=patterns)
    except Exception as e:
        raise SourceError(
            f"{key}: {ds.path} is not a local file or folder, and downloading it as an HF Hub data set "
            f"failed: {type(e).__name__}: {e}"
        ) from None
    root = Path(folder)
    return select_files(sorted(p for p in root.rglob("*") if p.is_file()), root, ds)


def select_files(files: list[Path], root: Path, ds) -> list[Path]:
    """Data files under `root` matching `data_files` (a glob), else those whose path names the split."""
    rel = {p: p.relative_to(root).as_posix() for p in files if p.suffix in SUFFIXES}
    if ds.data_files:
        chosen = [p for p, r in rel.items() if fnmatch.fnmatch(r, ds.data_files)]
    else:
        # HF conventions: data/train-00000-of-00001.parquet, train.jsonl, train/part-0.json
        chosen = [p for p, r in rel.items() if any(split_named(part, ds.split) for part in r.split("/"))]
        if not chosen and len(rel) == 1:
            chosen = list(rel)
    if not chosen:
        what = f"data_files = {ds.data_files!r}" if ds.data_files else f"split {ds.split!r}"
        found = ", ".join(list(rel.values())[:10]) or "no .jsonl/.json/.parquet files"
        raise SourceError(f"{ds.path}: no data file matches {what}; files there: {found}")
    return sorted(chosen)


def split_named(part: str, split: str) -> bool:
    stem = part.split(".")[0]
    return stem == split or stem.startswith(split + "-") or stem.startswith(split + "_")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# A row's id is its file's number in the data set times 2^40 plus its position in the file (line index for JSONL),
# so ids are unique across files and independent of how the rows are cut into tasks.
FILE_ID_STRIDE = 1 << 40


def read_records(path: Path, file_index: int = 0):
    """Yield (where, row id, row) for every row of a file; row is a dict, or the raw line of a JSONL file."""
    name = str(path)
    base = file_index * FILE_ID_STRIDE
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is not part of row 1
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield f"{name}:{line_no}", base + line_no - 1, line
    elif path.suffix == ".json":
        text = path.read_text(encoding="utf-8-sig")
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            hint = "; one object per line is JSON Lines: name the file .jsonl" if e.msg == "Extra data" else ""
            raise SourceError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}{hint}") from None
        if isinstance(rows, dict) and len(rows) == 1 and isinstance(next(iter(rows.values())), list):
            rows = next(iter(rows.values()))  # {"data": [...]}
        if not isinstance(rows, list):
            raise SourceError(f"{path}: a .json data file must hold a list of objects, got {type(rows).__name__}")
        if not rows:
            raise SourceError(f"{path} holds an empty list: no rows to read")
        for i, row in enumerate(rows):
            yield f"{path}[{i}]", base + i, row
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SourceError(f"reading {path} needs pyarrow: pip install 'nanotune[parquet]'") from None
        parquet = pq.ParquetFile(path)
        n = 0
        for batch in parquet.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                n += 1
                yield f"{path} row {n}", base + n - 1, row
    else:
        raise SourceError(f"{path}: unknown data file type {path.suffix!r}; use .jsonl, .json or .parquet")


def jsonl_ranges(path: Path, lines_per_range: int):
    """(start byte, end byte, index of the first line) of consecutive runs of lines of a JSONL file. Worker
    processes read their own ranges, so the main process neither reads nor sends the rows."""
    with open(path, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else b""
        start, line, size = 0, 0, len(data)
        while start < size:
            end, n = start, 0
            while n < lines_per_range and end < size:
                nl = data.find(b"\n", end)
                end = size if nl < 0 else nl + 1
                n += 1
            yield start, end, line
            start, line = end, line + n


def read_jsonl_range(path: Path, start: int, end: int, first_line: int, file_index: int) -> list:
    """The (where, row id, raw line) records of one range from `jsonl_ranges`."""
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read(end - start).decode("utf-8-sig" if start == 0 else "utf-8")
    name, base = str(path), file_index * FILE_ID_STRIDE
    return [(f"{name}:{first_line + k + 1}", base + first_line + k, line)
            for k, line in enumerate(text.split("\n")) if line.strip()]


def check_not_empty(path: Path) -> None:
    """An empty data file is a mistake (a failed download, a wrong glob): say which file, before any work."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            return  # read_records says what to install
        empty = pq.ParquetFile(path).metadata.num_rows == 0
    else:
        with open(path, "rb") as f:  # the first non-blank byte is normally in the first block
            empty = all(not block.strip() for block in iter(lambda: f.read(1 << 20), b""))
    if empty:
        raise SourceError(f"{path} is empty: no rows to read")


def parse_record(where: str, row) -> dict:
    """A row as a dict; `where` is file:line for a JSONL line, so an error reads file:line:column."""
    if isinstance(row, str):
        try:
            row = json.loads(row)
        except json.JSONDecodeError as e:
            raise RowError(f"{where}:{e.colno}: invalid JSON: {e.msg}") from None
    if not isinstance(row, dict):
        raise RowError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    return row
