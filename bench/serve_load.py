"""Serving throughput: `llmray serve` (batched decoding) under 16 concurrent clients vs one request at a time.

Model: ``--model DIR`` (an export), or by default a randomly initialised ``cpu-small`` preset
(12.6M parameters; weights fan-in scaled so greedy answers do not collapse onto one token)
exported with a BPE tokenizer trained here on real text; speed does not depend on quality.
Requests: 64 chat requests, the user-oriented instructions of Self-Instruct (instruction +
input) rendered with the chat template, greedy, ``max_tokens`` each (32 quick, 128 full).

Peers, on the same prompts, both with 2 torch threads:

* **serve**: `llmray serve` on an embedded 2-CPU Ray (``--replicas 2 --replica-cpus 1
  --max-batch-size 8``: one replica per core; a decode step of this small model is mostly Python
  between small kernels, so one replica with 2 threads kept 1.2 cores busy and reached 330-475
  tokens/s where two 1-thread replicas reach 516-555), 16 threads of the official OpenAI client sending the 64 requests
  (non-streaming) as fast as answers return. Latency is per request, client side.
* **sequential**: the ``llmray generate``/``chat`` code path in this process: each prompt alone
  through :func:`llmray.model.generate.generate` with the KV cache.

Both are warmed up first; rounds alternate (serve, sequential, ...) and medians are reported.
Greedy decoding is batch-invariant, so both peers must produce the same texts (checked:
``outputs_match``). Tokens are completion tokens, a closing stop token included, as ``usage`` counts them.

    python bench/serve_load.py            # 128 tokens per answer, 3 rounds
    python bench/serve_load.py --quick    # 32 tokens per answer, 1 round (under 5 minutes idle)

The last line printed is one JSON object: serve_tokens_per_s, sequential_tokens_per_s, speedup,
p50_ms, p95_ms (serve request latency), and ``_load.LoadWatch``'s load averages and ``idle``.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _load import LoadWatch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from llmray import cluster  # noqa: E402
from llmray.model import hf, llama  # noqa: E402
from llmray.model.config import preset  # noqa: E402
from llmray.model.generate import SamplingConfig, generate  # noqa: E402
from llmray.tokenizer.chat import ChatTemplate  # noqa: E402
from tests.conftest import SHARED_DATA  # noqa: E402
from tests.eval_support import save_tokenizer, train_bpe  # noqa: E402

THREADS = 2
REQUESTS = 64
CONCURRENCY = 16
MAX_PROMPT_TOKENS = 192


def build_model(directory: Path, preset_name: str) -> Path:
    cfg = preset(preset_name)
    text = (SHARED_DATA / "wikipedia_sample" / "wiki_demo.txt").read_text(encoding="utf-8")[:400_000]
    tokenizer_dir = save_tokenizer(train_bpe(text.splitlines(), cfg.vocab_size), directory / "tokenizer")
    torch.manual_seed(0)
    model = llama.build(cfg)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, param.shape[1] ** -0.5)
    return hf.export(directory / "chat-model", cfg, model.state_dict(), tokenizer_dir=tokenizer_dir)


def conversations(template: ChatTemplate) -> list[list[dict]]:
    """REQUESTS single-turn chats from Self-Instruct's user-oriented instructions that fit MAX_PROMPT_TOKENS."""
    chats = []
    for line in (SHARED_DATA / "self_instruct_human" / "user_oriented_instructions.jsonl").read_text().splitlines():
        task = json.loads(line)
        content = f"{task['instruction']}\n\n{task['instances'][0]['input']}".strip()
        messages = [{"role": "user", "content": content}]
        if len(template.render(messages, add_generation_prompt=True).ids) <= MAX_PROMPT_TOKENS:
            chats.append(messages)
        if len(chats) == REQUESTS:
            return chats
    raise SystemExit(f"only {len(chats)} instructions fit in {MAX_PROMPT_TOKENS} tokens")


def run_serve(client, name: str, chats: list[list[dict]], max_tokens: int) -> dict:
    def ask(messages):
        started = time.perf_counter()
        answer = client.chat.completions.create(model=name, messages=messages, max_tokens=max_tokens, temperature=0)
        return answer, time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(ask, chats))
    seconds = time.perf_counter() - started
    latencies = [latency for _, latency in results]
    return {"tokens": sum(a.usage.completion_tokens for a, _ in results), "seconds": seconds,
            "texts": [a.choices[0].message.content for a, _ in results],
            "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * statistics.quantiles(latencies, n=20)[-1]}


def run_sequential(pretrained, tokenizer, template: ChatTemplate, chats, max_tokens: int) -> dict:
    cfg = SamplingConfig(max_new_tokens=max_tokens, temperature=0.0, stop_tokens=list(template.stop_ids))
    tokens, texts = 0, []
    started = time.perf_counter()
    for messages in chats:
        completion = generate(pretrained.model, [template.render(messages, add_generation_prompt=True).ids], cfg)[0]
        tokens += len(completion) + (len(completion) < max_tokens)  # the stop token that ended it
        texts.append(tokenizer.decode(completion, skip_special_tokens=True))
    return {"tokens": tokens, "seconds": time.perf_counter() - started, "texts": texts}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32 tokens per answer, 1 round")
    parser.add_argument("--model", type=Path, default=None, help="an export to serve (default: build cpu-small)")
    parser.add_argument("--preset", default="cpu-small", help="preset of the built model (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    max_tokens = 32 if args.quick else 128
    rounds = args.rounds or (1 if args.quick else 3)
    # threads the serve phase keeps runnable: the replicas' torch threads and event loops, Serve's
    # HTTP proxy and the client threads (measured: load 4.8 with 0.01 cores used by other processes)
    load = LoadWatch(THREADS + 2)

    import openai
    from tokenizers import Tokenizer

    from llmray.serve import app
    from llmray.serve.options import ServeOptions

    model_dir = args.model or build_model(Path(tempfile.mkdtemp(prefix="llmray-serve-bench-")), args.preset)
    torch.set_num_threads(THREADS)
    pretrained = hf.load(model_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    template = ChatTemplate(tokenizer)
    chats = conversations(template)
    params = sum(p.numel() for p in pretrained.model.parameters())
    print(f"model {model_dir} ({params / 1e6:.1f}M parameters); {len(chats)} chats, {max_tokens} tokens each")

    cluster.connect(cluster.RayConfig(num_cpus=THREADS, dashboard=False))
    options = ServeOptions(model=str(model_dir), port=free_port(), replicas=THREADS, replica_cpus=1,
                           max_batch_size=CONCURRENCY // THREADS)
    client = openai.OpenAI(base_url=app.start(options, token=None), api_key="unused", max_retries=0, timeout=600)
    run_serve(client, options.model_name, chats[:CONCURRENCY], 4)  # warm-up: first batch, first requests
    run_sequential(pretrained, tokenizer, template, chats[:2], 4)

    serve_runs, sequential_runs = [], []
    for round_index in range(rounds):
        serve_runs.append(run_serve(client, options.model_name, chats, max_tokens))
        sequential_runs.append(run_sequential(pretrained, tokenizer, template, chats, max_tokens))
        print(f"round {round_index}: serve {serve_runs[-1]['tokens'] / serve_runs[-1]['seconds']:.0f} tok/s "
              f"(p50 {serve_runs[-1]['p50_ms']:.0f} ms), sequential "
              f"{sequential_runs[-1]['tokens'] / sequential_runs[-1]['seconds']:.0f} tok/s")
    from ray import serve

    serve.shutdown()
    serve_tps = statistics.median(r["tokens"] / r["seconds"] for r in serve_runs)
    sequential_tps = statistics.median(r["tokens"] / r["seconds"] for r in sequential_runs)
    print(json.dumps({
        "requests": REQUESTS, "concurrency": CONCURRENCY, "max_tokens": max_tokens, "threads": THREADS,
        "model_parameters": params, "completion_tokens": serve_runs[0]["tokens"],
        "serve_tokens_per_s": round(serve_tps, 1), "sequential_tokens_per_s": round(sequential_tps, 1),
        "speedup": round(serve_tps / sequential_tps, 3),
        "p50_ms": round(statistics.median(r["p50_ms"] for r in serve_runs)),
        "p95_ms": round(statistics.median(r["p95_ms"] for r in serve_runs)),
        "outputs_match": all(s["texts"] == q["texts"] for s, q in zip(serve_runs, sequential_runs)),
        "rounds": rounds, **load.fields()}))


if __name__ == "__main__":
    main()
