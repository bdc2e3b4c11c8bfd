"""nanotune: supervised fine-tuning of open LLMs in pure PyTorch."""

__version__ = "0.1.0"
