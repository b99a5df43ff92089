"""The weight broadcast group (llmray.rl.weight_sync) over gloo: rank 0 and a receiver in two threads."""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist

from llmray.model import llama
from llmray.model.config import preset
from llmray.rl import weight_sync


def _broadcast_between_threads(state: dict, receiver: torch.nn.Module) -> list[BaseException]:
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    address = weight_sync.GroupAddress("127.0.0.1", store.port, 2, "gloo", generation=1)
    errors: list[BaseException] = []

    def member(rank: int) -> None:
        try:
            group = weight_sync.join(address, rank, store if rank == 0 else None)
            if rank == 0:
                weight_sync.send(group, state, torch.device("cpu"))
            else:
                weight_sync.receive(group, receiver)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    threads = [threading.Thread(target=member, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return errors


def test_a_broadcast_lands_the_learners_weights_in_the_actors_own_parameters():
    cfg = preset("tiny", vocab_size=97, tie_embeddings=True)
    learner, actor = llama.build(cfg, seed=1), llama.build(cfg, seed=2)
    parameters = {name: p for name, p in actor.named_parameters()}
    assert not torch.equal(parameters["layers.0.attention.wq.weight"], learner.layers["0"].attention.wq.weight)
    assert _broadcast_between_threads(learner.state_dict(), actor) == []
    for name, tensor in learner.state_dict().items():
        assert torch.equal(actor.state_dict()[name], tensor), name
    assert all(p is parameters[name] for name, p in actor.named_parameters())  # in place, no new tensors
    assert actor.output.weight is actor.tok_embeddings.weight  # ties kept


def test_a_model_of_another_shape_is_refused_before_any_weight_is_written():
    learner = llama.build(preset("tiny", vocab_size=97), seed=1)
    actor = llama.build(preset("tiny", vocab_size=98), seed=2)
    before = {name: t.clone() for name, t in actor.state_dict().items()}
    errors = _broadcast_between_threads(learner.state_dict(), actor)
    assert len(errors) == 2, errors  # the sender fails as well: nobody is left waiting
    assert all(isinstance(e, ValueError) and "differ in names, shapes or dtypes" in str(e) for e in errors), errors
    assert all(torch.equal(actor.state_dict()[name], t) for name, t in before.items())
