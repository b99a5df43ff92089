"""Export to and import from the Hugging Face checkpoint layout (config.json + model.safetensors).

Why this shape:

* The model uses HF's rotate-half RoPE layout (see ``llama.py``), so the weight mapping is a pure
  rename, table-driven below, and exact: an exported model's logits equal ``transformers``'
  within float rounding, both ways (tested).
* The architecture written is the plainest one that expresses the config: ``LlamaForCausalLM``;
  ``MistralForCausalLM`` when a sliding window is set; ``Qwen3ForCausalLM`` when QK-norm is on
  (Qwen3 is the Llama layout plus per-head q/k RMSNorm, exactly our QK-norm). Import accepts
  those three and refuses, naming the field, anything this model cannot represent (biases,
  other activations, other RoPE types, mixed sliding/full layers).
* RoPE settings are written both as ``rope_parameters`` (transformers 5) and as the legacy
  ``rope_theta``/``rope_scaling`` pair (transformers 4, vLLM, llama.cpp converters).
* Tied embeddings: ``lm_head.weight`` is not stored and ``tie_word_embeddings`` is true, which
  is what HF expects (safetensors also refuses to store one tensor under two names).
* A chat model (SFT/DPO export, ``chat=True``) ends each reply with the end-of-turn token
  ``<|end|>``, not ``<|eos|>``: its ``eos_token_id`` (config.json and generation_config.json)
  lists end-of-turn then end-of-sequence, as Llama 3 Instruct does, so ``transformers``'
  ``generate`` (and vLLM, TGI) stop at the end of the turn instead of running into the next one.
* Safetensors only, nothing unpickled; written through :func:`llmray.runs.atomic_dir` so a killed
  export never leaves a half-written directory at the final path.
* :func:`load` is the one loader for anything in this layout: an export, or the
  ``model.safetensors`` + ``config.json`` that a training checkpoint's export writes.
* ``transformers`` is never imported here: it is only a test-time dependency.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmray import runs, storage
from llmray.model import param_init
from llmray.model.config import ModelConfig, RopeScaling
from llmray.model.llama import Transformer, build
from llmray.tokenizer.chat import END

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")

# llmray name → HF name (global tensors, then the part after "layers.<i>.")
_GLOBAL_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_LAYER_NAMES_FROM_HF = {hf: ours for ours, hf in _LAYER_NAMES.items()}
_GLOBAL_NAMES_FROM_HF = {hf: ours for ours, hf in _GLOBAL_NAMES.items()}
_OUR_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SCORE_SUFFIX = "ForSequenceClassification"  # a head=score model (reward model): the head is ``score.weight``
_SCORE_HEAD = ("lm_head.weight", "score.weight")


class HFFormatError(ValueError):
    """A Hugging Face directory this model cannot load; the message names the file and field."""


@dataclass
class SpecialTokens:
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None


@dataclass
class Pretrained:
    """A loaded model with what generation needs to know about its tokens."""

    model: Transformer
    config: ModelConfig
    special_tokens: SpecialTokens
    path: Path


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------

def to_hf_name(name: str) -> str:
    return _rename(name, _GLOBAL_NAMES, _OUR_LAYER_KEY, _LAYER_NAMES, "model.layers",
                   "no Hugging Face name for parameter")


def _hf_name(name: str, cfg: ModelConfig) -> str:
    """HF name of a parameter of a model of ``cfg`` (a score head is ``score.weight``)."""
    hf_name = to_hf_name(name)
    return _SCORE_HEAD[1] if cfg.head == "score" and hf_name == _SCORE_HEAD[0] else hf_name


def from_hf_name(name: str) -> str:
    return _rename(name, _GLOBAL_NAMES_FROM_HF, _HF_LAYER_KEY, _LAYER_NAMES_FROM_HF, "layers",
                   "unsupported Hugging Face tensor")


def _rename(name: str, global_names: dict[str, str], layer_key: re.Pattern, layer_names: dict[str, str],
            layers_prefix: str, unknown: str) -> str:
    """One parameter name in the other layout: a global name, or ``<layers_prefix>.<i>.<layer name>``."""
    if name in global_names:
        return global_names[name]
    match = layer_key.fullmatch(name)
    if match is None or match.group(2) not in layer_names:
        raise KeyError(f"{unknown} {name!r}")
    return f"{layers_prefix}.{match.group(1)}.{layer_names[match.group(2)]}"


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

def model_type(cfg: ModelConfig) -> str:
    if cfg.qk_norm:
        return "qwen3"
    return "mistral" if cfg.sliding_window else "llama"


def hf_config(cfg: ModelConfig, special: SpecialTokens, dtype: torch.dtype) -> dict:
    """config.json contents for ``cfg``."""
    kind = model_type(cfg)
    scaling = None
    if cfg.rope_scaling is not None:
        scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling.factor,
                   "low_freq_factor": cfg.rope_scaling.low_freq_factor,
                   "high_freq_factor": cfg.rope_scaling.high_freq_factor,
                   "original_max_position_embeddings": cfg.rope_scaling.original_max_seq_len}
    architecture = _ARCHITECTURES[kind]
    config = {
        "architectures": [architecture if cfg.head == "lm" else architecture.replace("ForCausalLM", SCORE_SUFFIX)],
        "model_type": kind,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": cfg.rope_theta},
        "bos_token_id": special.bos_token_id,
        "eos_token_id": _eos_value(special.eos_token_ids),
        "pad_token_id": special.pad_token_id,
        "dtype": str(dtype).removeprefix("torch."),  # transformers 5
        "torch_dtype": str(dtype).removeprefix("torch."),  # transformers 4
        "use_cache": True,
    }
    if cfg.head == "score":
        config.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    if kind == "llama":
        config["mlp_bias"] = False
    if kind == "mistral":
        config["sliding_window"] = cfg.sliding_window
    if kind == "qwen3":
        layer_type = "sliding_attention" if cfg.sliding_window else "full_attention"
        config.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                      max_window_layers=0, layer_types=[layer_type] * cfg.n_layers)
    return config


def config_from_hf(config: dict, where: str = CONFIG_FILE) -> ModelConfig:
    """ModelConfig for an HF config.json mapping; refuses options this model does not have."""
    def need(key: str):
        if key not in config:
            raise HFFormatError(f"{where}: required field '{key}' is missing")
        return config[key]

    def refuse(key: str, allowed, default) -> None:
        value = config.get(key, default)
        if value not in allowed:
            raise HFFormatError(f"{where}: {key}={value!r} is not supported (expected one of {allowed})")

    kind = need("model_type")
    if kind not in _ARCHITECTURES:
        raise HFFormatError(f"{where}: model_type {kind!r} is not supported "
                            f"(expected one of {sorted(_ARCHITECTURES)})")
    refuse("hidden_act", ["silu"], "silu")
    refuse("attention_bias", [False], False)
    refuse("mlp_bias", [False], False)
    rope, rope_theta = _rope_from_hf(config, where)
    sliding_window = None
    if kind == "mistral":
        sliding_window = config.get("sliding_window")
    elif kind == "qwen3" and config.get("use_sliding_window"):
        layer_types = set(config.get("layer_types") or [])
        if layer_types != {"sliding_attention"}:
            raise HFFormatError(f"{where}: layer_types {sorted(layer_types)} mixes sliding and full "
                                "attention; only all-sliding or all-full models are supported")
        sliding_window = config.get("sliding_window")
    n_heads = need("num_attention_heads")
    score = any(a.endswith(SCORE_SUFFIX) for a in config.get("architectures") or [])
    if score and config.get("num_labels", len(config.get("id2label") or {}) or 2) != 1:
        raise HFFormatError(f"{where}: a sequence classifier with num_labels != 1 is not a reward model")
    return ModelConfig(
        vocab_size=need("vocab_size"), dim=need("hidden_size"), n_layers=need("num_hidden_layers"),
        n_heads=n_heads, n_kv_heads=config.get("num_key_value_heads") or n_heads,
        head_dim=config.get("head_dim"), ffn_hidden_dim=need("intermediate_size"),
        norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=rope_theta, rope_scaling=rope,
        max_seq_len=need("max_position_embeddings"), qk_norm=kind == "qwen3",
        tie_embeddings=config.get("tie_word_embeddings", False) and not score, sliding_window=sliding_window,
        init_std=config.get("initializer_range", 0.02), head="score" if score else "lm")


def _rope_from_hf(config: dict, where: str) -> tuple[RopeScaling | None, float]:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise HFFormatError(f"{where}: partial_rotary_factor is not supported")
    if kind == "default":
        return None, theta
    if kind != "llama3":
        raise HFFormatError(f"{where}: rope_type {kind!r} is not supported (expected 'default' or 'llama3')")
    return RopeScaling(factor=params["factor"], low_freq_factor=params["low_freq_factor"],
                       high_freq_factor=params["high_freq_factor"],
                       original_max_seq_len=params.get("original_max_position_embeddings",
                                                       config.get("max_position_embeddings"))), theta


def _eos_value(ids: list[int]) -> int | list[int] | None:
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else list(ids)


def special_tokens_from(config: dict) -> SpecialTokens:
    eos = config.get("eos_token_id")
    return SpecialTokens(bos_token_id=config.get("bos_token_id"),
                         eos_token_ids=[] if eos is None else [eos] if isinstance(eos, int) else list(eos),
                         pad_token_id=config.get("pad_token_id"))


def _prefer(first: SpecialTokens, second: SpecialTokens) -> SpecialTokens:
    """Each id from ``first`` where it has one, else from ``second``."""
    return SpecialTokens(
        bos_token_id=second.bos_token_id if first.bos_token_id is None else first.bos_token_id,
        eos_token_ids=first.eos_token_ids or second.eos_token_ids,
        pad_token_id=second.pad_token_id if first.pad_token_id is None else first.pad_token_id)


def special_tokens_from_tokenizer(tokenizer_dir: str | Path, chat: bool = False) -> SpecialTokens:
    """bos/eos/pad ids named by tokenizer_config.json (strings), looked up in tokenizer.json;
    ``chat``: the end-of-turn token first among the eos ids."""
    from tokenizers import Tokenizer

    tokenizer_dir = storage.local_copy(tokenizer_dir)
    config_path = tokenizer_dir / "tokenizer_config.json"
    names = json.loads(config_path.read_text()) if config_path.is_file() else {}
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))

    def token_id(key: str) -> int | None:
        value = names.get(key)
        if isinstance(value, dict):  # {"content": "<|eos|>", ...}
            value = value.get("content")
        if value is None:
            return None
        token = tokenizer.token_to_id(value)
        if token is None:
            raise HFFormatError(f"{config_path}: {key} {value!r} is not a token of "
                                f"{tokenizer_dir / 'tokenizer.json'}")
        return token

    eos = token_id("eos_token")
    eos_ids = [] if eos is None else [eos]
    if chat:
        end = tokenizer.token_to_id(END)
        if end is None:
            raise HFFormatError(f"{tokenizer_dir / 'tokenizer.json'} has no end-of-turn token {END}: "
                                f"not a chat tokenizer (train it with `llmray tokenizer train`)")
        eos_ids = [end, *(i for i in eos_ids if i != end)]
    return SpecialTokens(bos_token_id=token_id("bos_token"), eos_token_ids=eos_ids, pad_token_id=token_id("pad_token"))


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------

def check_exportable(cfg: ModelConfig) -> None:
    """The Llama layout holds SwiGLU + RMSNorm models only; the GPT-2-style baseline has no export."""
    if cfg.mlp != "swiglu" or cfg.norm != "rmsnorm":
        raise ValueError(f"model.mlp={cfg.mlp}, model.norm={cfg.norm} (the GPT-2-style baseline) has no Hugging "
                         "Face Llama layout: export needs mlp=swiglu and norm=rmsnorm; its checkpoints stay usable "
                         "for comparison and resumption")


def export(out_dir: str | Path, cfg: ModelConfig, state_dict: dict[str, torch.Tensor], *,
           tokenizer_dir: str | Path | None = None, special_tokens: SpecialTokens | None = None,
           dtype: torch.dtype = torch.float32, chat: bool = False) -> str | Path:
    """Write ``out_dir`` in HF layout from a full (unsharded) llmray state dict.

    Special token ids come from ``special_tokens``, else from the tokenizer's own config, with
    end-of-turn among the eos ids of a ``chat`` model.
    """
    check_exportable(cfg)
    if chat and (tokenizer_dir is None or special_tokens is not None):
        raise ValueError("chat=True reads the end-of-turn id from tokenizer_dir (give it, and no special_tokens)")
    if special_tokens is None:
        special_tokens = special_tokens_from_tokenizer(tokenizer_dir, chat) if tokenizer_dir else SpecialTokens()
    tensors = {}
    for name, tensor in state_dict.items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue  # stored once, as the embedding
        tensors[_hf_name(name, cfg)] = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
    expected = {_hf_name(n, cfg) for n in _expected_shapes(cfg)}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"state dict does not hold a full model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    with runs.built_locally(out_dir, last=(CONFIG_FILE,)) as partial:
        save_file(tensors, str(partial / WEIGHTS_FILE), metadata={"format": "pt"})
        runs.write_json(partial / CONFIG_FILE, hf_config(cfg, special_tokens, dtype))
        generation = {"bos_token_id": special_tokens.bos_token_id,
                      "eos_token_id": _eos_value(special_tokens.eos_token_ids),
                      "pad_token_id": special_tokens.pad_token_id}
        runs.write_json(partial / GENERATION_CONFIG_FILE,
                        {key: value for key, value in generation.items() if value is not None})
        if tokenizer_dir is not None:
            _copy_tokenizer(storage.local_copy(tokenizer_dir), partial)
    return out_dir


def _copy_tokenizer(source: Path, target: Path) -> None:
    if not (source / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer directory {source} has no tokenizer.json")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            with runs.atomic_write(target / name, "wb") as handle, open(source / name, "rb") as src:
                shutil.copyfileobj(src, handle)


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Each stored parameter of a model of ``cfg`` (a tied head is the embedding) and its shape."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {n: tuple(t.shape) for n, t in model.state_dict().items()
            if not (n == "output.weight" and cfg.tie_embeddings)}


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------

class WeightSlices:
    """The weights of a directory in HF layout as a :data:`~llmray.model.param_init.Source`: any
    slice of any parameter, read from the memory-mapped safetensors file alone.

    Why: a sharded run starting from pretrained weights fills each rank's part straight from the
    file: FSDP2 rows, tensor-parallel rows or columns and a pipeline stage read only that part;
    ZeRO-3 reads one module at a time and keeps its partition. Opening checks the file against ``cfg``:
    every parameter there with its shape. ``skip``: parameters the caller fills from elsewhere (a
    new head), which the file may lack or hold in another shape. ``path`` is a local directory
    (an object-store one goes through :func:`llmray.storage.local_copy` first).
    """

    def __init__(self, path: str | Path, cfg: ModelConfig, skip: tuple[str, ...] = ()):
        from safetensors import safe_open

        self.path, self.cfg = Path(path), cfg
        self._files = {file: safe_open(str(self.path / file), framework="pt") for file in _weight_files(self.path)}
        self._file_of = {name: file for file, handle in self._files.items() for name in handle.keys()}
        expected = {name: shape for name, shape in _expected_shapes(cfg).items() if name not in skip}
        ours = {}
        for hf_name in self._file_of:
            if hf_name == "lm_head.weight" and cfg.tie_embeddings:
                continue  # some exporters store the tied head too; the embedding is the one weight
            try:
                ours[_our_name(hf_name, cfg)] = hf_name
            except KeyError as exc:
                raise HFFormatError(f"{self.path}: {exc.args[0]}") from None
        missing = sorted(set(expected) - set(ours))
        unexpected = sorted(set(ours) - set(expected) - set(skip))
        if missing or unexpected:
            raise HFFormatError(f"{self.path}: weights do not match {CONFIG_FILE}: missing "
                                f"{[_hf_name(n, cfg) for n in missing][:5]}, unexpected "
                                f"{[ours[n] for n in unexpected][:5]}")
        for name, shape in expected.items():
            stored = tuple(self._slice(name).get_shape())
            if stored != shape:
                raise HFFormatError(f"{self.path}: weights do not match {CONFIG_FILE}: size mismatch for "
                                    f"{name} ({ours[name]}): the file has {list(stored)}, the config gives "
                                    f"{list(shape)}")

    def __call__(self, name: str, shape: tuple[int, ...], offset: tuple[int, ...],
                 local_shape: tuple[int, ...]) -> torch.Tensor:
        index = tuple(slice(start, start + size) for start, size in zip(offset, local_shape))
        return self._slice(name)[index]

    def _slice(self, name: str):
        if name == "output.weight" and self.cfg.tie_embeddings:
            name = "tok_embeddings.weight"
        hf_name = _hf_name(name, self.cfg)
        return self._files[self._file_of[hf_name]].get_slice(hf_name)


def _weight_files(path: Path) -> list[str]:
    """``model.safetensors``, or the shards listed in ``model.safetensors.index.json``."""
    if (path / WEIGHTS_FILE).is_file():
        return [WEIGHTS_FILE]
    index = path / WEIGHTS_INDEX_FILE
    if not index.is_file():
        raise FileNotFoundError(f"{path} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}")
    return sorted(set(json.loads(index.read_text())["weight_map"].values()))


def _our_name(hf_name: str, cfg: ModelConfig) -> str:
    return from_hf_name(_SCORE_HEAD[0] if cfg.head == "score" and hf_name == _SCORE_HEAD[1] else hf_name)


def read_config(path: str | Path) -> ModelConfig:
    """The model shape of a directory in HF layout, from its config.json alone (no weights read)."""
    raw, config_path = _config_json(path)
    return config_from_hf(raw, config_path)


def _config_json(path: str | Path) -> tuple[dict, str]:
    config_path = storage.join(path, CONFIG_FILE)
    if not storage.is_file(config_path):
        raise FileNotFoundError(f"{path} has no {CONFIG_FILE}: not a model directory")
    return json.loads(storage.read_text(config_path)), config_path


def load(path: str | Path, device: torch.device | str = "cpu",
         dtype: torch.dtype = torch.float32) -> Pretrained:
    """Load a directory in HF layout (an export, or a checkpoint's exported weights), local or on
    an object store (read through this node's cache, :func:`llmray.storage.local_copy`)."""
    path = storage.local_copy(path)
    raw, config_path = _config_json(path)
    cfg = config_from_hf(raw, config_path)
    special = special_tokens_from(raw)
    generation_path = path / GENERATION_CONFIG_FILE
    if generation_path.is_file():  # generation_config.json wins for generation settings, as in HF
        special = _prefer(special_tokens_from(json.loads(generation_path.read_text())), special)
    model = build(cfg, "meta").to(dtype)
    param_init.materialize(model, torch.device(device), WeightSlices(path, cfg))
    return Pretrained(model=model.eval(), config=cfg, special_tokens=special, path=path)
