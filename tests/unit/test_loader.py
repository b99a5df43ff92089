"""The packed loader: batch contents, multi-rank coverage, exact resume (also in a fresh process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llmray.tokens.loader import TokenLoader
from tests.unit.shard_fixtures import write_positional_shards

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN, BATCH = 16, 4


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokens")
    # shards of 497, 500, 550 tokens; windows = (n - 1) // 16 -> 31 + 31 + 34 = 96 windows = 4 ranks x 4 x 6 batches.
    write_positional_shards(directory, [200, 297, 150, 350, 300, 250], shard_tokens=490)
    return directory


def test_batches_are_packed_windows_of_the_shards(tokens_dir):
    loader = TokenLoader(tokens_dir, seq_len=SEQ_LEN, batch_size=BATCH, seed=3)
    assert loader.num_windows == 96 and loader.batches_per_epoch == 24
    windows = loader.windows_of_next_batch()
    batch = next(loader)
    assert batch.dtype == torch.int64 and batch.shape == (BATCH, SEQ_LEN + 1)
    shard_starts = {0: 0, 1: 497, 2: 997}  # global position of each shard's first token
    for row, window in zip(batch, windows):
        shard = 0 if window < 31 else 1 if window < 62 else 2
        first = shard_starts[shard] + (int(window) - [0, 31, 62][shard]) * SEQ_LEN
        assert torch.equal(row, torch.arange(first, first + SEQ_LEN + 1))


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_each_token_is_an_input_once_per_epoch_across_ranks(tokens_dir, world_size):
    loaders = [TokenLoader(tokens_dir, seq_len=SEQ_LEN, batch_size=BATCH, rank=r, world_size=world_size, seed=7)
               for r in range(world_size)]
    steps = loaders[0].batches_per_epoch
    assert steps == 96 // (BATCH * world_size)
    seen = torch.cat([torch.cat([next(loader)[:, :-1].reshape(-1) for _ in range(steps)]) for loader in loaders])
    expected = np.concatenate([np.arange(0, 496), np.arange(497, 497 + 496), np.arange(997, 997 + 544)])
    assert seen.numel() == expected.size
    assert np.array_equal(np.sort(seen.numpy()), expected)  # every token once, none twice


def test_all_world_sizes_share_one_global_order(tokens_dir):
    single = TokenLoader(tokens_dir, seq_len=SEQ_LEN, batch_size=BATCH * 2, seed=1)
    pair = [TokenLoader(tokens_dir, seq_len=SEQ_LEN, batch_size=BATCH, rank=r, world_size=2, seed=1) for r in (0, 1)]
    for _ in range(5):
        joint = set(single.windows_of_next_batch().tolist())
        next(single)
        assert joint == set(pair[0].windows_of_next_batch().tolist()) | set(pair[1].windows_of_next_batch().tolist())
        for loader in pair:
            next(loader)


def test_epochs_reshuffle_and_seed_changes_order(tokens_dir):
    loader = TokenLoader(tokens_dir, seq_len=SEQ_LEN, batch_size=BATCH, seed=0)
    first_epoch = [loader.windows_of_next_batch() for _ in range(24) if next(loader) is not None]
    second = loader.windows_of_next_batch()
    next(loader)
    assert loader.epoch == 1 and not np.array_equal(second, first_epoch[0])
    other = TokenLoader(tokens_dir, seq_len=SEQ_LEN, batch_size=BATCH, seed=99)
    assert not np.array_equal(other.windows_of_next_batch(), first_epoch[0])
    ordered = TokenLoader(tokens_dir, seq_len=SEQ_LEN, batch_size=BATCH, shuffle=False)
    assert ordered.windows_of_next_batch().tolist() == [0, 1, 2, 3]


RESUME_SCRIPT = """
import json, sys, torch
from llmray.tokens.loader import TokenLoader
directory, state_file, out_file, rank, world = sys.argv[1:6]
loader = TokenLoader(directory, seq_len=16, batch_size=4, rank=int(rank), world_size=int(world), seed=11)
loader.load_state_dict(json.loads(open(state_file).read()))
torch.save(torch.stack([next(loader) for _ in range(8)]), out_file)
"""


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_restored_loader_in_a_fresh_process_continues_exactly(tokens_dir, tmp_path, rank, world_size):
    loader = TokenLoader(tokens_dir, seq_len=SEQ_LEN, batch_size=BATCH, rank=rank, world_size=world_size, seed=11)
    for _ in range(40):  # crosses epoch boundaries (24 or 12 batches per epoch)
        next(loader)
    state_file = tmp_path / "state.json"
    state_file.write_text(json.dumps(loader.state_dict()))
    expected = torch.stack([next(loader) for _ in range(8)])
    out_file = tmp_path / "resumed.pt"
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(tokens_dir), str(state_file), str(out_file),
                    str(rank), str(world_size)], check=True, cwd=REPO)
    resumed = torch.load(out_file, weights_only=True)
    assert torch.equal(resumed, expected)


def test_state_restores_across_a_world_size_change(tokens_dir):
    pair = [TokenLoader(tokens_dir, seq_len=SEQ_LEN, batch_size=BATCH, rank=r, world_size=2, seed=5) for r in (0, 1)]
    for _ in range(3):
        for loader in pair:
            next(loader)
    state = pair[0].state_dict()
    assert state["consumed"] == 3 * BATCH * 2
    quad = [TokenLoader(tokens_dir, seq_len=SEQ_LEN, batch_size=BATCH // 2, rank=r, world_size=4, seed=5)
            for r in range(4)]
    for loader in quad:
        loader.load_state_dict(state)
    assert set().union(*(set(l.windows_of_next_batch().tolist()) for l in quad)) == \
        set().union(*(set(l.windows_of_next_batch().tolist()) for l in pair))


def test_state_from_other_data_or_seed_is_refused(tokens_dir, tmp_path):
    loader = TokenLoader(tokens_dir, seq_len=SEQ_LEN, batch_size=BATCH, seed=5)
    next(loader)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seed: saved 5, this loader 6"):
        TokenLoader(tokens_dir, seq_len=SEQ_LEN, batch_size=BATCH, seed=6).load_state_dict(state)
    other = tmp_path / "other"
    write_positional_shards(other, [400, 400], shard_tokens=1000)
    with pytest.raises(ValueError, match="data_sha256: saved"):
        TokenLoader(other, seq_len=SEQ_LEN, batch_size=BATCH, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="not a multiple of batch_size x world_size = 8"):
        TokenLoader(tokens_dir, seq_len=SEQ_LEN, batch_size=8, seed=5).load_state_dict(state)


def test_too_little_data_for_one_step_is_refused(tokens_dir):
    with pytest.raises(ValueError, match="96 windows of 17 tokens, fewer than one step needs"):
        TokenLoader(tokens_dir, seq_len=SEQ_LEN, batch_size=25, world_size=4, rank=0)
