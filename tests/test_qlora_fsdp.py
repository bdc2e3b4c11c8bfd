"""QLoRA under FSDP2: NF4 storage as plain tensors, quantised by each process for its own rows; trains like one process.

One torchrun job of 2 processes (this file run as a script, `worker`) loads the NF4 model sharded and reports what each
process holds, then trains QLoRA under FSDP (dp_shard = 2) and HSDP (dp_replicate = 2); the same run in one process,
and the FSDP run's step-2 checkpoint resumed in one process, run in the test process.

Tolerance against one process: the NF4 codes and scales are bit for bit those of one process (each process quantises
whole rows, and blocks never straddle rows), so the frozen base is the same; what differs is the order in which fp32
gradients of the adapters are summed (a reduce-scatter over 2 processes instead of one sum), as in every FSDP layout
of tests/test_parallel.py, and so the same tolerances hold: losses to 1e-5 relative, adapters and merged weights
within `assert_same_params` (a handful of elements may differ by up to one AdamW step, ~lr, where a gradient is near
zero and its sign flips with the rounding). The matmuls run in bf16 (NF4's compute dtype) in both: a difference of one
fp32 rounding in an adapter weight reaches the bf16 product only when it crosses a bf16 rounding boundary, which the
loss tolerance covers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("bitsandbytes")

import models  # noqa: E402
from nanotune import parallel, qlora, train  # noqa: E402
from nanotune.config import load_config  # noqa: E402
from tests.conftest import PROBE, ROOT, run_tasks, run_torchrun  # noqa: E402
from tests.test_parallel import assert_continues_like, base_argv, reshard_data  # noqa: E402
from tests.test_train import assert_same_params, losses  # noqa: E402

QLORA = ["--lora.enabled=true", "--lora.quantize=nf4", "--lora.rank=4", "--lora.alpha=8", "--lora.dropout=0",
         "--lora.targets=['q_proj','k_proj','v_proj','o_proj','gate_proj','up_proj','down_proj']"]


# ----------------------------------------------------------------------------------------- NF4 storage, one process


@pytest.mark.parametrize("shape", [(48, 64), (96, 112), (7, 200)], ids=["aligned", "padded-row", "odd-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitsandbytes_dequantisation_is_the_reference_bit_for_bit(shape, dtype):
    """bitsandbytes' kernel, given the plain codes and scales, computes exactly what the PyTorch reference does; rows
    whose length is not a multiple of 64 are padded to whole blocks, and the padding is cut off."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    codes, absmax = qlora.quantize_nf4_rows(w)
    assert codes.shape == (shape[0], qlora.padded_in_features(shape[1]) // 2) and codes.dtype == torch.uint8
    assert absmax.shape == (shape[0], qlora.padded_in_features(shape[1]) // 64) and absmax.dtype == torch.bfloat16
    fast = qlora.dequantize_nf4(codes, absmax, shape[1], dtype)
    assert fast.shape == shape and torch.equal(fast, qlora.dequantize_nf4_reference(codes, absmax, shape[1], dtype))
    # NF4 rounds each weight to one of 16 levels of its block's absmax: the widest gap is 0.30 of it (0.70 to 1.0)
    blocks = torch.nn.functional.pad(w, (0, qlora.padded_in_features(shape[1]) - shape[1])).view(shape[0], -1, 64)
    bound = (0.16 * blocks.abs().amax(-1, keepdim=True)).expand(-1, -1, 64).reshape(shape[0], -1)[:, :shape[1]]
    assert ((fast.float() - w).abs() <= bound + 1e-2 * w.abs()).all()


@pytest.mark.cuda
def test_on_cuda_quantisation_and_bitsandbytes_dequantisation_match_the_cpu():
    """The CUDA kernel gives the reference's bits too, from codes and scales quantised on the GPU exactly as on CPU."""
    w = torch.randn(96, 4096, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    codes, absmax = qlora.quantize_nf4_rows(w)
    codes_cuda, absmax_cuda = qlora.quantize_nf4_rows(w.cuda())
    assert torch.equal(codes_cuda.cpu(), codes) and torch.equal(absmax_cuda.cpu(), absmax)
    fast = qlora.dequantize_nf4(codes_cuda, absmax_cuda, 4096, torch.bfloat16)
    assert fast.is_cuda and torch.equal(fast.cpu(), qlora.dequantize_nf4_reference(codes, absmax, 4096, torch.bfloat16))


def test_a_block_of_rows_quantises_to_those_rows_of_the_whole():
    w = torch.randn(10, 200, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    codes, absmax = qlora.quantize_nf4_rows(w)
    part_codes, part_absmax = qlora.quantize_nf4_rows(w[3:7])
    assert torch.equal(part_codes, codes[3:7]) and torch.equal(part_absmax, absmax[3:7])
    small_chunks = qlora.quantize_nf4_rows(w, chunk_elements=300)  # two rows at a time
    assert torch.equal(small_chunks[0], codes) and torch.equal(small_chunks[1], absmax)


def test_codes_are_bitsandbytes_own_for_whole_blocks():
    """On rows of whole blocks the codes are those of bitsandbytes' quantize_4bit (NF4, blocksize 64, scales kept):
    the same nearest-level rounding. The weights are bf16, so each block's absmax is a bf16 value and storing the
    scales in bf16 rounds nothing here (for fp32 weights a code next to a midpoint may differ)."""
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    packed, state = qlora._bnb().functional.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    codes, absmax = qlora.quantize_nf4_rows(w)
    assert torch.equal(packed.view(32, 64), codes)
    assert torch.equal(state.absmax.to(torch.bfloat16).view(32, 2), absmax)


@pytest.mark.parametrize("from_original", [False, True], ids=["dequantised", "original-weights"])
def test_streamed_final_of_a_qlora_model_is_what_one_process_writes(hf_checkpoint, tmp_path, from_original):
    """save_final_streamed on a QLoRA model (here in one process, where gathering is the identity), bit for bit:
    merged into the original full-precision weights, what lora.merge_adapter_into_base writes; without them, the
    adapters merged into the dequantised NF4 weights, what lora.merge_lora + models.save_pretrained write."""
    from nanotune import lora

    folder, _ = hf_checkpoint("llama", attention_bias=True)

    def prepare(model):
        qlora.quantize_nf4(model)
        lora.apply_lora(model, ["q_proj", "down_proj"], rank=4, alpha=8)

    model = models.from_pretrained(folder, prepare=prepare)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a non-zero update, so that merging changes the weights
    parallel.save_final_streamed(model, tmp_path / "streamed", parallel.DistInfo(), merge_lora=True,
                                 max_shard_bytes=60_000, original=folder if from_original else None)
    if from_original:
        lora.save_adapter(model, tmp_path / "adapter")
        lora.merge_adapter_into_base(folder, tmp_path / "adapter", tmp_path / "reference")
    else:
        lora.merge_lora(model)
        models.save_pretrained(model, tmp_path / "reference")
    streamed, reference = ({k: v for f in models.safetensors_io.checkpoint_files(tmp_path / name)
                            for k, v in load_file(f).items()} for name in ("streamed", "reference"))
    assert len(models.safetensors_io.checkpoint_files(tmp_path / "streamed")) > 1  # written in several shards
    assert streamed.keys() == reference.keys()
    assert all(streamed[k].dtype == reference[k].dtype and torch.equal(streamed[k], reference[k]) for k in reference)
    dtypes = {torch.float32} if from_original else {torch.float32, torch.bfloat16}  # NF4 layers in their compute dtype
    assert {t.dtype for t in streamed.values()} == dtypes


def test_what_qlora_cannot_do_under_several_processes_is_refused_naming_the_keys():
    from nanotune.config import ConfigError, LoraConfig

    config = models.config_from_hf(dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=96,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    one = {"dp_replicate": 1, "dp_shard": 1, "cp": 1, "tp": 1}
    fsdp = {**one, "dp_shard": 2}
    qlora_dora = LoraConfig(enabled=True, quantize="nf4", dora=True)
    with pytest.raises(ConfigError, match="lora.dora = true with lora.quantize = 'nf4' and several data-parallel"):
        parallel.check_model_layout(fsdp, config, qlora_dora)
    with pytest.raises(ConfigError, match="lora.quantize = 'nf4' with parallel.tp > 1 is not supported"):
        parallel.check_model_layout({**one, "tp": 2}, config, LoraConfig(enabled=True, quantize="nf4"))
    parallel.check_model_layout(one, config, qlora_dora)  # one process: DoRA on NF4 works
    parallel.check_model_layout(fsdp, config, LoraConfig(enabled=True, quantize="nf4"))  # and QLoRA under FSDP


def test_the_70b_config_holds_per_process_what_its_comment_says():
    """configs/llama-3.1-70b-qlora-fsdp.toml on Llama-3.1-70B's shapes (built on the meta device, swaps applied): the
    layout fits 2 processes, and the frozen NF4 base and bf16 rest plus the adapters' fp32 weights, gradients and
    AdamW states come to the 36.4 + 4.2 + 3.3 GB, 22 GB per process, worked out in its comment."""
    from nanotune import lora

    cfg = load_config(ROOT / "configs" / "llama-3.1-70b-qlora-fsdp.toml")
    layout = parallel.resolve_layout(cfg.parallel, 2)
    hf = dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
              num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False)
    model = models.build_model(models.config_from_hf(hf), "meta", train.PARAM_DTYPES[cfg.train.precision])
    parallel.check_model_layout(layout, model.config, cfg.lora)
    lora.prepare_from_config(cfg.lora)(model)
    nf4 = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.endswith(("weight", "absmax"))
              and isinstance(model.get_submodule(n.rpartition(".")[0]), qlora.NF4Linear))
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    adapters = 16 * sum(p.numel() for p in model.parameters() if p.requires_grad)  # fp32 weight, grad, AdamW m and v
    assert layout["dp_shard"] == 2 and cfg.parallel.cpu_offload
    assert round(nf4 / 1e9, 1) == 36.4 and round((frozen - nf4) / 1e9, 1) == 4.2 and round(adapters / 1e9, 1) == 3.3
    assert round((frozen + adapters) / 2 / 1e9) == 22


# ----------------------------------------------------------------------------------------- 2 processes



def probe(argv: list[str], out: str) -> None:
    """Build, shard and load the model exactly as train.py does, then write this process's NF4 shards (codes and scales,
    with their first row) and how many bytes of NF4 storage it holds."""
    cfg = load_config(argv[0], argv[1:])
    info = parallel.init_distributed(cfg.device, cfg.parallel)
    model = train.build_model(cfg, 1, torch.device("meta"), info.layout)
    model = parallel.parallelize(model, info, cfg.parallel, cfg.train.precision)
    parallel.load_sharded(model, cfg.model.path, info.device)
    tensors, nbytes = {}, 0
    for name, module in model.named_modules():
        if isinstance(module, qlora.NF4Linear):
            for local in ("weight", "weight_absmax"):
                shard, (first, _) = parallel.local_box(getattr(module, local))
                tensors[f"{name}.{local}"] = shard.contiguous()
                tensors[f"{name}.{local}.first_row"] = torch.tensor(first)
                nbytes += shard.numel() * shard.element_size()
    save_file(tensors, f"{out}/shards-rank{info.rank}.safetensors")
    Path(f"{out}/nf4-bytes-rank{info.rank}.json").write_text(json.dumps(nbytes))


def worker(spec_file: str) -> None:
    """Inside torchrun: each task of the spec in turn (training runs and probes), in one process group."""
    run_tasks(spec_file, probe)


def torchrun(nproc: int, tasks: list, tmp: Path) -> None:
    spec = tmp / f"qlora-{nproc}.json"
    spec.write_text(json.dumps(tasks))
    run_torchrun(__file__, str(spec), nproc=nproc)


def qlora_argv(tmp: Path, out: str, *extra: str) -> list[str]:
    """Four optimizer steps of 4 rows, QLoRA on every projection, a checkpoint every 2 steps (all kept)."""
    return base_argv(tmp, tmp / "llama", tmp / out) + QLORA + [
        "--train.max_steps=4", "--checkpoint.every=2", "--checkpoint.keep=0", *extra]


FSDP = ["--parallel.dp_shard=2", "--train.grad_accum_steps=2"]
HSDP = ["--parallel.dp_replicate=2", "--parallel.dp_shard=1", "--train.grad_accum_steps=2"]
ONE = ["--train.grad_accum_steps=4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qlora_fsdp")
    reshard_data(tmp)  # 48 rows of the quickstart data and a tiny random Llama in HF format (tmp / "llama")
    (tmp / "probe").mkdir()
    assert train.main(qlora_argv(tmp, "one", *ONE)) == 0
    torchrun(2, [[PROBE, qlora_argv(tmp, "unused", *FSDP), str(tmp / "probe")], qlora_argv(tmp, "fsdp", *FSDP),
                 qlora_argv(tmp, "hsdp", *HSDP, "--checkpoint.every=0")], tmp)
    assert train.main(qlora_argv(tmp, "fsdp-then-one", *ONE, f"--checkpoint.resume={tmp / 'fsdp' / 'step-2'}")) == 0
    return tmp


@pytest.mark.slow
def test_each_process_quantises_its_own_rows_exactly_as_one_process(runs):
    """Loading sharded, each process reads and quantises only its rows of every NF4 weight: together they hold the
    codes and scales of one process's model bit for bit, each about half of the bytes."""
    cfg = load_config(qlora_argv(runs, "unused")[0], qlora_argv(runs, "unused")[1:])
    single = train.build_model(cfg, 1, torch.device("cpu"))
    whole = {f"{n}.{local}": getattr(m, local) for n, m in single.named_modules() if isinstance(m, qlora.NF4Linear)
             for local in ("weight", "weight_absmax")}
    total = sum(t.numel() * t.element_size() for t in whole.values())
    shards = [load_file(runs / "probe" / f"shards-rank{r}.safetensors") for r in range(2)]
    for name, tensor in whole.items():
        parts = [(int(s[f"{name}.first_row"]), s[name]) for s in shards]
        assert [first for first, _ in parts] == [0, tensor.shape[0] // 2]  # rows split in halves (dims are even)
        assert torch.equal(torch.cat([part for _, part in parts]), tensor), name
    per_rank = [json.loads((runs / "probe" / f"nf4-bytes-rank{r}.json").read_text()) for r in range(2)]
    assert per_rank == [total // 2, total // 2]


@pytest.mark.slow
@pytest.mark.parametrize("layout_name", ["fsdp", "hsdp"])
def test_qlora_under_fsdp_trains_like_one_process(runs, layout_name):
    """FSDP (dp_shard 2) and HSDP (dp_replicate 2 x dp_shard 1): losses, the trained adapters (adapter/) and the merged
    model (final/: the adapters merged into the original full-precision weights, streamed one tensor at a time) equal
    those of one process (see the module docstring for the tolerance); and training moved the adapters."""
    one, fsdp = runs / "one", runs / layout_name
    assert len(losses(fsdp)) == 4 and losses(fsdp) == pytest.approx(losses(one), rel=1e-5)
    adapter = load_file(fsdp / "adapter" / "adapter_model.safetensors")
    reference = load_file(one / "adapter" / "adapter_model.safetensors")
    assert_same_params(adapter, reference, max_outlier_fraction=1 / min(t.numel() for t in adapter.values()))
    assert all(t.dtype == torch.float32 for t in adapter.values())
    assert max(t.abs().max() for k, t in adapter.items() if "lora_B" in k) > 1e-3  # B starts at zero
    final, final_reference = (load_file(out / "final" / "model.safetensors") for out in (fsdp, one))
    base = load_file(runs / "llama" / "model.safetensors")
    assert final.keys() == final_reference.keys() == base.keys()
    assert_same_params(final, final_reference, max_outlier_fraction=0.02)
    for key in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(final[key], base[key])  # frozen and not adapted: the original, not a rounded copy
    key = "model.layers.0.self_attn.q_proj.weight"
    assert (final[key] - base[key]).abs().max() > 1e-4  # merged into the original weight
    assert json.loads((fsdp / "final" / "config.json").read_text())["dtype"] == "float32"


@pytest.mark.slow
def test_a_qlora_fsdp_checkpoint_resumes_in_one_process(runs):
    """The FSDP run's step-2 checkpoint (its adapters and AdamW states; the NF4 base comes from model.path again)
    resumed in one process continues like the uninterrupted single-process run."""
    assert_continues_like(runs / "fsdp-then-one", runs / "one", 3)


if __name__ == "__main__":
    worker(sys.argv[1])
