"""Batching is deterministic, covers every request once, respects its caps and never mixes kinds."""

from __future__ import annotations

import random

from llmray.eval.prompts import GenerationRequest, LoglikelihoodRequest
from llmray.eval.runner import make_batches


def test_batches_cover_each_request_once_within_caps():
    rng = random.Random(0)
    requests = [LoglikelihoodRequest(tuple(range(rng.randint(1, 60))), (1,) * rng.randint(1, 5)) for _ in range(200)]
    requests += [GenerationRequest((0,) * rng.randint(1, 20), 16, ("\n\n",), (1,)) for _ in range(20)]
    requests += [GenerationRequest((0,) * 5, 32, ("\n\n",), (1,)) for _ in range(3)]
    batches = make_batches(requests, batch_size=16, max_batch_tokens=400)
    assert sorted(i for b in batches for i in b) == list(range(len(requests)))
    for batch in batches:
        kinds = {(type(requests[i]), getattr(requests[i], "max_new_tokens", None)) for i in batch}
        assert len(kinds) == 1
        lengths = [requests[i].length for i in batch]
        assert len(batch) <= 16 and len(batch) * max(lengths) <= 400 or len(batch) == 1
        assert lengths == sorted(lengths, reverse=True)
    assert batches == make_batches(list(requests), 16, 400)  # deterministic
    first_loglikelihood = next(b for b in batches if isinstance(requests[b[0]], LoglikelihoodRequest))
    assert requests[first_loglikelihood[0]].length == max(r.length for r in requests[:200])
