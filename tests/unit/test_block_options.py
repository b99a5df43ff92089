"""Activation checkpointing and ``torch.compile`` per Transformer block, as configured
(``parallel.activation_checkpointing``, ``parallel.compile``): each is really applied to every
block, and the run's losses equal the plain run's (checkpointing: bitwise, the recomputation is
the same arithmetic; compile: within 1e-4 relative, inductor fuses elementwise ops).
"""

from __future__ import annotations

import os

import pytest

from llmray.parallel import ParallelConfig
from tests.train_support import make_trainer, stdlib_texts, write_byte_shards

STEPS = 5


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_byte_shards(tmp_path_factory.mktemp("shards"), stdlib_texts(6))


def run(shards, **options):
    trainer = make_trainer(shards, steps=STEPS, parallel=ParallelConfig(strategy="fsdp2", **options))
    losses = trainer.fit().losses
    return trainer.engine.model.layers.values(), [losses[s] for s in range(1, STEPS + 1)]


@pytest.fixture(scope="module")
def plain(shards):
    return run(shards)[1]


def test_activation_checkpointing_wraps_every_block_and_changes_no_loss(shards, plain):
    blocks, losses = run(shards, activation_checkpointing=True)
    assert all(type(block).__name__ == "CheckpointWrapper" for block in blocks)
    assert losses == plain


@pytest.fixture
def restored_environment():
    """Inductor leaves a pointer in ``_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR``; processes spawned
    later (the gloo and DeepSpeed tests) must not inherit it (measured: a later ZeRO rank aborts)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_compile_per_block_matches_eager(shards, plain, restored_environment):
    blocks, losses = run(shards, compile=True)
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert max(abs(a - b) / b for a, b in zip(losses, plain)) < 1e-4
