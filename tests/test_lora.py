"""LoRA / DoRA / QLoRA: identity at init, merging, gradients, and adapter round trips with PEFT as the reference."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import models
from nanotune import lora
from nanotune.lora import LoRALinear, QLoRALinear, apply_lora, load_adapter, merge_lora, save_adapter
from tests.conftest import ROOT

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def ids_for(vocab=96, B=2, T=7, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize_adapters(model, seed=1):
    """B = 0 at init makes every adapter a no-op; give all trainable tensors random values so tests see them."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(lora.trainable_parameters(model).items()):
        p.add_(torch.randn(p.shape, generator=g) * 0.1)


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------------------------ LoRA basics


@pytest.mark.parametrize("on_meta", [False, True], ids=["loaded", "meta"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_fresh_lora_equals_base_and_only_adapters_train(hf_checkpoint, on_meta, dora):
    folder, _ = hf_checkpoint("llama")
    base = models.from_pretrained(folder)
    if on_meta:  # swapped on the meta model, adapters allocated by materialize_after_load
        model = models.from_pretrained(folder, prepare=lambda m: apply_lora(m, "all-linear", 4, 8, dora=dora))
    else:
        model = models.from_pretrained(folder)
        apply_lora(model, "all-linear", rank=4, alpha=8, dora=dora)
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(adapted) == 2 * 7 and not any("lm_head" in n for n in adapted)
    a = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert a.lora_A.weight.abs().sum() > 0 and a.lora_B.weight.abs().sum() == 0  # A Kaiming, B zero
    ids = ids_for()
    if dora:  # m = ||W|| per row, so W' = W up to the rounding of m / ||W||
        assert torch.equal(a.lora_magnitude_vector, a.weight.norm(dim=1))
        assert max_diff(logits(model, ids), logits(base, ids)) <= 1e-5
    else:
        assert torch.equal(logits(model, ids), logits(base, ids))

    model(ids).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = set(lora.trainable_parameters(model))
    assert with_grad == trainable
    lora_names = ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if dora else ())
    assert trainable and all(n.endswith(lora_names) for n in trainable)
    num_trainable, total = lora.count_parameters(model)
    assert num_trainable == sum(p.numel() for p in lora.trainable_parameters(model).values())
    assert total == sum(p.numel() for p in base.parameters()) + num_trainable
    assert "trainable params" in lora.describe_parameters(model)


def test_targets_suffixes_modules_to_save_and_errors(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    model = models.from_pretrained(folder)
    chosen = apply_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4, modules_to_save=["lm_head", "embed_tokens"])
    assert chosen == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = lora.trainable_parameters(model)
    assert "lm_head.weight" in trainable and "model.embed_tokens.weight" in trainable
    assert "model.layers.0.self_attn.k_proj.weight" not in trainable

    fresh = models.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"matched no module.*q_proj"):
        apply_lora(fresh, ["qproj"], rank=2, alpha=4)
    with pytest.raises(ValueError, match="not linear layers.*modules_to_save"):
        apply_lora(fresh, ["embed_tokens"], rank=2, alpha=4)
    with pytest.raises(ValueError, match="positive"):
        apply_lora(fresh, ["q_proj"], rank=0, alpha=4)
    with pytest.raises(ValueError, match="holds\\) a LoRA target"):
        apply_lora(fresh, ["q_proj"], rank=2, alpha=4, modules_to_save=["self_attn"])
    fresh = models.from_pretrained(folder)
    apply_lora(fresh, ["q_proj"], rank=2, alpha=4)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(fresh, ["q_proj"], rank=2, alpha=4)


@pytest.mark.parametrize("variant", [dict(), dict(rslora=True), dict(dora=True)], ids=["lora", "rslora", "dora"])
def test_merged_equals_unmerged(hf_checkpoint, variant):
    folder, _ = hf_checkpoint("llama", attention_bias=True)
    model = models.from_pretrained(folder)
    apply_lora(model, "all-linear", rank=4, alpha=16, **variant)
    randomize_adapters(model)
    ids = ids_for()
    before = logits(model, ids)
    merge_lora(model)
    assert not any(isinstance(m, lora.ADAPTED) for m in model.modules())
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("proj"))
    after = logits(model, ids)
    assert max_diff(before, after) <= 1e-5
    assert max_diff(before, logits(models.from_pretrained(folder), ids)) > 1e-3  # the adapters did change something


def test_rslora_scaling(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    model = models.from_pretrained(folder)
    apply_lora(model, ["q_proj"], rank=4, alpha=8, rslora=True)
    assert model.get_submodule("model.layers.0.self_attn.q_proj").scaling == pytest.approx(8 / 2)


def test_dropout_is_used_in_training_only(hf_checkpoint):
    folder, _ = hf_checkpoint("llama")
    model = models.from_pretrained(folder)
    apply_lora(model, ["q_proj"], rank=4, alpha=8, dropout=0.5)
    randomize_adapters(model)
    ids = ids_for()
    model.eval()
    assert torch.equal(logits(model, ids), logits(model, ids))
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(logits(model, ids), logits(model, ids))


# ------------------------------------------------------------------------------------------------ PEFT round trips


def hf_model_from(folder):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").float().eval()


@pytest.mark.parametrize(
    "options",
    [
        dict(targets=["q_proj", "v_proj", "down_proj"]),
        dict(targets="all-linear", rslora=True, modules_to_save=["lm_head", "embed_tokens"]),
        dict(targets=ATTN, dora=True),
    ],
    ids=["lora", "rslora-modules_to_save", "dora"],
)
def test_nanotune_adapter_loads_in_peft_with_same_logits(hf_checkpoint, tmp_path, options):
    peft = pytest.importorskip("peft")
    folder, _ = hf_checkpoint("llama")
    model = models.from_pretrained(folder)
    targets = options.pop("targets")
    apply_lora(model, targets, rank=4, alpha=8, **options)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(folder))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["use_dora"] == options.get("dora", False)

    reference = peft.PeftModel.from_pretrained(hf_model_from(folder), tmp_path / "adapter").eval()
    ids = ids_for()
    ours, theirs = logits(model, ids), logits(reference, ids)
    assert max_diff(ours, theirs) <= 1e-4
    assert max_diff(theirs, logits(models.from_pretrained(folder), ids)) > 1e-3  # PEFT really applied it


@pytest.mark.parametrize(
    "options",
    [
        dict(target_modules=["q_proj", "k_proj", "up_proj"], lora_alpha=16),
        dict(target_modules="all-linear", use_rslora=True, modules_to_save=["lm_head"], lora_alpha=8),
        dict(target_modules=r".*\.(q_proj|o_proj)", use_dora=True, lora_alpha=8),
    ],
    ids=["lora", "all-linear-rslora-modules_to_save", "regex-dora"],
)
def test_peft_adapter_loads_in_nanotune_with_same_logits(hf_checkpoint, tmp_path, options):
    peft = pytest.importorskip("peft")
    folder, _ = hf_checkpoint("llama")
    torch.manual_seed(3)
    reference = peft.get_peft_model(hf_model_from(folder), peft.LoraConfig(r=4, **options))
    randomize_adapters(reference, seed=2)
    reference.eval()
    reference.save_pretrained(tmp_path / "peft_adapter")

    model = load_adapter(models.from_pretrained(folder), tmp_path / "peft_adapter")
    ids = ids_for()
    assert max_diff(logits(model, ids), logits(reference, ids)) <= 1e-4
    # and back: what nanotune writes from it is the same adapter
    save_adapter(model, tmp_path / "again")
    again = load_adapter(models.from_pretrained(folder), tmp_path / "again")
    assert torch.equal(logits(again, ids), logits(model, ids))


def test_dora_training_step_matches_peft(hf_checkpoint):
    """Same forward, same gradients (the weight norm is a constant for backward in both), with dropout off."""
    peft = pytest.importorskip("peft")
    folder, _ = hf_checkpoint("llama", attention_bias=True)
    model = models.from_pretrained(folder)
    apply_lora(model, ["q_proj", "gate_proj"], rank=4, alpha=8, dora=True)
    randomize_adapters(model)
    reference = peft.get_peft_model(hf_model_from(folder), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"], use_dora=True))
    peft_params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, p in lora.trainable_parameters(model).items():
            head, _, leaf = name.rpartition(".")
            if leaf == "lora_magnitude_vector":
                key = f"base_model.model.{head}.lora_magnitude_vector.default.weight"
            else:
                key = f"base_model.model.{head.rpartition('.')[0]}.{head.rpartition('.')[2]}.default.{leaf}"
            peft_params[key].copy_(p)
    model.train()
    reference.train()
    ids = ids_for()
    ours, theirs = model(ids), reference(ids).logits
    assert max_diff(ours, theirs) <= 1e-4
    ours.square().mean().backward()
    theirs.square().mean().backward()
    name = "model.layers.1.mlp.gate_proj"
    ours_layer, theirs_layer = model.get_submodule(name), reference.get_submodule("base_model.model." + name)
    magnitude_grad = theirs_layer.lora_magnitude_vector["default"].weight.grad
    assert max_diff(ours_layer.lora_magnitude_vector.grad, magnitude_grad) <= 1e-5
    assert max_diff(ours_layer.lora_A.weight.grad, theirs_layer.lora_A["default"].weight.grad) <= 1e-5
    assert ours_layer.lora_A.weight.grad.abs().max() > 0


def test_adapter_errors(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("llama")
    model = models.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(model, tmp_path / "none")
    apply_lora(model, ["q_proj"], rank=2, alpha=4)
    save_adapter(model, tmp_path / "a")
    other = models.from_pretrained(folder)
    apply_lora(other, ["q_proj"], rank=4, alpha=4)
    with pytest.raises(ValueError, match="differ"):
        load_adapter(other, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": True}))
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        load_adapter(models.from_pretrained(folder), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["k_proj"]}))
    with pytest.raises(ValueError, match=r"missing \['model.layers.0.self_attn.k_proj.lora_A.weight'"):
        load_adapter(models.from_pretrained(folder), tmp_path / "a")


# ------------------------------------------------------------------------------------------------ QLoRA (NF4)


def test_qlora_forward_backward_and_merge_on_cpu(hf_checkpoint):
    pytest.importorskip("bitsandbytes")
    from nanotune.qlora import NF4Linear, quantize_nf4

    folder, _ = hf_checkpoint("llama", attention_bias=True)
    base = models.from_pretrained(folder)

    def prepare(model):  # on the meta model: weights are quantised as they stream in
        quantize_nf4(model)
        apply_lora(model, ["q_proj", "v_proj", "up_proj"], rank=4, alpha=8, dora=False)

    model = models.from_pretrained(folder, prepare=prepare)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q, QLoRALinear) and q.weight.dtype == torch.uint8 and q.weight.numel() == 64 * 64 // 2
    assert isinstance(model.get_submodule("model.layers.0.self_attn.k_proj"), NF4Linear)
    assert type(model.lm_head) is nn.Linear  # the LM head stays in full precision
    # the dequantised weight is W up to NF4 rounding (about 1/8 of a block's absmax at worst)
    w = base.get_submodule("model.layers.0.self_attn.q_proj").weight
    assert max_diff(q.dequantize(), w) <= 0.1 * w.abs().max().item()

    ids = ids_for()
    out = model(ids)  # fresh adapters: the NF4 model, which is close to the fp32 one
    reference = logits(base, ids)
    assert max_diff(out, reference) <= 0.2 * reference.abs().max().item()
    out.float().square().mean().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(lora.trainable_parameters(model))
    assert q.lora_B.weight.grad.abs().max() > 0 and not q.weight.requires_grad

    trainable, total = lora.count_parameters(model)
    assert total == sum(p.numel() for p in base.parameters()) + trainable

    randomize_adapters(model)
    before = logits(model, ids)
    merge_lora(model)
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    assert model.get_submodule("model.layers.0.self_attn.k_proj").weight.dtype == torch.bfloat16
    # the merged weights are bf16-rounded and the NF4 matmul ran in bf16: equal up to bf16 precision
    assert max_diff(logits(model.float(), ids), before) <= 2e-2 * before.abs().max().item()


def test_qlora_dora_on_loaded_model(hf_checkpoint):
    pytest.importorskip("bitsandbytes")
    from nanotune.qlora import quantize_nf4

    folder, _ = hf_checkpoint("llama")
    model = models.from_pretrained(folder)
    quantize_nf4(model)  # on a loaded model: quantised immediately
    apply_lora(model, ["o_proj"], rank=4, alpha=8, dora=True)
    o = model.get_submodule("model.layers.1.self_attn.o_proj")
    assert torch.allclose(o.lora_magnitude_vector, o.dequantize().float().norm(dim=1))
    ids = ids_for()
    model(ids).float().mean().backward()
    assert o.lora_magnitude_vector.grad is not None


PEAK_RSS_SCRIPT = """
import gc, sys, torch
sys.path.insert(0, sys.argv[1])
import models
from nanotune.qlora import quantize_nf4

def status_mb(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) / 1024

def load(folder):
    return models.from_pretrained(folder, dtype=torch.bfloat16, prepare=quantize_nf4 if sys.argv[4] == "nf4" else None)

warm = load(sys.argv[2])  # warm-up on a tiny model: libraries mapped on first use are not model memory
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # resets the peak resident set size (VmHWM)
before = status_mb("VmRSS")
model = load(sys.argv[3])
print(status_mb("VmHWM") - before, status_mb("VmRSS") - before)
"""


def write_random_checkpoint(folder, **hf_config):
    """config.json + model.safetensors with random bf16 weights (faster than building a transformers model)."""
    from safetensors.torch import save_file

    hf = dict(model_type="llama", vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False, **hf_config)
    model = models.build_model(models.config_from_hf(hf))  # on meta: only the names and shapes
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf))
    tensors = {n: torch.randn(p.shape).to(torch.bfloat16) for n, p in model.named_parameters()}
    save_file(tensors, str(folder / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak resident set size from /proc")
def test_qlora_loading_peak_memory_stays_near_the_quantised_size(tmp_path):
    """Peak resident memory while loading with NF4, against the same load in bf16 (measured, not assumed)."""
    pytest.importorskip("bitsandbytes")
    shape = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=4)
    write_random_checkpoint(tmp_path / "tiny", **{**shape, "num_hidden_layers": 1})
    # 16 layers of 256 -> 1024: 17M parameters in linear layers, 32 MiB in bf16, ~8.5 MiB in NF4
    write_random_checkpoint(tmp_path / "m", **{**shape, "num_hidden_layers": 16})
    linear_bf16_mb = 16 * (4 * 256 * 256 + 3 * 256 * 1024) * 2 / 2**20
    largest_bf16_mb = 256 * 1024 * 2 / 2**20
    # large allocations straight from mmap, so freed tensors leave the resident set at once and it tracks live memory
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}

    def peak_and_final_mb(mode):
        args = [sys.executable, "-c", PEAK_RSS_SCRIPT, str(ROOT), str(tmp_path / "tiny"), str(tmp_path / "m"), mode]
        out = subprocess.run(args, capture_output=True, text=True, check=True, env=env)
        return tuple(map(float, out.stdout.split()[-2:]))  # (peak growth, final growth) in MiB

    bf16_peak, _ = peak_and_final_mb("bf16")
    nf4_peak, nf4_final = peak_and_final_mb("nf4")
    assert bf16_peak > 0.9 * linear_bf16_mb, (bf16_peak, linear_bf16_mb)  # the measure sees a full-size load
    # NF4 keeps 4.25 bits per weight (4 + a bf16 scale per 64): ~8.5 MiB, 0.27 of bf16; the resident set adds a
    # few MiB of allocator bookkeeping (12 MiB measured in all), while a bf16 copy left behind would add the whole
    # 32 MiB
    assert nf4_final < 0.5 * linear_bf16_mb, (nf4_final, linear_bf16_mb)
    # on top only the tensor in flight and quantisation scratch (~9 bytes per weight of the tensor, ~5x its bf16
    # size), which scale with the largest tensor, not with the model
    assert nf4_peak < nf4_final + 10 * largest_bf16_mb, (nf4_peak, nf4_final, largest_bf16_mb)
    print(f"peak RSS growth: bf16 {bf16_peak:.0f} MiB, nf4 {nf4_peak:.0f} MiB (after load {nf4_final:.0f} MiB)")


# ------------------------------------------------------------------------------- merging from disk, scripts/merge_lora.py


def test_merge_script_writes_a_model_transformers_loads_with_peft_logits(hf_checkpoint, tmp_path):
    peft = pytest.importorskip("peft")
    from scripts.merge_lora import main

    folder, _ = hf_checkpoint("llama", attention_bias=True)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    reference = peft.get_peft_model(hf_model_from(folder), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, modules_to_save=["lm_head"]))
    randomize_adapters(reference, seed=5)
    reference.eval().save_pretrained(tmp_path / "adapter")

    main([str(folder), str(tmp_path / "adapter"), str(tmp_path / "merged")])
    merged = hf_model_from(tmp_path / "merged")
    ids = ids_for()
    assert max_diff(logits(merged, ids), logits(reference, ids)) <= 1e-4
    assert (tmp_path / "merged" / "tokenizer_config.json").read_text() == '{"model_max_length": 256}'
    with pytest.raises(SystemExit, match="not empty"):
        main([str(folder), str(tmp_path / "adapter"), str(tmp_path / "merged")])


def test_library_merge_refuses_a_non_empty_output_before_reading_the_base(hf_checkpoint, tmp_path):
    """The merge lives in the library (the trainer's QLoRA final/ uses it); the script is only its command line."""
    folder, _ = hf_checkpoint("llama")
    model = models.from_pretrained(folder)
    apply_lora(model, ATTN, rank=4, alpha=8)
    save_adapter(model, tmp_path / "adapter")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("a user's file")
    (folder / "model.safetensors").unlink()  # reading the base would fail with another error
    with pytest.raises(FileExistsError, match="out is not empty; choose a new output folder"):
        lora.merge_adapter_into_base(folder, tmp_path / "adapter", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "a user's file"


def test_merged_model_and_adapter_are_readable_by_others(hf_checkpoint, tmp_path):
    """0644 files and 0755 folders even under a umask of 077 and with a 0600 tokenizer file in the base folder."""
    folder, _ = hf_checkpoint("llama")
    (folder / "tokenizer.json").write_text("{}")
    (folder / "tokenizer.json").chmod(0o600)
    model = models.from_pretrained(folder)
    apply_lora(model, ATTN, rank=4, alpha=8)
    old_umask = os.umask(0o077)
    try:
        save_adapter(model, tmp_path / "adapter")
        lora.merge_adapter_into_base(folder, tmp_path / "adapter", tmp_path / "merged")
    finally:
        os.umask(old_umask)
    for out in (tmp_path / "adapter", tmp_path / "merged"):
        found = {p.name: p.stat().st_mode & 0o777 for p in [out, *out.iterdir()]}
        assert found == {name: 0o755 if name == out.name else 0o644 for name in found}, found
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_prepare_from_config(hf_checkpoint):
    from nanotune.config import LoraConfig

    folder, _ = hf_checkpoint("llama")
    assert lora.prepare_from_config(LoraConfig(enabled=False)) is None
    with pytest.raises(ValueError, match="nf4"):
        lora.prepare_from_config(LoraConfig(enabled=True, quantize="int8"))
    cfg = LoraConfig(enabled=True, rank=4, alpha=8, targets=["q_proj"], modules_to_save=["lm_head"])
    model = models.from_pretrained(folder, prepare=lora.prepare_from_config(cfg))
    assert isinstance(model.get_submodule("model.layers.1.self_attn.q_proj"), LoRALinear)
    assert set(lora.trainable_parameters(model)) == {"lm_head.weight"} | {
        f"model.layers.{i}.self_attn.q_proj.lora_{ab}.weight" for i in range(2) for ab in "AB"}
    if importlib.util.find_spec("bitsandbytes") is not None:  # the QLoRA half needs it; the LoRA half ran above
        from nanotune.qlora import NF4Linear

        cfg.quantize, cfg.modules_to_save = "nf4", ["down_proj"]
        model = models.from_pretrained(folder, prepare=lora.prepare_from_config(cfg))
        assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj"), QLoRALinear)
        assert isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), NF4Linear)
        assert type(model.get_submodule("model.layers.0.mlp.down_proj")) is nn.Linear  # trained in full, not NF4
        assert model.get_submodule("model.layers.0.mlp.down_proj").weight.requires_grad


# ------------------------------------------------------------------------------------------ other model families


def write_family_checkpoint(folder, family):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8)
    if family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**common, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    else:
        config = transformers.Gemma3TextConfig(**common, sliding_window=4, query_pre_attn_scalar=8)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").save_pretrained(folder)


@pytest.mark.parametrize("family", ["qwen3_moe", "gemma3_text"])
def test_lora_on_moe_and_gemma_matches_peft_and_merges(tmp_path, family):
    """Attention and dense-MLP linears of the other families: PEFT gives the same logits; merged == unmerged."""
    peft = pytest.importorskip("peft")
    write_family_checkpoint(tmp_path / "base", family)
    targets = ATTN if family == "qwen3_moe" else [*ATTN, "gate_proj", "up_proj", "down_proj"]
    model = models.from_pretrained(tmp_path / "base", attn_implementation="eager")
    apply_lora(model, targets, rank=4, alpha=8)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    reference = peft.PeftModel.from_pretrained(hf_model_from(tmp_path / "base"), tmp_path / "adapter").eval()
    ids = ids_for(T=12)
    unmerged = logits(model, ids)
    assert max_diff(unmerged, logits(reference, ids)) <= 1e-4
    assert max_diff(logits(merge_lora(model), ids), unmerged) <= 1e-5


# ------------------------------------------------------------------------------------------ the fused LoRA path


class OpLog(TorchDispatchMode):
    """Records every aten / custom op that runs (forward and backward) with its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []  # (op name, [tensor arguments])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in [*args, *(kwargs or {}).values()] if isinstance(a, torch.Tensor)]
        self.calls.append((str(func.overloadpacket), tensors))
        return func(*args, **(kwargs or {}))

    def matmuls(self):
        return [ts for name, ts in self.calls if name.split(".")[-1] in ("mm", "addmm", "bmm", "addmm_")]

    def elementwise(self, min_numel):
        """Element-wise adds and multiplies over activations (a tensor argument of at least min_numel elements)."""
        return [n for n, ts in self.calls if n.split(".")[-1] in ("add", "add_", "mul", "mul_", "sub")
                and any(t.numel() >= min_numel for t in ts)]

    def casts(self):
        """(shape, from dtype) of every dtype conversion of a tensor."""
        return [(tuple(ts[0].shape), ts[0].dtype) for name, ts in self.calls if name.endswith("_to_copy")]


def saved_storages(fn, held=()):
    """Run fn() and return {storage: bytes} of the tensors autograd saves for the backward, leaving out storages in
    `held` (the parameters, which exist anyway). Each storage counts once, however many views of it are saved."""
    held = {t.untyped_storage()._cdata for t in held}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in held:
            saved[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def lora_layer(in_features=64, out_features=112, rank=8, alpha=16.0, dtype=torch.float32, bias=True, seed=0,
               **options):
    """A LoRALinear over a random nn.Linear, with B random too (at init B = 0 hides the adapter in every gradient)."""
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(in_features, out_features, bias=bias).to(dtype), rank, alpha, **options)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer


def forward_backward(module, x, seed=0):
    """Output, input gradient and trainable-parameter gradients of one forward and backward (same dropout draws)."""
    x = x.detach().clone().requires_grad_(x.is_floating_point())  # token ids have no gradient
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = module(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out.float() * weights).sum().backward()  # a loss whose gradient differs from element to element
    grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    return out.detach(), x.grad, grads


def runs_fused(layer) -> bool:
    """Whether the layer's output comes from the fused autograd Function (looking past views and casts)."""
    fn = layer(torch.randn(3, layer.in_features, requires_grad=True)).grad_fn
    while fn is not None and fn.name().startswith(("ViewBackward", "ToCopyBackward")):
        fn = fn.next_functions[0][0]
    return fn is not None and fn.name().startswith("_LoRALinearFunction")


def reference_copy(model):
    reference = copy.deepcopy(model)
    assert lora.set_fast_path(reference, fused=False) > 0
    return reference


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_fused_layer_is_bitwise_the_reference_in_fp32(dropout, dora):
    """alpha / rank = 2: scaling by a power of two is exact wherever it is applied, so in fp32 one fused layer (update
    added inside addmm_, the adapter's input gradient added into the base's, scaling applied to the small (N, r) and
    (out, r) products in the backward) gives the reference's output and gradients bit for bit, dropout draws included.
    DoRA under the fused switch is the reference's formula in the base's dtype: the same in fp32."""
    layer = lora_layer(rank=4, alpha=8.0, dropout=dropout, dora=dora)
    reference = reference_copy(layer)
    assert runs_fused(layer) != dora and not runs_fused(reference)  # DoRA has no autograd Function of its own
    x = torch.randn(3, 5, 64)
    (out, gx, grads), (out_ref, gx_ref, grads_ref) = forward_backward(layer, x), forward_backward(reference, x)
    assert torch.equal(out, out_ref) and torch.equal(gx, gx_ref)
    assert grads.keys() == grads_ref.keys() == {"lora_A.weight", "lora_B.weight"} | ({"lora_magnitude_vector"}
                                                                                   if dora else set())
    assert all(torch.equal(grads[n], grads_ref[n]) for n in grads)
    if dropout:  # the draws really are used: another seed gives another output
        assert not torch.equal(forward_backward(layer, x, seed=1)[0], out)


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_fused_model_matches_the_reference_in_fp32(hf_checkpoint, dropout):
    """A whole model, every linear adapted: the logits are bitwise equal; the gradients agree to 1e-5 of each
    tensor's largest entry, because autograd sums a hidden state's gradient from one tensor per fused layer but from
    two (base and adapter) per reference layer, and floating-point addition in another order rounds differently
    (the differences seen are a few float32 ulps)."""
    folder, _ = hf_checkpoint("llama", attention_bias=True)
    model = models.from_pretrained(folder)
    apply_lora(model, "all-linear", rank=4, alpha=8, dropout=dropout)
    randomize_adapters(model)
    reference = reference_copy(model)
    model.train(), reference.train()
    ids = ids_for()
    (out, _, grads), (out_ref, _, grads_ref) = forward_backward(model, ids), forward_backward(reference, ids)
    assert torch.equal(out, out_ref)
    assert grads.keys() == grads_ref.keys() == set(lora.trainable_parameters(model))
    assert all(max_diff(grads[n], grads_ref[n]) <= 1e-5 * grads_ref[n].abs().max().item() for n in grads)


@pytest.mark.parametrize("options", [dict(alpha=6.0), dict(alpha=6.0, rslora=True, dropout=0.2)],
                         ids=["alpha-6", "rslora-dropout"])
def test_fused_layer_matches_the_reference_with_any_scaling(options):
    """With s = 1.5 or 3 the two paths round s * (...) at different places, so they agree to fp32 rounding: a bound of
    1e-5 of each tensor's largest entry (~100 float32 ulps; one rounding of the sum of 64 or 112 products)."""
    layer = lora_layer(rank=4, **options)
    reference = reference_copy(layer)
    x = torch.randn(3, 5, 64)
    results = forward_backward(layer, x), forward_backward(reference, x)
    (out, gx, grads), (out_ref, gx_ref, grads_ref) = results
    for got, want in [(out, out_ref), (gx, gx_ref), *[(grads[n], grads_ref[n]) for n in grads]]:
        assert max_diff(got, want) <= 1e-5 * want.abs().max().item()


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16], ids=["fp32-base", "bf16-base"])
def test_casts_matmul_dtypes_and_saved_bytes_per_layer(base_dtype):
    """A base in fp32 or bf16 with fp32 adapters (the default): count, over one forward and backward of one layer, the
    dtype casts and matmul dtypes of both paths, and the bytes autograd saves for the backward beyond the parameters."""
    N, d_in, d_out, r = 24, 64, 112, 8  # tokens (B=2, T=12), features, rank
    layer = lora_layer(d_in, d_out, rank=r, dtype=base_dtype)
    reference = reference_copy(layer)
    assert layer.lora_A.weight.dtype == torch.float32  # fp32 master copies: the optimizer steps these
    counts = {}
    for name, module in [("fused", layer), ("reference", reference)]:
        x = torch.randn(2, 12, d_in, dtype=base_dtype, requires_grad=True)
        log = OpLog()
        with log:
            saved = saved_storages(lambda: module(x).sum().backward(), held=module.parameters())  # no cast in the loss
        activation_casts = [c for c in log.casts() if c[0][0] in (2, N)]  # a leading dim of B or N: an activation
        fp32_matmuls = [ts for ts in log.matmuls() if any(t.dtype == torch.float32 for t in ts)]
        counts[name] = dict(activation_casts=len(activation_casts), all_casts=len(log.casts()),
                            matmuls=len(log.matmuls()), fp32_matmuls=len(fp32_matmuls),
                            activation_elementwise=len(log.elementwise(N * d_in)), saved_bytes=sum(saved.values()))
    print(base_dtype, counts)  # reported by `pytest -s`
    if base_dtype == torch.float32:
        # nothing to cast and every matmul in fp32 (forward: base, x Aᵀ, update; backward: dx through the base, dA,
        # dB, dy B, dx through A); the same x and x Aᵀ kept. The reference adds four element-wise passes over
        # activations: scaling and sum forward, scaling the gradient and summing the two input gradients backward
        expected = dict(activation_casts=0, all_casts=0, matmuls=8, fp32_matmuls=8,
                        saved_bytes=N * d_in * 4 + N * r * 4)
        assert counts["fused"] == dict(expected, activation_elementwise=0)
        assert counts["reference"] == dict(expected, activation_elementwise=4)
        return
    # fused: only the adapter weights are cast (A, B to bf16 forward; their gradients to fp32 backward), and every
    # matmul is bf16; it keeps x, x Aᵀ (bf16) and the bf16 copies of A and B
    assert counts["fused"] == dict(activation_casts=0, all_casts=4, matmuls=8, fp32_matmuls=0, activation_elementwise=0,
                                   saved_bytes=N * d_in * 2 + N * r * 2 + (r * d_in + d_out * r) * 2)
    # reference: x up to fp32 and the update down to bf16 in the forward; in the backward the gradient up, its share for
    # the bf16 base output down (the bf16 + fp32 sum promoted) and the input gradient down; both adapter matmuls
    # forward and all four backward in fp32. It keeps an fp32 copy of x and x Aᵀ in fp32 (its frozen bf16 base matmul
    # keeps only W); the fused path keeps x itself, often saved for another layer anyway (q, k and v share it)
    assert counts["reference"] == dict(activation_casts=5, all_casts=5, matmuls=8, fp32_matmuls=6,
                                       activation_elementwise=4, saved_bytes=N * d_in * 4 + N * r * 4)


def bf16_error(got, oracle) -> float:
    return max_diff(got, oracle) / oracle.abs().max().item()


@pytest.mark.parametrize("where", ["bf16-base", "autocast"])
def test_fused_path_in_bf16_is_as_close_to_fp32_as_the_reference(where):
    """bf16 (`train.precision = "bf16"`: bf16 base, fp32 adapters) and autocast (`amp-bf16`: everything fp32 under
    torch.autocast): the output is bf16, the adapter gradients fp32, and both paths are within 1% of each tensor's
    largest entry of the fp32 computation on the same weights (bf16 keeps 8 significant bits, 0.4%, and the inputs,
    weights and results are each rounded to it; both paths show up to 0.5% here, the bound allows ~2.5 roundings)."""
    layer = lora_layer(rank=8, dropout=0.0)
    oracle = forward_backward(layer, x := torch.randn(2, 12, 64))  # fp32 everything
    reference = reference_copy(layer)
    if where == "bf16-base":
        for module in (layer, reference):
            module.weight.data, module.bias.data = module.weight.data.bfloat16(), module.bias.data.bfloat16()
        x_in, context = x.bfloat16(), contextlib.nullcontext
    else:
        x_in, context = x, lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    for module in (layer, reference):
        with context():
            out, gx, grads = forward_backward(module, x_in)
        assert out.dtype == torch.bfloat16
        assert all(g.dtype == torch.float32 for g in grads.values())
        assert bf16_error(out, oracle[0]) <= 1e-2 and bf16_error(gx, oracle[1]) <= 1e-2
        assert all(bf16_error(grads[n], oracle[2][n]) <= 1e-2 for n in grads)
    log = OpLog()
    with log, context():
        layer(x_in).sum().backward()
    assert not [ts for ts in log.matmuls() if any(t.dtype == torch.float32 for t in ts)]


def test_a_trainable_base_takes_the_reference_path():
    layer = lora_layer()
    layer.weight.requires_grad_(True)  # the fused backward computes no base gradient, so it must not be used
    assert layer.fused and not runs_fused(layer)
    forward_backward(layer, torch.randn(3, 64))
    assert layer.weight.grad is not None


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_fused_dora_in_bf16_casts_no_activation(dropout):
    """DoRA with a bf16 base and fp32 adapters: under the fused switch no activation is cast and no matmul over
    activations runs in fp32 (the fp32 matmul left is B A for the weight norm, (out, r) x (r, in), no activation);
    the reference casts x up and the result down. Output within 1% of the fp32 computation (bf16: 0.4% a rounding)."""
    N = 24  # tokens: B=2, T=12
    layer = lora_layer(rank=8, dora=True, dropout=dropout)
    oracle = forward_backward(layer.eval(), x := torch.randn(2, 12, 64))[0]
    layer.weight.data, layer.bias.data = layer.weight.data.bfloat16(), layer.bias.data.bfloat16()
    reference = reference_copy(layer)
    x = x.bfloat16()
    for module in (layer, reference):
        log = OpLog()
        with log:
            out = forward_backward(module.train(), x)[0]
        activation_casts = [c for c in log.casts() if c[0][0] in (2, N)]
        fp32_matmuls = [[tuple(t.shape) for t in ts] for ts in log.matmuls()
                        if any(t.dtype == torch.float32 for t in ts)]
        if module is layer:
            # the loss's `.float()` and its gradient's way back are the only activation casts
            assert len(activation_casts) == 2 and fp32_matmuls == [[(112, 8), (8, 64)]]
            assert bf16_error(forward_backward(module.eval(), x)[0], oracle) <= 1e-2
        else:
            assert len(activation_casts) > 2 and len(fp32_matmuls) > 1
        assert out.dtype == torch.bfloat16


def test_fused_dora_weight_norm_follows_every_change_of_the_adapter():
    """The weight norm is not cached: after an in-place change of A, B (what an optimizer step does) and the base
    weight, the fused DoRA layer still equals the reference bit for bit (fp32, alpha / rank = 2)."""
    layer = lora_layer(rank=4, alpha=8.0, dora=True)
    reference = reference_copy(layer)
    x = torch.randn(3, 5, 64)
    assert torch.equal(layer(x), reference(x))
    with torch.no_grad():
        for module in (layer, reference):
            module.lora_B.weight.mul_(3.0)
            module.lora_A.weight.add_(0.5)
            module.weight.mul_(0.5)
    assert torch.equal(layer(x), reference(x))
    assert not torch.equal(layer(x), lora_layer(rank=4, alpha=8.0, dora=True)(x))  # the change did change it


LLAMA_8B_SHAPES = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-5)
LLAMA_1B_SHAPES = dict(LLAMA_8B_SHAPES, hidden_size=2048, intermediate_size=8192, head_dim=64)


def decoder_layer_saved_bytes(hf_config: dict, fused: bool, B: int, T: int, rank: int) -> int:
    """Bytes autograd keeps for one bf16 Llama decoder layer with LoRA on its 7 projections, beyond the parameters;
    on the meta device, so nothing is allocated or computed."""
    from models import attention

    config = models.config_from_hf(hf_config)
    config.attn_implementation = "sdpa"
    model = models.build_model(config, "meta", torch.bfloat16)
    apply_lora(model, [*ATTN, "gate_proj", "up_proj", "down_proj"], rank=rank, alpha=2 * rank)
    lora.set_fast_path(model, fused=fused)
    positions = torch.arange(T).expand(B, T)
    ctx = attention.build_context("sdpa", (B, T), torch.device("cpu"), positions, None, None)
    x = torch.empty(B, T, config.hidden_size, device="meta", dtype=torch.bfloat16, requires_grad=True)
    cos, sin = model.model.rotary_emb(positions.to("meta"), x.dtype)
    saved = saved_storages(lambda: model.model.layers[0](x, cos, sin, ctx), held=model.parameters())
    return sum(saved.values())


@pytest.mark.parametrize("workload", ["W2", "W3"])
def test_saved_bytes_of_a_decoder_layer_at_benchmark_shapes(workload):
    """The benchmark's LoRA shapes (W2: Llama 1B, 4 rows of 2,048 tokens; W3: Llama 8B, one row of 4,096; rank 16):
    the fused path keeps less by exactly what the per-layer count predicts: the reference's fp32 copy of each adapted
    input and fp32 x Aᵀ, less the bf16 inputs the fused path keeps (q, k and v share one, gate and up share one) and
    the bf16 copies of A and B."""
    hf_config, B, T = {"W2": (LLAMA_1B_SHAPES, 4, 2048), "W3": (LLAMA_8B_SHAPES, 1, 4096)}[workload]
    r, N, D, I = 16, B * T, hf_config["hidden_size"], hf_config["intermediate_size"]
    kv = hf_config["num_key_value_heads"] * hf_config["head_dim"]
    shapes = [(D, D), (D, kv), (D, kv), (D, D), (D, I), (D, I), (I, D)]  # (in, out) of q, k, v, o, gate, up, down
    reference = decoder_layer_saved_bytes(hf_config, False, B, T, r)
    fused = decoder_layer_saved_bytes(hf_config, True, B, T, r)
    print(f"{workload} saved per decoder layer: reference {reference / 2**20:.1f} MiB, fused {fused / 2**20:.1f} MiB")
    kept_by_reference = sum(N * d_in * 4 + N * r * 4 for d_in, _ in shapes)
    kept_by_fused = N * (D + D + D + I) * 2 + len(shapes) * N * r * 2 + sum(r * (i + o) * 2 for i, o in shapes)
    assert reference - fused == kept_by_reference - kept_by_fused
