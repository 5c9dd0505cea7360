"""`ternchat chat`: multi-turn sessions in the chat format, UTF-8 safe streaming, and the terminal command."""

import subprocess
import sys

from ternchat.eval.chat import ChatSession, Sampling, stream_text
from ternchat.eval.engine import chat_reply
from ternchat.runs import load_model_and_tokenizer


def test_streaming_never_splits_a_character(task_tokenizer):
    ids = task_tokenizer.encode("é → ✓")
    assert len(ids) > 3  # multi-byte characters arrive as several byte tokens
    pieces = list(stream_text(iter(ids), task_tokenizer))
    assert "".join(pieces) == "é → ✓" and "\ufffd" not in "".join(pieces)


def test_a_session_keeps_the_turns_and_replies_as_the_engine_does(tmp_path, pretrained_run):
    model, tok = load_model_and_tokenizer(pretrained_run(tmp_path))
    session = ChatSession(model, tok, chat_format=True, sampling=Sampling(max_tokens=6, temperature=0.0),
                          system="You write Rust.")
    first = "".join(session.reply("fn add"))
    assert first == chat_reply(model, tok, [{"role": "system", "content": "You write Rust."},
                                            {"role": "user", "content": "fn add"}], 6, temperature=0.0)
    "".join(session.reply("again"))
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert session.messages[2]["content"] == first
    session.reset()
    assert session.messages == [{"role": "system", "content": "You write Rust."}]


def test_the_terminal_command_chats_resets_and_quits(tmp_path, pretrained_run):
    run = pretrained_run(tmp_path)
    result = subprocess.run([sys.executable, "-m", "ternchat", "chat", "--run", str(run), "--chat", "--max-tokens",
                             "5", "--seed", "1"], input="fn add\n/reset\nfn sub\n/quit\nnever read\n",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("model> ") == 2 and "(new conversation)" in result.stdout
    plain = subprocess.run([sys.executable, "-m", "ternchat", "chat", "--run", str(run), "--max-tokens", "3"],
                           input="fn main", capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0 and "completion" in plain.stdout and "model> fn main" in plain.stdout
