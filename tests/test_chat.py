"""The chat format and SFT's assistant-only loss mask."""

import pytest

from ternchat.data.chat import completion_prompt, render_conversation
from ternchat.data.errors import DataError
from ternchat.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["fn main() { println!(\"hi\"); }\n" * 20, "Write a function that adds."] * 5, 300)


CONVERSATION = [{"role": "system", "content": "You write Rust."},
                {"role": "user", "content": "Write a function that adds."},
                {"role": "assistant", "content": "fn add(a: i32, b: i32) -> i32 { a + b }"},
                {"role": "user", "content": "Now main."},
                {"role": "assistant", "content": "fn main() {}"}]


def test_mask_covers_exactly_the_assistant_replies_and_their_end(tok):
    ids, mask = render_conversation(CONVERSATION, tok)
    assert len(ids) == len(mask) and ids[0] == tok.bos_id
    trained = [i for i, m in zip(ids, mask) if m]
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    end = tok.special("<|assistant_end|>")
    expected = [t for r in replies for t in tok.encode(r) + [end]]
    assert trained == expected
    start = tok.special("<|assistant_start|>")
    assert all(m == 0 for i, m in zip(ids, mask) if i == start)
    assert tok.decode(ids).count("<|user_start|>") == 2


def test_completion_prompt_ends_with_the_assistant_start(tok):
    ids = completion_prompt(CONVERSATION[:2], tok)
    assert ids[-1] == tok.special("<|assistant_start|>")
    assert ids[:-1] == render_conversation(CONVERSATION[:2], tok)[0]
    with pytest.raises(DataError, match="end with a user message"):
        completion_prompt(CONVERSATION[:3], tok)


@pytest.mark.parametrize("messages, error", [
    ([], "at least one"),
    ([{"role": "bot", "content": "x"}], "not one of"),
    ([{"role": "user", "content": 3}], "must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only come first"),
    ([{"role": "assistant", "content": "a"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
])
def test_bad_conversations_are_clear_errors(tok, messages, error):
    with pytest.raises(DataError, match=error):
        render_conversation(messages, tok)
