"""Llama and Mistral against transformers on tiny random checkpoints: logits parity, loading, saving, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import models
from models import CheckpointError
from tests.conftest import ROOT, write_hf_checkpoint

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}


def max_logit_diff(ours, theirs, ids, **kwargs):
    with torch.no_grad():
        return (ours(ids, **kwargs) - theirs(ids).logits).abs().max().item()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
        dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
        dict(tie_word_embeddings=True),
        dict(attention_bias=True, mlp_bias=True),
        dict(head_dim=32, num_key_value_heads=1),
    ],
    ids=["plain", "llama3-rope", "linear-rope", "tied", "bias", "head_dim-mqa"],
)
def test_llama_logits_match_transformers(hf_checkpoint, overrides):
    folder, reference = hf_checkpoint("llama", **overrides)
    model = models.from_pretrained(folder)
    ids = torch.randint(0, 96, (2, 70))  # longer than original_max_position_embeddings: the llama3 scaling matters
    assert max_logit_diff(model, reference, ids) <= 1e-4
    if overrides.get("tie_word_embeddings"):
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_mistral_sliding_window_longer_sequence(hf_checkpoint):
    folder, reference = hf_checkpoint("mistral", sliding_window=8)
    model = models.from_pretrained(folder)
    assert model.config.sliding_window == 8
    ids = torch.randint(0, 96, (2, 40))  # 5x the window
    assert max_logit_diff(model, reference, ids) <= 1e-4
    # the window really changes the result: without it the logits differ
    model.config.sliding_window = None
    assert max_logit_diff(model, reference, ids) > 1e-3


def test_mistral_null_window_is_full_causal(hf_checkpoint):
    folder, reference = hf_checkpoint("mistral", sliding_window=None)
    model = models.from_pretrained(folder)
    assert model.config.sliding_window is None
    assert max_logit_diff(model, reference, torch.randint(0, 96, (1, 50))) <= 1e-4


def test_bf16_load_lands_in_requested_dtype_and_is_close(hf_checkpoint):
    folder, reference = hf_checkpoint("llama")
    model = models.from_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, 96, (1, 16))
    with torch.no_grad():
        ours = model(ids).float()
        theirs = reference.to(torch.bfloat16)(ids).logits.float()
    assert (ours - theirs).abs().max().item() <= 2e-2


def test_bf16_checkpoint_loads_as_fp32(tmp_path):
    reference = write_hf_checkpoint(tmp_path / "m", "llama", dtype=torch.bfloat16)
    model = models.from_pretrained(tmp_path / "m", dtype=torch.float32)
    ids = torch.randint(0, 96, (1, 16))
    # the reference kept fp32 weights; compare against its weights rounded to bf16 as saved
    reference = reference.to(torch.bfloat16).float()
    assert max_logit_diff(model, reference, ids) <= 1e-4


def test_sharded_save_and_load(hf_checkpoint, tmp_path):
    folder, reference = hf_checkpoint("llama")
    model = models.from_pretrained(folder)
    models.save_pretrained(model, tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = models.from_pretrained(tmp_path / "sharded")
    assert max_logit_diff(again, reference, torch.randint(0, 96, (2, 12))) <= 1e-4


@pytest.mark.parametrize("family,overrides", [("llama", dict(tie_word_embeddings=True)), ("mistral", dict(sliding_window=8))])
def test_saved_model_loads_in_transformers_with_same_logits(hf_checkpoint, tmp_path, family, overrides):
    transformers = pytest.importorskip("transformers")
    folder, _ = hf_checkpoint(family, **overrides)
    model = models.from_pretrained(folder)
    models.save_pretrained(model, tmp_path / "saved")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="eager").eval()
    assert max_logit_diff(model, loaded, torch.randint(0, 96, (2, 24))) <= 1e-4


def modes(folder):
    """{relative path: permission bits} of a folder and everything in it."""
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]}


def test_saved_model_is_readable_by_others_whatever_the_umask(hf_checkpoint, tmp_path):
    """Files 0644 and folders 0755, also when the writer's umask or temp files (mkstemp: 0600) would say otherwise."""
    import os
    import tempfile

    folder, _ = hf_checkpoint("llama")
    model = models.from_pretrained(folder)
    old_umask = os.umask(0o077)  # what a cautious cluster sets; files come out 0600, folders 0700
    try:
        models.save_pretrained(model, tmp_path / "saved", max_shard_size="100KB")
        fd, name = tempfile.mkstemp(dir=tmp_path / "saved", suffix=".json")  # 0600 whatever the umask
        os.close(fd)
        models.make_readable(tmp_path / "saved")
    finally:
        os.umask(old_umask)
    found = modes(tmp_path / "saved")
    assert len(found) > 4 and os.path.basename(name) in found  # shards, index, config.json, the temp file
    assert found == {path: 0o755 if path == "." else 0o644 for path in found}


def test_make_readable_leaves_link_targets_alone(tmp_path):
    (tmp_path / "private").write_text("secret")
    (tmp_path / "private").chmod(0o600)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "link").symlink_to(tmp_path / "private")
    models.make_readable(tmp_path / "model")
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o600


def test_random_init_model_saves_in_a_format_transformers_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = models.from_size("llama-tiny", vocab_size=80)
    models.save_pretrained(model, tmp_path / "tiny")
    written = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert written["architectures"] == ["LlamaForCausalLM"] and written["hidden_act"] == "silu"
    assert written["rope_theta"] == 10000.0 and written["rms_norm_eps"] == 1e-6  # explicit, not left to defaults
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", attn_implementation="eager").eval()
    assert max_logit_diff(model, loaded, torch.randint(0, 80, (2, 24))) <= 1e-4


def test_hidden_states_feed_the_lm_head(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    model = models.from_pretrained(folder)
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        hidden = model(ids, return_hidden=True)
        assert hidden.shape == (2, 10, 64)
        torch.testing.assert_close(model.lm_head(hidden), model(ids))


# ----------------------------------------------------------------------------------------------------- errors


def test_unsupported_model_type_lists_supported(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match=r"model_type 'gpt2' is not supported.*llama.*mistral"):
        models.from_pretrained(tmp_path / "m")


def test_missing_folder_config_and_weights(tmp_path, hf_checkpoint):
    with pytest.raises(CheckpointError, match="does not exist"):
        models.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        models.from_pretrained(tmp_path / "empty")
    folder, _ = hf_checkpoint("llama")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        models.from_pretrained(folder)


def test_truncated_and_lfs_pointer_weights_are_named(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is truncated"):
        models.from_pretrained(folder)
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(CheckpointError, match="git lfs pull"):
        models.from_pretrained(folder)


def test_missing_unexpected_and_misshaped_keys_are_named(hf_checkpoint):
    from safetensors.torch import load_file, save_file

    folder, _ = hf_checkpoint("llama")
    tensors = load_file(folder / "model.safetensors")
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    tensors["model.norm.weight"] = torch.zeros(65)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        models.from_pretrained(folder)
    message = str(err.value)
    assert "missing keys ['model.layers.1.mlp.up_proj.weight']" in message
    assert "unexpected keys ['model.layers.0.extra.weight']" in message
    assert "model.norm.weight: checkpoint (65,), model (64,)" in message


def test_unknown_rope_scaling_is_an_error(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"type": "su", "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="rope scaling type 'su' is not supported"):
        models.from_pretrained(folder)


def test_llama3_rope_without_original_context_is_refused_before_any_tensor_is_read(hf_checkpoint):
    folder, _ = hf_checkpoint("llama", rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)
    config = json.loads((folder / "config.json").read_text())
    for spelling in ("rope_scaling", "rope_parameters"):  # transformers 4 and 5
        if config.get(spelling):
            del config[spelling]["original_max_position_embeddings"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"not read")  # reading any tensor would fail differently
    with pytest.raises(CheckpointError, match=r"^config.json \(llama\): .*'llama3' has no original_max_position_embeddings"):
        models.from_pretrained(folder)


def test_mistral_without_sliding_window_and_kv_heads_reads_transformers_defaults(hf_checkpoint):
    """Left out of config.json: sliding_window is 4096 and num_key_value_heads 8 for Mistral (not Llama's None and
    num_attention_heads); the biases transformers' Mistral never builds are not read either."""
    folder, _ = hf_checkpoint("mistral", sliding_window=8, num_attention_heads=16, num_key_value_heads=8)
    config = json.loads((folder / "config.json").read_text())
    del config["sliding_window"], config["num_key_value_heads"]
    config["attention_bias"] = True
    (folder / "config.json").write_text(json.dumps(config))
    reference = pytest.importorskip("transformers").AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager").eval()
    model = models.from_pretrained(folder)
    assert (model.config.sliding_window, model.config.num_key_value_heads) == (4096, 8)
    assert model.model.layers[0].self_attn.q_proj.bias is None
    assert max_logit_diff(model, reference, torch.randint(0, 96, (1, 12))) <= 1e-4


def test_unsupported_activation_is_an_error(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    config = json.loads((folder / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="hidden_act 'gelu' is not supported"):
        models.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------------ memory

PEAK_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    sys.path.insert(0, {root!r})
    import models
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = models.from_pretrained({folder!r}, dtype=getattr(torch, {dtype!r}))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters()) * 4  # the checkpoint is fp32
    print(before, after, size, largest)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_host_memory_is_about_one_model_copy(tmp_path_factory, dtype):
    """~100M parameters: loading adds one model copy in the target dtype to peak RSS, plus one checkpoint tensor in
    flight (the largest, the embedding, being converted) and a little slack; never a second full copy."""
    folder = tmp_path_factory.getbasetemp() / "model-100m"
    if not (folder / "config.json").exists():
        write_hf_checkpoint(folder, "llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                            num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=4)
    script = PEAK_SCRIPT.format(root=str(ROOT), folder=str(folder), dtype=dtype)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    before, after, size, largest = map(int, out.split())
    assert size > 90e6 * (4 if dtype == "float32" else 2)
    added = after - before
    assert added <= size + largest + 32 * 2**20, f"loading added {added / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB model"
    assert added < 1.6 * size


# ------------------------------------------------------------------------------------------------------ layout


def imported_modules(file) -> set[str]:
    """Top-level names of every module a Python file imports (absolute imports; relative ones are the package)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_models_import_only_torch_safetensors_and_the_stdlib():
    """models/ is self-contained: a reader can copy the folder into another project."""
    allowed = {"torch", "safetensors", "models", "__future__"} | set(sys.stdlib_module_names)
    files = sorted((ROOT / "models").glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "attention.py", "llama.py"}
    bad = {f.name: sorted(imported_modules(f) - allowed) for f in files if imported_modules(f) - allowed}
    assert not bad, f"models/ imports outside torch, safetensors and the stdlib: {bad}"


def test_library_never_imports_scripts_transformers_or_peft():
    """scripts/ are command lines around the library; transformers and peft are test-only references."""
    files = sorted((ROOT / "nanotune").rglob("*.py"))
    assert len(files) > 10
    bad = {str(f.relative_to(ROOT)): sorted(imported_modules(f) & {"scripts", "transformers", "peft"}) for f in files
           if imported_modules(f) & {"scripts", "transformers", "peft"}}
    assert not bad, f"the library imports what it must not: {bad}"
    assert not (ROOT / "nanotune" / "attention.py").exists()  # it lives in models/, with no shim left behind
