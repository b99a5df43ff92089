"""ModelConfig: validation, presets, shipped YAMLs, exact parameter counts, FLOPs per token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llmray import config as config_lib
from llmray.model.config import PRESETS, ModelConfig, preset
from llmray.model.llama import build

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"


def _counted(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


@pytest.mark.parametrize("name", list(PRESETS))
def test_closed_form_parameter_count_equals_built_model(name):
    cfg = preset(name)
    model = build(cfg, "meta")
    assert all(p.is_meta for p in model.parameters())
    assert cfg.num_params() == _counted(model)
    embedding = model.tok_embeddings.weight.numel()
    expected_non_embedding = _counted(model) - (0 if cfg.tie_embeddings else embedding)
    assert cfg.num_params(include_embedding=False) == expected_non_embedding


@pytest.mark.parametrize("overrides", [dict(qk_norm=True), dict(tie_embeddings=False), dict(n_kv_heads=1),
                                       dict(head_dim=24), dict(ffn_hidden_dim=None),
                                       dict(mlp="gelu", norm="layernorm", ffn_hidden_dim=None)])
def test_closed_form_count_for_every_option(overrides):
    cfg = preset("tiny", **overrides)
    assert cfg.num_params() == _counted(build(cfg, "meta"))


@pytest.mark.parametrize("name, published", [("llama3-8b", 8.03e9), ("llama3-70b", 70.55e9), ("1b", 1.24e9)])
def test_llama3_shapes_match_published_counts(name, published):
    assert abs(preset(name).num_params() / published - 1) < 0.005


def test_small_presets_are_the_advertised_sizes():
    assert preset("tiny").num_params() < 1_000_000
    assert 10e6 <= preset("cpu-small").num_params() <= 20e6
    assert abs(preset("gpt2-124m").num_params() / 124e6 - 1) < 0.01


@pytest.mark.parametrize("name, seq_len", [("tiny", 64), ("tiny", 8), ("llama3-8b", 32)])
def test_flops_per_token_matches_counted_matmul_flops(name, seq_len):
    """torch's FLOP counter over a real forward+backward (on meta) agrees with 6N + 12·L·H·Q·T.

    The only difference is norm weights, which are in N but are elementwise, not matmuls.
    """
    cfg = preset(name)
    model = build(cfg, "meta")
    batch = 2
    tokens = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(tokens).sum().backward()
    measured = counter.get_total_flops() / (batch * seq_len)
    norm_params = cfg.dim * (2 * cfg.n_layers + 1)
    assert measured == cfg.flops_per_token(seq_len) - 6 * norm_params


def test_sliding_window_caps_the_attention_term():
    full, windowed = preset("tiny"), preset("tiny", sliding_window=16)
    attention = 12 * full.n_layers * full.n_heads * full.head_dim
    assert full.flops_per_token(128) - windowed.flops_per_token(128) == attention * (128 - 16)
    assert full.flops_per_token(8) == windowed.flops_per_token(8)


def test_derived_fields_resolve_and_rederive_on_override():
    cfg = ModelConfig(dim=512, n_layers=2, n_heads=8)
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.ffn_hidden_dim) == (8, 64, 1536)
    wider = preset("gpt2-124m", dim=1024, n_heads=16, ffn_hidden_dim=None)
    assert wider.head_dim == 64 and wider.ffn_hidden_dim == 2816


@pytest.mark.parametrize("data, message", [
    (dict(n_heads=6, n_kv_heads=4, dim=384, n_layers=2), "divisible by n_kv_heads"),
    (dict(dim=100, n_heads=8, n_layers=2), "divisible by n_heads"),
    (dict(dim=96, n_heads=4, head_dim=25, n_layers=2), "must be even"),
    (dict(n_head=4), "did you mean 'n_heads'"),
    (dict(n_layers=0), "out of range"),
    (dict(rope_scaling=dict(low_freq_factor=4.0, high_freq_factor=1.0)), "high_freq_factor"),
])
def test_invalid_configs_are_refused_with_a_reason(data, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.from_dict(ModelConfig, data)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(KeyError, match="tiny"):
        preset("huge")


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_ships_a_yaml_with_the_same_values(name):
    cfg = config_lib.load(ModelConfig, CONFIGS / f"{name}.yaml")
    assert cfg == preset(name)
    assert config_lib.from_dict(ModelConfig, config_lib.to_dict(cfg)) == cfg  # saved configs round-trip


SHAPE = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden_dim")


@pytest.mark.parametrize("depth, aspect_ratio, kv_group, shape", [
    (2, 64, 1, (128, 2, 2, 2, 64, 512)),
    (4, 64, 1, (256, 4, 4, 4, 64, 768)),
    (6, 64, 3, (384, 6, 6, 2, 64, 1024)),
    (12, 64, 1, (768, 12, 12, 12, 64, 2048)),
    (20, 64, 4, (1280, 20, 20, 5, 64, 3584)),
    (24, 128, 4, (3072, 24, 48, 12, 64, 8192)),
])
def test_depth_derives_the_whole_shape(depth, aspect_ratio, kv_group, shape):
    cfg = ModelConfig(vocab_size=100, depth=depth, aspect_ratio=aspect_ratio, kv_group=kv_group)
    assert tuple(getattr(cfg, name) for name in SHAPE) == shape


# every preset as the depth rule with its own constants
PRESETS_BY_DEPTH = {
    "tiny": dict(depth=2, aspect_ratio=32, head_dim=16, kv_group=2, ffn_multiple_of=64),
    "cpu-small": dict(depth=6, kv_group=3),
    "gpt2-124m": dict(depth=12),
    "1b": dict(depth=16, aspect_ratio=128, kv_group=4, ffn_ratio=4.0),
    "llama3-8b": dict(depth=32, aspect_ratio=128, head_dim=128, kv_group=4, ffn_ratio=3.5),
    "llama3-70b": dict(depth=80, aspect_ratio=102.4, head_dim=128, kv_group=8, ffn_ratio=3.5),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_the_depth_rule_unchanged_in_shape(name):
    given = {k: v for k, v in PRESETS[name].items() if k not in SHAPE}
    by_depth = ModelConfig(**given, **PRESETS_BY_DEPTH[name])
    assert tuple(getattr(by_depth, f) for f in SHAPE) == tuple(getattr(preset(name), f) for f in SHAPE)
    assert by_depth.num_params() == preset(name).num_params()


def test_depth_keeps_explicit_fields_and_a_saved_config_loads_back():
    cfg = ModelConfig(vocab_size=100, depth=4, n_kv_heads=1, ffn_hidden_dim=300)
    assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_hidden_dim) == (256, 4, 1, 300)
    assert config_lib.from_dict(ModelConfig, config_lib.to_dict(cfg)) == cfg


@pytest.mark.parametrize("fields, message", [
    (dict(depth=4, n_layers=5), "must equal depth"),
    (dict(depth=3, aspect_ratio=50), "not a multiple of head_dim"),
    (dict(depth=6, kv_group=4), "divisible by kv_group"),
    (dict(dim=64, n_heads=4), "missing: n_layers"),
])
def test_depth_rule_errors_name_the_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(vocab_size=100, **fields)


def test_the_gpt2_style_baseline_config_matches_cpu_small_in_parameters():
    """configs/train/baseline-gpt2.yaml: GELU MLP of 4·dim + LayerNorm, equal to cpu-small but for norm biases."""
    from llmray.train.pretrain import PretrainConfig

    baseline = config_lib.load(PretrainConfig, CONFIGS.parent / "train" / "baseline-gpt2.yaml").model
    recipe = preset("cpu-small")
    assert (baseline.mlp, baseline.norm, baseline.ffn_hidden_dim) == ("gelu", "layernorm", 1536)
    norm_biases = (2 * baseline.n_layers + 1) * baseline.dim
    assert baseline.num_params() == recipe.num_params() + norm_biases
    assert baseline.num_params() == _counted(build(baseline, "meta"))
    assert baseline.flops_per_token(256) - recipe.flops_per_token(256) == 6 * norm_biases
