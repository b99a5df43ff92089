"""The Ray Serve application of ``llmray serve``: OpenAI routes on a FastAPI ingress, one engine per replica.

Why this shape:

* One deployment, :class:`OpenAIServer`, is both the HTTP ingress and the model holder: a token
  goes from the decoding loop to the client without another actor hop.
* Batching is continuous (:class:`llmray.serve.engine.Scheduler`): up to ``max_batch_size``
  requests decode together and a new request joins at the next step. Serve's ``@serve.batch``
  was the first design: it runs one batch to its end before the next, so under a steady stream
  of requests batches fragmented and each request waited for the one before it (16 concurrent
  clients at 128 tokens got 1.2x the sequential tokens/s; continuous batching: see
  ``bench/serve_load.py``). Streamed and whole answers come from the same deltas; a whole answer
  just collects them.
* ``max_ongoing_requests`` is twice the batch size so requests queue in the replica, ready to
  join as rows free up.
* The response waits for the first delta before sending headers: errors become proper HTTP
  errors rather than broken streams, and the ``x-llmray-batch-size`` header can say how many
  requests were decoded together.
* Module-level helpers the deployment uses are defined above it: Serve pickles the class when
  the decorator runs, capturing only the globals that exist then.
* Errors have OpenAI's ``{"error": {...}}`` shape, so clients raise their usual exceptions.
  FastAPI's own docs routes are off: every route checks the token (:mod:`llmray.serve.security`).
"""

import time
from typing import AsyncIterator

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from llmray.serve.engine import Delta, Engine, Job, Scheduler
from llmray.serve.openai_schema import (SSE_DONE, ChatCompletionRequest, CompletionRequest, Reply, RequestError,
                                        model_list, parse, sse)
from llmray.serve.options import APP_NAME, ServeOptions
from llmray.serve.security import DEFAULT_TOKEN_ENV, BearerAuth, check_exposure, token_digest

BATCH_SIZE_HEADER = "x-llmray-batch-size"

api = FastAPI(title="llmray", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _events(first: Delta, deltas: AsyncIterator[Delta], job: Job, reply: Reply,
                  include_usage: bool) -> AsyncIterator[str]:
    """The server-sent events of a streamed answer."""
    yield sse(reply.chunk(first.text, first.finish_reason, first=True))
    last = first
    async for last in deltas:
        if last.text or last.finish_reason:
            yield sse(reply.chunk(last.text, last.finish_reason))
    if include_usage:
        yield sse(reply.usage_chunk(len(job.prompt), last.completion_tokens))
    yield SSE_DONE


@serve.deployment
@serve.ingress(api)
class OpenAIServer:
    def __init__(self, options: ServeOptions, token_sha256: str | None) -> None:
        torch.set_num_threads(max(1, int(options.replica_cpus)))
        device = "cuda" if options.replica_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.engine = Engine.load(options.model, device=device, dtype=getattr(torch, options.dtype))
        self.options = options
        self.auth = BearerAuth(token_sha256)
        self.created = int(time.time())
        self.scheduler = Scheduler(self.engine, options.max_batch_size, options.batch_wait_ms / 1000)

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        return model_list(self.options.model_name, self.created)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        self._authorize(request)
        body = parse(CompletionRequest, await request.body())
        self._check_model(body.model)
        return await self._answer(self.engine.completion_job(body.prompt, body.params()), body, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._authorize(request)
        body = parse(ChatCompletionRequest, await request.body())
        self._check_model(body.model)
        messages = [message.as_template_message() for message in body.messages]
        return await self._answer(self.engine.chat_job(messages, body.params()), body, chat=True)

    def _authorize(self, request: Request) -> None:
        if not self.auth.allows(request.headers.get("authorization")):
            raise RequestError("missing or invalid bearer token (send 'Authorization: Bearer <token>')",
                               status=401, kind="authentication_error")

    def _check_model(self, model: str) -> None:
        if model != self.options.model_name:
            raise RequestError(f"model {model!r} does not exist; this server serves {self.options.model_name!r}",
                               param="model", status=404, kind="not_found_error")

    async def _answer(self, job: Job, body, chat: bool):
        reply = Reply(chat=chat, model=self.options.model_name)
        deltas = self.scheduler.submit(job)
        first = await anext(deltas)
        headers = {BATCH_SIZE_HEADER: str(first.batch_size)}
        if body.stream:
            return StreamingResponse(_events(first, deltas, job, reply, body.include_usage),
                                     media_type="text/event-stream", headers=headers)
        text, last = first.text, first
        async for last in deltas:
            text += last.text
        return JSONResponse(reply.whole(text, last.finish_reason, len(job.prompt), last.completion_tokens),
                            headers=headers)


def build(options: ServeOptions, token: str | None):
    """The Serve application (not started): ``options.replicas`` replicas of :class:`OpenAIServer`."""
    return OpenAIServer.options(
        num_replicas=options.replicas, max_ongoing_requests=2 * options.max_batch_size,
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus},
    ).bind(options, token_digest(token))


def start(options: ServeOptions, token: str | None, token_env: str = DEFAULT_TOKEN_ENV) -> str:
    """Check exposure, start Serve's HTTP proxy on ``options.host:port`` and deploy; returns the API's base URL.

    Needs a connected Ray (:func:`llmray.cluster.connect`)."""
    check_exposure(options.host, token, token_env)
    serve.start(http_options={"host": options.host, "port": options.port})
    serve.run(build(options, token), name=APP_NAME, route_prefix="/")
    return f"http://{options.host}:{options.port}/v1"
