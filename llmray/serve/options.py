"""Settings of one ``llmray serve`` application (no Ray, no torch: the CLI reads its defaults).

The bearer token is not here: it is read from the environment by the CLI, checked there, and
only its digest reaches the replicas (see :mod:`llmray.serve.security`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmray.cluster import LOCALHOST

APP_NAME = "llmray"


@dataclass(frozen=True)
class ServeOptions:
    model: str  # export directory (config.json, model.safetensors, tokenizer files), seen by every replica
    model_name: str = ""  # the id clients pass as "model"; default: the directory's name
    host: str = LOCALHOST
    port: int = 8000
    replicas: int = 1
    max_batch_size: int = 16  # requests decoded together by one replica
    batch_wait_ms: float = 10.0  # how long a replica waits for more requests before starting a batch
    replica_cpus: float = 1.0  # also the torch thread count of a replica
    replica_gpus: float = 0.0  # > 0: the replica decodes on CUDA
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.model_name:
            object.__setattr__(self, "model_name", Path(self.model).resolve().name)
        for name, low in (("port", 1), ("replicas", 1), ("max_batch_size", 1), ("replica_cpus", 0),
                          ("replica_gpus", 0), ("batch_wait_ms", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.port > 65535:
            raise ValueError(f"port must be <= 65535, got {self.port}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
