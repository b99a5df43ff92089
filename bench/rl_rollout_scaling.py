"""Rollout scaling: completions per second from 2 rollout actors vs 1, on the same problems and seeds.

    python bench/rl_rollout_scaling.py [--quick]

The real pool (:class:`llmray.rl.stream.RolloutPool`) over a small random Llama (dim 128, 4 layers,
GSM8K tokenizer), each actor one torch thread (half a logical CPU, so that both pools, 3 actors,
stay alive on a 2-CPU Ray; only one pool works at a time): a rollout batch of
``--prompts`` arithmetic problems × ``--group-size`` completions of ``--max-new-tokens`` tokens is
split into one chunk per actor, sampled with the KV-cache generator, scored (behaviour log-probs)
and rewarded. Actors are started and warmed up before timing; rounds alternate 1 and 2 actors,
and the medians are compared. Both runs sample identical completions (per-sample seeds), which
the script checks. Target (issue): >= 1.7x. Last line: JSON with ``one_actor_completions_per_s``,
``two_actors_completions_per_s``, ``speedup`` and the machine fields (``idle``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _rl_setup  # noqa: E402
from _load import LoadWatch  # noqa: E402

from llmray import cluster  # noqa: E402
from llmray.rl.grpo import GrpoConfig  # noqa: E402
from llmray.rl.rewards import RewardConfig  # noqa: E402
from llmray.rl.rollout import SamplingSpec  # noqa: E402
from llmray.rl.stage import render_prompts  # noqa: E402
from llmray.rl.stream import Pending, RolloutPool, RolloutPoolConfig, RolloutSpec  # noqa: E402
from llmray.rl.tasks import arithmetic_problems  # noqa: E402
from llmray.tokenizer.chat import ChatTemplate  # noqa: E402


def spec_for(actors: int, model_dir: Path, tokenizer_dir: Path, args) -> RolloutSpec:
    problems = arithmetic_problems(400, 3, seed=0)
    prompts = render_prompts(ChatTemplate.from_file(str(tokenizer_dir / "tokenizer.json")), problems)
    return RolloutSpec(problems=problems, prompts=prompts, model_dir=str(model_dir), tokenizer_dir=str(tokenizer_dir),
                       sampling=SamplingSpec(max_new_tokens=args.max_new_tokens), reward=RewardConfig(),
                       grpo=GrpoConfig(), pool=RolloutPoolConfig(actors=actors, actor_cpus=0.5, threads=1),
                       prompts_per_step=args.prompts, group_size=args.group_size, micro_batch_size=1,
                       max_staleness=0, seed=0, learner_row_tokens=512)


def timed_batch(pool: RolloutPool, spec: RolloutSpec, index: int) -> tuple[float, list]:
    started = time.perf_counter()
    samples = pool.collect(pool.submit(Pending(index, 0), spec.work_items(index)))
    return len(samples) / (time.perf_counter() - started), samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of smaller batches (under 5 minutes)")
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    args.prompts = args.prompts or (16 if args.quick else 32)
    args.rounds = args.rounds or (3 if args.quick else 5)
    load = LoadWatch(2)
    root = Path(tempfile.mkdtemp(prefix="llmray-rl-scaling-"))
    tokenizer_dir = _rl_setup.tokenizer(root, 512)
    model_dir = _rl_setup.initial_model(root, tokenizer_dir, 512, 128, 4)
    cluster.connect(cluster.RayConfig(num_cpus=2, object_store_memory_mb=512, dashboard=False))
    specs = {n: spec_for(n, model_dir, tokenizer_dir, args) for n in (1, 2)}
    pools = {n: RolloutPool(spec) for n, spec in specs.items()}
    rates: dict[int, list[float]] = {1: [], 2: []}
    try:
        for n in (1, 2):
            timed_batch(pools[n], specs[n], 0)  # start-up and warm-up, untimed
        for round_index in range(1, args.rounds + 1):
            outputs = {}
            for n in ((1, 2) if round_index % 2 else (2, 1)):
                rate, outputs[n] = timed_batch(pools[n], specs[n], round_index)
                rates[n].append(rate)
            same = [s["completion"].tolist() for s in outputs[1]] == [s["completion"].tolist() for s in outputs[2]]
            if not same:
                raise AssertionError(f"round {round_index}: 1 and 2 actors sampled different completions")
            print(f"round {round_index}: 1 actor {rates[1][-1]:.1f}/s, 2 actors {rates[2][-1]:.1f}/s", flush=True)
    finally:
        for pool in pools.values():
            pool.close()
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(json.dumps({"one_actor_completions_per_s": one, "two_actors_completions_per_s": two, "speedup": two / one,
                      "rounds": {"one": rates[1], "two": rates[2]}, "completions_per_batch": args.prompts * args.group_size,
                      "max_new_tokens": args.max_new_tokens, "target_speedup": 1.7, **load.fields()}))


if __name__ == "__main__":
    main()
