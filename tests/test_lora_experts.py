"""LoRA on stacked MoE expert weights: the grouped-GEMM update against the dense per-expert formula, exact merging,
adapters in PEFT's format for fused expert parameters (target_parameters) both ways, and a training run."""

from __future__ import annotations

import json

import pytest
import torch

import models
from models.qwen_moe import grouped_matmul, grouped_mm_works
from nanotune import lora, lora_experts
from nanotune.lora_experts import FrozenExperts
from tests.test_models_qwen_moe import VOCAB, loop_reference, write_checkpoint

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def randomize(model, seed=1):
    """Non-zero B (a fresh adapter is the identity), so an adapter that is ignored or misplaced changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.mark.parametrize("use_grouped_mm", [False, True], ids=["padded-bmm", "grouped_mm"])
def test_grouped_update_equals_the_dense_per_expert_formula_with_gradients(use_grouped_mm):
    if use_grouped_mm and not grouped_mm_works("cpu", torch.float32):
        pytest.skip("torch._grouped_mm does not run in fp32 on CPU in this torch")
    from models.qwen_moe import Experts

    gen = torch.Generator().manual_seed(0)
    experts = Experts(4, 32, 16)
    experts.gate_up_proj = torch.nn.Parameter(torch.randn(4, 32, 32, generator=gen))
    experts.down_proj = torch.nn.Parameter(torch.randn(4, 32, 16, generator=gen))
    module = FrozenExperts(experts)
    module.add_adapters(["gate_up_proj"], rank=4, alpha=8.0)
    randomize(module)
    module.use_grouped_mm = use_grouped_mm
    counts = torch.tensor([3, 0, 5, 2])  # an expert with no tokens too
    x = torch.randn(10, 32, generator=gen, requires_grad=True)
    ours = module.project("gate_up_proj", x, counts)  # (10, 32)

    A, B = (module.lora_A["gate_up_proj"].detach().clone().requires_grad_(), 
            module.lora_B["gate_up_proj"].detach().clone().requires_grad_())
    x2 = x.detach().clone().requires_grad_()
    merged = experts.gate_up_proj.detach() + 2.0 * torch.bmm(B, A)  # W_e + s B_e A_e, s = 8 / 4
    theirs = loop_reference(x2, merged, counts)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    grad = torch.randn(ours.shape, generator=gen)
    ours.backward(grad)
    theirs.backward(grad)
    for got, expected in [(x.grad, x2.grad), (module.lora_A["gate_up_proj"].grad, A.grad),
                          (module.lora_B["gate_up_proj"].grad, B.grad)]:
        assert expected.abs().max() > 0
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert module.gate_up_proj.grad is None  # the stacked weight stays frozen


CASES = [("qwen2_moe", ["gate_up_proj", "down_proj"]), ("qwen3_moe", ["gate_up_proj", "down_proj"]),
         ("qwen3_moe", ["down_proj"])]


@pytest.mark.parametrize("family,targets", CASES, ids=["qwen2-both", "qwen3-both", "qwen3-down"])
def test_adapters_round_trip_with_peft_both_ways(tmp_path, family, targets):
    reference = write_checkpoint(tmp_path / "m", family)
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        base = reference(ids).logits

    # nanotune -> PEFT: an adapter saved by nanotune gives the same logits in transformers + peft
    model = models.from_pretrained(tmp_path / "m")
    lora.apply_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8)
    lora_experts.apply_expert_lora(model, targets, rank=4, alpha=8)
    randomize(model)
    lora.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_parameters"] == sorted(f"mlp.experts.{t}" for t in targets)
    with torch.no_grad():
        ours = model(ids)
        theirs = peft.PeftModel.from_pretrained(reference, tmp_path / "ours").eval()(ids).logits
        assert (ours - base).abs().max() > 1e-2  # the adapters matter
        assert (ours - theirs).abs().max() <= 1e-5

        # merged: the same logits from plain stacked experts
        lora.merge_lora(model)
        assert not any(isinstance(m, FrozenExperts) for m in model.modules())
        assert (model(ids) - ours).abs().max() <= 1e-5

    # PEFT -> nanotune: an adapter made by peft (with other weights) loads into a fresh model
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "m", attn_implementation="eager", experts_implementation="eager").eval()
    made = peft.get_peft_model(reference, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=[f"mlp.experts.{t}" for t in targets]))
    randomize(made, seed=2)
    made.save_pretrained(tmp_path / "peft")
    fresh = lora.load_adapter(models.from_pretrained(tmp_path / "m"), tmp_path / "peft")
    with torch.no_grad():
        theirs = made(ids).logits
        assert (theirs - base).abs().max() > 1e-2
        assert (fresh(ids) - theirs).abs().max() <= 1e-5


def test_expert_options_peft_cannot_express_are_refused():
    with pytest.raises(ValueError, match="lora.dropout = 0.1 with lora.target_experts"):
        lora.check_expert_options(["down_proj"], 0.1, False)
    with pytest.raises(ValueError, match="lora.dora = true with lora.target_experts"):
        lora.check_expert_options(["down_proj"], 0.0, True)
    from models.qwen_moe import Experts

    with pytest.raises(ValueError, match=r"lora.target_experts \['up_proj'\]: name stacked expert weights"):
        FrozenExperts(Experts(2, 16, 16)).add_adapters(["up_proj"], 4, 8)


@pytest.mark.parametrize("nf4", [False, True], ids=["bf16-experts", "nf4-experts"])
def test_training_run_saves_expert_adapters_that_peft_loads_and_a_merged_final(tmp_path, nf4):
    """With NF4 experts too: the adapter trained on them is merged into the original weights, so final/ is exactly
    base + adapter as transformers + peft compute it."""
    from tests.test_train import QUICKSTART
    from nanotune import train

    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "moe")
    rows = (QUICKSTART / "train.jsonl").read_text().splitlines()[:32]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    argv = [str(QUICKSTART.parent.parent / "configs" / "quickstart.toml"), f"--model.path={tmp_path / 'moe'}",
            f"--model.tokenizer={QUICKSTART / 'tokenizer'}", f'--data.datasets=[{{path="{tmp_path / "train.jsonl"}"}}]',
            "--data.eval_datasets=[]", "--data.seq_len=64", f"--data.cache_dir={tmp_path / 'cache'}",
            "--train.micro_batch_size=2", "--train.max_steps=3", "--train.eval_every=0", "--optim.lr=1e-2",
            "--logging.plot=false", "--lora.enabled=true", '--lora.targets=["q_proj"]',
            '--lora.target_experts=["gate_up_proj", "down_proj"]', f"--output_dir={out}",
            f"--lora.quantize_experts={str(nf4).lower()}"]
    assert train.main(argv) == 0
    ids = torch.randint(0, 64, (2, 12))
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe", experts_implementation="eager").eval()
    final = transformers.AutoModelForCausalLM.from_pretrained(out / "final", experts_implementation="eager").eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = peft.PeftModel.from_pretrained(base, out / "adapter").eval()(ids).logits
        assert (adapted - base_logits).abs().max() > 1e-3  # the expert adapters learned something
        assert (final(ids).logits - adapted).abs().max() <= 1e-4
