"""Data: files -> rendered, tokenized and masked examples (cached on disk). Packing into batches: nanotune/packing.py.

    from nanotune.data import load_tokenizer, prepare_data
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    data = prepare_data(cfg.data, tok, seed=cfg.seed)      # data.train, data.eval (or None), data.stats

`python -m nanotune.data CONFIG` runs the same preparation and prints its statistics; see docs/data.md.
"""

from nanotune.data.examples import TokenizedDataset
from nanotune.data.formats import RowError
from nanotune.data.pipeline import DataError, PreparedData, prepare_data
from nanotune.data.sources import SourceError
from nanotune.data.template import ChatTemplate, TemplateError
from nanotune.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer

__all__ = [
    "ChatTemplate",
    "DataError",
    "PreparedData",
    "RowError",
    "SourceError",
    "TemplateError",
    "TokenizedDataset",
    "Tokenizer",
    "TokenizerError",
    "load_tokenizer",
    "prepare_data",
]
