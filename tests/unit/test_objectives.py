import math

import torch
import torch.nn.functional as F

from llmray.model import llama
from llmray.model.config import preset
from llmray.train.objectives import IGNORE_INDEX, CausalLM, bits_per_byte, token_cross_entropy


def test_causal_lm_sums_next_token_loss_over_every_target():
    """The objective asks the model for its fused loss; it equals cross-entropy on the model's logits."""
    torch.manual_seed(0)
    model, batch = llama.build(preset("tiny", vocab_size=11, max_seq_len=16)), torch.randint(0, 11, (3, 9))
    out = CausalLM().loss(model, batch)
    assert out.weight == 3 * 8
    logits = model(batch[:, :-1])
    expected = F.cross_entropy(logits.reshape(-1, 11), batch[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(out.loss_sum, expected)


def test_ignored_targets_cost_nothing():
    logits = torch.randn(1, 3, 5)
    targets = torch.tensor([[1, IGNORE_INDEX, 2]])
    nats = token_cross_entropy(logits, targets)
    assert nats[0, 1] == 0 and nats[0, 0] > 0


def test_bits_per_byte_leaves_out_zero_byte_tokens():
    nats = torch.tensor([[math.log(2), 5.0, 2 * math.log(2)]])
    targets = torch.tensor([[1, 0, 2]])  # token 0 is a special token of 0 bytes
    token_bytes = torch.tensor([0, 1, 3])
    bits, nbytes = bits_per_byte(nats, targets, token_bytes)
    assert nbytes == 4
    assert math.isclose(bits, 3.0, rel_tol=1e-6)  # 1 bit + 2 bits; the special token's 5 nats are not counted


def test_z_loss_adds_the_squared_normalizer_of_each_counted_token_and_pulls_it_to_zero():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7) * 3 + 5  # normalizers far from zero
    targets = torch.tensor([[1, 2, IGNORE_INDEX, 3], [4, 5, 6, 0]])
    counted = targets != IGNORE_INDEX
    expected = F.cross_entropy(logits[counted], targets[counted], reduction="sum") \
        + 1e-2 * (logits.logsumexp(-1)[counted] ** 2).sum()
    torch.testing.assert_close(CausalLM(z_loss=1e-2).pipeline_loss(logits, targets), expected)
    torch.testing.assert_close(CausalLM().pipeline_loss(logits, targets),
                               F.cross_entropy(logits[counted], targets[counted], reduction="sum"))
    # training with it alone drives logsumexp toward 0 while the plain loss ignores it
    shifted = logits.clone().requires_grad_(True)
    (CausalLM(z_loss=1.0).pipeline_loss(shifted, targets) - CausalLM().pipeline_loss(shifted, targets)).backward()
    assert (shifted.grad[counted].sum(-1) > 0).all()  # a gradient step lowers every counted normalizer


def test_the_pretrain_config_hands_its_z_loss_to_the_objective(tmp_path):
    from llmray.model.config import preset
    from llmray.train.pretrain import PretrainConfig, PretrainTrainConfig, TokensInput, pretrain_job
    from tests.train_support import stdlib_texts, write_byte_shards

    shards = write_byte_shards(tmp_path / "shards", stdlib_texts(4))
    cfg = PretrainConfig(model=preset("tiny", vocab_size=257), data=TokensInput(str(shards)),
                         train=PretrainTrainConfig(z_loss=1e-4))
    assert pretrain_job(cfg, tmp_path / "c", None).objective.z_loss == 1e-4
