"""``llmray serve --model DIR``: an OpenAI-compatible HTTP API for an export, on Ray Serve.

Routes: ``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions``
(``"stream": true`` for server-sent events). Concurrent requests are decoded together in
batches (``--max-batch-size``, ``--batch-wait-ms``) by each of ``--replicas`` replicas.

Binds 127.0.0.1 unless ``--host`` says otherwise; any other address needs a bearer token, read
from the environment variable named by ``--token-env`` (default LLMRAY_SERVE_TOKEN). With a
token set, every request must send ``Authorization: Bearer <token>`` (the ``api_key`` of an
OpenAI client). Runs until interrupted (Ctrl-C, SIGTERM, ``ray job stop``), then removes the app.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from llmray.serve.options import ServeOptions
from llmray.serve.security import DEFAULT_TOKEN_ENV

def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="serve a model with an OpenAI-compatible API on Ray Serve",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True,
                        help="export directory: config.json + model.safetensors + tokenizer files")
    parser.add_argument("--model-name", default="", help="model id clients pass (default: the directory name)")
    parser.add_argument("--host", default=ServeOptions.host, help="address to bind; default: %(default)s")
    parser.add_argument("--port", type=int, default=ServeOptions.port, help="default: %(default)s")
    parser.add_argument("--replicas", type=int, default=ServeOptions.replicas, help="default: %(default)s")
    parser.add_argument("--token-env", default=DEFAULT_TOKEN_ENV, metavar="NAME",
                        help="environment variable holding the bearer token; default: %(default)s")
    parser.add_argument("--max-batch-size", type=int, default=ServeOptions.max_batch_size,
                        help="most requests one replica decodes together; default: %(default)s")
    parser.add_argument("--batch-wait-ms", type=float, default=ServeOptions.batch_wait_ms,
                        help="how long a replica waits for more requests before decoding; default: %(default)s")
    parser.add_argument("--replica-cpus", type=float, default=ServeOptions.replica_cpus,
                        help="CPUs (and torch threads) per replica; default: %(default)s")
    parser.add_argument("--replica-gpus", type=float, default=ServeOptions.replica_gpus,
                        help="GPUs per replica (> 0 decodes on CUDA); default: %(default)s")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=ServeOptions.dtype,
                        help="weights dtype; default: %(default)s")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of an embedded local Ray")
    parser.set_defaults(handler=run_serve)


def run_serve(args) -> int:
    from llmray.serve.security import check_exposure

    token = os.environ.get(args.token_env) or None
    try:
        options = ServeOptions(model=str(args.model.resolve()), model_name=args.model_name, host=args.host,
                               port=args.port, replicas=args.replicas, max_batch_size=args.max_batch_size,
                               batch_wait_ms=args.batch_wait_ms, replica_cpus=args.replica_cpus,
                               replica_gpus=args.replica_gpus, dtype=args.dtype)
        check_exposure(options.host, token, args.token_env)  # before Ray starts
    except ValueError as exc:  # bad options, or an unprotected exposure (ServeSecurityError)
        print(f"llmray serve: {exc}", file=sys.stderr)
        return 2
    if not (args.model / "config.json").is_file():
        print(f"llmray serve: {args.model} has no config.json: not an export directory", file=sys.stderr)
        return 2
    from ray import serve

    from llmray import cluster
    from llmray.serve import app

    connection = cluster.connect(cluster.RayConfig(address=args.address, num_cpus=args.num_cpus))
    print(cluster.describe(connection), file=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `ray job stop`: leave through the finally below
    try:
        url = app.start(options, token, args.token_env)
        print(f"llmray serve: {options.model_name!r} at {url} ({options.replicas} replica(s), "
              f"{'bearer token required' if token else 'no token'}); Ctrl-C stops", file=sys.stderr)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.delete(app.APP_NAME)
