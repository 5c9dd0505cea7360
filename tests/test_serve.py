"""`ternchat serve`: the OpenAI-compatible API over real HTTP, and the chat page in a real headless browser."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from ternchat.data.chat import completion_prompt  # noqa: E402
from ternchat.eval.engine import generate  # noqa: E402
from ternchat.eval.serve import Generator, Limits, create_app  # noqa: E402
from ternchat.runs import load_model_and_tokenizer  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A uvicorn server for `engine` on a free local port, in a thread."""

    def __init__(self, engine: Generator):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=self.port,
                                                   log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def model_and_tok(pretrained_run, tmp_path):
    return load_model_and_tokenizer(pretrained_run(tmp_path))


@pytest.fixture
def chat_server(model_and_tok):
    model, tok = model_and_tok
    with Server(Generator(model, tok, True, "tiny", Limits(max_tokens=64, max_body_bytes=20_000))) as server:
        yield server, model, tok


def events(response) -> list[str]:
    data = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return data[:-1]


def test_chat_completions_whole_and_streamed(chat_server):
    server, model, tok = chat_server
    messages = [{"role": "system", "content": "Answer in Rust."}, {"role": "user", "content": "fn add(a: i32"}]
    prompt = completion_prompt(messages, tok)
    expected_ids = list(generate(model, prompt, 12, temperature=0,
                                 stop_ids=[tok.special("<|assistant_end|>"), tok.eod_id]))
    request = {"model": "tiny", "messages": messages, "max_tokens": 12, "temperature": 0}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        body = client.post("/v1/chat/completions", json=request).json()
        assert body["object"] == "chat.completion" and body["model"] == "tiny"
        choice = body["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": tok.decode(expected_ids)}
        assert choice["finish_reason"] == ("length" if len(expected_ids) == 12 else "stop")
        assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(expected_ids),
                                 "total_tokens": len(prompt) + len(expected_ids)}

        stream_request = {**request, "stream": True, "stream_options": {"include_usage": True}}
        with client.stream("POST", "/v1/chat/completions", json=stream_request) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            chunks = [json.loads(d) for d in events(response)]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert streamed == choice["message"]["content"]
        assert chunks[-2]["choices"][0]["finish_reason"] == choice["finish_reason"]
        assert chunks[-1]["usage"] == body["usage"] and chunks[-1]["choices"] == []

        models = client.get("/v1/models").json()
        assert models["data"][0]["id"] == "tiny" and models["data"][0]["chat_format"] is True


def test_completions_and_stop_strings(chat_server):
    server, model, tok = chat_server
    text = tok.decode(list(generate(model, tok.encode("fn main() {"), 24, temperature=0, stop_ids=[tok.eod_id])))
    request = {"prompt": "fn main() {", "max_tokens": 24, "temperature": 0}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        whole = client.post("/v1/completions", json=request).json()
        assert whole["object"] == "text_completion" and whole["choices"][0]["text"] == text
        with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as response:
            streamed = "".join(json.loads(d)["choices"][0]["text"] for d in events(response))
        assert streamed == text
        stop = text[5:8]  # a stop string the greedy text contains: the reply ends before its first occurrence
        cut = client.post("/v1/completions", json={**request, "stop": [stop, "never appears"]}).json()["choices"][0]
        assert cut["text"] == text[:text.index(stop)] and cut["finish_reason"] == "stop"
        with client.stream("POST", "/v1/completions", json={**request, "stop": stop, "stream": True}) as response:
            assert "".join(json.loads(d)["choices"][0]["text"] for d in events(response)) == cut["text"]


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"prompt": "fn f() {}\n" * 200}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x" * 30_000}, 413, None),
    ("/v1/embeddings", {"input": "x"}, 404, None),
])
def test_bad_requests_get_clear_errors(chat_server, path, body, status, param):
    server, _, _ = chat_server
    response = httpx.post(server.url + path, json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_malformed_json_and_pretrained_chat(model_and_tok):
    model, tok = model_and_tok
    with Server(Generator(model, tok, False, "pre", Limits())) as server:
        response = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=30,
                              headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
        response = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                              json={"messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 400 and response.json()["error"]["code"] == "no_chat_format"


def test_a_client_that_leaves_frees_the_model(chat_server):
    server, _, _ = chat_server
    with httpx.Client(base_url=server.url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json={"prompt": "fn", "max_tokens": 64, "stream": True,
                                                             "temperature": 1.0}) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # one chunk, then hang up
        start = time.time()
        body = client.post("/v1/completions", json={"prompt": "fn", "max_tokens": 2}).json()
        assert body["usage"]["completion_tokens"] <= 2
        assert time.time() - start < 30  # the abandoned stream released the model


def browser_executable() -> str | None:
    return os.environ.get("TERNCHAT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class PacedGenerator(Generator):
    """The real model's output, paced at 20 ms a piece, so the browser can press Stop in the middle of a reply."""

    def pieces(self, *args, **kwargs):
        for piece in super().pieces(*args, **kwargs):
            time.sleep(0.02)
            yield piece


def test_chat_page_in_a_real_browser(model_and_tok, tmp_path):
    required = os.environ.get("TERNCHAT_REQUIRE_BROWSER") == "1"  # CI: a missing browser fails, not skips
    try:
        from playwright import sync_api as playwright
    except ImportError:
        if required:
            raise
        pytest.skip("playwright is not installed (scripts/setup.sh --test installs it)")
    executable = browser_executable()
    if executable is None:
        if required:
            pytest.fail("TERNCHAT_REQUIRE_BROWSER=1 but there is no chromium")
        pytest.skip("no chromium on this machine (scripts/setup.sh --test installs Debian's)")
    model, tok = model_and_tok
    messages = [{"role": "user", "content": "Write fn add"}]
    expected = tok.decode(list(generate(model, completion_prompt(messages, tok), 20, temperature=0,
                                        stop_ids=[tok.special("<|assistant_end|>"), tok.eod_id])))
    with Server(PacedGenerator(model, tok, True, "tiny", Limits(max_tokens=200))) as server, \
            playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1000, "height": 640})
        page.goto(server.url + "/")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "20")
        page.fill("#input", "Write fn add")
        page.click("#send")
        page.wait_for_selector(".assistant .status", timeout=60_000)
        reply = page.locator(".assistant").first
        assert reply.evaluate("e => e.firstChild.textContent") == expected  # the streamed text, whole
        assert page.locator(".user").first.inner_text() == "Write fn add"

        page.fill("#max-tokens", "200")  # a second turn, stopped with the Stop button while it streams
        page.fill("#input", "And fn sub")
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelectorAll('.assistant').length == 2 && "
                               "document.querySelectorAll('.assistant')[1].textContent.length > 0")
        page.click("#stop")
        page.wait_for_selector(".assistant >> nth=1 >> .status", timeout=60_000)
        assert page.locator(".assistant >> nth=1 >> .status").inner_text() == "[stopped]"
        assert page.locator("#send").is_enabled() and page.locator("#stop").is_disabled()
        page.screenshot(path=str(os.environ.get("TERNCHAT_SCREENSHOT") or tmp_path / "serve.png"))
        browser.close()
