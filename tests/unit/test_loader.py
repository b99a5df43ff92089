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
    # shards of 497, 500, 550 tokens: one stream of 1547, (1547 - 1) // 16 = 96 windows = 4 ranks x 4 x 6 batches.
    write_positional_shards(directory, [200, 297, 150, 350, 300, 250], shard_tokens=490)
    return directory


def test_batches_are_packed_windows_of_the_split_stream_across_shard_ends(tokens_dir):
    loader = TokenLoader(tokens_dir, seq_len=SEQ_LEN, batch_size=BATCH, seed=3)
    assert loader.num_windows == 96 and loader.batches_per_epoch == 24
    for _ in range(loader.batches_per_epoch):
        windows = loader.windows_of_next_batch()
        batch = next(loader)
        assert batch.dtype == torch.int64 and batch.shape == (BATCH, SEQ_LEN + 1)
        for row, window in zip(batch, windows):  # token values are stream positions
            assert torch.equal(row, torch.arange(window * SEQ_LEN, window * SEQ_LEN + SEQ_LEN + 1))


def test_windows_span_many_tiny_shards(tmp_path):
    """Shards shorter than a window (the tokens stage's small validation shards) still fill whole
    windows: nothing but the stream's last < T tokens is lost."""
    write_positional_shards(tmp_path, [5, 3, 9, 1, 7, 12, 4, 6, 2, 8], shard_tokens=1)  # 10 shards, 57 tokens
    loader = TokenLoader(tmp_path, seq_len=SEQ_LEN, batch_size=3, shuffle=False)
    assert loader.num_windows == 3
    assert torch.equal(next(loader), torch.arange(3 * SEQ_LEN + 1).unfold(0, SEQ_LEN + 1, SEQ_LEN))


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_each_token_is_an_input_once_per_epoch_across_ranks(tokens_dir, world_size):
    loaders = [TokenLoader(tokens_dir, seq_len=SEQ_LEN, batch_size=BATCH, rank=r, world_size=world_size, seed=7)
               for r in range(world_size)]
    steps = loaders[0].batches_per_epoch
    assert steps == 96 // (BATCH * world_size)
    seen = torch.cat([torch.cat([next(loader)[:, :-1].reshape(-1) for _ in range(steps)]) for loader in loaders])
    expected = np.arange(96 * SEQ_LEN)  # the stream's first 96 x 16 tokens, across the shards' ends
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
