"""Hugging Face export/import checked with the real client (transformers), both directions.

Exported models load in transformers' own classes (LlamaForCausalLM; Qwen3ForCausalLM for
QK-norm, which HF Llama lacks; MistralForCausalLM for a sliding window) and give the same logits
within 1e-4 in fp32; HF-initialized random models imported into llmray do too. Every weight,
norms included, is random, so a swapped or transposed tensor cannot hide.
"""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402

from llmray import cli  # noqa: E402
from llmray.model import hf  # noqa: E402
from llmray.model.config import RopeScaling, preset  # noqa: E402
from llmray.model.generate import SamplingConfig, generate  # noqa: E402
from llmray.model.llama import build  # noqa: E402

VOCAB = 320  # >= 256 byte-level symbols + 7 specials, for the tokenizer below
TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))

EXPORT_VARIANTS = {
    "gqa-untied": (dict(tie_embeddings=False), "LlamaForCausalLM"),
    "gqa-tied": (dict(tie_embeddings=True), "LlamaForCausalLM"),
    "mha-llama3-rope-scaling": (dict(n_kv_heads=4, rope_theta=500000.0, max_seq_len=64,
                                     rope_scaling=RopeScaling(factor=8.0, original_max_seq_len=32)),
                                "LlamaForCausalLM"),
    "qk-norm": (dict(qk_norm=True, tie_embeddings=False), "Qwen3ForCausalLM"),
    "sliding-window": (dict(sliding_window=6), "MistralForCausalLM"),
    "qk-norm-sliding-window": (dict(qk_norm=True, sliding_window=6), "Qwen3ForCausalLM"),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:  # norm weights: away from 1 so a misplaced norm shows
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * param.shape[-1] ** -0.5)


def _ours(overrides: dict, seed: int = 0):
    model = build(preset("tiny", vocab_size=VOCAB, **overrides)).eval()
    _randomize(model, seed)
    return model


def _hf_logits(path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    with torch.no_grad():
        return model(TOKENS).logits, type(model).__name__


@pytest.mark.parametrize("variant", list(EXPORT_VARIANTS))
def test_exported_model_matches_transformers(variant, tmp_path):
    overrides, architecture = EXPORT_VARIANTS[variant]
    model = _ours(overrides)
    hf.export(tmp_path / "export", model.cfg, model.state_dict())
    theirs, loaded_as = _hf_logits(tmp_path / "export")
    with torch.no_grad():
        ours = model(TOKENS)
    assert loaded_as == architecture
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    with safe_open(tmp_path / "export" / "model.safetensors", "pt") as weights:
        assert ("lm_head.weight" in weights.keys()) == (not model.cfg.tie_embeddings)


def test_options_under_test_change_the_logits():
    """The parity tests above would be blind if HF and we both ignored an option: we do not."""
    base = dict(n_kv_heads=4, rope_theta=500000.0, max_seq_len=64)
    with torch.no_grad():
        plain = _ours(base)(TOKENS)
        scaled = _ours({**base, "rope_scaling": RopeScaling(factor=8.0, original_max_seq_len=32)})(TOKENS)
        windowed = _ours({**base, "sliding_window": 6})(TOKENS)
    assert not torch.allclose(plain, scaled, atol=1e-3)
    assert not torch.allclose(plain[:, 6:], windowed[:, 6:], atol=1e-3)
    torch.testing.assert_close(plain[:, :6], windowed[:, :6])


def _hf_random(kind: str, seed: int, **options) -> torch.nn.Module:
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                  rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**common, **options})).eval()
    _randomize(model, seed)
    return model


@pytest.mark.parametrize("kind, options", [
    ("llama", dict(tie_word_embeddings=False)),
    ("llama", dict(tie_word_embeddings=True)),
    ("llama", dict(num_key_value_heads=1, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    ("qwen3", dict(tie_word_embeddings=False)),
    ("mistral", dict(sliding_window=5)),
], ids=["llama-untied", "llama-tied", "llama-mqa-rope-scaling", "qwen3-qk-norm", "mistral-sliding-window"])
def test_transformers_random_model_imports_with_equal_logits(kind, options, tmp_path):
    theirs = _hf_random(kind, seed=1, **options)
    theirs.save_pretrained(tmp_path / "hf")
    loaded = hf.load(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(TOKENS), theirs(TOKENS).logits, rtol=0, atol=1e-4)
    assert loaded.config.tie_embeddings == options.get("tie_word_embeddings", False)
    if loaded.config.tie_embeddings:
        assert loaded.model.output.weight is loaded.model.tok_embeddings.weight


def test_slices_of_a_multi_file_bf16_checkpoint_are_read_without_the_rest(tmp_path):
    """What a sharded rank asks for: a block of rows (FSDP2), of columns (TP) or of a norm, from a
    checkpoint split over several files and stored in bf16; ``load`` takes the same path."""
    theirs = _hf_random("llama", seed=3, tie_word_embeddings=False).to(torch.bfloat16)
    theirs.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 2
    state = {hf.from_hf_name(name): tensor for name, tensor in theirs.state_dict().items()}
    config = hf.read_config(tmp_path / "hf")
    slices = hf.WeightSlices(tmp_path / "hf", config)
    for name, offset, size in [("layers.1.attention.wq.weight", (8, 0), (16, config.dim)),
                               ("layers.0.feed_forward.w2.weight", (0, 40), (config.dim, 24)),
                               ("output.weight", (100, 0), (1, config.dim)),
                               ("layers.1.ffn_norm.weight", (5,), (7,))]:
        full = state[name]
        got = slices(name, tuple(full.shape), offset, size)
        want = full[tuple(slice(o, o + n) for o, n in zip(offset, size))]
        assert got.dtype == torch.bfloat16 and torch.equal(got, want), name
    loaded = hf.load(tmp_path / "hf").model
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, state[name].float()), name


def test_import_refuses_what_the_model_cannot_represent(tmp_path):
    theirs = _hf_random("llama", seed=2)
    theirs.save_pretrained(tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    original = json.loads(config_path.read_text())
    for change, message in [({"attention_bias": True}, "attention_bias=True is not supported"),
                            ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
                            ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
                            ({"num_hidden_layers": 3}, "missing .*model.layers.2"),
                            ({"intermediate_size": 128}, "size mismatch for layers.0.feed_forward.w1.weight")]:
        config_path.write_text(json.dumps({**original, **change}))
        with pytest.raises(hf.HFFormatError, match=message):
            hf.load(tmp_path / "hf")


def test_export_refuses_a_partial_state_dict(tmp_path):
    model = _ours({})
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("layers.1.")}
    with pytest.raises(ValueError, match="missing"):
        hf.export(tmp_path / "export", model.cfg, state)
    assert not (tmp_path / "export").exists()


# ---------------------------------------------------------------------------------------------
# Tokenizer files, special tokens, and the generate / chat commands on an export
# ---------------------------------------------------------------------------------------------

CHAT_SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog", "hello world, héllo wörld", "def f(x): return x"] * 20
    tokenizer.train_from_iterator(text, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=CHAT_SPECIALS,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert tokenizer.get_vocab_size() <= VOCAB
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}))
    return path


@pytest.fixture(scope="module")
def exported(tokenizer_dir, tmp_path_factory):
    model = _ours({"tie_embeddings": False}, seed=3)
    path = tmp_path_factory.mktemp("model") / "export"
    hf.export(path, model.cfg, model.state_dict(), tokenizer_dir=tokenizer_dir)
    return path


def test_export_copies_tokenizer_and_names_special_tokens(exported, tokenizer_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (exported / name).read_bytes() == (tokenizer_dir / name).read_bytes()
    assert json.loads((exported / "generation_config.json").read_text()) == {
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    config = json.loads((exported / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 1, 2)
    special = hf.load(exported).special_tokens
    assert special == hf.SpecialTokens(bos_token_id=0, eos_token_ids=[1], pad_token_id=2)
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(exported)
    assert fast.eos_token_id == 1


def test_special_tokens_in_added_token_form_and_unknown_ones(tokenizer_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"eos_token": {"__type": "AddedToken", "content": "<|end|>"}}))
    assert hf.special_tokens_from_tokenizer(tmp_path) == hf.SpecialTokens(eos_token_ids=[6])
    config.write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(hf.HFFormatError, match="bos_token '<s>' is not a token of"):
        hf.special_tokens_from_tokenizer(tmp_path)


def _run_cli(argv, monkeypatch, stdin: str = "") -> str:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert cli.main(argv) == 0
    return out.getvalue()


def test_generate_command_streams_the_greedy_completion(exported, monkeypatch):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(exported / "tokenizer.json"))
    loaded = hf.load(exported)
    prompt = [0] + tokenizer.encode("the quick brown").ids
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0, stop_tokens=[1, 0])  # EOS, BOS end a document
    expected = generate(loaded.model, [prompt], greedy)
    text = _run_cli(["generate", "--model", str(exported), "--prompt", "the quick brown", "--temperature", "0",
                     "--max-new-tokens", "12"], monkeypatch)
    assert text == tokenizer.decode(expected[0], skip_special_tokens=True) + "\n"
    assert expected[0]  # something was generated


def test_chat_command_renders_with_the_chat_template(exported, monkeypatch):
    chat = pytest.importorskip("llmray.tokenizer.chat")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(exported / "tokenizer.json"))
    template = chat.ChatTemplate(tokenizer)
    loaded = hf.load(exported)
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.0, stop_tokens=list(template.stop_ids))
    first = generate(loaded.model, [template.render([{"role": "user", "content": "hello"}],
                                                     add_generation_prompt=True).ids], cfg)[0]
    reply = tokenizer.decode(first, skip_special_tokens=True)
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": reply},
               {"role": "user", "content": "the fox"}]
    second = generate(loaded.model, [template.render(history, add_generation_prompt=True).ids], cfg)[0]
    text = _run_cli(["chat", "--model", str(exported), "--temperature", "0", "--max-new-tokens", "10"],
                    monkeypatch, stdin="hello\nthe fox\n")
    assert text == reply + "\n" + tokenizer.decode(second, skip_special_tokens=True) + "\n"


def test_text_stream_holds_back_incomplete_characters(tokenizer_dir):
    from tokenizers import Tokenizer

    from llmray.model.generate_cli import TextStream

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    first_byte, second_byte = (tokenizer.token_to_id(symbol) for symbol in ("Ã", "¶"))  # "ö" = c3 b6
    text = TextStream(tokenizer)
    assert text.push(tokenizer.token_to_id("w")) == "w"
    assert text.push(first_byte) == ""
    assert text.push(second_byte) == "ö"
    assert text.push(first_byte) == ""
    assert text.finish() == "\ufffd"  # never completed: shown as the replacement character at the end


def test_generate_command_on_a_directory_without_a_model_says_why(tmp_path, tokenizer_dir):
    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    with pytest.raises(SystemExit, match="has no config.json: not a model directory"):
        cli.main(["generate", "--model", str(tmp_path), "--prompt", "x"])


def test_generate_command_runs_several_prompts_as_one_batch(exported, monkeypatch):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(exported / "tokenizer.json"))
    loaded = hf.load(exported)
    texts = ["hello", "the lazy dog jumps"]
    prompts = [[0] + tokenizer.encode(text).ids for text in texts]
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.0, stop_tokens=[5])
    expected = [tokenizer.decode(c, skip_special_tokens=True) for c in generate(loaded.model, prompts, cfg)]
    output = _run_cli(["generate", "--model", str(exported), "--prompt", texts[0], "--prompt", texts[1],
                       "--temperature", "0", "--max-new-tokens", "8", "--stop-token", "5"], monkeypatch)
    assert output == "".join(line + "\n" for line in expected)
