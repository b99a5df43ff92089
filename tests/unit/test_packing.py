"""SFT rows: the loss mask is exactly the assistant tokens, packing never splits what fits, epochs cover all."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from llmray.align.conversations import SftSource, build_mixture
from llmray.align.loader import RowLoader
from llmray.align.packing import IGNORE_INDEX, best_fit, pack, pack_conversations, render_all
from llmray.tokenizer.chat import END
from llmray.train.objectives import MaskedLM
from tests.align_support import template as make_template
from tests.align_support import tiny_model

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 12 times 3?"},
    {"role": "assistant", "content": "12 times 3 is 36."},
    {"role": "user", "content": "And plus 4?"},
    {"role": "assistant", "content": "That makes 40."},
]


@pytest.fixture(scope="module")
def template(shared_data):
    return make_template(shared_data)


@pytest.fixture(scope="module")
def conversations(shared_data):
    mixture = build_mixture([
        SftSource(kind="oasst", path=str(shared_data / "oasst1_en_100" / "en_100_tree.jsonl")),
        SftSource(kind="gsm8k", path=str(shared_data / "gsm8k" / "train.jsonl.gz"), max_records=150),
        SftSource(kind="self_instruct", path=str(shared_data / "self_instruct_human" / "seed_tasks.jsonl"))],
        val_fraction=0.0)
    return [c.messages for c in mixture.train]


def test_exactly_assistant_tokens_and_their_end_token_carry_the_loss(template):
    rows, _ = pack_conversations([CONVERSATION], template, seq_len=63, pad_id=2)
    batch = {k: torch.from_numpy(v) for k, v in rows.batch([0]).items()}
    counted = batch["targets"][0][batch["targets"][0] != IGNORE_INDEX].tolist()
    end_id = template.end_id
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert counted == sum((template.encode_text(r) + [end_id] for r in replies), [])
    assert template._tokenizer.decode(counted, skip_special_tokens=False) == "".join(r + END for r in replies)

    # The gradient of the loss reaches exactly the positions whose target is an assistant token.
    model = tiny_model()
    logits = model(batch["inputs"], segment_ids=batch["segment_ids"]).detach().requires_grad_(True)
    from llmray.train.objectives import token_cross_entropy
    token_cross_entropy(logits, batch["targets"]).sum().backward()
    touched = logits.grad[0].abs().sum(-1) > 0
    assert touched.tolist() == (batch["targets"][0] != IGNORE_INDEX).tolist()

    # Perturbing a non-assistant target (a user token, seen only as a target here) leaves the loss alone,
    # perturbing an assistant target changes it.
    objective = MaskedLM()
    base = objective.loss(model, batch).loss_sum
    user_target = int((batch["targets"][0] == IGNORE_INDEX).nonzero()[3])
    changed = dict(batch, targets=batch["targets"].clone())
    changed["targets"][0, user_target] = IGNORE_INDEX  # it was already ignored: the loss must not move
    assistant_target = int((batch["targets"][0] != IGNORE_INDEX).nonzero()[0])
    other = dict(batch, targets=batch["targets"].clone())
    other["targets"][0, assistant_target] = (other["targets"][0, assistant_target] + 1) % 1024
    assert objective.loss(model, changed).loss_sum == base
    assert objective.loss(model, other).loss_sum != base
    assert objective.weight(batch) == len(counted)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=80), st.integers(64, 100))
def test_best_fit_places_each_item_once_within_capacity_and_leaves_no_mergeable_bins(lengths, capacity):
    bins = best_fit(lengths, capacity)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))
    fills = [sum(lengths[i] for i in b) for b in bins]
    assert max(fills) <= capacity
    # any-fit property: a new row opens only when nothing fits, so no two rows could share one
    assert all(a + b > capacity for i, a in enumerate(fills) for b in fills[i + 1:])


def test_packed_rows_hold_every_conversation_whole_and_compute_as_if_alone(template, conversations):
    examples, stats = render_all(conversations, template, row_len=257)
    assert stats.dropped_overlong > 0 and stats.conversations == len(examples) > 100
    rows = pack(examples, row_len=257, pad_id=2)
    seen = []
    for r, members in enumerate(rows.members):
        start = 0
        for s, index in enumerate(members):
            ids = examples[index].ids
            assert np.array_equal(rows.tokens[r, start:start + len(ids)], ids)  # contiguous, unsplit
            assert np.array_equal(rows.loss_mask[r, start:start + len(ids)], examples[index].mask)
            assert (rows.segment_ids[r, start:start + len(ids)] == s).all()
            start += len(ids)
            seen.append(index)
        assert not rows.loss_mask[r, start:].any()
    assert sorted(seen) == list(range(len(examples)))
    assert rows.loss_mask.sum() == sum(e.mask.sum() for e in examples)
    fill = sum(len(e.ids) for e in examples) / rows.tokens.size
    assert fill > 0.9

    # Document masking: the loss of a packed row equals the sum of its conversations' losses alone.
    model, objective = tiny_model(), MaskedLM()
    row = next(r for r, m in enumerate(rows.members) if len(m) >= 2)
    packed = objective.loss(model, {k: torch.from_numpy(v) for k, v in rows.batch([row]).items()})
    alone = [pack([examples[i]], row_len=len(examples[i].ids), pad_id=2) for i in rows.members[row]]
    losses = [objective.loss(model, {k: torch.from_numpy(v) for k, v in r.batch([0]).items()}) for r in alone]
    assert packed.weight == sum(out.weight for out in losses)
    torch.testing.assert_close(packed.loss_sum, sum(out.loss_sum for out in losses), rtol=1e-5, atol=1e-4)


def test_every_row_appears_once_per_epoch_on_any_world_size_and_resume_is_exact(template, conversations):
    rows, _ = pack_conversations(conversations, template, seq_len=128, pad_id=2, overlong="truncate")
    n = len(rows)

    def epoch_rows(world_size, batch_size):
        loaders = [RowLoader(rows, batch_size=batch_size, rank=r, world_size=world_size, seed=1)
                   for r in range(world_size)]
        seen = []
        for _ in range(loaders[0].order.batches_per_epoch):
            for loader in loaders:
                batch = next(loader)
                for inputs, targets in zip(batch["inputs"], batch["targets"]):
                    seen.append((inputs, (targets != IGNORE_INDEX).any()))
        return seen

    for world_size, batch_size in ((1, 4), (2, 3)):
        seen = epoch_rows(world_size, batch_size)
        real = [inputs for inputs, has_targets in seen if has_targets]
        assert len(real) == n and len(seen) - n < world_size * batch_size  # each row once, then empty rows
        keys = {tuple(x.tolist()) for x in real}
        assert keys == {tuple(t[:-1].tolist()) for t in rows.tokens}

    single = RowLoader(rows, batch_size=4, seed=1)
    for _ in range(3):
        next(single)
    state = single.state_dict()
    expected = [next(single) for _ in range(2)]
    pair = [RowLoader(rows, batch_size=2, rank=r, world_size=2, seed=1) for r in range(2)]
    for loader in pair:
        loader.load_state_dict(state)
    for want in expected:  # the same global batch, split over two ranks (rank r takes rows r, r+2)
        halves = [next(loader) for loader in pair]
        assert torch.equal(want["inputs"][0::2], halves[0]["inputs"])
        assert torch.equal(want["inputs"][1::2], halves[1]["inputs"])
    other, _ = pack_conversations(conversations[:-1], template, seq_len=128, pad_id=2, overlong="truncate")
    assert other.fingerprint != rows.fingerprint
    with pytest.raises(ValueError, match="data_sha256"):
        RowLoader(other, batch_size=4, seed=1).load_state_dict(state)
