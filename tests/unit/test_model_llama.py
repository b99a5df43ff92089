"""The Transformer: causality, sliding window, KV-cache prefill, init, meta build, pipeline split."""

from __future__ import annotations

import math

import pytest
import torch

from llmray.model.config import RopeScaling, preset
from llmray.model.llama import build, rope_frequencies

VARIANTS = {
    "gqa-tied": dict(),
    "mha-untied": dict(n_kv_heads=4, tie_embeddings=False),
    "qk-norm": dict(qk_norm=True),
    "sliding-window": dict(sliding_window=5),
}


def _model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build(preset("tiny", vocab_size=128, **overrides)).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_changing_token_t_never_changes_earlier_logits(variant):
    model = _model(**VARIANTS[variant])
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(tokens)
        for t in (0, 7, 23):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1) % 128
            after = model(changed)
            torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
            assert not torch.allclose(after[:, t], before[:, t])  # the test can see a change


def test_one_layer_sliding_window_sees_exactly_the_window():
    """With one layer, token t reaches positions t .. t+W-1 and nothing after."""
    window = 4
    model = _model(n_layers=1, sliding_window=window)
    tokens = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(2))
    changed = tokens.clone()
    changed[0, 6] = (changed[0, 6] + 1) % 128
    with torch.no_grad():
        diff = (model(tokens) - model(changed)).abs().amax(dim=-1)[0]  # (T,)
    assert torch.all(diff[:6] == 0)
    assert torch.all(diff[6:6 + window] > 0)
    assert torch.all(diff[6 + window:] == 0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_prefill_in_chunks_equals_one_forward(variant):
    model = _model(**VARIANTS[variant])
    tokens = torch.randint(0, 128, (2, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(batch_size=2, max_len=32)
        pieces = [model(tokens[:, a:b], cache=cache) for a, b in ((0, 9), (9, 10), (10, 21))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cache_rows_at_different_lengths_each_compute_what_they_compute_alone():
    """Rows of one cache are separate sequences: prefilled in separate passes to different lengths,
    then extended together (different slots and positions per row), each equals its full forward;
    a row moved into another's place carries on from there."""
    model = _model(sliding_window=5)
    short = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(4))
    long = torch.randint(0, 128, (1, 11), generator=torch.Generator().manual_seed(5))
    extra = torch.randint(0, 128, (2, 3), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        cache = model.new_cache(batch_size=3, max_len=8)
        model(long[:, :8], cache=cache.rows(1, 2))
        cache.grow(16)
        model(long[:, 8:], cache=cache.rows(1, 2))
        model(short, cache=cache.rows(2, 3))
        cache.move_row(2, 0)
        assert cache.lengths[:2] == [6, 11]
        together = model(extra, cache=cache.rows(0, 2))
        torch.testing.assert_close(together[0], model(torch.cat([short, extra[:1]], dim=1))[0, 6:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(together[1], model(torch.cat([long, extra[1:]], dim=1))[0, 11:], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="KV cache full"):
            model(torch.zeros(2, 3, dtype=torch.long), cache=cache.rows(0, 2))


@pytest.mark.parametrize("variant", ["gqa-tied", "sliding-window"])
def test_packed_documents_compute_what_each_computes_alone(variant):
    model = _model(**VARIANTS[variant])
    first, second = torch.randint(0, 128, (1, 9)), torch.randint(0, 128, (1, 7))
    segments = torch.tensor([[0] * 9 + [1] * 7])
    with torch.no_grad():
        packed = model(torch.cat([first, second], dim=1), segment_ids=segments)
        torch.testing.assert_close(packed[:, :9], model(first), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed[:, 9:], model(second), rtol=1e-5, atol=1e-5)


def test_return_hidden_gives_the_head_input():
    model = _model(tie_embeddings=False)
    tokens = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        hidden = model(tokens, return_hidden=True)
        assert hidden.shape == (2, 8, 64)
        torch.testing.assert_close(hidden @ model.output.weight.T, model(tokens))


def test_pipeline_stages_hold_subsets_under_unchanged_names():
    full = _model(n_layers=4, tie_embeddings=False)
    first, second = _model(n_layers=4, tie_embeddings=False), _model(n_layers=4, tie_embeddings=False)
    for stage in (first, second):
        stage.load_state_dict(full.state_dict())
    for name in ("2", "3"):
        del first.layers[name]
    first.norm = first.output = None
    for name in ("0", "1"):
        del second.layers[name]
    second.tok_embeddings = None
    full_keys = set(full.state_dict())
    assert set(first.state_dict()) | set(second.state_dict()) == full_keys
    assert not set(first.state_dict()) & set(second.state_dict())
    tokens = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        hidden = first(tokens)
        assert hidden.shape == (2, 12, 64)
        torch.testing.assert_close(second(hidden), full(tokens))


def test_meta_build_then_init_scales_residual_projections():
    cfg = preset("tiny", dim=256, n_heads=4, n_kv_heads=4, n_layers=8, ffn_hidden_dim=512, qk_norm=True)
    torch.manual_seed(0)
    model = build(cfg)
    assert not any(p.is_meta for p in model.parameters())
    assert model.output.weight is model.tok_embeddings.weight
    layer = model.layers["5"]
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    assert layer.attention.wq.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert layer.feed_forward.w1.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert layer.attention.wo.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert layer.feed_forward.w2.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    for norm in (layer.attention_norm, layer.ffn_norm, layer.attention.q_norm, model.norm):
        assert torch.all(norm.weight == 1)


def test_bfloat16_model_keeps_ties_and_runs():
    model = build(preset("tiny", vocab_size=128), dtype=torch.bfloat16)
    assert model.output.weight is model.tok_embeddings.weight
    assert model(torch.randint(0, 128, (1, 8))).dtype == torch.bfloat16


def test_sequence_longer_than_max_seq_len_is_refused():
    model = _model(max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_llama3_rope_scaling_stretches_only_long_wavelengths():
    base = rope_frequencies(128, 500000.0, None)
    scaled = rope_frequencies(128, 500000.0, RopeScaling(factor=8.0))
    wavelength = 2 * math.pi / base
    short, long = wavelength < 8192 / 4, wavelength > 8192
    torch.testing.assert_close(scaled[short], base[short])
    torch.testing.assert_close(scaled[long], base[long] / 8)
    middle = ~short & ~long
    assert middle.any() and torch.all((scaled[middle] < base[middle]) & (scaled[middle] > base[middle] / 8))


@pytest.mark.gpu
def test_cuda_forward_and_kv_cache_match_cpu():
    model = _model(sliding_window=6, qk_norm=True)
    tokens = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = model(tokens)
        on_gpu = model.to("cuda")
        torch.testing.assert_close(on_gpu(tokens.cuda()).cpu(), expected, rtol=1e-3, atol=1e-3)
        cache = on_gpu.new_cache(batch_size=2, max_len=20)
        pieces = [on_gpu(tokens[:, a:b].cuda(), cache=cache) for a, b in ((0, 12), (12, 13), (13, 20))]
    torch.testing.assert_close(torch.cat(pieces, dim=1).cpu(), expected, rtol=1e-3, atol=1e-3)


def test_gpt2_style_blocks_are_a_gelu_mlp_and_layernorm_and_refuse_the_llama_export(tmp_path):
    from llmray.model import hf

    cfg = preset("tiny", mlp="gelu", norm="layernorm", ffn_hidden_dim=None, vocab_size=50)
    torch.manual_seed(0)
    model = build(cfg)
    block = model.layers["0"]
    assert block.feed_forward.w3 is None and cfg.ffn_hidden_dim == 4 * cfg.dim
    x = torch.randn(2, 5, cfg.dim)
    ff = block.feed_forward
    assert torch.allclose(ff(x), ff.w2(torch.nn.functional.gelu(ff.w1(x), approximate="tanh")))
    with torch.no_grad():
        block.attention_norm.weight.uniform_(0.5, 1.5)
        block.attention_norm.bias.uniform_(-0.5, 0.5)
    reference = torch.nn.functional.layer_norm(x, (cfg.dim,), block.attention_norm.weight,
                                               block.attention_norm.bias, cfg.norm_eps)
    assert torch.allclose(block.attention_norm(x), reference, atol=1e-6)
    loss = model(torch.randint(0, 50, (2, 8))).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="no Hugging Face Llama layout"):
        hf.export(tmp_path / "out", cfg, model.state_dict())


@pytest.mark.parametrize("shape", [(16, 24), (2, 9, 24), (3, 1, 24), (70, 24)], ids=["16-rows", "18-rows-3d", "3-rows", "70-rows"])
def test_linear_few_row_inference_product_equals_the_plain_one(shape):
    """The transposed product for 16-55 rows at inference computes what ``F.linear`` does, in every
    input shape, and training keeps autograd's plain path."""
    from llmray.model.llama import Linear

    torch.manual_seed(0)
    layer = Linear(24, 40, bias=False)
    x = torch.randn(*shape)
    with torch.no_grad():
        out = layer(x)
    assert out.shape == (*shape[:-1], 40) and out.is_contiguous()
    torch.testing.assert_close(out, torch.nn.functional.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
    trained = layer(x.requires_grad_())
    trained.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_building_a_model_leaves_torch_distributed_tensor_unimported():
    """Importing ``torch.distributed.tensor`` costs a process ~0.6 s; rollout and eval actors, servers
    and the generate CLI build single-process models, so the model code imports it only on the DTensor
    paths (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys, torch; from llmray.model import llama; from llmray.model.config import preset; "
            "model = llama.build(preset('tiny', vocab_size=256)); "
            "model(torch.zeros(1, 4, dtype=torch.long), targets=torch.zeros(1, 4, dtype=torch.long)).backward(); "
            "print('torch.distributed.tensor' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
