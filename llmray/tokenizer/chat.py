"""THE chat format: the one contract SFT, DPO, eval, generate and chat use to turn messages into ids.

A conversation renders as::

    <|bos|><|system|>{system}<|end|><|user|>{user}<|end|><|assistant|>{assistant}<|end|>...

Design choices:

* Role headers and the end-of-turn marker are **single special tokens**, not text, so a turn
  boundary can never be produced by ordinary text and the model learns one id per boundary.
* Contents are encoded with special-token matching **off**: a user typing ``<|assistant|>``
  gets the characters, not the control token (prompt-injection of turn boundaries is
  impossible through :meth:`ChatTemplate.render`).
* ``assistant_mask`` is 1 on the tokens an assistant turn produced: its content and its closing
  ``<|end|>`` (so the model learns to stop), 0 on BOS, headers, and system/user turns. SFT uses
  it as the loss mask, DPO to find the completion.
* Generation stops at ``<|end|>`` (:attr:`ChatTemplate.stop_ids`); a prompt for generation
  ends with the ``<|assistant|>`` header (``add_generation_prompt=True``).
* The same format is exported as a Jinja ``chat_template`` (:data:`JINJA_TEMPLATE`) in
  ``tokenizer_config.json``, with ``{% generation %}`` around assistant output, so
  ``transformers``' ``apply_chat_template`` (and its ``return_assistant_tokens_mask``) gives the
  same ids and mask for ordinary messages (tested). The Jinja path renders a string and
  re-tokenizes it, so unlike :meth:`render` it *would* turn special-token text inside a message
  into control tokens; use :meth:`render` in this project.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"

ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
# Order fixes the ids: specials take ids 0..6 of every tokenizer this project trains.
SPECIAL_TOKENS = (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END)

JINJA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + '; expected system, user or assistant') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% else %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class ChatFormatError(ValueError):
    """A conversation does not fit the chat format; the message names the turn and the problem."""


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation: token ids and the 0/1 mask of assistant-produced tokens."""

    ids: list[int]
    assistant_mask: list[int]

    def __iter__(self):  # allows ``ids, mask = template.render(...)``
        return iter((self.ids, self.assistant_mask))


class ChatTemplate:
    """Renders conversations with a ``tokenizers.Tokenizer`` trained by this project."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids = {}
        for token in SPECIAL_TOKENS:
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ChatFormatError(f"tokenizer has no special token {token}; "
                                      f"train it with llmray.tokenizer.train (needs {list(SPECIAL_TOKENS)})")
            self._ids[token] = token_id

    @classmethod
    def from_file(cls, tokenizer_json: str) -> "ChatTemplate":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(tokenizer_json)))

    @property
    def bos_id(self) -> int:
        return self._ids[BOS]

    @property
    def end_id(self) -> int:
        return self._ids[END]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end an assistant turn during generation."""
        return (self._ids[END], self._ids[EOS])

    def encode_text(self, text: str) -> list[int]:
        """Ids of plain text, with special-token strings treated as ordinary characters."""
        previous = self._tokenizer.encode_special_tokens
        self._tokenizer.encode_special_tokens = True
        try:
            return self._tokenizer.encode(text, add_special_tokens=False).ids
        finally:
            self._tokenizer.encode_special_tokens = previous

    def render(self, messages: Iterable[Mapping[str, str]], add_generation_prompt: bool = False) -> Rendered:
        """Ids and assistant mask of ``messages`` (each ``{"role": ..., "content": ...}``)."""
        ids = [self._ids[BOS]]
        mask = [0]
        for index, message in enumerate(messages):
            role, content = _check_message(index, message)
            content_ids = self.encode_text(content) + [self._ids[END]]
            ids.append(self._ids[ROLE_TOKENS[role]])
            mask.append(0)
            ids.extend(content_ids)
            mask.extend([1 if role == "assistant" else 0] * len(content_ids))
        if add_generation_prompt:
            ids.append(self._ids[ASSISTANT])
            mask.append(0)
        return Rendered(ids, mask)


def _check_message(index: int, message: Mapping[str, str]) -> tuple[str, str]:
    if not isinstance(message, Mapping):
        raise ChatFormatError(f"message {index} is a {type(message).__name__}, expected a mapping "
                              f"with 'role' and 'content'")
    role = message.get("role")
    if role not in ROLE_TOKENS:
        raise ChatFormatError(f"message {index} has role {role!r}; expected one of {list(ROLE_TOKENS)}")
    content = message.get("content")
    if not isinstance(content, str):
        raise ChatFormatError(f"message {index} ({role}) has content of type {type(content).__name__}, "
                              f"expected a string")
    return role, content
