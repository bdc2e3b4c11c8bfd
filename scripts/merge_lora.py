"""Fold a LoRA / DoRA adapter (made by nanotune or by PEFT) into its base model and write an HF-format folder.

    python scripts/merge_lora.py meta-llama/Llama-3.1-8B outputs/run/adapter outputs/run/merged
    python scripts/merge_lora.py BASE ADAPTER OUT --dtype float32 --device cuda

The result loads in transformers (and vLLM, ...) like any other checkpoint, with no PEFT needed. The base is read
in its checkpoint dtype unless --dtype says otherwise; each merged weight is computed in fp32 and stored in that
dtype. An adapter trained with QLoRA is merged into the original (unquantised) base weights, as is usual: the
merged model is then slightly different from the NF4 model it was trained on. The work is done by
`nanotune.lora.merge_adapter_into_base`; this file is its command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models
from nanotune.lora import merge_adapter_into_base


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path, help="HF-format base model folder (config.json + *.safetensors)")
    parser.add_argument("adapter", type=Path, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("out", type=Path, help="where to write the merged model (a new or empty folder)")
    parser.add_argument("--dtype", choices=sorted(models.DTYPES), help="dtype of the merged weights "
                        "(default: the base checkpoint's)")
    parser.add_argument("--device", default="cpu", help="where to merge (cpu, cuda, ...)")
    args = parser.parse_args(argv)
    try:
        merge_adapter_into_base(args.base, args.adapter, args.out, models.DTYPES[args.dtype] if args.dtype else None,
                                args.device)
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError
        raise SystemExit(f"merge_lora: {e}") from None
    print(f"merged {args.adapter} into {args.base} -> {args.out}")


if __name__ == "__main__":
    main()
