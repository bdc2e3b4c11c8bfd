"""BatchLoader: pre-shifted labels that never cross documents, segment boundaries, determinism, sharding, resume."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nanotune.packing import BatchLoader, pack_group, packing_efficiency

ROOT = Path(__file__).resolve().parents[1]


class ToyData:
    """Examples of given lengths: token ids 1000*i + position, targets every other token from the second on."""

    def __init__(self, lengths, seed=0):
        rng = np.random.default_rng(seed)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.items = []
        for i, n in enumerate(self.lengths):
            ids = (1000 * (i + 1) + np.arange(n)).astype(np.int32)
            mask = (rng.random(n) < 0.6).astype(np.uint8)
            mask[0] = 0
            self.items.append((ids, mask))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def lengths(n=300, seed=1, hi=200):
    return np.random.default_rng(seed).integers(2, hi, size=n)


def expected_pairs(data):
    """Every (input token, its target) pair a correct loader must produce: within one document, only masked."""
    pairs = []
    for ids, mask in data.items:
        pairs += [(int(ids[t]), int(ids[t + 1])) for t in range(len(ids) - 1) if mask[t + 1]]
    return sorted(pairs)


def produced_pairs(batches):
    pairs = []
    for b in batches:
        ids, labels = b["input_ids"].flatten(), b["labels"].flatten()
        keep = labels != -100
        pairs += list(zip(ids[keep].tolist(), labels[keep].tolist()))
    return sorted(pairs)


@pytest.mark.parametrize("packing", [True, False])
def test_every_target_exactly_once_and_never_across_documents(packing):
    data = ToyData(lengths(200))
    loader = BatchLoader(data, seq_len=256, micro_batch_size=3, packing=packing, fill="empty")
    batches = list(loader)
    # the ids encode (document, position): a label is always the next position of the same document
    for b in batches:
        ids, labels = b["input_ids"], b["labels"]
        t = labels != -100
        assert torch.equal(labels[t] // 1000, ids[t] // 1000)
        assert torch.equal(labels[t], ids[t] + 1)
        assert b["num_trainable_tokens"] == int(t.sum())
    assert produced_pairs(batches) == expected_pairs(data)


def test_batch_tensors_shapes_positions_and_cu_seqlens():
    data = ToyData([5, 3, 4, 7, 2])
    loader = BatchLoader(data, seq_len=10, micro_batch_size=2, packing=True, shuffle=False, pad_id=-1)
    for b in loader:
        B, T = b["input_ids"].shape
        assert (B, T) == (2, 10)
        assert b["input_ids"].dtype == b["labels"].dtype == b["position_ids"].dtype == torch.int64
        assert b["cu_seqlens"].dtype == torch.int32
        cu = b["cu_seqlens"].tolist()
        assert cu[0] == 0 and cu[-1] == B * T
        flat_pos = b["position_ids"].flatten()
        seg = np.diff(cu)
        assert b["max_seqlen"] == seg.max()
        # position ids restart at 0 exactly at segment starts and count up within a segment
        for s, n in zip(cu[:-1], seg):
            assert flat_pos[s : s + n].tolist() == list(range(n))
        # every segment lies inside one row; padding (pad_id -1) is never a target
        assert all(s // T == (s + n - 1) // T for s, n in zip(cu[:-1], seg))
        assert (b["labels"][b["input_ids"] == -1] == -100).all()
        assert torch.equal(b["attention_mask"], b["input_ids"] != -1)  # False exactly in the padding slots
        assert b["packed"] is True  # the model takes the loader's word: it need not look at position_ids
        # the last token of each segment is never trained (it would predict the next document's first token)
        ends = np.array(cu[1:]) - 1
        assert (b["labels"].flatten()[ends] == -100).all()


def test_unpacked_pads_to_longest_in_batch():
    data = ToyData([5, 9, 4])
    loader = BatchLoader(data, seq_len=16, micro_batch_size=3, packing=False, shuffle=False)
    (b,) = list(loader)
    assert b["input_ids"].shape == (3, 9)
    assert b["cu_seqlens"].tolist() == [0, 5, 9, 18, 22, 27]
    assert b["packed"] is False  # one example then padding per row: plain causal attention


def test_deterministic_and_reshuffled_each_epoch():
    data = ToyData(lengths(300))

    def epoch_ids(seed, epoch):
        loader = BatchLoader(data, seq_len=256, micro_batch_size=2, seed=seed)
        loader.set_epoch(epoch)
        return [b["input_ids"] for b in loader]

    a, b = epoch_ids(0, 0), epoch_ids(0, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = epoch_ids(0, 1)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert not all(torch.equal(x, y) for x, y in zip(a, epoch_ids(1, 0)))


def test_epoch_order_is_not_sorted_by_length():
    data = ToyData(lengths(2000, hi=500))
    loader = BatchLoader(data, seq_len=512, micro_batch_size=1, group_size=256)
    firsts = [int(data.lengths[(b["input_ids"][0, 0].item() // 1000) - 1]) for b in loader]
    # longest-first packing of the whole epoch would start with the long examples and end with the short ones
    half = len(firsts) // 2
    assert abs(np.mean(firsts[:half]) - np.mean(firsts[half:])) < 0.25 * np.mean(firsts)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_get_equal_steps_and_disjoint_rows(world_size):
    data = ToyData(lengths(101))
    loaders = [BatchLoader(data, seq_len=256, micro_batch_size=2, rank=r, world_size=world_size, fill="empty")
               for r in range(world_size)]
    steps = [len(loader) for loader in loaders]
    assert len(set(steps)) == 1
    batches = [list(loader) for loader in loaders]
    assert [len(b) for b in batches] == steps
    # together the ranks see every target exactly once
    assert produced_pairs([b for rank in batches for b in rank]) == expected_pairs(data)


def test_fill_repeat_keeps_steps_full():
    data = ToyData(lengths(11, hi=20))
    loader = BatchLoader(data, seq_len=32, micro_batch_size=4, packing=False, world_size=2, rank=1)
    assert len(loader) == 2  # 11 rows -> 16 slots: 5 rows repeated from the start of the epoch
    assert all(b["num_trainable_tokens"] >= 0 and b["input_ids"].shape[0] == 4 for b in loader)


def test_resume_mid_epoch_is_exact():
    data = ToyData(lengths(300))
    full = BatchLoader(data, seq_len=256, micro_batch_size=2, seed=3)
    full.set_epoch(2)
    reference = [b["input_ids"] for b in full]

    first = BatchLoader(data, seq_len=256, micro_batch_size=2, seed=3)
    first.set_epoch(2)
    it = iter(first)
    seen = [next(it)["input_ids"] for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip

    resumed = BatchLoader(data, seq_len=256, micro_batch_size=2, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the trainer's loop calls set_epoch for the current epoch; it must not rewind
    rest = [b["input_ids"] for b in resumed]
    assert len(seen) + len(rest) == len(reference)
    assert all(torch.equal(x, y) for x, y in zip(seen + rest, reference))
    resumed.set_epoch(3)
    assert resumed.position == 0 and len(list(resumed)) == len(resumed)


def test_resume_rejects_a_different_layout():
    data = ToyData(lengths(50))
    state = BatchLoader(data, seq_len=256, micro_batch_size=2).state_dict()
    with pytest.raises(ValueError, match="micro_batch_size"):
        BatchLoader(data, seq_len=256, micro_batch_size=4).load_state_dict(state)


def test_pack_group_respects_capacity_and_keeps_every_item():
    sizes = lengths(500, hi=300)
    bins = pack_group(sizes, 512)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert max(sizes[b].sum() for b in bins) <= 512
    assert sizes.sum() / (len(bins) * 512) > 0.97


def test_too_long_example_is_an_error():
    with pytest.raises(ValueError, match="more than seq_len"):
        BatchLoader(ToyData([5, 40]), seq_len=32, micro_batch_size=1)


def test_gsm8k_packing_efficiency():
    """>= 0.98 on GSM8K train rendered as chat at seq_len 2048 with the shipped BPE tokenizer."""
    from nanotune.config import load_config
    from nanotune.data import load_tokenizer, prepare_data

    cfg = load_config(ROOT / "configs/gsm8k.toml")
    cfg.data.eval_datasets = []
    tok = load_tokenizer(ROOT / cfg.model.tokenizer)
    cfg.data.datasets[0].path = str(ROOT / cfg.data.datasets[0].path)
    data = prepare_data(cfg.data, tok, seed=0, quiet=True, use_cache=False)
    efficiency = packing_efficiency(data.train.lengths, 2048, seed=0)
    assert efficiency >= 0.98
    loader = BatchLoader(data.train, seq_len=2048, micro_batch_size=2, pad_id=tok.pad_id)
    assert len(loader) > 0 and loader.efficiency >= 0.98


def test_partial_pass_keeps_position_until_rewind():
    data = ToyData(lengths(60))
    loader = BatchLoader(data, seq_len=256, micro_batch_size=1, shuffle=False, fill="empty")
    first = [b["input_ids"] for _, b in zip(range(2), loader)]  # an evaluation limited to 2 batches
    assert loader.position == 2
    loader.rewind()
    again = [b["input_ids"] for _, b in zip(range(2), loader)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))


def test_packed_loss_equals_unpacked_loss_with_a_model():
    """The contract end to end: a model fed packed rows (position_ids / cu_seqlens) gives the same summed loss over
    an epoch as fed one padded example per row."""
    models = pytest.importorskip("models")
    vocab = 64
    rng = np.random.default_rng(0)
    data = ToyData(rng.integers(2, 40, size=12))
    data.items = [(rng.integers(0, vocab, size=len(ids)).astype(np.int32), mask) for ids, mask in data.items]
    model = models.from_size("llama-tiny", vocab_size=vocab, attn_implementation="sdpa").eval()

    def epoch_loss(packing):
        loader = BatchLoader(data, seq_len=64, micro_batch_size=2, packing=packing, fill="empty")
        total, count = 0.0, 0
        with torch.no_grad():
            for b in loader:
                logits = model(b["input_ids"], b["position_ids"], b["cu_seqlens"], b["max_seqlen"])  # (B, T, V)
                total += torch.nn.functional.cross_entropy(logits.view(-1, vocab).double(), b["labels"].view(-1),
                                                           ignore_index=-100, reduction="sum").item()
                count += b["num_trainable_tokens"]
        return total, count

    packed, unpacked = epoch_loss(True), epoch_loss(False)
    assert packed[1] == unpacked[1] == sum(int(m[1:].sum()) for _, m in data.items)
    assert packed[0] == pytest.approx(unpacked[0], rel=1e-5)
