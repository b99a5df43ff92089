"""A chat model's export stops transformers' ``generate`` at the end of the assistant's turn.

A tiny model is fitted (plain AdamW on one real conversation, loss on the assistant's tokens as
in SFT) until greedy decoding reproduces the reply and its closing ``<|end|>``. Exported the way
SFT/DPO export (from a DCP checkpoint, ``chat=True``), ``generate`` with the export's own
generation_config.json stops right after ``<|end|>``; the same weights exported as a base model
(``eos_token_id`` = ``<|eos|>`` only) run on past the turn, which is the bug this guards against.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp

transformers = pytest.importorskip("transformers")
from llmray.model import hf  # noqa: E402
from llmray.tokenizer import chat  # noqa: E402
from llmray.train.launch import export_checkpoint  # noqa: E402
from tests.align_support import template, tiny_model, tokenizer_dir  # noqa: E402

CONVERSATION = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is Paris."}]
MAX_NEW_TOKENS = 24


def fitted_model(ids: list[int], mask: list[int]):
    """The tiny model trained until it predicts every assistant token of ``ids`` greedily."""
    model = tiny_model(seed=0)
    inputs, targets = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    targets[0, torch.tensor(mask[1:]) == 0] = -100  # loss on the assistant's reply and its <|end|>
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 1e-3:
            break
    return model.eval()


def generated(model_dir, prompt: list[int]) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_generate_stops_at_the_end_of_the_turn_of_a_chat_export(shared_data, tmp_path):
    chat_template = template(shared_data)
    ids, mask = chat_template.render(CONVERSATION)
    prompt = chat_template.render(CONVERSATION[:1], add_generation_prompt=True).ids
    reply = ids[len(prompt):]  # the assistant's tokens, ending with <|end|>
    assert reply[-1] == chat_template.end_id
    model = fitted_model(ids, mask)
    checkpoint = tmp_path / "step_00000001"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(checkpoint), no_dist=True)

    export_checkpoint(checkpoint, model.cfg, tmp_path / "sft", str(tokenizer_dir(shared_data)), chat=True)
    generation = json.loads((tmp_path / "sft" / hf.GENERATION_CONFIG_FILE).read_text())
    eos = chat_template._tokenizer.token_to_id(chat.EOS)
    assert generation["eos_token_id"] == [chat_template.end_id, eos]
    assert generated(tmp_path / "sft", prompt) == reply  # the reply, <|end|>, and nothing after

    export_checkpoint(checkpoint, model.cfg, tmp_path / "base", str(tokenizer_dir(shared_data)))
    assert json.loads((tmp_path / "base" / hf.GENERATION_CONFIG_FILE).read_text())["eos_token_id"] == eos
    past_the_turn = generated(tmp_path / "base", prompt)
    assert past_the_turn[:len(reply)] == reply and len(past_the_turn) == MAX_NEW_TOKENS


def test_a_chat_export_needs_the_tokenizer_that_defines_end_of_turn(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="end-of-turn id from tokenizer_dir"):
        hf.export(tmp_path / "m", model.cfg, model.state_dict(), chat=True)
