import numpy as np
import pytest
import torch

from ternchat.data.errors import DataError
from ternchat.data.loader import TokenLoader
from ternchat.data.shards import write_shard

HASH = "12" * 32


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, n in enumerate((3001, 1777, 2500)):
        path = tmp_path / f"train_{i:05d}.bin"
        write_shard(path, rng.integers(0, 5000, n).astype(np.uint16), 1, HASH)
        paths.append(path)
    return paths


def loader(paths, **kw):
    args = dict(batch_size=4, seq_len=32, seed=3, tokenizer_hash=HASH)
    args.update(kw)
    return TokenLoader(paths, **args)


def test_batches_have_shape_and_shifted_targets(shards):
    x, y = loader(shards).next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_windows_come_from_the_shards(shards):
    tokens = [np.asarray(np.memmap(p, dtype=np.uint16, mode="r", offset=256)) for p in shards]
    ld = loader(shards, shuffle=False, batch_size=1)
    x, y = ld.next_batch()
    assert x[0].tolist() == tokens[0][:32].tolist() and y[0].tolist() == tokens[0][1:33].tolist()


def test_same_seed_same_batches_other_seed_differs(shards):
    a, b, c = loader(shards), loader(shards), loader(shards, seed=4)
    batches_a = [a.next_batch()[0] for _ in range(5)]
    assert all(torch.equal(p, b.next_batch()[0]) for p in batches_a)
    assert not all(torch.equal(p, c.next_batch()[0]) for p in batches_a)


def test_resume_continues_the_exact_sequence_across_epochs(shards):
    reference = loader(shards)
    per_epoch = reference.steps_per_epoch
    expected = [reference.next_batch() for _ in range(2 * per_epoch + 5)]
    first = loader(shards)
    for _ in range(per_epoch + 3):
        first.next_batch()
    state = first.state_dict()
    resumed = loader(shards)
    resumed.load_state_dict(state)
    for x_ref, y_ref in expected[per_epoch + 3:]:
        x, y = resumed.next_batch()
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_ranks_read_disjoint_windows(shards):
    r0, r1 = loader(shards, rank=0, world_size=2), loader(shards, rank=1, world_size=2)
    for _ in range(3):
        a, b = r0.next_batch()[0], r1.next_batch()[0]
        rows_a, rows_b = {tuple(r) for r in a.tolist()}, {tuple(r) for r in b.tolist()}
        assert not rows_a & rows_b


def test_resume_with_another_sequence_length_is_refused(shards):
    state = loader(shards).state_dict()
    with pytest.raises(DataError, match="cannot resume the loader"):
        loader(shards, seq_len=16).load_state_dict(state)


def test_resume_at_another_number_of_ranks_continues_at_the_same_window(shards):
    one = loader(shards, batch_size=4)
    one.next_batch()
    state = one.state_dict()
    rows = one.next_batch()[0]
    halves = []
    for rank in range(2):
        two = loader(shards, batch_size=2, rank=rank, world_size=2)
        two.load_state_dict(state)
        halves.append(two.next_batch()[0])
    assert torch.equal(torch.cat(halves), rows)


def test_too_little_data_is_a_clear_error(shards):
    with pytest.raises(DataError, match="fewer than one step"):
        loader(shards[:1], batch_size=200, seq_len=64)
