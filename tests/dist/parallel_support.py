"""Shared pieces of the TP/PP/2-D/3-D equivalence tests: real-text batches, the single-process
reference loop, and helpers every rank uses.

Each test file spawns its gloo ranks *once* (process start and imports dominate the run time on
2 cores) and runs all of its layouts inside that one process group, writing per-layout results
to JSON that the individual tests then compare with the reference computed in the test process.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from llmray.model import llama
from llmray.model.config import preset
from llmray.train.objectives import CausalLM, token_cross_entropy
from llmray.train.trainer import OptimizerConfig, optimizer_factory
from tests.train_support import stdlib_texts

SEQ = 32
LR = 3e-3
GRAD_CLIP = 1.0


def tiny(seed: int = 0, **overrides) -> llama.Transformer:
    """The tiny preset over a 257-id byte vocabulary (64 dims, 4 heads / 2 kv-heads)."""
    torch.manual_seed(seed)
    return llama.build(preset("tiny", **{"vocab_size": 257, "max_seq_len": 64, **overrides}))


def text_batches(steps: int, batch: int, offset: int = 0) -> list[torch.Tensor]:
    """``steps`` batches (batch, SEQ+1) of byte ids (+1) of Python standard-library source."""
    data = np.frombuffer("".join(stdlib_texts(4)).encode(), dtype=np.uint8).astype(np.int64) + 1
    need = (offset + steps) * batch * (SEQ + 1)
    windows = torch.from_numpy(data[:need].copy()).view(offset + steps, batch, SEQ + 1)
    return list(windows[offset:])


def summed_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of a (micro-)batch; the step divides by the global target count once."""
    return token_cross_entropy(logits, targets).sum()


def make_optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:
    return optimizer_factory(OptimizerConfig(lr=LR), torch.device("cpu"))(module)


def reference(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict:
    """One process: per-step mean loss, grad norm and the final parameters."""
    optimizer = make_optimizer(model)
    losses, norms = [], []
    for batch in batches:
        loss_sum = summed_loss(model(batch[:, :-1]), batch[:, 1:])
        (loss_sum / batch[:, 1:].numel()).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss_sum) / batch[:, 1:].numel())
    return {"losses": losses, "grad_norms": norms,
            "params": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def full_params(modules: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Unsharded parameters of the given parts under global names (collective over their meshes)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for module in modules:
        for name, p in module.state_dict().items():
            out[_strip(name)] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
    return out


def _strip(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def all_reduce_sum(value: torch.Tensor, group=None) -> float:
    value = value.detach().double().clone()
    dist.all_reduce(value, group=group)
    return float(value)


def write_results(path: Path, results: dict) -> None:
    path.write_text(json.dumps(results))


def read_results(path: Path) -> dict:
    return json.loads(path.read_text())


def max_relative_error(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def trainer(shards: Path, parallel, *, steps: int, global_batch: int = 4, store=None, checkpoint_every: int = 0,
            optimizer: OptimizerConfig | None = None, precision: str = "auto", on_meta: bool = False,
            **model_overrides):
    """A real :class:`~llmray.train.trainer.Trainer` on the byte shards; each data-parallel rank reads its slice.

    Ranks of one tensor-/pipeline-parallel group read the same rows: the loader is sharded by the
    rank's ``dp`` coordinate on the mesh, not by its global rank. ``on_meta``: the model is handed
    over on ``meta`` and each rank initializes its part from the run's seed (as ``llmray pretrain``).
    """
    from llmray.tokens.loader import TokenLoader
    from llmray.train.schedule import ScheduleConfig
    from llmray.train.trainer import TrainConfig, Trainer
    from tests.train_support import byte_token_lengths, tiny_model

    world = dist.get_world_size() if dist.is_initialized() else 1
    dims = parallel.dims(world)
    dp_rank = dims.coordinates(dist.get_rank() if dist.is_initialized() else 0)["dp"]
    cfg = TrainConfig(steps=steps, optimizer=optimizer or OptimizerConfig(lr=LR), schedule=ScheduleConfig(warmup_steps=2),
                      log_every=5, eval_batches=2, checkpoint_every=checkpoint_every, grad_clip=GRAD_CLIP,
                      peak_flops=1e11, precision=precision)
    batch = global_batch // dims.dp
    data = TokenLoader(shards, seq_len=SEQ, batch_size=batch, rank=dp_rank, world_size=dims.dp)

    def val():
        return TokenLoader(shards, split="val", seq_len=SEQ, batch_size=batch, shuffle=False, rank=dp_rank,
                           world_size=dims.dp)
    model = tiny_model(0, device="meta" if on_meta else "cpu", **model_overrides)
    return Trainer(cfg, model, CausalLM(), data, parallel=parallel, store=store, val_data=val, device=torch.device("cpu"),
                   token_bytes=byte_token_lengths(), flops_per_token=1000)


def trainer_reference(shards: Path, steps: int, optimizer: OptimizerConfig | None = None, precision: str = "auto",
                      **model_overrides) -> dict:
    """The same Trainer in one process: per-step losses and tokens, evaluations, final weights."""
    from llmray.parallel import ParallelConfig

    trainer_ = trainer(shards, ParallelConfig(strategy="none"), steps=steps, optimizer=optimizer,
                       precision=precision, **model_overrides)
    result = trainer_.fit()
    return {"losses": [result.losses[s] for s in range(1, steps + 1)], "evals": result.evals,
            "tokens": [r.tokens for r in result.records], "params": trainer_.export_weights()}


def spawn_runs(tmp_path_factory, name: str, world_size: int, ranks_main, shards: Path) -> Path:
    """Run ``ranks_main(shards, out)`` on ``world_size`` gloo ranks; returns ``out``."""
    from tests.train_support import spawn_gloo

    out = tmp_path_factory.mktemp(name)
    spawn_gloo(world_size, ranks_main, shards, out)
    return out
