"""scripts/bench_long.py on the tiny model on CPU: memory grows linearly with the sequence, the switches lower the
slope, and the binary search finds the longest length within the budget."""

import torch

from scripts import bench_long
from scripts.bench_long import Switches

ONE_LAYER = {**bench_long.TINY, "num_hidden_layers": 1}  # the tiny model, shorter: the test's time


def test_peak_memory_is_linear_in_length_and_the_switches_lower_the_slope(capsys):
    table = [("baseline", Switches()),
             ("all", Switches(loss="chunked", tiled_mlp=64, checkpointing="full", offload="overlap"))]
    base, saving = bench_long.slopes(ONE_LAYER, "lora", torch.device("cpu"), torch.float32, [64, 128, 192], table)
    for row in (base, saving):
        assert row["off"] < 0.02 and row["slope"] > 0  # a line through the three lengths
    assert saving["slope"] < 0.3 * base["slope"]
    assert "| all | " in capsys.readouterr().out


def test_binary_search_finds_the_longest_length_within_the_budget(capsys, monkeypatch):
    monkeypatch.setattr(bench_long, "TINY", ONE_LAYER)
    model = bench_long.build(ONE_LAYER, "lora", torch.device("cpu"), torch.float32)
    switches = Switches(loss="chunked")  # the command line's default
    context, _ = bench_long.prepare(model, switches, torch.device("cpu"))
    budget_mib = 1.5 * bench_long.peak_bytes(model, context, switches, 128, torch.device("cpu")) / 2**20
    rc = bench_long.main(["--device", "cpu", "--tiny", "--recipe", "lora", "--budget-mib", f"{budget_mib}",
                          "--start", "64", "--granularity", "32"])
    out = capsys.readouterr().out
    assert rc == 0, out
    longest = int(out.split("longest: ")[1].split(" tokens")[0])
    sizes = {int(line.split("T =")[1].split(":")[0]): float(line.split(":")[1].split("MiB")[0])
             for line in out.splitlines() if "T =" in line and "MiB" in line}
    assert 128 < longest < 256 and sizes[longest] <= budget_mib + 0.05  # 1.5x the bytes of 128 tokens: ~192 (printed to 0.1 MiB)
    # the next length within the granularity was tried and did not fit
    assert any(longest < n <= longest + 32 and mib > budget_mib for n, mib in sizes.items()), sizes
