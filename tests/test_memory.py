"""nanotune/memory.py: tiled MLPs, activation offload and frozen-layer offload change memory, never the numbers."""

from __future__ import annotations

import copy

import pytest
import torch

import models
from nanotune import lora
from nanotune.config import ConfigError
from nanotune.memory import ActivationOffload, LayerOffload, TiledMLP, apply_tiled_mlp

VOCAB = 64
FAMILIES = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "gemma3": dict(model_type="gemma3_text", hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=8,
                   query_pre_attn_scalar=8, layer_types=["sliding_attention", "full_attention"]),
    # layer 0 dense, layer 1 sparse with a shared expert: both kinds of MLP, and the router's aux loss
    "qwen2_moe": dict(model_type="qwen2_moe", hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                      num_experts_per_tok=2, mlp_only_layers=[0], shared_expert_intermediate_size=24,
                      router_aux_loss_coef=0.5),
}


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]  # on a GPU: the side streams and pinned memory


def tiny_model(family: str, seed: int = 0, device: str = "cpu"):
    config = models.config_from_hf({**FAMILIES[family], "vocab_size": VOCAB})
    model = models.build_model(config, "meta")
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.to(device).train()


def loss_and_grads(model, ids, mask=None):
    """Mean token loss (+ the MoE aux loss) and every trainable parameter's gradient."""
    model.zero_grad(set_to_none=True)
    extra = {"aux_loss_mask": mask} if mask is not None else {}
    logits = model(ids, **extra)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    if getattr(model, "aux_loss", None) is not None:
        loss = loss + model.aux_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a, b, atol=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.allclose(loss_a, loss_b, atol=atol, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=atol, rtol=1e-4), name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiled_mlp_gradients_equal_the_untiled_mlp(family):
    torch.manual_seed(0)
    plain = tiny_model(family)
    tiled = copy.deepcopy(plain)
    assert apply_tiled_mlp(tiled, tile_tokens=7) == 2  # 2 x 20 tokens: five full tiles and one of 5
    assert all(isinstance(layer.mlp, TiledMLP) for layer in tiled.model.layers)
    assert [n for n, _ in tiled.named_parameters()] == [n for n, _ in plain.named_parameters()]  # names unchanged
    ids = torch.randint(0, VOCAB, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 14:] = False  # padding: the router statistics leave it out, also when a tile straddles it
    kwargs = {"mask": mask} if family == "qwen2_moe" else {}
    expected = loss_and_grads(plain, ids, **kwargs)
    assert_same(loss_and_grads(tiled, ids, **kwargs), expected)
    if family == "qwen2_moe":
        assert plain.aux_loss.item() > 0 and torch.allclose(tiled.aux_loss, plain.aux_loss, atol=1e-6, rtol=0)
        router = "model.layers.1.mlp.gate.weight"
        assert expected[1][router].abs().max() > 0  # the aux loss reaches the router: its gradient is compared


class TilesWithAutograd:
    """The oracle for dropout: the MLP over the same tiles, in the same order, but differentiated by autograd through
    every tile (no recompute), so it draws the dropout masks the tiled forward draws."""

    def forward(self, x):
        B, T, D = x.shape
        flat = x.reshape(1, B * T, D)
        untiled = super().forward  # (zero-argument super does not work inside the comprehension)
        tiles = [untiled(flat[:, s:s + self.tile]) for s in range(0, B * T, self.tile)]
        return torch.cat(tiles, dim=1).view(B, T, D)


def test_tiled_mlp_composes_with_lora_dropout_and_checkpointing():
    """LoRA with dropout (the recompute must draw the forward's masks), with and without full checkpointing."""
    plain = tiny_model("llama")
    lora.apply_lora(plain, ["all-linear"], rank=4, alpha=8, dropout=0.3)
    for name, p in plain.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapters matter so their dropout shows in the gradients
            torch.nn.init.normal_(p, std=0.1)
    tiled = copy.deepcopy(plain)
    apply_tiled_mlp(tiled, tile_tokens=8)
    for layer in plain.model.layers:
        layer.mlp.__class__ = type("Oracle", (TilesWithAutograd, type(layer.mlp)), {"tile": 8})
    ids = torch.randint(0, VOCAB, (1, 30))
    for mode in ("none", "full"):
        plain.activation_checkpointing = tiled.activation_checkpointing = mode
        torch.manual_seed(1)
        expected = loss_and_grads(plain, ids)
        torch.manual_seed(1)
        assert_same(loss_and_grads(tiled, ids), expected)
    assert any("lora_A" in name for name in expected[1])


def test_tiled_mlp_is_the_plain_mlp_when_one_tile_holds_every_token():
    model = tiny_model("llama")
    apply_tiled_mlp(model, tile_tokens=64)
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        tiled = model(ids)
        apply_tiled_mlp(model, tile_tokens=5)
        assert torch.allclose(model(ids), tiled, atol=1e-6)  # the forward in tiles, without a backward


def lora_model(family: str = "llama", device: str = "cpu"):
    model = tiny_model(family)
    lora.apply_lora(model, ["all-linear"], rank=4, alpha=8)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapters change the output
            torch.nn.init.normal_(p, std=0.1)
    return model.to(device)


class CountingOffload(ActivationOffload):
    """Counts what goes to the host and comes back, so that the test sees the offload happen."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.packed = self.unpacked = 0

    def _pack(self, t):
        handle = super()._pack(t)
        self.packed += not isinstance(handle, torch.Tensor)
        return handle

    def _unpack(self, handle):
        self.unpacked += not isinstance(handle, torch.Tensor)
        return super()._unpack(handle)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_activation_offload_changes_nothing(family, device):
    """Every saved activation goes to the host and comes back, a layer ahead: the same loss and gradients."""
    model = lora_model(family, device)
    ids = torch.randint(0, VOCAB, (2, 24), device=device)
    expected = loss_and_grads(model, ids)
    offload = CountingOffload(model, torch.device(device), min_bytes=0)
    for _ in range(2):  # a second step reuses the offloader
        with offload.saving():
            model.zero_grad(set_to_none=True)
            logits = model(ids)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
            loss = loss + (model.aux_loss if family == "qwen2_moe" else 0)
        layers_seen = set(offload.by_layer)
        loss.backward()
        got = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert_same(got, expected, atol=1e-6)
    assert offload.packed > 20 and offload.unpacked == offload.packed
    assert layers_seen == {0, 1}  # tensors grouped by layer (the final norm and head: with the last layer)
    assert layers_seen <= offload.fetched  # every layer's tensors were fetched back


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_layer_offload_changes_nothing_and_keeps_two_layers_at_most(checkpointing, device):
    model = lora_model("llama", device)
    model.config.num_hidden_layers = 3
    model.model.layers.append(copy.deepcopy(model.model.layers[0]))  # three layers: eviction happens
    model.activation_checkpointing = checkpointing
    ids = torch.randint(0, VOCAB, (2, 16), device=device)
    expected = loss_and_grads(model, ids)
    offload = LayerOffload(model, torch.device(device))
    frozen = model.model.layers[1].self_attn.q_proj.weight
    assert frozen.untyped_storage().nbytes() == 0  # freed until its layer runs
    assert offload.bytes_offloaded() > 0
    resident = []
    for layer in model.model.layers:  # after each layer's forward and before each backward: how many are resident?
        layer.register_forward_hook(lambda *_: resident.append(len(offload.arrived)))
    for _ in range(2):
        assert_same(loss_and_grads(model, ids), expected, atol=1e-6)
    assert max(resident) <= 2
    offload.close()
    assert frozen.untyped_storage().nbytes() == frozen.numel() * frozen.element_size()
    assert_same(loss_and_grads(model, ids), expected, atol=1e-6)  # closed: all weights back, no hooks


# ---------------------------------------------------------------------------------------------- in the trainer

from tests.test_train import assert_same_params, final_params, losses, run  # noqa: E402,F401  (run: the fixture)


def test_training_with_every_memory_switch_equals_plain_training(run):
    """LoRA with tiled MLPs, overlapped activation offload and layer offload trains as plain LoRA does, and the
    final/ merge sees every weight again."""
    common = ("--train.max_steps=2", "--lora.enabled=true", "--lora.rank=4", "--lora.targets=[\"all-linear\"]")
    plain = run(*common)
    saving = run(*common, "--train.tiled_mlp=true", "--train.tiled_mlp_tile=48", "--train.activation_offload=overlap",
                 "--train.layer_offload=true")
    assert losses(saving) == pytest.approx(losses(plain), rel=1e-6)
    assert_same_params(final_params(saving), final_params(plain), atol=1e-6, max_outlier_fraction=0)
    log = (saving / "train.log").read_text()
    assert "tiled MLP: 2 MLPs run over tiles of 48 tokens" in log and "layer offload: " in log
    sync = run(*common, "--train.activation_offload=sync", "--train.activation_checkpointing=full")
    assert losses(sync) == pytest.approx(losses(plain), rel=1e-6)


@pytest.mark.parametrize("change, message", [
    (("--train.layer_offload=true",), r"train.layer_offload = true .* full fine-tuning .* lora.enabled = true"),
    (("--train.layer_offload=true", "--lora.enabled=true", "--train.compile=true"), r"set train.compile = false"),
    (("--train.activation_offload=\"async\"",), r"train.activation_offload = 'async': choose"),
    (("--train.tiled_mlp_tile=0",), r"train.tiled_mlp_tile must be at least 1"),
], ids=["full-fine-tuning", "compile", "offload-mode", "tile"])
def test_memory_switches_refuse_what_they_cannot_do(run, change, message):
    with pytest.raises(ConfigError, match=message):
        run(*change)


@pytest.mark.slow
def test_layer_offload_is_refused_under_fsdp(run, tmp_path):
    from tests.test_train import torchrun

    config = run("--train.max_steps=1", "--checkpoint.save_final=false") / "config.toml"
    result = torchrun(config, "--lora.enabled=true", "--train.layer_offload=true", f"--output_dir={tmp_path / 'd'}",
                      expect_ok=False)
    assert result.returncode != 0
    assert "train.layer_offload = true runs in one process (this run has 2)" in result.stderr + result.stdout


def test_layer_offload_with_qlora_changes_nothing():
    """NF4 weights (packed uint8, their scales beside them) leave and come back like any frozen tensor."""
    pytest.importorskip("bitsandbytes")
    from nanotune.qlora import quantize_nf4

    model = tiny_model("llama")
    quantize_nf4(model, compute_dtype=torch.float32, device="cpu")
    lora.apply_lora(model, ["all-linear"], rank=4, alpha=8)
    for module in model.modules():
        if hasattr(module, "materialize_after_load") and any(p.is_meta for p in module.parameters()):
            module.materialize_after_load("cpu")
    for name, p in model.named_parameters():
        p.requires_grad = ".lora_" in name
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, VOCAB, (2, 16))
    expected = loss_and_grads(model, ids)
    offload = LayerOffload(model, torch.device("cpu"))
    packed = model.model.layers[0].mlp.up_proj.weight
    assert packed.dtype == torch.uint8 and packed.untyped_storage().nbytes() == 0
    assert_same(loss_and_grads(model, ids), expected, atol=1e-6)
