"""Download only what nanotune needs from an HF Hub model repo: config, safetensors weights, tokenizer files.

    python scripts/download.py meta-llama/Llama-3.2-1B --out models-hf/llama-3.2-1b
    python scripts/download.py mistralai/Mistral-7B-v0.3 --revision main

Gated repos need an access token: accept the licence on the model's page, then `hf auth login` (or set HF_TOKEN).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

WANTED = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "LICENSE*",
]


def download(repo_id: str, revision: str | None = None, out: str | Path | None = None) -> Path:
    """Snapshot-download the files nanotune reads; returns the local folder. Raises SystemExit with one line on failure."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors

    out = Path(out) if out else Path("models-hf") / repo_id.replace("/", "--")
    try:
        folder = snapshot_download(repo_id, revision=revision, local_dir=out, allow_patterns=WANTED)
    except errors.GatedRepoError:
        raise SystemExit(
            f"{repo_id} is gated: accept its licence on its Hub page, then log in with `hf auth login` or set HF_TOKEN"
        ) from None
    except errors.RepositoryNotFoundError:
        raise SystemExit(f"{repo_id} was not found on the Hub (check the spelling, or log in if it is private)") from None
    except errors.RevisionNotFoundError:
        raise SystemExit(f"{repo_id} has no revision {revision!r}") from None
    except errors.LocalEntryNotFoundError:
        raise SystemExit(
            f"cannot reach the Hub to download {repo_id} (no network, or HF_HUB_OFFLINE=1) and it is not cached"
        ) from None
    except errors.HfHubHTTPError as e:
        raise SystemExit(f"downloading {repo_id} failed: {str(e).splitlines()[0]}") from None
    except OSError as e:  # connection refused, DNS failure, ...
        raise SystemExit(f"cannot reach the Hub to download {repo_id}: {e}") from None
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")):
        raise SystemExit(f"{repo_id} has no safetensors weights; nanotune does not read .bin checkpoints")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo_id", help="e.g. meta-llama/Llama-3.2-1B")
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    parser.add_argument("--out", default=None, help="target folder (default: models-hf/<org>--<name>)")
    args = parser.parse_args(argv)
    print(download(args.repo_id, args.revision, args.out))


if __name__ == "__main__":
    sys.exit(main())
