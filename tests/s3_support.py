"""A real S3 API on 127.0.0.1 for the tests: ``moto`` in server mode, as a child process.

The endpoint and fake credentials are put in the environment when this module is imported (by
``tests/conftest.py``), before the session's Ray starts, so Ray's workers inherit them exactly
as cluster nodes inherit their own cloud credentials: llmray never passes credentials around.
The server itself starts on first use and stops with the session.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid

ENDPOINT_VARIABLE = "AWS_ENDPOINT_URL"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configure_environment() -> None:
    """Point every S3 client of this test session (and its Ray workers) at the local server, never
    at a real account whatever the developer's environment holds."""
    os.environ.update({ENDPOINT_VARIABLE: f"http://127.0.0.1:{_free_port()}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})


class MotoServer:
    """``python -m moto.server`` on the endpoint's port; ``bucket()`` makes a fresh bucket."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        port = endpoint.rsplit(":", 1)[1]
        # The server logs every request: to a file, since an unread pipe fills up and stalls it.
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
                                        stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", int(port)), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.log.seek(0)
                    output = self.log.read().decode(errors="replace")[-2000:]
                    self.stop()
                    raise RuntimeError(f"moto server did not start on {endpoint}: {output}")
                time.sleep(0.2)

    def bucket(self) -> str:
        import pyarrow.fs as pafs

        name = f"llmray-{uuid.uuid4().hex[:12]}"
        pafs.S3FileSystem(endpoint_override=self.endpoint, allow_bucket_creation=True).create_dir(name)
        return name

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
