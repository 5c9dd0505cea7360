"""The chat format: conversations as token ids with the tokenizer's role tokens, and the loss mask
of supervised fine-tuning (the assistant's tokens only), as nanochat renders its conversations.

    <|bos|> [<|system_start|> system <|system_end|>]
            <|user_start|> user <|user_end|> <|assistant_start|> reply <|assistant_end|> ...

Roles alternate user / assistant after an optional first system message. The mask is 1 on each
reply's tokens and on its <|assistant_end|> (the model learns to stop), 0 everywhere else, the
role tokens that open a reply included. `completion_prompt` renders a conversation that ends with
a user turn, followed by <|assistant_start|>, for the model to reply to.
"""

from __future__ import annotations

from typing import Sequence

from ternchat.data.errors import DataError
from ternchat.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
CHAT_FORMAT = "ternchat-roles-1"  # the rendering above; a packed model file records the one it was trained with


def _check(messages: Sequence[dict]) -> None:
    if not messages:
        raise DataError("a conversation needs at least one message")
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"message {i}: content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise DataError(f"message {i}: a system message may only come first")
    turns = [m["role"] for m in messages if m["role"] != "system"]
    for i, role in enumerate(turns):
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise DataError(f"turn {i} is {role!r}: after the optional system message, turns alternate user, "
                            "assistant, user, ...")


def render_conversation(messages: Sequence[dict], tok: Tokenizer) -> tuple[list[int], list[int]]:
    """(ids, mask) of a whole conversation; mask 1 marks the tokens SFT trains on."""
    _check(messages)
    ids, mask = [tok.bos_id], [0]

    def add(tokens: list[int], train: bool) -> None:
        ids.extend(tokens)
        mask.extend([int(train)] * len(tokens))

    for message in messages:
        role = message["role"]
        add([tok.special(f"<|{role}_start|>")], False)
        add(tok.encode(message["content"]) + [tok.special(f"<|{role}_end|>")], role == "assistant")
    return ids, mask


def completion_prompt(messages: Sequence[dict], tok: Tokenizer) -> list[int]:
    """A conversation ending with a user turn, then <|assistant_start|>: the model writes the reply."""
    _check(messages)
    if messages[-1]["role"] != "user":
        raise DataError("the conversation to reply to must end with a user message")
    ids, _ = render_conversation(messages, tok)
    return ids + [tok.special("<|assistant_start|>")]
