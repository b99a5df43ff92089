"""``llmray serve``: the OpenAI API over Ray Serve, checked with the official ``openai`` client.

One application is served for the module, on 127.0.0.1 at a free port, with a bearer token,
from a tiny export whose weights are fan-in scaled (its greedy trajectories wander, so equality
checks mean something) and whose tokenizer is a real BPE trained on shared/data. References are
computed in-process, one prompt at a time, with :func:`llmray.model.generate.generate`.
The engine's stop handling is checked first without Ray, on a hand-written bigram model.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from tokenizers import Tokenizer

from llmray import cli
from llmray.model import hf
from llmray.model.generate import SamplingConfig, document_prompt, document_stop_tokens, generate
from llmray.serve.engine import Engine, Scheduler
from llmray.serve.openai_schema import GenerationParams
from llmray.serve.options import ServeOptions
from llmray.serve.security import ServeSecurityError, is_loopback
from llmray.tokenizer import chat
from tests import align_support
from tests.eval_support import bigram_model, word_tokenizer

PROMPTS = ["The history of", "A recipe for bread needs flour, water, salt and",
           "Question: what is two plus two? Answer:", "In 1905 Albert Einstein published four papers that"]
BATCH_HEADER = "x-llmray-batch-size"


# ---------------------------------------------------------------------------------------------
# The engine alone (no Ray): stop tokens, stop strings, budgets
# ---------------------------------------------------------------------------------------------

def _bigram_engine() -> Engine:
    """Greedy chat answer 'hello world<|end|>'; raw text after 'hi' runs 'hello world <|end|> again again ...'."""
    words = ["hi", "hello", "world", "again", "x"]
    tokenizer = word_tokenizer(words)
    token = {t: tokenizer.token_to_id(t) for t in [*chat.SPECIAL_TOKENS, *words]}
    table = torch.full((len(token), len(token)), -10.0)
    for before, after in [(chat.ASSISTANT, "hello"), ("hi", "hello"), ("hello", "world"), ("world", chat.END),
                          (chat.END, "again"), ("again", "again"), (chat.BOS, "hi"), (chat.USER, "hi")]:
        table[token[before], token[after]] = 10.0
    model = bigram_model(table)
    special = hf.SpecialTokens(bos_token_id=token[chat.BOS], eos_token_ids=[token[chat.EOS]])
    return Engine(hf.Pretrained(model=model, config=model.cfg, special_tokens=special, path=Path(".")), tokenizer)


def _decode_all(engine: Engine, jobs, max_rows: int = 16) -> list[list]:
    """Every job's deltas, all submitted at once to one scheduler."""
    async def collect():
        scheduler = Scheduler(engine, max_rows=max_rows, wait_s=0.01)

        async def answer(job):
            return [delta async for delta in scheduler.submit(job)]
        return await asyncio.gather(*(answer(job) for job in jobs))

    return asyncio.run(collect())


def test_engine_stops_at_end_of_turn_stop_strings_and_budget_without_showing_a_stop_prefix():
    engine = _bigram_engine()
    greedy = GenerationParams(temperature=0.0)
    jobs = [engine.chat_job([{"role": "user", "content": "hi"}], greedy),
            engine.completion_job("hi", GenerationParams(max_tokens=5, temperature=0.0)),
            engine.completion_job("hi", GenerationParams(max_tokens=5, temperature=0.0, stop=("wor",)))]
    chat_answer, raw, cut = _decode_all(engine, jobs)
    assert "".join(d.text for d in chat_answer) == "hello world"
    assert (chat_answer[-1].finish_reason, chat_answer[-1].completion_tokens) == ("stop", 3)  # <|end|> counted
    assert [d.finish_reason for d in raw] == [None] * 4 + ["length"] and raw[-1].completion_tokens == 5
    assert [d.text for d in cut] == ["hello", " "] and cut[-1].finish_reason == "stop"  # "wor" never shown
    assert {d.batch_size for d in chat_answer + raw + cut} == {3}


def test_a_long_prompt_and_a_long_budget_decode_together_and_neither_is_cut():
    """40 + 50 slots exceed max_seq_len (64), but each request has its own cache row."""
    engine = _bigram_engine()  # max_seq_len 64
    long_prompt = GenerationParams(max_tokens=10, temperature=0.0)
    long_budget = GenerationParams(max_tokens=50, temperature=0.0)
    jobs = [engine.completion_job(" ".join(["x"] * 40), long_prompt), engine.completion_job("hi", long_budget),
            engine.completion_job("hi hi", GenerationParams(max_tokens=5, temperature=0.0))]
    together = _decode_all(engine, jobs)
    alone = [_decode_all(engine, [job])[0] for job in jobs]
    assert [[(d.text, d.finish_reason) for d in r] for r in together] == \
        [[(d.text, d.finish_reason) for d in r] for r in alone]
    assert together[1][-1].completion_tokens == 50  # the short prompt got its whole budget


@pytest.mark.parametrize("max_rows", [2, 1])
def test_a_request_joins_the_decoding_at_the_next_step_when_a_row_is_free(max_rows):
    """Continuous batching: a request arriving mid-decode joins at once (prefilled into a free row) and
    ends long before the running one; with no free row it waits. Answers equal the lone answers."""
    engine = _bigram_engine()
    long_job = lambda: engine.completion_job("hi", GenerationParams(max_tokens=40, temperature=0.0))
    short_job = lambda: engine.completion_job("hi hi", GenerationParams(max_tokens=5, temperature=0.0))
    events = []

    async def scenario():
        scheduler = Scheduler(engine, max_rows=max_rows, wait_s=0.0)

        async def answer(name, job, after=None):
            if after is not None:
                await after.wait()
            deltas = []
            async for delta in scheduler.submit(job):
                deltas.append(delta)
                events.append(name)
                if name == "long" and len(deltas) == 3:
                    started.set()
            return deltas
        started = asyncio.Event()
        return await asyncio.gather(answer("long", long_job()), answer("short", short_job(), after=started))

    long_answer, short_answer = asyncio.run(scenario())
    assert [(d.text, d.finish_reason) for d in long_answer] == \
        [(d.text, d.finish_reason) for d in _decode_all(engine, [long_job()])[0]]
    assert [(d.text, d.finish_reason) for d in short_answer] == \
        [(d.text, d.finish_reason) for d in _decode_all(engine, [short_job()])[0]]
    short_done, long_done = len(events) - events[::-1].index("short"), len(events) - events[::-1].index("long")
    if max_rows == 2:
        assert short_answer[0].batch_size == 2 and short_done < long_done  # joined, finished first
    else:
        assert short_answer[0].batch_size == 1 and events.index("short") > long_done - 1  # waited for the row


# ---------------------------------------------------------------------------------------------
# The served application
# ---------------------------------------------------------------------------------------------

def _http(url: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
    """Status and JSON body of a plain HTTP call (GET, or POST when ``body`` is given)."""
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def export(tmp_path_factory, shared_data) -> Path:
    model = align_support.tiny_model(seed=3)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, param.shape[1] ** -0.5)
    return hf.export(tmp_path_factory.mktemp("serve") / "tiny-chat", model.cfg, model.state_dict(),
                     tokenizer_dir=align_support.tokenizer_dir(shared_data))


@pytest.fixture(scope="module")
def served(ray_session, export):
    from ray import serve

    from llmray.serve import app

    token = secrets.token_urlsafe(24)
    options = ServeOptions(model=str(export), port=_free_port(), max_batch_size=8, batch_wait_ms=250)
    url = app.start(options, token)
    yield url, token, options.model_name
    serve.shutdown()


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    url, token, _ = served
    return openai.OpenAI(base_url=url, api_key=token, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(export):
    """Greedy completions computed in-process, one prompt at a time (the `llmray generate` path)."""
    pretrained = hf.load(export)
    tokenizer = Tokenizer.from_file(str(export / "tokenizer.json"))
    template = chat.ChatTemplate(tokenizer)

    def complete(prompt: str, max_tokens: int) -> tuple[str, int]:
        ids = document_prompt(template.encode_text(prompt), pretrained.special_tokens)
        cfg = SamplingConfig(max_new_tokens=max_tokens, temperature=0.0,
                             stop_tokens=document_stop_tokens(pretrained.special_tokens))
        return tokenizer.decode(generate(pretrained.model, [ids], cfg)[0], skip_special_tokens=True), len(ids)

    return complete


def test_completions_whole_and_streamed(client, served, reference):
    name = served[2]
    expected, prompt_tokens = reference(PROMPTS[0], 12)
    whole = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert whole.choices[0].text == expected and expected.strip()
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == prompt_tokens
    assert whole.usage.completion_tokens == 12 or whole.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_completions_whole_and_streamed(client, served):
    name = served[2]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    whole = client.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0)
    answer = whole.choices[0].message
    assert answer.role == "assistant" and answer.content.strip()
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_concurrent_prompts_of_different_lengths_batch_and_equal_one_at_a_time(client, served, reference):
    """Greedy answers of prompts decoded together are exactly the one-at-a-time answers."""
    name = served[2]
    start = threading.Barrier(len(PROMPTS))

    def ask(prompt: str):
        start.wait()
        return client.completions.with_raw_response.create(model=name, prompt=prompt, max_tokens=16, temperature=0)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        raws = list(pool.map(ask, PROMPTS))
    assert max(int(raw.headers[BATCH_HEADER]) for raw in raws) >= 2, "the requests were never batched"
    assert len({reference(p, 16)[1] for p in PROMPTS}) == len(PROMPTS)  # all prompt lengths differ
    assert [raw.parse().choices[0].text for raw in raws] == [reference(p, 16)[0] for p in PROMPTS]


def test_stop_strings_cut_the_text_streamed_or_not(client, served, reference):
    name = served[2]
    full, _ = reference(PROMPTS[1], 16)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    expected = full[:full.index(stop)]
    whole = client.completions.create(model=name, prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop])
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (expected, "stop")
    streamed = client.completions.create(model=name, prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_seeded_sampling_is_reproducible(client, served):
    name = served[2]
    ask = lambda seed: client.completions.create(model=name, prompt=PROMPTS[2], max_tokens=12, temperature=1.0,
                                                 top_p=0.95, seed=seed).choices[0].text
    assert ask(5) == ask(5)
    assert len({ask(5), ask(6), ask(7)}) > 1


def test_sixteen_concurrent_requests_all_complete(client, served, reference):
    name = served[2]
    prompts = [f"{PROMPTS[i % 4]} {'and then' * (i // 4)}".strip() for i in range(16)]

    def ask(i: int) -> str:
        if i % 2:
            stream = client.completions.create(model=name, prompt=prompts[i], max_tokens=8, temperature=0, stream=True)
            return "".join(c.choices[0].text for c in stream)
        return client.completions.create(model=name, prompt=prompts[i], max_tokens=8, temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(ask, range(16)))
    assert texts == [reference(p, 8)[0] for p in prompts]


def test_requests_without_the_token_get_401(served):
    url, token, name = served
    status, refused = _http(f"{url}/completions", {"model": name, "prompt": "hi", "max_tokens": 2})
    assert status == 401 and "bearer token" in refused["error"]["message"]
    assert _http(f"{url}/completions", {"not": "valid"})[0] == 401  # auth is checked before the body
    assert _http(f"{url}/models")[0] == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong-" + token, max_retries=0).models.list()
    status, listed = _http(f"{url}/models", token=token)
    assert status == 200 and [m["id"] for m in listed["data"]] == [name]


def test_the_api_listens_on_loopback_only(served):
    import ray

    port = int(served[0].rsplit(":", 1)[1].split("/")[0])
    node_ip = ray.util.get_node_ip_address()
    if is_loopback(node_ip):
        pytest.skip(f"this node's only address is the loopback {node_ip}")
    with pytest.raises(OSError):  # connection refused: nothing listens there on the node's address
        socket.create_connection((node_ip, port), timeout=5).close()


def test_bad_requests_are_refused_naming_the_problem(client, served):
    name = served[2]
    with pytest.raises(openai.NotFoundError, match="serves 'tiny-chat'"):
        client.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="'n' is not supported"):
        client.completions.create(model=name, prompt="hi", n=2)
    with pytest.raises(openai.BadRequestError, match="context is 256 tokens"):
        client.completions.create(model=name, prompt="hi", max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="role 'tool'"):
        client.chat.completions.create(model=name, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])


def test_non_loopback_host_without_token_is_refused_before_starting(export, monkeypatch, capsys):
    from llmray.serve import app

    with pytest.raises(ServeSecurityError, match="refusing to serve on '0.0.0.0' without a bearer token.*"
                                                 "LLMRAY_SERVE_TOKEN"):
        app.start(ServeOptions(model=str(export), host="0.0.0.0", port=_free_port()), token=None)
    monkeypatch.delenv("SERVE_TOKEN_FOR_TEST", raising=False)
    code = cli.main(["serve", "--model", str(export), "--host", "0.0.0.0", "--token-env", "SERVE_TOKEN_FOR_TEST"])
    assert code == 2 and "without a bearer token" in capsys.readouterr().err
    monkeypatch.setenv("SERVE_TOKEN_FOR_TEST", "short")
    assert cli.main(["serve", "--model", str(export), "--host", "10.1.2.3", "--token-env", "SERVE_TOKEN_FOR_TEST"]) == 2
    assert "use at least 16" in capsys.readouterr().err
