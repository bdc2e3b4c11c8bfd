"""Shared test fixtures: tiny random HF checkpoints written by transformers (a test-only reference)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through Triton's interpreter; it must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))


def run_torchrun(script, *args: str, nproc: int = 2, timeout: int = 600):
    """`script` (a test file run as a worker, or nanotune/train.py) under torchrun with `nproc` gloo processes of one
    thread each, nanotune imported from this checkout; fails the test with the end of the output unless it exits 0."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


PROBE = "probe"  # a task of run_tasks that is not a training run: ["probe", args, out] calls probe(args, out)


def run_tasks(spec_file, probe=None) -> None:
    """Inside torchrun: every task of the JSON spec in turn, in one gloo process group that they share (the cost of
    starting processes and importing torch paid once): a train.py argv, trained to the end, or a PROBE task."""
    import json

    import torch.distributed as dist

    from nanotune import train

    dist.init_process_group("gloo")
    for task in json.loads(Path(spec_file).read_text()):
        if task[0] == PROBE:
            probe(task[1], task[2])
        else:
            assert train.main(task) == 0
    dist.destroy_process_group()


def rerun_in_fresh_process(test_file, tmp_path: Path, min_ran: int) -> None:
    """Run a kernel test file again in a new process with TRITON_INTERPRET=1 set before triton is imported (this
    process imported it without), and check that at least `min_ran` of its tests ran, not skipped, and none failed."""
    import subprocess
    from xml.etree import ElementTree

    report = tmp_path / f"{Path(test_file).stem}.xml"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", str(test_file), "-x", f"--junitxml={report}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    suite = ElementTree.parse(report).getroot().find("testsuite")
    ran = int(suite.get("tests")) - int(suite.get("skipped"))
    assert ran >= min_ran and int(suite.get("failures")) == 0, ElementTree.tostring(suite)[:2000]


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip, with the reason, on a machine without a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu_check.sh runs the cuda-marked tests on one)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


def tiny_hf_config(family: str = "llama", **overrides):
    transformers = pytest.importorskip("transformers")
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    base.update(overrides)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}[family]
    return cls(**base)


def write_hf_checkpoint(path: Path, family: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    """Save a randomly initialised transformers model to `path`; returns the transformers model (eval, fp32)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = tiny_hf_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # HF's init leaves norms at 1 and biases at 0: randomise them so they are tested too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.to(dtype).save_pretrained(path)
    return model.float()


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: hf_checkpoint(family="llama", **config overrides) -> (folder, transformers model)."""

    def make(family="llama", name="model", **overrides):
        folder = tmp_path / name
        return folder, write_hf_checkpoint(folder, family, **overrides)

    return make


def assert_compiled_backward_matches_eager(loss_fn, block, x, cos, sin, ctx) -> None:
    """A MoE decoder block's loss_fn(block, x, ...) compiled in one graph (fullgraph, aot_eager) gives eager's
    gradients for the input, the router and the experts (bf16 tolerance), and none of them is zero."""
    grads = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        block.zero_grad(set_to_none=True)
        x_in = x.clone().requires_grad_()
        fn(block, x_in, cos, sin, ctx).backward()
        grads.append([x_in.grad, block.mlp.gate.weight.grad, block.mlp.experts.gate_up_proj.grad])
    for eager, compiled in zip(*grads):
        assert eager.abs().max() > 0
        torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=1e-3)
