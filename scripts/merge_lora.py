"""Fold a LoRA / DoRA adapter (made by nanotune or by PEFT) into its base model and write an HF-format folder.

    python scripts/merge_lora.py meta-llama/Llama-3.1-8B outputs/run/adapter outputs/run/merged
    python scripts/merge_lora.py BASE ADAPTER OUT --dtype float32 --device cuda

The result loads in transformers (and vLLM, ...) like any other checkpoint, with no PEFT needed. The base is read
in its checkpoint dtype unless --dtype says otherwise; each merged weight is computed in fp32 and stored in that
dtype. An adapter trained with QLoRA is merged into the original (unquantised) base weights, as is usual: the
merged model is then slightly different from the NF4 model it was trained on.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import models
from nanotune.lora import load_adapter, merge_lora, read_adapter_config

# files of a model folder that are not weights and carry over unchanged (tokenizer, chat template, generation)
CARRIED = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
           "generation_config.json", "chat_template.jinja", "chat_template.json")


def checkpoint_dtype(base: Path) -> torch.dtype:
    hf = models.read_config(base)
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if name not in models.DTYPES:
        raise SystemExit(f"{base}/config.json: dtype {name!r} is not one of {sorted(models.DTYPES)}; pass --dtype.")
    return models.DTYPES[name]


def merge(base: Path, adapter: Path, out: Path, dtype: torch.dtype | None = None, device: str = "cpu") -> None:
    base, adapter, out = Path(base), Path(adapter), Path(out)
    read_adapter_config(adapter)  # a malformed or unsupported adapter stops here, before the base is read
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; choose a new output folder.")
    dtype = dtype or checkpoint_dtype(base)
    model = models.from_pretrained(base, dtype=dtype, device=device)
    load_adapter(model, adapter)
    merge_lora(model)
    models.save_pretrained(model, out, dtype=dtype)
    for name in CARRIED:
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path, help="HF-format base model folder (config.json + *.safetensors)")
    parser.add_argument("adapter", type=Path, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("out", type=Path, help="where to write the merged model (a new or empty folder)")
    parser.add_argument("--dtype", choices=sorted(models.DTYPES), help="dtype of the merged weights "
                        "(default: the base checkpoint's)")
    parser.add_argument("--device", default="cpu", help="where to merge (cpu, cuda, ...)")
    args = parser.parse_args(argv)
    merge(args.base, args.adapter, args.out, models.DTYPES[args.dtype] if args.dtype else None, args.device)
    print(f"merged {args.adapter} into {args.base} -> {args.out}")


if __name__ == "__main__":
    main()
