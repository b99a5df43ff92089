"""Mesh degree arithmetic and validation, without starting any process (torchtitan's parallel_dims test)."""

from __future__ import annotations

import pytest

from llmray.config import ConfigError, from_dict
from llmray.model.config import preset
from llmray.parallel import ParallelConfig
from llmray.parallel.mesh import ParallelDims
from llmray.parallel.pipeline import PipelineScheduleConfig, split_layers, stage_indices


def test_dp_shard_is_inferred_from_the_world_size():
    dims = ParallelDims.resolve(8, pp=2, tp=2)
    assert (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp) == (2, 1, 2, 2)
    assert dims.dp == 2 and dims.world_size == 8 and dims.tp_enabled and dims.pp_enabled


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=6, tp=4), "not divisible"),
    (dict(world_size=4, tp=2, dp_shard=4), "but the world size is 4"),
    (dict(world_size=4, tp=0), "parallel.tp must be >= 1"),
    (dict(world_size=4, dp_shard=0), "dp_shard must be >= 1 or -1"),
])
def test_degrees_that_do_not_multiply_to_the_world_size_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims.resolve(kwargs.pop("world_size"), **kwargs)


def test_tp_must_divide_query_and_kv_heads():
    ParallelDims.resolve(2, tp=2).validate_model(4, n_heads=4, n_kv_heads=2)
    with pytest.raises(ValueError, match=r"tp=4 must divide .* key/value heads \(2\)"):
        ParallelDims.resolve(4, tp=4).validate_model(4, n_heads=4, n_kv_heads=2)


def test_pipeline_stages_may_not_exceed_layers():
    ParallelDims.resolve(2, pp=2).validate_model(4, 4, 2, virtual_stages=2)
    with pytest.raises(ValueError, match="6 pipeline stages, more than the model's 4 layers"):
        ParallelDims.resolve(2, pp=2).validate_model(4, 4, 2, virtual_stages=3)


def test_deepspeed_is_data_parallel_only():
    with pytest.raises(ValueError, match="deepspeed is data-parallel only"):
        ParallelConfig(strategy="deepspeed", tp=2).dims(2)
    assert ParallelConfig(strategy="deepspeed").dims(2).dp == 2


def test_coordinates_are_row_major_with_tp_fastest():
    dims = ParallelDims.resolve(8, pp=2, dp_replicate=1, tp=2)  # dp_shard = 2
    assert [dims.coordinates(r)["tp"] for r in range(8)] == [0, 1] * 4
    assert [dims.coordinates(r)["dp"] for r in range(8)] == [0, 0, 1, 1] * 2
    assert [dims.coordinates(r)["pp"] for r in range(8)] == [0] * 4 + [1] * 4
    hsdp = ParallelDims.resolve(8, dp_replicate=2, tp=2)  # dp_shard = 2, dp = 4
    assert [hsdp.coordinates(r)["dp"] for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_balanced_split_moves_layers_away_from_the_embedding_and_head():
    big_vocab = preset("tiny", vocab_size=8192, n_layers=8, tie_embeddings=False)  # embedding ≈ 10 layers
    assert [len(s) for s in split_layers(big_vocab, 2)] == [4, 4]
    assert [len(s) for s in split_layers(big_vocab, 3)] == [1, 6, 1]
    small_vocab = preset("tiny", vocab_size=64, n_layers=6, tie_embeddings=False)
    assert [len(s) for s in split_layers(small_vocab, 3)] == [2, 2, 2]
    assert split_layers(small_vocab, 2, [2, 4]) == [["0", "1"], ["2", "3", "4", "5"]]
    with pytest.raises(ValueError, match="must list 2 positive counts summing to the model's 6 layers"):
        split_layers(small_vocab, 2, [2, 3])


def test_interleaved_stages_are_looped_over_ranks():
    assert stage_indices(0, 2, 2) == [0, 2] and stage_indices(1, 2, 2) == [1, 3]


def test_pipeline_config_checks_schedule_against_virtual_stages():
    with pytest.raises(ConfigError, match="virtual_stages >= 2"):
        from_dict(ParallelConfig, {"pp": 2, "pipeline": {"schedule": "interleaved_1f1b"}})
    with pytest.raises(ValueError, match="needs an interleaved schedule"):
        PipelineScheduleConfig(schedule="1f1b", virtual_stages=2)


def test_tensor_and_pipeline_peers_read_the_same_data_shard():
    cfg = ParallelConfig(pp=2, tp=2)  # world 8: dp_shard 2; tp fastest, then dp, then pp
    shards = [cfg.data_shard(rank, 8) for rank in range(8)]
    assert shards == [(0, 2), (0, 2), (1, 2), (1, 2), (0, 2), (0, 2), (1, 2), (1, 2)]
    assert ParallelConfig().data_shard(3, 4) == (3, 4)  # plain data parallel: every rank its own slice


def test_pipeline_needs_an_objective_with_a_pipeline_loss():
    import torch

    from llmray.model import llama
    from llmray.parallel import build_engine

    model = llama.build(preset("tiny", vocab_size=64, tie_embeddings=False))
    with pytest.raises(ValueError, match="needs an objective that can run as a pipeline loss"):
        build_engine(model, lambda m: torch.optim.AdamW(m.parameters()), ParallelConfig(pp=2), world_size=2,
                     param_dtype=None, device=torch.device("cpu"))
