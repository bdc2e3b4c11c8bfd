"""FP8 linear layers: the three scaled products against an emulated reference and against full precision, the swap's
filter, unchanged state dicts, LoRA with an FP8 base, torch.compile without graph breaks, hardware refusal."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import models
from nanotune import fp8
from nanotune.config import ConfigError, Fp8Config
from nanotune.fp8 import E4M3, E5M2, Float8Linear, Float8LoRALinear, apply_fp8, fp8_linear
from nanotune.lora import LoRALinear, apply_lora, merge_lora
from tests.conftest import ROOT, run_torchrun

RECIPES = ["tensorwise", "rowwise"]
GRADS = {"e5m2": E5M2, "e4m3": E4M3}
UNIT_ROUNDOFF = {E4M3: 2.0**-4, E5M2: 2.0**-3}  # half the spacing of 1.0 and the next value: 3 / 2 mantissa bits
MIN_SUBNORMAL = {E4M3: 2.0**-9, E5M2: 2.0**-16}


def emulated_cast(x: torch.Tensor, dtype: torch.dtype, dim: int | None) -> torch.Tensor:
    """Quantise -> dequantise in float64, written independently of nanotune.fp8: a power-of-two scale per tensor
    (dim None) or per slice along `dim`, chosen so the amax lands in the top binade of the FP8 range."""
    x = x.double()
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    scale = 2.0 ** torch.floor(torch.log2(torch.finfo(dtype).max / amax.clamp(min=1e-12)))
    return (x * scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype).double() / scale


def emulated_linear_grads(x, w, dy, rowwise: bool, grad_dtype):
    """y, dx, dw of y = x w^T with every operand quantised along its product's contraction dimension."""
    along = (lambda d: d) if rowwise else (lambda d: None)
    y = emulated_cast(x, E4M3, along(1)) @ emulated_cast(w, E4M3, along(1)).T  # contraction over in
    dx = emulated_cast(dy, grad_dtype, along(1)) @ emulated_cast(w, E4M3, along(0))  # over out: w per column
    dw = emulated_cast(dy, grad_dtype, along(0)).T @ emulated_cast(x, E4M3, along(0))  # over tokens: per column
    return y, dx, dw


def fp8_error_bound(a, b, a_dtype, b_dtype):
    """Elementwise bound on |fl(a) fl(b) - a b| for the product a @ b: each FP8 value is off by at most its unit
    roundoff times itself, plus half a subnormal step of its scale for values below the normal range (the scale is
    at most 2 * fp8_max / amax, so that step is at most MIN_SUBNORMAL * amax / fp8_max in the original units)."""
    a, b = a.double(), b.double()

    def elem_err(t, dtype):
        return UNIT_ROUNDOFF[dtype] * t.abs() + MIN_SUBNORMAL[dtype] * t.abs().max() / torch.finfo(dtype).max

    ea, eb = elem_err(a, a_dtype), elem_err(b, b_dtype)
    return ea @ b.abs() + a.abs() @ eb + ea @ eb


def operands(M=40, K=64, N=48, seed=0, dtype=torch.float32, outlier=3000.0):
    """x, w and an output gradient dy, each with one outlier row and one outlier column.

    Power-of-two scales do not change relative FP8 rounding, so the recipes differ only where one scale must cover
    values ~2^11 apart and the small ones fall below FP8's normal range: with these outliers a product quantised
    along the wrong axis no longer matches the emulated reference. M = 40 tokens is not a multiple of 16, so the
    weight gradient's padding is exercised too."""
    g = torch.Generator().manual_seed(seed)

    def with_outliers(t, row, col):
        t[row] *= outlier
        t[:, col] *= outlier
        return t.to(dtype)

    x = with_outliers(torch.randn(M, K, generator=g), 3, 5)
    w = with_outliers(torch.randn(N, K, generator=g) * 0.05, 11, 9)
    dy = with_outliers(torch.randn(M, N, generator=g) * 1e-3, 7, 4)
    return x, w, dy


def fp8_grads(x, w, dy, rowwise, grad_dtype):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_linear(x, w, None, rowwise, grad_dtype)
    y.backward(dy)
    return y, x.grad, w.grad


# ------------------------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("grad", list(GRADS))
@pytest.mark.parametrize("recipe", RECIPES)
def test_three_products_equal_the_emulated_reference(recipe, grad):
    """torch._scaled_mm against quantise -> dequantise -> float64 matmul: the same FP8 values, so the only difference
    is fp32 accumulation order inside _scaled_mm; rtol 1e-5 and atol 1e-5 of the output's scale cover that."""
    x, w, dy = operands()
    y, dx, dw = fp8_grads(x, w, dy, recipe == "rowwise", GRADS[grad])
    ref = emulated_linear_grads(x, w, dy, recipe == "rowwise", GRADS[grad])
    for got, want in zip((y, dx, dw), ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("grad", list(GRADS))
@pytest.mark.parametrize("recipe", RECIPES)
def test_three_products_stay_within_the_fp8_error_bound_of_full_precision(recipe, grad):
    """Against the exact float64 products, every element stays within the worst-case FP8 rounding bound (computed
    per element from the operands, `fp8_error_bound`); 1.01x leaves room for fp32 accumulation only."""
    x, w, dy = operands()
    g = GRADS[grad]
    y, dx, dw = fp8_grads(x, w, dy, recipe == "rowwise", g)
    x64, w64, dy64 = x.double(), w.double(), dy.double()
    checks = [(y, x64 @ w64.T, fp8_error_bound(x64, w64.T, E4M3, E4M3)),
              (dx, dy64 @ w64, fp8_error_bound(dy64, w64, g, E4M3)),
              (dw, dy64.T @ x64, fp8_error_bound(dy64.T, x64, g, E4M3))]
    for got, exact, bound in checks:
        err = (got.double() - exact).abs()
        assert (err <= 1.01 * bound + 1e-12).all(), f"worst excess {(err / bound).max().item():.3f}x the bound"
        assert err.max() > 0  # FP8 really ran: a full-precision product would be (nearly) exact


@pytest.mark.parametrize("recipe", RECIPES)
def test_operands_have_the_layouts_and_scale_shapes_cuda_requires(recipe, monkeypatch):
    """The CPU kernel accepts any layout; CUDA's does not. Every call must pass a row-major left operand, a
    column-major right operand, contraction and output dimensions in multiples of 16, and fp32 scales of shape ()
    (tensorwise) or (M, 1) and (1, N) (rowwise)."""
    calls = []
    real = torch._scaled_mm

    def checked(a, b, scale_a, scale_b, out_dtype):
        calls.append((a.is_contiguous(), b.t().is_contiguous(), a.shape[1] % 16, b.shape[1] % 16,
                      tuple(scale_a.shape), tuple(scale_b.shape), scale_a.dtype, scale_b.dtype, a.shape[0], b.shape[1]))
        return real(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)

    monkeypatch.setattr(torch, "_scaled_mm", checked)
    fp8_grads(*operands(M=48, outlier=1.0), recipe == "rowwise", E5M2)  # 48 tokens: no padding copy
    assert len(calls) == 3
    for row_major, col_major, k_rest, n_rest, sa, sb, da, db, M, N in calls:
        assert row_major and col_major and k_rest == 0 and n_rest == 0 and da == db == torch.float32
        assert (sa, sb) == (((), ()) if recipe == "tensorwise" else ((M, 1), (1, N)))


def test_rowwise_keeps_precision_that_one_outlier_row_costs_tensorwise():
    """With one token 1e5 times larger than the rest, tensorwise scaling pushes the other tokens towards FP8's
    subnormals; rowwise scales each token on its own. Measured on the same operands, rowwise is more accurate."""
    x, w, dy = operands(outlier=1.0)
    x[3] *= 1e5
    exact = x.double() @ w.double().T
    errors = {}
    for recipe in RECIPES:
        y, _, _ = fp8_grads(x, w, dy, recipe == "rowwise", E5M2)
        others = torch.arange(x.shape[0]) != 3
        errors[recipe] = ((y.double() - exact)[others].norm() / exact[others].norm()).item()
    assert errors["rowwise"] < errors["tensorwise"] / 2, errors


def test_bf16_inputs_give_bf16_outputs_and_gradients_within_bf16_plus_fp8_error():
    """A bf16 layer: outputs and gradients come back in bf16, within the FP8 bound plus bf16 rounding of the result
    (2^-8 relative)."""
    x, w, dy = operands(dtype=torch.bfloat16, outlier=1.0)
    y, dx, dw = fp8_grads(x, w, dy, False, E5M2)
    assert (y.dtype, dx.dtype, dw.dtype) == (torch.bfloat16,) * 3
    exact = x.double() @ w.double().T
    bound = fp8_error_bound(x.double(), w.double().T, E4M3, E4M3) + 2.0**-8 * exact.abs()
    assert ((y.double() - exact).abs() <= 1.01 * bound + 1e-12).all()


def test_autocast_gives_the_autocast_dtype_as_a_plain_linear_would():
    x, w, _ = operands()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp8_linear(x, w, torch.zeros(w.shape[0]), False, E5M2).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ the swap


class Toy(nn.Module):
    """Names like a decoder layer of an MoE model: a router `gate`, eligible projections, an odd and a small one."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.ModuleDict(dict(gate=nn.Linear(64, 16, bias=False), gate_proj=nn.Linear(64, 128),
                                      odd=nn.Linear(64, 40), small=nn.Linear(64, 32)))
        self.lm_head = nn.Linear(64, 96, bias=False)


def test_filter_skips_head_router_unaligned_and_small_layers():
    model = Toy()
    swapped = apply_fp8(model, skip=["lm_head", "gate"], min_dim=48)
    assert swapped == ["mlp.gate_proj"]  # gate: skipped by name; odd: 40 is no multiple of 16; small: 32 < 48
    assert type(model.lm_head) is nn.Linear and type(model.mlp["gate"]) is nn.Linear
    assert apply_fp8(Toy(), skip=[], min_dim=0) == ["mlp.gate", "mlp.gate_proj", "mlp.small", "lm_head"]


def test_swap_keeps_parameters_state_dict_keys_and_dtypes():
    model = models.from_size("llama-tiny", vocab_size=96, dtype=torch.bfloat16, device="cpu")
    before = {k: (v.dtype, v.shape, v.data_ptr()) for k, v in model.state_dict().items()}
    params_before = {n: p for n, p in model.named_parameters()}
    swapped = apply_fp8(model, "rowwise", skip=["lm_head"], min_dim=0)
    assert len(swapped) == 2 * 7 and isinstance(model.model.layers[0].mlp.up_proj, Float8Linear)
    after = {k: (v.dtype, v.shape, v.data_ptr()) for k, v in model.state_dict().items()}
    assert after == before  # same keys, dtypes, shapes and storage: checkpoints are those of the plain model
    assert all(p is params_before[n] for n, p in model.named_parameters())  # the optimizer sees the same objects


def test_swap_on_the_meta_device_then_load(hf_checkpoint):
    folder, reference = hf_checkpoint("llama", intermediate_size=128)
    model = models.from_pretrained(folder, prepare=lambda m: apply_fp8(m, min_dim=0))
    assert isinstance(model.model.layers[1].self_attn.o_proj, Float8Linear)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids), reference(ids).logits
    rel = ((got - want).norm() / want.norm()).item()
    assert 0 < rel < 0.1, rel  # two layers of e4m3 products (~4% each, relative) against transformers' fp32 logits


def test_lora_base_in_fp8_adapter_path_in_full_precision():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(2)])
    model.load_state_dict(base.state_dict())
    apply_lora(base, "all-linear", rank=4, alpha=8)
    apply_lora(model, "all-linear", rank=4, alpha=8)
    model.load_state_dict(base.state_dict())
    with torch.no_grad():
        for m in (base, model):  # the same non-zero adapters in both
            for layer in m:
                layer.lora_B.weight.copy_(torch.linspace(-0.1, 0.1, 256).view(64, 4))
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert apply_fp8(model, min_dim=0) == ["0", "1"]
    assert all(type(m) is Float8LoRALinear for m in model)
    assert {n: p for n, p in model.named_parameters() if p.requires_grad} == adapters  # the very same tensors
    x = torch.randn(24, 64)
    y, y_ref = model(x), base(x)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    rel = ((y - y_ref).norm() / y_ref.norm()).item()
    assert 0 < rel < 0.1, rel  # two e4m3 base products (~4% each)
    assert model[0].weight.grad is None  # the frozen base gets no weight gradient (the third product is skipped)
    g, g_ref = model[0].lora_A.weight.grad, base[0].lora_A.weight.grad
    assert ((g - g_ref).norm() / g_ref.norm()).item() < 0.15  # the adapters' gradients flow through FP8 input grads
    merge_lora(model)  # LoRA's own tools still see a LoRA layer
    assert all(type(m) is nn.Linear for m in model)


def test_compiles_without_graph_breaks():
    layer = Float8Linear(nn.Linear(64, 48), "rowwise")
    x = torch.randn(2, 16, 64, requires_grad=True)
    explanation = torch._dynamo.explain(lambda t: layer(t).sum())(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("recipe", RECIPES)
def test_compiled_forward_and_backward_equal_eager(recipe):
    """fullgraph=True fails on any graph break; AOTAutograd traces the backward products too. aot_eager runs the
    traced graphs with the same kernels, so the results must be bitwise equal. (Inductor on the CPU was also seen to
    match bitwise, but takes ~15 s to compile: too slow for the suite.)"""
    layer = Float8Linear(nn.Linear(64, 48), recipe)
    x = torch.randn(2, 16, 64, requires_grad=True)
    grads = []
    for fn in (layer, torch.compile(layer, backend="aot_eager", fullgraph=True)):
        y = fn(x)
        y.square().sum().backward()
        grads.append((y.detach(), x.grad, layer.weight.grad, layer.bias.grad))
        x.grad = layer.weight.grad = layer.bias.grad = None
    for eager, compiled in zip(*grads):
        assert torch.equal(eager, compiled)


# ------------------------------------------------------------------------------------------------ config


def test_refuses_gpus_without_fp8_matrix_cores(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ConfigError, match=r"compute capability 8\.9 or newer.*A100 has 8\.0; set fp8\.enabled = false"):
        fp8.check_config(Fp8Config(enabled=True), torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fp8.check_config(Fp8Config(enabled=True), torch.device("cuda"))  # Hopper passes
    fp8.check_config(Fp8Config(enabled=True), torch.device("cpu"))  # the CPU runs it, for tests


@pytest.mark.parametrize("cfg, lora_quantize, message", [
    (Fp8Config(enabled=True, recipe="blockwise"), "", "fp8.recipe = 'blockwise' is not one of"),
    (Fp8Config(enabled=True, grad_dtype="e3m4"), "", "fp8.grad_dtype = 'e3m4' is not one of"),
    (Fp8Config(enabled=True, min_dim=-1), "", "fp8.min_dim must be at least 0"),
    (Fp8Config(enabled=True), "nf4", "an NF4 base cannot also be FP8"),
])
def test_config_errors_name_the_key(cfg, lora_quantize, message):
    with pytest.raises(ConfigError, match=message):
        fp8.check_config(cfg, torch.device("cpu"), lora_quantize)


def test_no_qualifying_layer_is_a_config_error():
    model = models.from_size("llama-tiny", vocab_size=96, device="cpu")
    with pytest.raises(ConfigError, match="no linear layer qualifies.*lower fp8.min_dim"):
        fp8.apply_from_config(model, Fp8Config(enabled=True, min_dim=4096))


# ------------------------------------------------------------------------------------------------ the trainer

from tests.test_train import losses, run  # noqa: E402, F401  (run is the trainer fixture)


def test_tiny_llama_trains_with_fp8_and_tracks_the_bf16_loss(run, hf_checkpoint):
    """Four trainer steps on a tiny Llama checkpoint (every linear but the LM head in FP8, min_dim 0) with bf16
    parameters, against the same run without FP8. Measured: at most 0.4% apart per step; the bound is 1% (the
    issue's target after 200 steps), well below the loss's own drop over these steps. (FP8 products on the CPU are a
    slow reference kernel, hence the tiny model and few steps.)"""
    folder, _ = hf_checkpoint("llama", vocab_size=64)
    steps = [f"--model.path={folder}", "--train.precision=bf16", "--optim.lr=1e-2"]
    reference = losses(run(*steps))
    assert reference[-1] < 0.95 * reference[0]  # the run learns, so tracking it means something
    for recipe in RECIPES:
        got = losses(run(*steps, "--fp8.enabled=true", f"--fp8.recipe={recipe}", "--fp8.min_dim=0"))
        assert got != reference  # FP8 really ran
        for step, (a, b) in enumerate(zip(got, reference), 1):
            assert abs(a - b) <= 0.01 * b, f"{recipe}, step {step}: FP8 loss {a:.4f}, bf16 loss {b:.4f}"


# ------------------------------------------------------------------------------------------------ the benchmark


def test_benchmark_smoke_run_on_cpu(tmp_path):
    """scripts/bench_fp8.py --tiny: every GEMM shape and every end-to-end variant runs, and the FP8 runs' losses
    stay within the script's own 2% of the bf16 loss (same weights and tokens). Speeds on the CPU mean nothing."""
    import json

    from scripts import bench_fp8

    out = tmp_path / "fp8.jsonl"
    assert bench_fp8.main(["--device", "cpu", "--tiny", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    gemms = [r for r in records if r["part"] == "gemm"]
    assert len(gemms) == len(bench_fp8.linear_shapes(tiny=True))
    assert all(r[f"{v}_ms"] > 0 for r in gemms for v in bench_fp8.VARIANTS)
    end_to_end = {r["variant"]: r for r in records if r["part"] == "end_to_end"}
    assert set(end_to_end) == set(bench_fp8.VARIANTS)
    assert all(end_to_end[v]["loss_ok"] and end_to_end[v]["speedup"] > 0 for v in ("tensorwise", "rowwise"))


def test_benchmark_shapes_are_the_llama_linears():
    from scripts import bench_fp8

    shapes = {name: (din, dout) for name, din, dout in bench_fp8.linear_shapes(tiny=False)}
    assert len(shapes) == 3 * 7
    assert shapes["llama-3.2-3b.k_proj"] == (3072, 1024) and shapes["llama-3.1-8b.down_proj"] == (14336, 4096)
    assert all(d % 16 == 0 for dims in shapes.values() for d in dims)  # every one is FP8-eligible


def test_lora_run_with_an_fp8_base_tracks_lora_and_writes_adapter_and_merged_model(run, hf_checkpoint):
    """LoRA on every linear with the frozen base in FP8, against the same LoRA run without FP8: losses within 1% per
    step (as the full fine-tune above), and adapter/ plus the merged final/ are written as usual."""
    folder, _ = hf_checkpoint("llama", vocab_size=64)
    steps = [f"--model.path={folder}", "--lora.enabled=true", "--lora.rank=4", "--optim.lr=1e-2"]
    reference = losses(run(*steps))
    out = run(*steps, "--fp8.enabled=true", "--fp8.min_dim=0")
    got = losses(out)
    assert got != reference and reference[-1] < reference[0]
    for a, b in zip(got, reference):
        assert abs(a - b) <= 0.01 * b, (got, reference)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    base, merged = load_file(folder / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in merged.items()} == {k: (v.shape, v.dtype) for k, v in base.items()}
    assert (merged["model.layers.0.mlp.up_proj.weight"] - base["model.layers.0.mlp.up_proj.weight"]).abs().max() > 0


@pytest.mark.slow
def test_fp8_under_fsdp2_matches_one_process(run, hf_checkpoint, tmp_path):
    """2 processes x 1 row x 2 accumulation (FSDP2 over gloo: each layer's weight is gathered before its FP8
    products) == 1 process x 1 row x 4 accumulation. Every micro-batch sees the same FP8 products in both, so the
    first step's loss agrees to fp32 summation order (rel 1e-5); later steps start from weights that differ by
    that rounding, which can move single FP8 roundings: rel 1e-4 for them (measured: 4e-8)."""
    from tests.test_train import torchrun

    folder, _ = hf_checkpoint("llama", vocab_size=64)
    single = run(f"--model.path={folder}", "--fp8.enabled=true", "--fp8.recipe=rowwise", "--fp8.min_dim=0",
                 "--train.micro_batch_size=1", "--train.grad_accum_steps=4", "--train.max_steps=3",
                 "--train.loss=plain")
    (tmp_path / "dist.toml").write_text((single / "config.toml").read_text())
    out = tmp_path / "dist"
    torchrun(tmp_path / "dist.toml", "--train.grad_accum_steps=2", f"--output_dir={out}")
    assert "FP8: 14 linear layers swapped" in (out / "train.log").read_text()  # FP8 really ran under FSDP2
    one, two = losses(single), losses(out)
    assert two[0] == pytest.approx(one[0], rel=1e-5)
    assert two == pytest.approx(one, rel=1e-4)


def test_fp8_and_qat_with_tensor_parallelism_are_refused_before_any_work():
    from pathlib import Path

    from nanotune import train
    from nanotune.config import load_config

    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.toml"
    for section in ("fp8", "qat"):
        cfg = load_config(quickstart, [f"--{section}.enabled=true", "--parallel.tp=2"])
        with pytest.raises(ConfigError, match=f"{section}.enabled with parallel.tp = 2"):
            train.check_config(cfg)


# ------------------------------------------------------------------------------------------------ FSDP2: FP8 all-gather


@pytest.mark.parametrize("cfg, dp_shard, dora, message", [
    (Fp8Config(fsdp_float8_all_gather=True), 2, False, "fp8.enabled = false; enable FP8 or set fp8.fsdp_float8"),
    (Fp8Config(enabled=True, recipe="rowwise", fsdp_float8_all_gather=True), 2, False,
     "needs fp8.recipe = 'tensorwise', not 'rowwise'"),
    (Fp8Config(enabled=True, fsdp_float8_all_gather=True), 1, False, r"shards over 1 process \(parallel.dp_shard = 1\)"),
    (Fp8Config(enabled=True, fsdp_float8_all_gather=True), 2, True, "with lora.dora = true is not supported"),
])
def test_float8_all_gather_refusals_name_the_keys(cfg, dp_shard, dora, message):
    with pytest.raises(ConfigError, match=message):
        fp8.check_config(cfg, torch.device("cpu"), dp_shard=dp_shard, dora=dora)
    fp8.check_config(Fp8Config(enabled=True, fsdp_float8_all_gather=True), torch.device("cpu"), dp_shard=2)


def test_a_run_in_one_process_refuses_the_float8_all_gather_before_any_work(run, tmp_path):
    with pytest.raises(ConfigError, match="parallel.dp_shard > 1, or set fp8.fsdp_float8_all_gather = false"):
        run("--fp8.enabled=true", "--fp8.fsdp_float8_all_gather=true", name="refused")
    assert not (tmp_path / "cache").exists()  # refused before the data was read


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_weight_gathered_in_fp8_gives_bitwise_the_products_of_the_high_precision_weight(compiled):
    """What FSDP2 hands the layer with the switch on: the weight's e4m3 bytes and tensorwise scale (a Float8Weight).
    Output, input gradient and weight gradient are bitwise those of the same layer holding the high-precision weight
    (tensorwise scales do not depend on the weight's layout, so the backward reuses the bytes, transposed); the weight
    gradient has the high-precision dtype. torch.compile traces it without graph breaks (fullgraph)."""
    plain = Float8Linear(nn.Linear(64, 48), "tensorwise")
    gathered = Float8Linear(nn.Linear(64, 48), "tensorwise")
    gathered.bias = plain.bias
    gathered.weight = nn.Parameter(fp8.Float8Weight(*fp8.to_float8(plain.weight.detach(), E4M3, False), torch.float32))
    x = torch.randn(2, 16, 64, requires_grad=True)
    results = []
    for layer in (plain, torch.compile(gathered, backend="aot_eager", fullgraph=True) if compiled else gathered):
        y = layer(x)
        y.square().sum().backward()
        results.append((y.detach(), x.grad, layer.weight.grad))
        x.grad = plain.bias.grad = None
    (y_ref, dx_ref, dw_ref), (y, dx, dw) = results
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref) and torch.equal(dw, dw_ref)
    assert type(dw) is torch.Tensor and dw.dtype == torch.float32


def fsdp_fp8_llama(folder, mesh, gather_in_fp8: bool, param_dtype, lora: bool):
    """The tiny Llama in `folder`, every linear but the LM head in tensorwise FP8 (with LoRA: LoRA on each, the frozen base in FP8),
    sharded by FSDP2 per layer; returns the model and a list that each decoder layer's all-gather appends the bytes it
    sends to."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather

    sent = []

    class CountingAllGather(DefaultAllGather):
        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            sent.append(input_tensor.numel() * input_tensor.element_size())
            return super().__call__(output_tensor, input_tensor, group, async_op)

    model = models.from_pretrained(folder)
    if lora:
        torch.manual_seed(0)  # the adapters' A
        apply_lora(model, "all-linear", rank=4, alpha=8)
        for module in model.modules():  # non-zero B, so that the base's input gradient matters
            if isinstance(module, LoRALinear):
                nn.init.normal_(module.lora_B.weight, std=0.02)
    apply_fp8(model, "tensorwise", skip=["lm_head"], min_dim=0)
    if gather_in_fp8:
        assert fp8.gather_weights_in_float8(model) == 2 * 7
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
        layer.set_custom_all_gather(CountingAllGather())
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model, sent


def compare_gathers(folder, mesh, param_dtype, lora: bool = False) -> dict:
    """Two training steps of fsdp_fp8_llama gathering in the parameter dtype and in FP8 (run in every process):
    -> what the test checks, as plain values."""
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(mesh.get_rank()))  # vocab 64
    runs = {}
    for gather_in_fp8 in (False, True):
        model, sent = fsdp_fp8_llama(folder, mesh, gather_in_fp8, param_dtype, lora)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        step_losses = []
        for _ in range(2):
            loss = model(ids).float().square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step_losses.append(loss.item())
        state = {k: v.to_local() for k, v in model.state_dict().items()}
        adam = [t.to_local() for s in optimizer.state.values() for t in s.values() if t.ndim]
        types = sorted({type(t).__name__ for t in [*state.values(), *adam]})
        runs[gather_in_fp8] = dict(losses=step_losses, state=state, sent=sent, types=types)
    hp, f8 = runs[False], runs[True]
    differ = [k for k in hp["state"] if not (f8["state"][k].dtype == hp["state"][k].dtype
                                              and torch.equal(f8["state"][k], hp["state"][k]))]
    layer = models.from_pretrained(folder).model.layers[0]
    fp8_elements = sum(m.weight.numel() for m in layer.modules() if type(m) is nn.Linear)  # the 7 projections
    return dict(fp8_elements_per_layer=fp8_elements, losses=[hp["losses"], f8["losses"]], sent=[hp["sent"], f8["sent"]], types=[hp["types"], f8["types"]],
                keys_equal=hp["state"].keys() == f8["state"].keys(), differ=differ)


@pytest.fixture(scope="module")
def float8_all_gather_runs(tmp_path_factory):
    """One torchrun job of 2 processes (FSDP2 over gloo): compare_gathers for fp32 and bf16 gathers, then trainer
    runs with FP8 tensorwise under amp-bf16 (bf16 gathers, fp32 gradient reduction): the weights gathered in bf16,
    in FP8 (both with a checkpoint after step 1), and resumed from that checkpoint with the FP8 gather."""
    from tests.test_parallel import QUICKSTART, base_argv, write_family_checkpoint

    tmp = tmp_path_factory.mktemp("fp8_all_gather")
    rows = (QUICKSTART / "train.jsonl").read_text().splitlines()[:48]
    (tmp / "train.jsonl").write_text("\n".join(rows) + "\n")
    write_family_checkpoint(tmp / "llama", "llama")
    common = ["--fp8.enabled=true", "--fp8.min_dim=0", "--train.precision=amp-bf16", "--parallel.dp_shard=2",
              "--train.grad_accum_steps=2", "--train.max_steps=2", "--checkpoint.every=1", "--checkpoint.keep=0"]
    on = ["--fp8.fsdp_float8_all_gather=true"]
    outs = {name: tmp / name for name in ("bf16_gather", "fp8_gather", "resumed")}
    runs = [base_argv(tmp, tmp / "llama", outs["bf16_gather"]) + common,
            base_argv(tmp, tmp / "llama", outs["fp8_gather"]) + common + on,
            base_argv(tmp, tmp / "llama", outs["resumed"]) + common + on +
            [f"--checkpoint.resume={outs['fp8_gather'] / 'step-1'}"]]
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"model": str(tmp / "llama"), "gathers": str(tmp / "gathers.json"), "runs": runs}))
    run_torchrun(__file__, str(spec), nproc=2)
    return json.loads((tmp / "gathers.json").read_text()), outs


def worker(spec_file: str) -> None:
    """Inside torchrun: compare_gathers, then each trainer run of the spec, in one process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from nanotune import train

    dist.init_process_group("gloo")
    spec = json.loads(Path(spec_file).read_text())
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    gathers = {name: compare_gathers(spec["model"], mesh, dtype, lora) for name, dtype, lora in
               (("fp32", None, False), ("bf16-lora", torch.bfloat16, True))}
    if dist.get_rank() == 0:
        Path(spec["gathers"]).write_text(json.dumps(gathers))
    for argv in spec["runs"]:
        assert train.main(argv) == 0
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["fp32", "bf16-lora"])
def test_fsdp2_sends_fp8_weights_as_one_byte_per_element_and_computes_the_same(float8_all_gather_runs, case):
    """Two processes, two training steps of a sharded tiny Llama, gathering the FP8 layers' weights in fp32 (or, with
    LoRA, the frozen FP8 base weights in bf16 under a mixed-precision policy) and in e4m3. Every all-gather of a decoder layer sends exactly its FP8 weights'
    elements x (bytes of the gather dtype - 1) fewer bytes, and nothing else changes. Losses, the updated weights and
    AdamW states are bitwise equal: the scale is the whole weight's (the max of the shards' amaxes, exact), so the
    gathered bytes are the very FP8 values the layer would cast the gathered weight to. Model and optimizer states
    are plain tensors: the wrapper never reaches a checkpoint."""
    got = float8_all_gather_runs[0][case]
    (losses_hp, losses_fp8), (sent_hp, sent_fp8) = got["losses"], got["sent"]
    assert losses_fp8 == losses_hp
    assert got["keys_equal"] and got["differ"] == []
    assert got["types"] == [["Tensor"], ["Tensor"]]
    gather_bytes = {"fp32": 4, "bf16-lora": 2}[case]
    assert len(sent_fp8) == len(sent_hp) >= 2 * 2 * 2  # 2 layers x (forward + backward) x 2 steps
    for hp, f8 in zip(sent_hp, sent_fp8):
        assert hp - f8 == got["fp8_elements_per_layer"] * (gather_bytes - 1) // 2  # each process sends half of each


def state_tensors(step_dir: Path) -> dict:
    """Every tensor of a DCP checkpoint folder, by file and key."""
    return {(f.name, k): v for f in sorted((step_dir / "state").glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.slow
def test_trainer_with_fp8_all_gather_equals_bf16_gather_and_resumes_exactly(float8_all_gather_runs):
    """The trainer under FSDP2 (2 processes, amp-bf16, tensorwise FP8): with fp8.fsdp_float8_all_gather the losses,
    the step-1 checkpoint (DCP files: keys, dtypes, values of parameters and AdamW states) and final/ are bitwise
    those of the bf16 gather; resuming the FP8-gather run from its checkpoint continues it bitwise too."""
    outs = float8_all_gather_runs[1]
    log = (outs["fp8_gather"] / "train.log").read_text()
    assert "FP8 all-gather: FSDP2 gathers 14 weights in e4m3" in log
    assert "FP8 all-gather" not in (outs["bf16_gather"] / "train.log").read_text()
    assert losses(outs["fp8_gather"]) == losses(outs["bf16_gather"])
    hp, f8 = state_tensors(outs["bf16_gather"] / "step-1"), state_tensors(outs["fp8_gather"] / "step-1")
    assert hp.keys() == f8.keys() and any("exp_avg" in k for _, k in hp)
    for key in hp:
        assert f8[key].dtype == hp[key].dtype and torch.equal(f8[key], hp[key]), key
    final_hp, final_f8 = load_file(outs["bf16_gather"] / "final" / "model.safetensors"), \
        load_file(outs["fp8_gather"] / "final" / "model.safetensors")
    assert final_hp.keys() == final_f8.keys() and all(torch.equal(final_f8[k], final_hp[k]) for k in final_hp)
    assert {v.dtype for v in final_f8.values()} == {torch.float32}  # the model's own dtype: nothing FP8 in final/
    assert losses(outs["resumed"]) == losses(outs["fp8_gather"])[1:]
    final_resumed = load_file(outs["resumed"] / "final" / "model.safetensors")
    assert all(torch.equal(final_resumed[k], final_f8[k]) for k in final_f8)


if __name__ == "__main__":
    worker(sys.argv[1])
