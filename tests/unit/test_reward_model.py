"""The reward model: Bradley-Terry loss and gradients against a per-pair reference, the scalar-head
initialisation from an LM, and the export as Hugging Face LlamaForSequenceClassification."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmray.align.pairs import PairRows
from llmray.model import hf, llama, param_init
from llmray.model.config import preset
from llmray.rl.reward_model import BradleyTerry, RewardPairs, ScalarHeadInit

VOCAB = 97


def score_model(seed: int = 0) -> llama.Transformer:
    torch.manual_seed(seed)
    return llama.build(preset("tiny", vocab_size=VOCAB, max_seq_len=64, tie_embeddings=False, head="score"))


@pytest.fixture
def pairs() -> RewardPairs:
    """5 pairs of right-padded sequences of different lengths (pad id 0)."""
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(4, 20, (10,), generator=gen).numpy()
    tokens = np.zeros((10, 21), dtype=np.int64)
    for row, length in enumerate(lengths):
        tokens[row, :length] = torch.randint(3, VOCAB, (int(length),), generator=gen).numpy()
    return RewardPairs(PairRows(tokens, tokens > 0, lengths.astype(np.int64), [f"p{i}" for i in range(5)]))


def reference_loss(model, pairs: RewardPairs, rows: list[int]) -> torch.Tensor:
    """Each sequence scored alone (no padding), −log σ(r_c − r_r) averaged over the pairs."""
    def reward(index: int) -> torch.Tensor:
        sequence = torch.from_numpy(pairs.rows.tokens[index, :pairs.rows.lengths[index]])[None]
        return model(sequence)[0, -1, 0]
    n = len(pairs)
    return torch.stack([-F.logsigmoid(reward(i) - reward(i + n)) for i in rows]).mean()


def test_bradley_terry_loss_and_gradients_equal_the_reference(pairs):
    model = score_model()
    objective = BradleyTerry()
    batch = {k: torch.from_numpy(v) for k, v in pairs.batch(np.array([0, 1, 2, 3, 4, -1])).items()}
    assert batch["valid"].tolist() == [1, 1, 1, 1, 1, 0]
    out = objective.loss(model, batch)
    assert out.weight == 5
    (out.loss_sum / out.weight).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want = reference_loss(model, pairs, [0, 1, 2, 3, 4])
    want.backward()
    assert float(out.loss_sum.detach() / out.weight) == pytest.approx(float(want.detach()), abs=1e-6)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(got[name], parameter.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_scalar_head_keeps_the_lm_body_and_seeds_the_head(tmp_path):
    torch.manual_seed(0)
    lm = llama.build(preset("tiny", vocab_size=VOCAB, max_seq_len=64))  # tied embeddings, like the presets
    directory = hf.export(tmp_path / "lm", lm.cfg, lm.state_dict())
    source = ScalarHeadInit(str(directory))

    def built(seed):
        model, cfg, values = source.build(seed=seed)
        assert all(p.device.type == "meta" for p in model.parameters())  # each rank fills only its part
        param_init.materialize(model, torch.device("cpu"), values)
        return model, cfg
    model, cfg = built(5)
    assert cfg.head == "score" and not cfg.tie_embeddings and model.output.weight.shape == (1, lm.cfg.dim)
    for name, tensor in lm.state_dict().items():
        if name != "output.weight":
            torch.testing.assert_close(model.state_dict()[name], tensor, msg=name)
    again, _ = built(5)
    other, _ = built(6)
    assert torch.equal(again.output.weight, model.output.weight)
    assert not torch.equal(other.output.weight, model.output.weight)
    assert 0.5 * cfg.init_std < float(model.output.weight.detach().std()) < 2 * cfg.init_std


def test_export_is_a_sequence_classifier_that_transformers_scores_alike(pairs, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = score_model()
    directory = hf.export(tmp_path / "rm", model.cfg, model.state_dict(), special_tokens=hf.SpecialTokens(pad_token_id=0))
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    loaded = hf.load(directory).model
    assert loaded.cfg.head == "score"
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(str(directory)).eval()
    tokens = torch.from_numpy(pairs.rows.tokens[:6, :20])
    last = torch.from_numpy(pairs.rows.lengths[:6] - 1).clamp(max=19)
    with torch.no_grad():
        ours = loaded(tokens)[..., 0].gather(1, last[:, None])[:, 0]
        hf_scores = theirs(input_ids=tokens, attention_mask=(tokens != 0).long()).logits[:, 0]
    torch.testing.assert_close(ours, hf_scores, atol=1e-5, rtol=1e-4)
