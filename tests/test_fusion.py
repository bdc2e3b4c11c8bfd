"""model.fuse_projections (models/fusion.py): q/k/v and gate/up as one weight each, against the unfused model.

Every family: the same logits, the same loss, gradients and updated weights after a training step, and a final/ with
exactly the checkpoint's HF keys that transformers loads with the same logits (both savers; a Gemma 3 image-text
checkpoint's text model too). Then the trainer: two processes (FSDP2 with sharded load and streamed save; context
parallelism) equal one unfused process, a fused run resumes exactly, and features that address the unfused
projections by name are refused. Kernels, torch.compile, activation checkpointing, QAT and FP8 run with the switch on.
"""

from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

import models
from models import fusion
from nanotune import parallel, train
from nanotune.config import ConfigError, load_config, to_toml
from tests import test_compile, test_models_gemma, test_models_qwen_moe
from tests.conftest import ROOT, run_torchrun, write_hf_checkpoint
from tests.test_context_parallel import assert_same_final
from tests.test_parallel import QUICKSTART, base_argv, write_family_checkpoint
from tests.test_train import assert_same_params, losses

transformers = pytest.importorskip("transformers")

FAMILIES = ["llama", "mistral", "gemma2", "gemma3", "qwen2_moe", "qwen3_moe"]
UNFUSED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def write_checkpoint(folder, family):
    """A tiny random transformers checkpoint (fp32); -> the transformers model. Llama with biases on every projection,
    Qwen2-MoE with q/k/v biases and a shared expert, Gemma 3 and Qwen3-MoE with q/k norms, Qwen3-MoE with a dense
    layer beside the sparse ones."""
    if family == "llama":
        return write_hf_checkpoint(folder, "llama", attention_bias=True, mlp_bias=True)
    if family == "mistral":
        return write_hf_checkpoint(folder, "mistral", sliding_window=8)
    if family.startswith("gemma"):
        return test_models_gemma.write_checkpoint(folder, family)
    if family == "qwen3_moe":  # layer 0 dense, so that it has a gate_up_proj to fuse
        return test_models_qwen_moe.write_checkpoint(folder, family, mlp_only_layers=[0])
    return test_models_qwen_moe.write_checkpoint(folder, family)


def loss_of(model, ids):
    """Next-token CE over the batch (+ the router losses of a MoE model)."""
    logits = model(ids)  # (B, T, V)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return loss + model.aux_loss if getattr(model, "aux_loss", None) is not None else loss


def hf_grads(model):
    """Gradients under the checkpoint's names: a fused parameter's cut into its parts (models/fusion.py)."""
    return {part: p.grad if rows is None else p.grad[rows] for name, p in model.named_parameters()
            for part, rows, _ in fusion.hf_parts(model.config, name, p.shape)}


def checkpoint_keys(folder):
    with safe_open(folder / "model.safetensors", "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_model_computes_trains_and_saves_like_the_unfused_one(tmp_path, family):
    write_checkpoint(tmp_path / "m", family)
    plain = models.from_pretrained(tmp_path / "m")
    fused = models.from_pretrained(tmp_path / "m", fuse_projections=True)
    names = [n for n, _ in fused.named_modules()]
    assert not [n for n in names if n.rpartition(".")[2] in UNFUSED]
    assert any(n.endswith("self_attn.qkv_proj") for n in names) and any(n.endswith("gate_up_proj") for n in names)

    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (fused(ids) - plain(ids)).abs().max().item() <= 1e-6

    # one training step: the same loss and gradients (in the checkpoint's layout), then the same updated weights
    losses_ = [loss_of(model, ids) for model in (plain, fused)]
    for loss in losses_:
        loss.backward()
    assert abs(losses_[0].item() - losses_[1].item()) <= 1e-6
    grads_plain, grads_fused = hf_grads(plain), hf_grads(fused)
    assert grads_fused.keys() == grads_plain.keys()
    for key, grad in grads_plain.items():  # the GEMMs add in another order (~1e-7 relative here)
        assert (grads_fused[key] - grad).abs().max() <= 1e-5 * grad.abs().max(), key
        if key.rpartition(".")[0].rpartition(".")[2] in UNFUSED:
            assert grad.abs().max() > 0, key
    lr = 1e-2 / max(g.abs().max().item() for g in grads_plain.values())  # no weight moves by more than 1e-2
    for model in (plain, fused):
        torch.optim.SGD(model.parameters(), lr=lr).step()
    after_plain, after_fused = models.hf_state_dict(plain), models.hf_state_dict(fused)
    assert after_fused.keys() == after_plain.keys()
    for key, value in after_plain.items():
        assert (after_fused[key] - value).abs().max().item() <= 1e-6, key

    # final/: exactly the checkpoint's HF keys, and transformers computes what the fused model computes
    models.save_pretrained(fused, tmp_path / "saved")
    assert checkpoint_keys(tmp_path / "saved") == checkpoint_keys(tmp_path / "m")
    extra = {"experts_implementation": "eager"} if "moe" in family else {}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="eager",
                                                               **extra).eval()
    with torch.no_grad():
        assert (fused(ids) - loaded(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_streamed_final_of_a_fused_model_is_the_unfused_one(tmp_path, family):
    """The saver of sharded runs (here in one process, where gathering is the identity) cuts the fused weights back
    into HF's tensors, across shard files."""
    write_family_checkpoint(tmp_path / "m", family)
    fused = models.from_pretrained(tmp_path / "m", fuse_projections=True)
    parallel.save_final_streamed(fused, tmp_path / "streamed", parallel.DistInfo(), max_shard_bytes=60_000)
    assert (tmp_path / "streamed" / "model.safetensors.index.json").is_file()
    streamed = models.from_pretrained(tmp_path / "streamed").state_dict()
    reference = models.from_pretrained(tmp_path / "m").state_dict()
    assert streamed.keys() == reference.keys()
    assert all(torch.equal(streamed[k], reference[k]) for k in reference)


def test_fused_text_model_of_a_gemma3_image_text_checkpoint_saves_text_only(tmp_path):
    """Read under language_model.* (the vision side skipped), saved as a text-only Gemma 3 by both savers, with HF's
    unfused keys; transformers loads it with the fused model's logits."""
    torch.manual_seed(0)
    base = test_models_gemma
    text = {**base.BASE, "vocab_size": 300, "layer_types": base.GEMMA3_LAYERS, "rope_parameters": base.GEMMA3_ROPE}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=299, boi_token_index=297, eoi_token_index=298)
    reference = transformers.Gemma3ForConditionalGeneration(config).eval()
    base.randomise_norms(reference)
    reference.save_pretrained(tmp_path / "m")
    fused = models.from_pretrained(tmp_path / "m", fuse_projections=True)
    ids = torch.randint(0, 290, (2, 20))
    with torch.no_grad():
        assert (fused(ids) - reference(input_ids=ids).logits).abs().max().item() <= 1e-4
    models.save_pretrained(fused, tmp_path / "text")
    parallel.save_final_streamed(fused, tmp_path / "streamed", parallel.DistInfo())
    assert checkpoint_keys(tmp_path / "streamed") == checkpoint_keys(tmp_path / "text")
    assert "model.layers.0.self_attn.k_proj.weight" in checkpoint_keys(tmp_path / "text")
    for folder in ("text", "streamed"):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / folder, attn_implementation="eager")
        with torch.no_grad():
            assert (fused(ids) - loaded.eval()(ids).logits).abs().max().item() <= 1e-4, folder


@pytest.mark.parametrize("saver", ["selective", "full", "tiled_mlp"])
def test_memory_savers_on_a_fused_model_give_the_unfused_gradients(tmp_path, saver):
    """Activation checkpointing (selective, full) and the tiled MLP (train.tiled_mlp) run the fused modules."""
    from nanotune import memory

    write_checkpoint(tmp_path / "m", "gemma3")
    plain = models.from_pretrained(tmp_path / "m")
    fused = models.from_pretrained(tmp_path / "m", fuse_projections=True)
    if saver == "tiled_mlp":
        assert memory.apply_tiled_mlp(fused, 8) == len(fused.model.layers)
    else:
        fused.activation_checkpointing = saver
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    for model in (plain, fused):
        loss_of(model.train(), ids).backward()
    grads_plain, grads_fused = hf_grads(plain), hf_grads(fused)
    for key, grad in grads_plain.items():
        assert (grads_fused[key] - grad).abs().max() <= 1e-5 * grad.abs().max(), key


def test_qat_and_fp8_swap_the_fused_linears(tmp_path):
    """QAT's int4 weight groups run along each row's inputs and its int8 activations per token, so the fused model
    computes what the unfused one does; FP8 swaps the fused linears too (with one scale for q, k and v together under
    tensorwise, so only a smoke test of that here)."""
    from nanotune.fp8 import apply_fp8
    from nanotune.qat import apply_qat

    write_checkpoint(tmp_path / "m", "llama")
    plain = models.from_pretrained(tmp_path / "m")
    fused = models.from_pretrained(tmp_path / "m", fuse_projections=True)
    swapped = [apply_qat(model, "int8-int4", 32, skip=["lm_head"]) for model in (plain, fused)]
    assert "model.layers.0.self_attn.qkv_proj" in swapped[1] and "model.layers.0.mlp.gate_up_proj" in swapped[1]
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (fused(ids) - plain(ids)).abs().max().item() <= 1e-5
        assert (plain(ids) - models.from_pretrained(tmp_path / "m")(ids)).abs().max().item() > 1e-3  # QAT is on

    fp8 = models.from_pretrained(tmp_path / "m", fuse_projections=True)
    swapped = apply_fp8(fp8, "tensorwise", skip=["lm_head"], min_dim=0)
    assert "model.layers.0.self_attn.qkv_proj" in swapped and "model.layers.0.mlp.gate_up_proj" in swapped
    loss = loss_of(fp8, ids)
    loss.backward()
    assert torch.isfinite(loss) and fp8.model.layers[0].self_attn.qkv_proj.weight.grad.abs().max() > 0


def test_a_fused_model_reads_only_the_rows_of_a_part_it_holds():
    """k_proj lands in rows 16..20 of a (Hq + 2 Hkv) * hd = 24-row qkv_proj, up_proj in rows 32..64 of gate_up_proj;
    under FSDP2 the rank holding rows 32..64 reads all of up_proj, the other none of it."""
    config = models.config_from_hf(dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1))
    config.fuse_projections = True
    model = models.build_model(config)
    name, rows = models.param_for_hf_key(model, "model.layers.0.self_attn.k_proj.weight")
    assert (name, rows) == ("model.layers.0.self_attn.qkv_proj.weight", slice(16, 20))
    name, rows = models.param_for_hf_key(model, "model.layers.0.mlp.up_proj.weight")
    assert (name, rows) == ("model.layers.0.mlp.gate_up_proj.weight", slice(32, 64))
    file_index, local_index = parallel.overlap(parallel.key_region((64, 16), rows), (32, 16), (32, 0))
    assert file_index == (slice(0, 32), slice(0, 16)) and local_index == (slice(0, 32), slice(0, 16))
    assert parallel.overlap(parallel.key_region((64, 16), rows), (32, 16), (0, 0)) is None
    keys = models.expected_checkpoint_keys(model)
    assert keys["model.layers.0.self_attn.q_proj.weight"] == (16, 16)
    assert keys["model.layers.0.self_attn.v_proj.weight"] == (4, 16)
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in keys)


# --------------------------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Llama and Qwen3-MoE trained 2 steps: unfused in one process, fused in one process (with a checkpoint each step)
    and fused in two processes (FSDP2, dp_shard 2: sharded load, streamed final/); Llama also fused with cp = 2."""
    tmp = tmp_path_factory.mktemp("fusion")
    rows = (QUICKSTART / "train.jsonl").read_text().splitlines()[:24]
    (tmp / "train.jsonl").write_text("\n".join(rows) + "\n")
    fused, out, two_process = ["--model.fuse_projections=true"], {}, []
    for family in ("llama", "qwen3_moe"):
        write_family_checkpoint(tmp / family, family)
        for name, extra in (("plain", []), ("fused", [*fused, "--checkpoint.every=1", "--checkpoint.keep=0"])):
            out[family, name] = tmp / f"{family}-{name}"
            assert train.main(base_argv(tmp, tmp / family, out[family, name])
                              + ["--train.grad_accum_steps=4", *extra]) == 0
        out[family, "fsdp"] = tmp / f"{family}-fsdp"
        two_process.append(base_argv(tmp, tmp / family, out[family, "fsdp"])
                           + ["--parallel.dp_shard=2", "--train.grad_accum_steps=2", *fused])
    out["llama", "cp"] = tmp / "llama-cp"  # context parallelism: each process holds half of every row
    two_process.append(base_argv(tmp, tmp / "llama", out["llama", "cp"])
                       + ["--parallel.cp=2", "--parallel.dp_shard=1", "--train.grad_accum_steps=4", *fused])
    spec = tmp / "runs.json"
    spec.write_text(json.dumps(two_process))
    run_torchrun(ROOT / "tests" / "test_parallel.py", str(spec), nproc=2)  # its worker trains each argv in turn
    out["tmp"] = tmp
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_fused_runs_in_one_and_two_processes_train_like_the_unfused_run(runs, family):
    plain = runs[family, "plain"]
    reference = load_file(plain / "final" / "model.safetensors")
    for name in ("fused", "fsdp"):
        out = runs[family, name]
        assert losses(out) == pytest.approx(losses(plain), rel=1e-5)
        assert checkpoint_keys(out / "final") == checkpoint_keys(runs["tmp"] / family)
        assert_same_params(load_file(out / "final" / "model.safetensors"), reference)


def test_fused_run_with_context_parallelism_trains_like_the_unfused_run(runs):
    assert losses(runs["llama", "cp"]) == pytest.approx(losses(runs["llama", "plain"]), rel=1e-5)
    assert_same_final(runs["llama", "cp"], runs["llama", "plain"])


def test_resuming_a_fused_run_is_exact_and_a_changed_switch_is_refused(runs, tmp_path):
    straight = runs["llama", "fused"]
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("step-2", "final"))
    argv = base_argv(runs["tmp"], runs["tmp"] / "llama", resumed) + [
        "--train.grad_accum_steps=4", "--model.fuse_projections=true", "--checkpoint.resume=auto"]
    assert train.main(argv) == 0
    assert losses(resumed) == losses(straight)
    assert_same_params(load_file(resumed / "final" / "model.safetensors"),
                       load_file(straight / "final" / "model.safetensors"), atol=0, max_outlier_fraction=0)
    # the DCP checkpoint holds qkv_proj / gate_up_proj: resuming it unfused is refused before anything is built
    with pytest.raises(ConfigError, match=r"model.fuse_projections \(checkpoint True, now False\) changed"):
        train.check_resumable(to_toml(load_config(None, ["--model.fuse_projections=true"])), load_config(None, []))


@pytest.mark.parametrize("keys,message", [
    (["--lora.enabled=true", "--lora.dora=true"], r"with lora.dora = true \(DoRA's magnitudes"),
    (["--lora.enabled=true", "--fp8.enabled=true"], r"with lora.enabled = true and fp8.enabled = true"),
    (["--lora.enabled=true", "--lora.quantize=nf4"], r"with lora.quantize = 'nf4' \(QLoRA"),
    (["--parallel.tp=2"], r"with parallel.tp = 2 \(the tensor-parallel plans split"),
    (["--fp8.enabled=true", "--fp8.skip=['lm_head','q_proj']"], r"fp8.skip names \['q_proj'\], which a model"),
    (["--qat.enabled=true", "--qat.skip=['up_proj']"], r"qat.skip names \['up_proj'\], which a model"),
])
def test_features_that_address_the_unfused_projections_are_refused(keys, message):
    cfg = load_config(None, ["--model.size=llama-tiny", "--model.fuse_projections=true", "--train.max_steps=1", *keys])
    with pytest.raises(ConfigError, match=message + ".*model.fuse_projections"):
        train.check_config(cfg)
    unfused = load_config(None, ["--model.size=llama-tiny", "--train.max_steps=1", *keys])
    train.check_fusion(unfused)  # without the switch these are not fusion's business


# --------------------------------------------------------------------------------------------- kernels, compile


def fused_tiny(family, dtype=torch.float32, attn="sdpa"):
    config = models.config_from_hf({**test_compile.TINY, **test_compile.FAMILIES[family]})
    config.attn_implementation, config.fuse_projections = attn, True
    model = models.build_model(config, "cpu", dtype)
    model.init_weights(torch.Generator().manual_seed(0))
    return model


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_kernels_swap_the_fused_mlp_and_keep_logits_and_gradients(family):
    pytest.importorskip("triton")
    from nanotune.kernels import apply_kernels

    model = fused_tiny(family, attn="auto")
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(1))
    names = [n for n, _ in model.named_parameters()]
    expected = model(ids)
    expected.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    swapped = apply_kernels(model)
    assert {type(model.get_submodule(n)).__name__ for n in swapped} == {"TritonRMSNorm", "TritonFusedGLUMLP",
                                                                        "TritonRope"}
    assert [n for n, _ in model.named_parameters()] == names
    logits = model(ids)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    logits.square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-3, atol=1e-6, msg=n)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2_moe"])
def test_fused_model_and_loss_have_no_graph_break(family):
    model = fused_tiny(family, torch.bfloat16 if "moe" in family else torch.float32, attn="auto")
    batch = test_compile.rows(packed=True)
    assert test_compile.graph_breaks(functools.partial(test_compile.loss_sum, model), batch) == []


def test_compiled_fused_forward_and_backward_equal_eager():
    model = fused_tiny("llama")
    batch = test_compile.rows(packed=True)
    expected = test_compile.loss_sum(model, batch)
    expected.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(functools.partial(test_compile.loss_sum, model), backend="aot_eager", fullgraph=True)
    out = compiled(batch)
    out.backward()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_bench_runs_fused_workloads_and_refuses_qlora(capsys):
    """scripts/bench.py --fuse-projections: the first step's loss of the fused model agrees with transformers' (the exit
    code says so) on a dense full, a dense LoRA (adapters on the fused q/k/v and gate/up, against peft's on the
    separate projections) and a MoE workload; QLoRA workloads are refused."""
    from scripts import bench

    assert bench.main(["--device", "cpu", "--tiny", "--workloads", "W1,W2,W6", "--steps", "1", "--warmup", "1",
                       "--no-liger", "--no-kernels", "--fuse-projections"]) == 0
    assert "fused q/k/v and gate/up projections" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--tiny", "--workloads", "W1,W4", "--fuse-projections"])
    assert "--fuse-projections: ['W4'] quantise q_proj ... up_proj to NF4" in capsys.readouterr().err
