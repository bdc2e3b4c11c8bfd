"""LoRA on stacked MoE experts (lora.target_experts) and NF4 experts (lora.quantize_experts) with several processes
(FSDP2, HSDP, expert parallelism): each process loads and quantises only its rows of every expert stack, and training
equals one process.

One torchrun job of 2 gloo processes (this file run as a script, `worker`) loads an NF4-expert model sharded and
writes what each process holds (`probe`), then trains Qwen3-MoE and Qwen2-MoE with expert adapters, on fp32 experts
and on NF4 experts, under FSDP (dp_shard = 2), HSDP (dp_replicate = 2) and expert parallelism (ep = 2); the same
runs in one process, and two of the runs' step-1 checkpoints resumed in one process, run in the test process.

Tolerance against one process, as in tests/test_qlora_fsdp.py: the NF4 codes and scales are bit for bit those of one
process (whole rows are quantised, blocks never straddle rows) and the adapters start from the same random numbers,
so what differs is the order in which fp32 gradients are summed: losses to 1e-5 relative, adapters and merged weights
within `assert_same_params` (with its allowance for an element whose tiny gradient flips sign). With expert parallelism
on NF4 experts, one more difference: NF4 experts compute in bf16, and an expert's adapter gradient is a bf16 grouped
GEMM over the rows it receives, which are those of both processes' micro-batches together instead of one micro-batch
at a time; so those gradients differ by bf16 rounding (~0.4%), AdamW's steps by that fraction of lr (1e-2), and an
element whose gradient is near zero may step the other way: weights within 3e-4 but for 1% of them, those within two
steps. (The fp32 experts with ep keep the fp32 tolerance; NF4 experts instead of fp32 ones move 7 to 49% of the
elements of each expert adapter by more than 3e-4, so this still tells them apart.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")

from nanotune import parallel, train  # noqa: E402
from nanotune.config import ConfigError, load_config  # noqa: E402
from nanotune.lora_experts import EXPERT_PARAMS, FrozenExperts  # noqa: E402
from tests.conftest import PROBE, run_tasks, run_torchrun  # noqa: E402
from tests.test_moe_ep_train import write_moe_checkpoint  # noqa: E402
from tests.test_parallel import QUICKSTART, assert_continues_like, base_argv  # noqa: E402
from tests.test_train import assert_same_params, losses  # noqa: E402

EXPERT_LORA = ["--lora.enabled=true", "--lora.rank=4", "--lora.alpha=8", "--lora.dropout=0",
               "--lora.targets=['q_proj','v_proj']", "--lora.target_experts=['gate_up_proj','down_proj']",
               "--model.router_aux_loss_coef=0.05"]
TUNINGS = {"lora": EXPERT_LORA, "nf4": [*EXPERT_LORA, "--lora.quantize_experts=true"],
           # and QLoRA of the linear layers (router included): NF4 everywhere but the embeddings, norms and LM head
           "qlora": [*EXPERT_LORA, "--lora.quantize_experts=true", "--lora.quantize=nf4"]}
LAYOUTS = {
    "one": ["--train.grad_accum_steps=4"],
    "fsdp": ["--parallel.dp_shard=2", "--train.grad_accum_steps=2"],
    "hsdp": ["--parallel.dp_replicate=2", "--parallel.dp_shard=1", "--train.grad_accum_steps=2"],
    "ep2": ["--parallel.dp_shard=2", "--parallel.ep=2", "--train.grad_accum_steps=2"],  # 2 of the 4 experts each
}
# (family, tuning, layout): expert adapters alone and on NF4 experts, FSDP, HSDP and expert parallel, both families
CASES = [("qwen3_moe", "lora", "fsdp"), ("qwen3_moe", "nf4", "fsdp"), ("qwen2_moe", "nf4", "hsdp"),
         ("qwen3_moe", "nf4", "ep2"), ("qwen2_moe", "lora", "ep2"), ("qwen2_moe", "qlora", "fsdp")]
RESUMED = [("qwen3_moe", "nf4", "fsdp"), ("qwen2_moe", "lora", "ep2")]  # their step-1 checkpoints resume in one process
PROBED = ("fsdp", "ep2")  # the layouts whose loading is probed: rows split by FSDP2, experts split by ep


def argv(tmp: Path, family: str, tuning: str, layout: str, name: str | None = None, *extra: str) -> list[str]:
    out = tmp / (name or f"{family}-{tuning}-{layout}")
    return base_argv(tmp, tmp / family, out) + TUNINGS[tuning] + LAYOUTS[layout] + list(extra)


def nf4_storage(model) -> dict[str, tuple[torch.Tensor, int]]:
    """Every NF4 expert stack's codes and scales and each process's adapters: name -> (local tensor, first row)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, FrozenExperts):
            for local in EXPERT_PARAMS:
                for key, param in ((f"{name}.{local}", getattr(module, local)),
                                   (f"{name}.{local}_absmax", getattr(module, f"{local}_absmax")),
                                   (f"{name}.lora_A.{local}", module.lora_A[local])):
                    shard, offset = parallel.local_box(param)
                    out[key] = shard.contiguous(), offset[0]
    return out


def probe(args: list[str], out: str) -> None:
    """Build, shard and load the model as train.py does; write this process's NF4 stacks and expert adapters."""
    cfg = load_config(args[0], args[1:])
    info = parallel.init_distributed(cfg.device, cfg.parallel)
    torch.manual_seed(cfg.seed)
    model = train.build_model(cfg, 1, torch.device("meta"), info.layout)
    model = parallel.parallelize(model, info, cfg.parallel, cfg.train.precision)
    parallel.load_sharded(model, cfg.model.path, info.device)
    tensors = {}
    for key, (shard, first) in nf4_storage(model).items():
        tensors[key], tensors[f"{key}.first_row"] = shard, torch.tensor(first)
    save_file(tensors, f"{out}/shards-rank{info.rank}.safetensors")


def worker(spec_file: str) -> None:
    """Inside torchrun: each task of the spec in turn (training runs and probes), in one process group."""
    run_tasks(spec_file, probe)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe_lora_fsdp")
    rows = (QUICKSTART / "train.jsonl").read_text().splitlines()[:48]
    (tmp / "train.jsonl").write_text("\n".join(rows) + "\n")
    for family in ("qwen3_moe", "qwen2_moe"):
        write_moe_checkpoint(tmp / family, family)
    for layout in PROBED:
        (tmp / f"probe-{layout}").mkdir()
    checkpoints = ["--checkpoint.every=1", "--checkpoint.keep=0"]
    for family, tuning in dict.fromkeys((f, t) for f, t, _ in CASES):
        assert train.main(argv(tmp, family, tuning, "one")) == 0
    tasks = [[PROBE, argv(tmp, "qwen3_moe", "nf4", layout, "unused"), str(tmp / f"probe-{layout}")]
             for layout in PROBED]
    tasks += [argv(tmp, *case, None, *(checkpoints if case in RESUMED else [])) for case in CASES]
    spec = tmp / "tasks.json"
    spec.write_text(json.dumps(tasks))
    run_torchrun(__file__, str(spec), nproc=2)
    for family, tuning, layout in RESUMED:
        resumed = argv(tmp, family, tuning, "one", f"{family}-{tuning}-{layout}-then-one",
                       f"--checkpoint.resume={tmp / f'{family}-{tuning}-{layout}' / 'step-1'}")
        assert train.main(resumed) == 0
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("layout", PROBED)
def test_each_process_quantises_its_own_expert_rows_and_draws_the_same_adapters(runs, layout):
    """Loading sharded (FSDP2: by rows; ep: by experts, here the same halves), each process reads and quantises only
    its rows of every NF4 expert stack (half the bytes): together the codes and scales are one process's bit for bit,
    and so are the expert adapters' initial values."""
    args = argv(runs, "qwen3_moe", "nf4", "one", "unused")
    cfg = load_config(args[0], args[1:])
    torch.manual_seed(cfg.seed)
    single = {k: t for k, (t, _) in nf4_storage(train.build_model(cfg, 1, torch.device("cpu"))).items()}
    shards = [load_file(runs / f"probe-{layout}" / f"shards-rank{r}.safetensors") for r in range(2)]
    assert single and all(s.keys() == {*single, *(f"{k}.first_row" for k in single)} for s in shards)
    for name, tensor in single.items():
        parts = [(int(s[f"{name}.first_row"]), s[name]) for s in shards]
        assert [first for first, _ in parts] == [0, tensor.shape[0] // 2], name  # rows split in halves
        assert torch.equal(torch.cat([part for _, part in parts]), tensor), name
    codes = [k for k in single if k.endswith(EXPERT_PARAMS) and ".lora_A." not in k]
    assert len(codes) == 2 and all(single[k].dtype == torch.uint8 for k in codes)  # one sparse layer (Qwen3: 1 of 2)


@pytest.mark.slow
@pytest.mark.parametrize("family,tuning,layout", CASES, ids=["-".join(c) for c in CASES])
def test_expert_lora_under_fsdp_trains_like_one_process(runs, family, tuning, layout):
    """Losses, adapter/ (PEFT's target_parameters layout) and final/ (the expert adapters merged, NF4 runs into the
    original full-precision experts) equal one process's; training moved the expert adapters."""
    one, out = runs / f"{family}-{tuning}-one", runs / f"{family}-{tuning}-{layout}"
    assert len(losses(out)) == 2 and losses(out) == pytest.approx(losses(one), rel=1e-5)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    reference = load_file(one / "adapter" / "adapter_model.safetensors")
    bf16_sums = (tuning, layout) == ("nf4", "ep2")  # see the module docstring
    tolerance = dict(atol=3e-4, outlier_atol=2e-2) if bf16_sums else {}
    one_element = 1 / min(t.numel() for t in adapter.values())
    assert_same_params(adapter, reference, max_outlier_fraction=0.01 if bf16_sums else one_element, **tolerance)
    expert_B = [k for k in adapter if "mlp.experts" in k and "lora_B" in k]
    assert len(expert_B) == 2 * (1 if family == "qwen3_moe" else 2)  # both targets of every sparse layer
    assert min(adapter[k].abs().max() for k in expert_B) > 1e-3  # B starts at zero
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    final, final_reference = (load_file(o / "final" / "model.safetensors") for o in (out, one))
    base = load_file(runs / family / "model.safetensors")
    assert final.keys() == final_reference.keys() == base.keys()
    assert_same_params(final, final_reference, max_outlier_fraction=0.02, **tolerance)
    for key in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.mlp.gate.weight",
                "model.layers.0.self_attn.k_proj.weight"):
        assert torch.equal(final[key], base[key])  # frozen and not adapted: the original
    for key in ("model.layers.1.mlp.experts.3.down_proj.weight", "model.layers.1.mlp.experts.0.up_proj.weight",
                "model.layers.0.self_attn.q_proj.weight"):
        assert (final[key] - base[key]).abs().max() > 1e-4  # the adapters merged into the original weights
        assert final[key].dtype == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize("family,tuning,layout", RESUMED, ids=["-".join(c) for c in RESUMED])
def test_an_expert_lora_checkpoint_from_two_processes_resumes_in_one(runs, family, tuning, layout):
    """The step-1 checkpoint of the FSDP NF4 run and of the ep run (expert adapters, split by rows or by experts, and
    their AdamW states; the experts come from model.path again) resumed in one process trains step 2 like the
    uninterrupted one-process run."""
    assert_continues_like(runs / f"{family}-{tuning}-{layout}-then-one", runs / f"{family}-{tuning}-one", 2)


@pytest.mark.parametrize("keys,message", [
    (["--parallel.tp=2"], "parallel.tp = 2 are not supported yet"),
    (["--parallel.dp_shard=1", "--parallel.cp=2"], "parallel.cp = 2 are not supported yet"),
])
def test_expert_lora_with_layouts_not_built_yet_is_refused_naming_the_keys(tmp_path, keys, message):
    write_moe_checkpoint(tmp_path / "m", "qwen3_moe")
    args = base_argv(tmp_path, tmp_path / "m", tmp_path / "out") + TUNINGS["nf4"] + keys
    cfg = load_config(args[0], args[1:])
    layout = parallel.resolve_layout(cfg.parallel, 2)
    with pytest.raises(ConfigError, match=rf"lora.target_experts / lora.quantize_experts with {message}"):
        train.build_model(cfg, 1, torch.device("meta"), layout)


if __name__ == "__main__":
    worker(sys.argv[1])
