"""Checkpoint state of one or several model parts under global names, written and read with DCP.

Every engine (one process, FSDP2, TP, pipeline stages) saves the same layout:
``{"model": {<global parameter name>: tensor}, "optim": {"state.<name>.<key>": ...,
"param_groups.<name>.<key>": ...}}``. Model names are those of the whole model (pipeline stages
keep ``layers.<i>``), and the optimizer state is *flattened* (keyed by parameter name, not by
position in one optimizer), so a checkpoint written by two pipeline stages with one optimizer
each loads into one optimizer of the whole model, and back. DCP reshards FSDP/TP DTensors on
load, so the data-parallel and tensor-parallel degrees may change too.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def state_dict(modules: list[nn.Module], optimizers: list[torch.optim.Optimizer] | None) -> dict:
    """``{"model": ..., "optim": ...}`` of ``modules`` (with one optimizer each) under global names."""
    state = {"model": {k: v for m in modules for k, v in get_model_state_dict(m).items()}}
    if optimizers is not None:
        state["optim"] = {k: v for m, o in zip(modules, optimizers)
                          for k, v in get_optimizer_state_dict(m, o, options=_FLAT).items()}
    return state


def save(modules: list[nn.Module], optimizers: list[torch.optim.Optimizer], directory: Path) -> None:
    """Every rank writes its shards; a collective."""
    dcp.save(state_dict(modules, optimizers), checkpoint_id=str(directory))


def load(modules: list[nn.Module], optimizers: list[torch.optim.Optimizer] | None, directory: Path) -> None:
    """Load a checkpoint written by :func:`save` under any split of the model into parts and shards."""
    state = state_dict(modules, optimizers)
    dcp.load(state, checkpoint_id=str(directory))
    for i, module in enumerate(modules):
        own = get_model_state_dict(module).keys()
        set_model_state_dict(module, {k: state["model"][k] for k in own}, options=StateDictOptions(strict=True))
        if optimizers is not None:
            own_optim = get_optimizer_state_dict(module, optimizers[i], options=_FLAT).keys()
            set_optimizer_state_dict(module, optimizers[i], {k: state["optim"][k] for k in own_optim},
                                     options=_FLAT)
