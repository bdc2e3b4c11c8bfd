"""N-D parallelism: the [parallel] layout checks, the TP plans, and every layout training like one process.

The multi-process tests start one torchrun job per world size; inside it, this file runs as a script (`worker`) that
trains several configurations in turn (process group set up and torn down by each run), so the cost of starting
processes and importing torch is paid once per world size, not once per layout.

Tolerance of the comparisons with one process (`assert_same_params` of tests/test_train.py): in fp32 the layouts add
the same numbers in another order (reduce-scatter over data-parallel ranks, matmuls split over tensor-parallel ranks
and all-reduced), so gradients agree to ~1e-7 relative and losses to 1e-5. AdamW's first steps move a weight by about
lr * sign(gradient); where a gradient is ~0 its sign can flip with that rounding, so a handful of elements (<= 1e-4 of
a tensor) may differ by up to about one step (lr), and all others agree to 3e-5. LoRA adapters are tensors of a
few hundred elements, so there one element may be such an outlier; in the merged final/ (W + s B A) that one element
shifts a whole row or column, so up to 2% of a merged weight may.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import models
from nanotune import parallel, train
from nanotune.config import ConfigError, LoraConfig, ParallelConfig, load_config
from tests.conftest import ROOT, run_tasks, run_torchrun, write_hf_checkpoint
from tests.test_train import assert_same_params, losses, metrics

QUICKSTART = ROOT / "data" / "quickstart"
LORA = ["--lora.enabled=true", "--lora.rank=4", "--lora.alpha=8",
        "--lora.targets=['q_proj','k_proj','v_proj','o_proj','gate_proj','up_proj','down_proj']"]

# --------------------------------------------------------------------------------------------- layout checks


def layout(world_size, **keys):
    return parallel.resolve_layout(ParallelConfig(**keys), world_size)


def test_dp_shard_takes_the_processes_left_over():
    assert layout(8, tp=2) == {"dp_replicate": 1, "dp_shard": 4, "cp": 1, "tp": 2}
    assert layout(8, dp_replicate=2, tp=2) == {"dp_replicate": 2, "dp_shard": 2, "cp": 1, "tp": 2}
    assert layout(1) == {"dp_replicate": 1, "dp_shard": 1, "cp": 1, "tp": 1}


@pytest.mark.parametrize("world_size,keys,message", [
    (4, dict(dp_shard=2), r"layout \(dp_shard 2 = 2\) does not match the 4 processes launched; make parallel."
                          r"dp_replicate x dp_shard x cp x tp equal the world size"),
    (6, dict(tp=4), r"parallel.dp_replicate x cp x tp = 4 does not divide the 6 processes"),
    (1, dict(tp=2), r"parallel.dp_replicate x cp x tp = 2 does not divide the 1 processes"),
    (2, dict(dp_shard=2, tp=2), r"layout \(dp_shard 2 x tp 2 = 4\) does not match the 2 processes launched"),
    (2, dict(dp_shard=1, dp_replicate=2, ep=2), r"parallel.ep = 2 does not divide parallel.dp_shard = 1"),
    (2, dict(dp_shard=0), r"parallel.dp_shard must be -1 \(the processes left over\) or at least 1"),
    (2, dict(reduce_dtype="fp16"), r"parallel.reduce_dtype = 'fp16' is not one of"),
])
def test_impossible_layouts_are_refused_naming_the_key(world_size, keys, message):
    with pytest.raises(ConfigError, match=message):
        layout(world_size, **keys)


def test_cpu_offload_without_a_gpu_is_refused():
    with pytest.raises(ConfigError, match="parallel.cpu_offload = true .* set parallel.cpu_offload = false"):
        parallel.init_distributed("cpu", ParallelConfig(cpu_offload=True))


def test_tp_beyond_one_node_is_a_warning(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.warns(UserWarning, match="parallel.tp = 4 is larger than the 2 processes of one node"):
        layout(8, tp=4)


def tiny_config(**overrides):
    hf = {**dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                 num_attention_heads=6, num_key_value_heads=2), **overrides}
    return models.config_from_hf(hf)


@pytest.mark.parametrize("tp,overrides,key", [(3, {}, "num_key_value_heads"), (4, {}, "num_attention_heads"),
                                              (2, {"intermediate_size": 97}, "intermediate_size")])
def test_tp_must_split_heads_and_mlp_evenly(tp, overrides, key):
    config = tiny_config(**overrides)  # 6 heads, 2 KV heads, MLP of 96
    with pytest.raises(ConfigError, match=rf"parallel.tp = {tp} does not divide the model's {key} .* set parallel.tp"):
        parallel.check_model_layout({"tp": tp}, config)
    assert parallel.check_model_layout({"tp": 2}, tiny_config()) is None  # and a tp that divides them all passes


def test_lora_variants_tp_cannot_split_yet_are_refused():
    config = tiny_config()
    with pytest.raises(ConfigError, match="lora.quantize = 'nf4' with parallel.tp > 1 is not supported"):
        parallel.check_model_layout({"tp": 2}, config, LoraConfig(enabled=True, quantize="nf4"))
    with pytest.raises(ConfigError, match="lora.dora = true with parallel.tp > 1 is not supported"):
        parallel.check_model_layout({"tp": 2}, config, LoraConfig(enabled=True, dora=True))


def test_bad_tp_is_refused_before_any_weight_is_read(hf_checkpoint, monkeypatch):
    folder, _ = hf_checkpoint("llama", vocab_size=64)  # 4 heads, 2 KV heads
    cfg = load_config(None, [f"--model.path={folder}"])

    def no_reading(*args):
        raise AssertionError("a weight was read before the layout was checked")

    monkeypatch.setattr(models.safetensors_io, "read_tensor", no_reading)
    with pytest.raises(ConfigError, match=r"parallel.tp = 3 does not divide the model's num_attention_heads \(4\).*"
                                          r"set parallel.tp to 2"):
        train.build_model(cfg, 51, torch.device("cpu"), {"dp_replicate": 1, "dp_shard": 1, "cp": 1, "tp": 3})


# --------------------------------------------------------------------------------------------- TP plans


def test_plan_star_matches_one_name_component():
    names = ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.shared_expert.gate_proj", "model.layers.12.mlp.gate_proj"]
    assert parallel.plan_matches("model.layers.*.mlp.gate_proj", names) == [names[0], names[2]]


def family_configs():
    return {
        "llama": dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2),
        "gemma3_text": dict(model_type="gemma3_text", vocab_size=64, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8),
        "qwen3_moe": dict(model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64,
                          moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0]),
        "mistral": dict(model_type="mistral", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2),
        "gemma2": dict(model_type="gemma2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    }


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gemma3_text", "qwen3_moe"])
def test_plans_cover_attention_and_dense_mlps_and_nothing_else(family):
    """Every linear layer of attention and of the dense MLPs is split, in Megatron's pairs (q/k/v and gate/up by
    output features, o and down by input features); embeddings, the LM head and the experts are not."""
    model = models.build_model(models.config_from_hf(family_configs()[family]))
    names = [n for n, _ in model.named_modules()]
    split = {name: style for pattern, style in model.tp_plan.items() for name in parallel.plan_matches(pattern, names)}
    unmatched = [pattern for pattern in model.tp_plan if not parallel.plan_matches(pattern, names)]
    assert unmatched == ([] if family != "gemma2" else ["model.layers.*.self_attn.q_norm",
                                                        "model.layers.*.self_attn.k_norm"])  # Gemma 2 has no q/k norm
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    expected = [n for n in linears if re.search(r"\.self_attn\.[qkvo]_proj$|\.layers\.\d+\.mlp\.(gate|up|down)_proj$", n)]
    assert sorted(n for n in split if n in linears) == sorted(expected)
    assert not any("expert" in n or n.endswith("mlp.gate") or "embed" in n or "lm_head" in n for n in split)
    for name, style in split.items():
        leaf = name.rsplit(".", 1)[-1]
        want = {"o_proj": "rowwise", "down_proj": "rowwise", "q_norm": "heads_norm", "k_norm": "heads_norm"}
        assert style == want.get(leaf, "colwise"), name


# --------------------------------------------------------------------------------------------- sharded loading


def test_a_rank_reads_only_the_part_of_a_checkpoint_tensor_it_holds():
    """Expert 2's rows 4..8 of a stacked (experts=4, rows=8, cols=6) parameter, sharded by experts over 2 ranks."""
    region = parallel.key_region((4, 8, 6), (2, slice(4, 8)))
    assert region == [(2, 3, True), (4, 8, False), (0, 6, False)]
    assert parallel.overlap(region, (2, 8, 6), (0, 0, 0)) is None  # rank 0 holds experts 0 and 1
    file_index, local_index = parallel.overlap(region, (2, 8, 6), (2, 0, 0))  # rank 1 holds experts 2 and 3
    assert file_index == (slice(0, 4), slice(0, 6)) and local_index == (0, slice(4, 8), slice(0, 6))
    # a column-split (tensor-parallel) shard of a whole weight: columns 3..6 of the file
    assert parallel.overlap(parallel.key_region((8, 6), None), (8, 3), (0, 3)) == (
        (slice(0, 8), slice(3, 6)), (slice(0, 8), slice(0, 3)))


@pytest.mark.slow
def test_load_memory_script_measures_real_sharded_loads(hf_checkpoint, tmp_path, capsys):
    """scripts/measure_load_memory.py on a tiny model: every process reports its peak, and the values the processes
    loaded add up to the checkpoint's (the script raises otherwise), for 1 and 2 processes."""
    from scripts import measure_load_memory

    folder, _ = hf_checkpoint("llama", vocab_size=64)
    assert measure_load_memory.main([str(folder), "--nproc", "1", "2", "--json", str(tmp_path / "m.json")]) == 0
    runs = json.loads((tmp_path / "m.json").read_text())["runs"]
    assert [len(runs[n]) for n in ("1", "2")] == [1, 2]
    assert all(r["peak_mib"] >= r["before_mib"] > 0 for n in runs for r in runs[n])
    halves = [r["checksum"] for r in runs["2"]]
    assert halves[0] != halves[1] and sum(halves) == pytest.approx(runs["1"][0]["checksum"], rel=1e-9)
    assert "| 2 |" in capsys.readouterr().out


@pytest.mark.parametrize("index", [(slice(2, 5),), (slice(None), slice(1, 3)), (slice(1, 2), slice(0, 4), slice(2, 3)),
                                   (slice(0, 3), slice(0, 4), slice(0, 5)), (slice(3, 3),)])
def test_read_slice_reads_exactly_a_box_of_a_tensor(tmp_path, index):
    from safetensors.torch import save_file

    whole = torch.randn(3, 4, 5).to(torch.bfloat16)
    save_file({"t": whole}, str(tmp_path / "t.safetensors"))
    info = models.safetensors_io.read_header(tmp_path / "t.safetensors")["t"]
    with open(tmp_path / "t.safetensors", "rb") as f:
        assert torch.equal(models.safetensors_io.read_slice(f, info, index), whole[index])


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_streamed_final_is_the_model_in_hf_shards(tmp_path, family):
    """save_final_streamed (here in one process, where gathering is the identity) writes the same tensors as
    models.save_pretrained, split into shard files with an index; with LoRA, the merged weights of lora.merge_lora.
    Qwen3-MoE's stacked experts are cut back into one checkpoint tensor per expert."""
    from nanotune import lora

    folder = tmp_path / "model"
    write_family_checkpoint(folder, family)
    model = models.from_pretrained(folder)
    lora.apply_lora(model, ["q_proj", "down_proj"], rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a non-zero update, so that merging changes the weights
    parallel.save_final_streamed(model, tmp_path / "streamed", parallel.DistInfo(), merge_lora=True,
                                 max_shard_bytes=60_000)
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    lora.merge_lora(model)
    models.save_pretrained(model, tmp_path / "reference")
    streamed = models.from_pretrained(tmp_path / "streamed").state_dict()
    reference = models.from_pretrained(tmp_path / "reference").state_dict()
    assert streamed.keys() == reference.keys()
    assert all(torch.equal(streamed[k], reference[k]) for k in reference)


# --------------------------------------------------------------------------------------------- multi-process runs


def write_family_checkpoint(folder: Path, family: str) -> None:
    """A tiny random transformers checkpoint of each family, with shapes that split over 2 processes."""
    transformers = pytest.importorskip("transformers")
    if family == "llama":
        write_hf_checkpoint(folder, "llama", vocab_size=64)
        return
    torch.manual_seed(0)
    if family == "gemma3":
        config = transformers.Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                               query_pre_attn_scalar=8, sliding_window=16,
                                               layer_types=["sliding_attention", "full_attention"])
    else:  # qwen3_moe: layer 0 has a dense MLP (split by TP), layer 1 the experts (whole on every process)
        config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                             moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                             mlp_only_layers=[0], router_aux_loss_coef=0.01)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms away from their init value, so that a wrong norm gradient shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)


def base_argv(tmp: Path, model: Path, out: Path) -> list[str]:
    """Two optimizer steps of 4 rows (1 row per micro-batch on every data-parallel process) of the quickstart data."""
    return [str(ROOT / "configs" / "quickstart.toml"), f"--model.path={model}",
            f"--model.tokenizer={QUICKSTART / 'tokenizer'}",
            f'--data.datasets=[{{path="{tmp / "train.jsonl"}", format="chat"}}]', "--data.eval_datasets=[]",
            "--data.seq_len=64", f"--data.cache_dir={tmp / 'cache'}", "--train.micro_batch_size=1",
            "--train.max_steps=2", "--train.eval_every=0", "--train.loss=plain", "--optim.warmup_steps=0",
            "--optim.lr=1e-2", "--logging.every=1", "--logging.plot=false", f"--output_dir={out}"]


# name -> (world size, [parallel] overrides); micro-batches per step: 4 / (data-parallel processes)
LAYOUTS = {
    "fsdp": (2, ["--parallel.dp_shard=2", "--train.grad_accum_steps=2"]),
    "hsdp": (2, ["--parallel.dp_replicate=2", "--parallel.dp_shard=1", "--train.grad_accum_steps=2"]),
    "tp": (2, ["--parallel.tp=2", "--train.grad_accum_steps=4"]),
    "fsdp-tp": (4, ["--parallel.dp_shard=2", "--parallel.tp=2", "--train.grad_accum_steps=2"]),
    # FSDP2 options that change when parameters are gathered and in which dtype gradients are reduced, not the result
    "fsdp-options": (2, ["--parallel.dp_shard=2", "--train.grad_accum_steps=2", "--parallel.reshard_after_forward=false",
                         "--parallel.param_dtype=fp32", "--parallel.reduce_dtype=fp32"]),
}
FAMILIES = ("llama", "gemma3", "qwen3_moe")


def worker(spec_file: str) -> None:
    """Inside torchrun: train each run of the spec in turn, in one process group that the runs share."""
    run_tasks(spec_file)


def torchrun(nproc: int, runs: list[list[str]], tmp: Path) -> None:
    spec = tmp / f"runs-{nproc}.json"
    spec.write_text(json.dumps(runs))
    run_torchrun(__file__, str(spec), nproc=nproc)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every family x (full, LoRA) trained in one process and in each layout; -> {(family, tuning, layout): out}."""
    tmp = tmp_path_factory.mktemp("parallel")
    rows = (QUICKSTART / "train.jsonl").read_text().splitlines()[:48]
    (tmp / "train.jsonl").write_text("\n".join(rows) + "\n")
    outs, runs = {}, {2: [], 4: []}
    for family in FAMILIES:
        write_family_checkpoint(tmp / family, family)
        for tuning, extra in (("full", []), ("lora", LORA)):
            single = tmp / f"{family}-{tuning}-single"
            assert train.main(base_argv(tmp, tmp / family, single) + ["--train.grad_accum_steps=4", *extra]) == 0
            outs[family, tuning, "single"] = single
            for name, (nproc, keys) in LAYOUTS.items():
                if (family, tuning, name) not in CASES:
                    continue
                out = tmp / f"{family}-{tuning}-{name}"
                runs[nproc].append(base_argv(tmp, tmp / family, out) + [*keys, *extra])
                outs[family, tuning, name] = out
    for nproc, argvs in runs.items():
        torchrun(nproc, argvs, tmp)
    return outs


# the FSDP2 options are a property of FSDP2, not of a family: Llama alone shows them
CASES = [(f, t, name) for f in FAMILIES for t in ("full", "lora") for name in LAYOUTS
         if name != "fsdp-options" or f == "llama"]


@pytest.mark.slow
@pytest.mark.parametrize("family,tuning,layout_name", CASES, ids=["-".join(c) for c in CASES])
def test_every_layout_trains_like_one_process(trained, family, tuning, layout_name):
    single, out = trained[family, tuning, "single"], trained[family, tuning, layout_name]
    assert losses(out) == pytest.approx(losses(single), rel=1e-5)
    final = load_file(out / "final" / "model.safetensors")
    reference = load_file(single / "final" / "model.safetensors")
    if tuning == "full":
        assert_same_params(final, reference)
    else:  # the adapter is what trains; final/ = W + s B A, where one outlier of A or B shifts a whole column or row
        adapter = load_file(out / "adapter" / "adapter_model.safetensors")
        one_element = 1 / min(t.numel() for t in adapter.values())  # the adapters are tiny: 1e-4 of one is < 1
        assert_same_params(adapter, load_file(single / "adapter" / "adapter_model.safetensors"),
                           max_outlier_fraction=one_element)
        assert_same_params(final, reference, max_outlier_fraction=0.02)  # one column of the widest (64) layers
    # and training moved the weights: equal to the single process is not equal to untouched
    base = load_file(out.parent / family / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert (final[key] - base[key]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------- resuming on another layout

# name -> (world size, overrides): 4 rows per optimizer step in every layout (1 row per micro-batch), so that a
# checkpoint of one resumes on another (checkpoint.check_layout)
RESHARD_LAYOUTS = {
    "one": (1, ["--train.grad_accum_steps=4"]),
    "fsdp": (2, ["--parallel.dp_shard=2", "--train.grad_accum_steps=2"]),
    "hsdp": (2, ["--parallel.dp_replicate=2", "--parallel.dp_shard=1", "--train.grad_accum_steps=2"]),
    "tp": (2, ["--parallel.tp=2", "--train.grad_accum_steps=4"]),
    "fsdp4": (4, ["--parallel.dp_shard=4", "--train.grad_accum_steps=1"]),
    "fsdp-tp": (4, ["--parallel.dp_shard=2", "--parallel.tp=2", "--train.grad_accum_steps=2"]),
}


def reshard_argv(tmp: Path, layout_name: str, out: str, max_steps: int, *extra: str) -> list[str]:
    """A run of RESHARD_LAYOUTS[layout_name] with a checkpoint every 2 steps, all kept."""
    common = [f"--train.max_steps={max_steps}", "--checkpoint.every=2", "--checkpoint.keep=0"]
    return base_argv(tmp, tmp / "llama", tmp / out) + common + RESHARD_LAYOUTS[layout_name][1] + [*extra]


def reshard_data(tmp: Path) -> None:
    rows = (QUICKSTART / "train.jsonl").read_text().splitlines()[:48]
    (tmp / "train.jsonl").write_text("\n".join(rows) + "\n")
    write_family_checkpoint(tmp / "llama", "llama")


def assert_continues_like(out: Path, straight: Path, first_step: int) -> None:
    """`out` resumed at first_step and trained like the uninterrupted `straight` from there: losses within 1e-5, final
    weights within assert_same_params (the tolerances of every layout against one process, see this file's docstring;
    with LoRA, those of the adapters and of the merged weights)."""
    steps = [r["step"] for r in metrics(out) if "loss" in r]
    assert steps[0] == first_step and steps == list(range(first_step, first_step + len(steps)))
    assert losses(out) == pytest.approx(losses(straight)[first_step - 1:], rel=1e-5), out.name
    final = load_file(out / "final" / "model.safetensors")
    reference = load_file(straight / "final" / "model.safetensors")
    if not (out / "adapter").exists():
        assert_same_params(final, reference)
        return
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    one_element = 1 / min(t.numel() for t in adapter.values())
    assert_same_params(adapter, load_file(straight / "adapter" / "adapter_model.safetensors"),
                       max_outlier_fraction=one_element)
    assert_same_params(final, reference, max_outlier_fraction=0.02)


@pytest.mark.slow
def test_a_checkpoint_resumes_on_another_layout_like_an_uninterrupted_run(tmp_path):
    """Four steps of one process, uninterrupted, against: FSDP (dp_shard 2) for two steps, resumed in one process;
    HSDP (dp_replicate 2 x dp_shard 1) for two steps, resumed in one process; and TP (tp 2) for two steps, resumed
    under FSDP (dp_shard 2). DCP reshards the parameters and AdamW states (TP, FSDP2 and HSDP DTensors into plain
    tensors, TP shards into FSDP2 shards) and the data position maps onto the new
    data-parallel processes, so steps 3 and 4 see the same rows as the uninterrupted run's steps 3 and 4: losses
    within 1e-5 and weights within `assert_same_params`, the tolerance of every layout against one process (fp32 sums
    in another order; see this file's docstring). A wrong position (one micro-batch early or late, or the epoch's
    start again) trains steps 3 and 4 on other rows, whose losses differ by far more."""
    reshard_data(tmp_path)
    assert train.main(reshard_argv(tmp_path, "one", "one", 4)) == 0
    torchrun(2, [reshard_argv(tmp_path, "fsdp", "fsdp", 4), reshard_argv(tmp_path, "hsdp", "hsdp", 4),
                 reshard_argv(tmp_path, "tp", "tp", 4),
                 reshard_argv(tmp_path, "fsdp", "tp-then-fsdp", 4, f"--checkpoint.resume={tmp_path / 'tp' / 'step-2'}")],
             tmp_path)
    for layout_name in ("fsdp", "hsdp"):
        assert train.main(reshard_argv(tmp_path, "one", f"{layout_name}-then-one", 4,
                                       f"--checkpoint.resume={tmp_path / layout_name / 'step-2'}")) == 0
        assert_continues_like(tmp_path / f"{layout_name}-then-one", tmp_path / "one", 3)
    assert_continues_like(tmp_path / "tp-then-fsdp", tmp_path / "one", 3)
    # the rows of steps 3 and 4 are not those of steps 1 and 2: equal losses mean the same rows, not any rows
    straight = losses(tmp_path / "one")
    assert straight[2:] != pytest.approx(straight[:2], rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_a_checkpoint_moves_from_fsdp_over_4_to_fsdp_x_tp_to_one_process(tmp_path, tuning):
    """dp_shard 4 for two steps, resumed as dp_shard 2 x tp 2 for two more (FSDP2 shards of 1/4 into 2-D FSDP x TP
    DTensors), resumed again in one process for the last two: each part continues like the uninterrupted run of one
    process, as in the test above. With LoRA of rank 2 (no dropout), FSDP2 over 4 leaves two processes an empty shard
    of every lora_A, and TP splits lora_B by rows and lora_A by columns."""
    reshard_data(tmp_path)
    extra = [*LORA, "--lora.rank=2", "--lora.alpha=4", "--lora.dropout=0"] if tuning == "lora" else []
    assert train.main(reshard_argv(tmp_path, "one", "one", 6, *extra)) == 0
    torchrun(4, [reshard_argv(tmp_path, "fsdp4", "fsdp4", 6, *extra),
                 reshard_argv(tmp_path, "fsdp-tp", "then-fsdp-tp", 6, *extra,
                              f"--checkpoint.resume={tmp_path / 'fsdp4' / 'step-2'}")],
             tmp_path)
    assert train.main(reshard_argv(tmp_path, "one", "then-one", 6, *extra,
                                   f"--checkpoint.resume={tmp_path / 'then-fsdp-tp' / 'step-4'}")) == 0
    assert_continues_like(tmp_path / "then-fsdp-tp", tmp_path / "one", 3)
    assert_continues_like(tmp_path / "then-one", tmp_path / "one", 5)

if __name__ == "__main__":
    worker(sys.argv[1])
