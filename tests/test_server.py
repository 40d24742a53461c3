"""llama.cpp's own llama-server, built from the patched source, started by `selfextend-gguf serve`.

The main server: the tiny fixture (trained context 64), 4 slots (--parallel 4, continuous batching)
of 208 tokens each, Self-Extend G=4, W=16 (which reaches exactly (64 - 16 + 4) * 4 = 208 tokens),
an API key and a state directory. Prompts are about 3x the trained context. Each greedy answer must
be, token for token, what selfextend_gguf.Llama answers. Clients are httpx and the `openai` package,
on loopback, with timeouts.
"""
import concurrent.futures
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import openai
import pytest

from selfextend_gguf.testing.parity import greedy_tokens

ROOT = Path(__file__).resolve().parents[1]
N_CTX, GROUP, WINDOW, N_CTX_TRAIN, N_PARALLEL = 208, 4, 16, 64, 4
N_PREDICT = 16
API_KEY = "test-key"
TIMEOUT = 120
VOCABULARY = ["stone", "river", "lamp", "quiet", "mint", "harbor", "violet", "ember", "copper"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(*args) -> list[str]:
    return [sys.executable, "-m", "selfextend_gguf", "serve", *map(str, args)]


def server_env() -> dict:
    """This environment without llama-server's LLAMA_ARG_* settings, with this checkout importable."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLAMA_ARG_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class ServerProcess:
    """`selfextend-gguf serve ARGS --port P`, ready when /health answers 200; stop() ends it."""

    def __init__(self, args, log_path: Path, api_key=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.log_path = log_path
        self._log = open(log_path, "w")
        args = list(args)
        at = args.index("--") if "--" in args else len(args)  # llama-server's own flags follow "--"
        args[at:at] = ["--port", self.port]
        self.process = subprocess.Popen(serve_command(*args), env=server_env(), cwd=ROOT,
                                        stdout=self._log, stderr=subprocess.STDOUT)
        # one client, so requests reuse connections (a new httpx client costs tens of ms)
        self.http = httpx.Client(base_url=self.url, headers=self.headers, timeout=TIMEOUT,
                                 limits=httpx.Limits(max_connections=16))
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self):
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"the server did not answer within {TIMEOUT} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def alive(self) -> bool:
        return self.process.poll() is None

    def post(self, path, body, **kwargs) -> httpx.Response:
        return self.http.post(path, json=body, **kwargs)

    def get(self, path) -> httpx.Response:
        return self.http.get(path)

    def complete(self, prompt, n_predict=N_PREDICT, **kwargs) -> dict:
        """POST /completion, greedy; the prompt is a list of token ids or a string."""
        body = {"prompt": prompt, "n_predict": n_predict, "temperature": 0, "return_tokens": True, **kwargs}
        response = self.post("/completion", body)
        assert response.status_code == 200, response.text
        return response.json()

    def stop(self):
        self.http.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


def words(n: int, start: str) -> str:
    """About n tokens of the fixture's byte-level BPE (about 0.83 tokens per letter), starting with
    `start`, so that the prompts of different tests share no prefix."""
    text, i = start, 0
    while len(text) < 1.2 * n:
        text += " " + VOCABULARY[i % len(VOCABULARY)]
        i += 7
    return text


@pytest.fixture(scope="module")
def llm(tiny_f32_gguf):
    """selfextend_gguf.Llama with the server's settings, for the expected answers."""
    from selfextend_gguf import Llama

    model = Llama(str(tiny_f32_gguf), n_ctx=N_CTX, grp_attn_n=GROUP, grp_attn_w=WINDOW, verbose=False)
    yield model
    model.close()


def greedy(llm, prompt_tokens, n=N_PREDICT, group_size=GROUP) -> list[int]:
    """n greedy tokens from selfextend_gguf.Llama after prompt_tokens, up to an end of generation
    token included (as the server's "tokens" include it)."""
    llm.reset()
    llm.set_self_extend(group_size, WINDOW)
    try:
        return greedy_tokens(llm, prompt_tokens, n)
    finally:
        llm.set_self_extend(GROUP, WINDOW)


def long_prompts(llm, count, n_tokens=180):
    """count token lists of n_tokens each (about 3x the trained context), no shared prefix."""
    names = ["Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel"]
    return [llm.tokenize(words(n_tokens + 20, names[i]).encode(), add_bos=False)[:n_tokens] for i in range(count)]


@pytest.fixture(scope="module")
def server(tiny_f32_gguf, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    process = ServerProcess(["--model", tiny_f32_gguf, "--ctx", N_CTX, "--parallel", N_PARALLEL, "--grp-attn-n", GROUP,
                             "--grp-attn-w", WINDOW, "--api-key", API_KEY, "--state-dir", folder / "states",
                             "--threads", 2, "--", "--no-warmup"],
                            folder / "server.log", api_key=API_KEY)
    process.state_dir = folder / "states"
    yield process
    process.stop()


def test_props_report_self_extend_and_the_slot_context(server):
    props = server.get("/props").json()
    assert (props["grp_attn_n"], props["grp_attn_w"]) == (GROUP, WINDOW)
    assert props["default_generation_settings"]["n_ctx"] == N_CTX  # the reach, not the 256 llama.cpp pads to
    assert props["total_slots"] == N_PARALLEL
    assert "Self-Extend: n_ctx_train = 64, grp_attn_n = 4, grp_attn_w = 16, reach = 208" in server.log_path.read_text()
    assert "possible training context overflow" not in server.log_path.read_text()


def test_parallel_slots_answer_as_the_python_api(server, llm):
    prompts = long_prompts(llm, N_PARALLEL)
    expected = [greedy(llm, prompt) for prompt in prompts]
    assert all(expected) and len({tuple(e) for e in expected}) >= 3 and sum(map(len, expected)) >= 30
    # Self-Extend is no no-op: off, the same prompts give other tokens
    assert [greedy(llm, prompt, group_size=1) for prompt in prompts] != expected

    def ask(prompt):
        return server.complete(prompt, cache_prompt=False)

    with concurrent.futures.ThreadPoolExecutor(N_PARALLEL) as pool:
        concurrent_answers = list(pool.map(ask, prompts))
    assert [answer["tokens"] for answer in concurrent_answers] == expected
    assert all(answer["tokens_evaluated"] == len(prompt) for answer, prompt in zip(concurrent_answers, prompts))
    assert [ask(prompt)["tokens"] for prompt in prompts] == expected  # one at a time: the same


@pytest.fixture(scope="module")
def wide_gguf(tiny_gguf_dir, make_tiny_gguf):
    """The tiny fixture's trained context (64) and tokenizer, but wide (n_embd 1024, n_ff 4096, 2
    layers, F32: 134 MB, written in about a second), so that a decode step costs reading its
    weights, as a real model's does: that cost is what continuous batching shares between slots."""
    return make_tiny_gguf.write_tiny_llama(tiny_gguf_dir / "wide-f32.gguf", weight_type="f32", n_embd=1024,
                                           n_head=8, n_head_kv=4, n_layer=2, n_ff=4096)


def test_parallel_slots_answer_at_once(wide_gguf, tmp_path, llm):
    """Continuous batching: 4 requests at once take clearly less time than the same 4 one after
    another (best of 3 each; scripts/load_test.py measures the server properly)."""
    prompts = long_prompts(llm, N_PARALLEL, n_tokens=80)  # past the trained 64, to decode 96 more
    server = start(wide_gguf, tmp_path, parallel=N_PARALLEL)

    def ask(prompt):
        return server.complete(prompt, n_predict=96, ignore_eos=True, cache_prompt=False)

    def sequential():
        for prompt in prompts:
            ask(prompt)

    def at_once():
        with concurrent.futures.ThreadPoolExecutor(N_PARALLEL) as pool:
            list(pool.map(ask, prompts))

    def best_of_3(run):
        times = []
        for _ in range(3):
            started = time.monotonic()
            run()
            times.append(time.monotonic() - started)
        return min(times)

    try:
        sequential_s, at_once_s = best_of_3(sequential), best_of_3(at_once)
    finally:
        server.stop()
    assert at_once_s < 0.7 * sequential_s, (at_once_s, sequential_s)


def test_openai_routes_and_streaming(server, llm):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=TIMEOUT)
    prompt = words(150, "India")
    tokens = llm.tokenize(prompt.encode(), add_bos=False)
    served = client.completions.create(model="tiny", prompt=prompt, max_tokens=N_PREDICT, temperature=0)
    assert served.usage.prompt_tokens == len(tokens) > 2 * N_CTX_TRAIN
    # the fixture's random tokens are often not UTF-8: the server sends U+FFFD for such bytes
    assert served.choices[0].text == llm.detokenize(greedy(llm, tokens)).decode(errors="replace")
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=N_PREDICT, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == served.choices[0].text
    answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": words(100, "Juliet")}],
                                            max_tokens=8, temperature=0)
    assert answer.choices[0].message.content is not None


@pytest.mark.parametrize("n_tokens", [230, 400])  # 230: past the 208-token slot, inside llama.cpp's padded 256
def test_prompt_past_the_slot_is_a_400_that_says_the_limit(server, llm, n_tokens):
    prompt = llm.tokenize(words(n_tokens + 20, "Kilo").encode(), add_bos=False)[:n_tokens]
    response = server.post("/completion", {"prompt": prompt, "n_predict": 4})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "exceed_context_size_error"
    assert f"({N_CTX} tokens)" in error["message"] and f"{n_tokens} tokens" in error["message"]
    assert server.alive()


def test_completion_stops_at_the_slot_context(server, llm):
    prompt = llm.tokenize(words(220, "Lima").encode(), add_bos=False)[:190]
    answer = server.complete(prompt, n_predict=100)
    assert answer["tokens_evaluated"] + len(answer["tokens"]) <= N_CTX
    assert answer["tokens"] == greedy(llm, prompt, n=len(answer["tokens"]))


def test_api_key_is_required(server):
    for path in ("/completion", "/v1/completions", "/v1/chat/completions"):
        assert httpx.post(f"{server.url}{path}", json={"prompt": "hi"}, timeout=TIMEOUT).status_code == 401
    assert httpx.get(f"{server.url}/v1/models", timeout=TIMEOUT).status_code == 401
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0, timeout=TIMEOUT)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


@pytest.mark.parametrize("path,content", [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}'),  # malformed JSON
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 3'),
    ("/completion", b'{"prompt": '),
    ("/v1/chat/completions", b'{"messages": "hi"}'),  # wrong types
])
def test_malformed_requests_are_rejected(server, path, content):
    response = httpx.post(f"{server.url}{path}", content=content, timeout=TIMEOUT,
                          headers={**server.headers, "Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert server.complete("Mike stone", n_predict=2)["tokens"]


STREAMING_CLIENT = textwrap.dedent("""
    import sys, httpx
    url, key = sys.argv[1], sys.argv[2]
    body = {"prompt": "Papa stone river lamp", "max_tokens": 150, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": "Bearer " + key}) as response:
        for line in response.iter_lines():
            print(line, flush=True)
""")


def test_server_survives_a_client_killed_mid_stream(server):
    expected = server.complete("Quebec stone river")["tokens"]
    killed = subprocess.Popen([sys.executable, "-c", STREAMING_CLIENT, server.url, API_KEY],
                              stdout=subprocess.PIPE, text=True)
    try:
        deadline, line = time.monotonic() + TIMEOUT, ""
        while time.monotonic() < deadline:  # wait for the first token
            line = killed.stdout.readline()
            if line.startswith("data:") or not line:
                break
        assert line.startswith("data:"), "the stream never started"
    finally:
        killed.kill()
        killed.wait(10)
        killed.stdout.close()
    assert server.complete("Quebec stone river")["tokens"] == expected
    assert server.alive()


def test_prompt_cache_and_saved_slot(server, llm):
    document = llm.tokenize(words(170, "Romeo").encode(), add_bos=False)[:160]
    first = document + llm.tokenize(b" Question one:", add_bos=False)
    second = document + llm.tokenize(b" Question two:", add_bos=False)
    slot = {"id_slot": 1, "cache_prompt": True}

    cold = server.complete(first, **slot)
    assert cold["timings"]["prompt_n"] == len(first)
    saved = server.post("/slots/1?action=save", {"filename": "romeo.bin"})
    assert saved.status_code == 200, saved.text
    assert (server.state_dir / "romeo.bin").is_file()

    warm = server.complete(second, **slot)  # the document comes from the slot's cache
    assert warm["timings"]["prompt_n"] < 10
    assert warm["tokens"] == greedy(llm, second)

    server.complete(words(40, "Sierra"), **slot)  # another prompt replaces the cache
    restored = server.post("/slots/1?action=restore", {"filename": "romeo.bin"})
    assert restored.status_code == 200, restored.text
    after = server.complete(second, **slot)
    assert after["timings"]["prompt_n"] < 10 and after["tokens"] == warm["tokens"]
    # names stay inside the state directory
    for name in ["../escape.bin", "/etc/passwd", "a/b.bin"]:
        assert server.post("/slots/1?action=save", {"filename": name}).status_code == 400
    assert sorted(p.name for p in server.state_dir.iterdir()) == ["romeo.bin"]


def start(tiny_f32_gguf, tmp_path, *extra, parallel=2, threads=2):
    return ServerProcess(["--model", tiny_f32_gguf, "--ctx", N_CTX, "--parallel", parallel, "--grp-attn-n", GROUP,
                          "--grp-attn-w", WINDOW, "--threads", threads, "--", "--no-warmup", *extra],
                         tmp_path / "server.log")


@pytest.mark.parametrize("extra", [["--kv-unified"], ["--model-draft", "DRAFT", "--spec-draft-n-max", "4"]],
                         ids=["unified-kv", "speculative"])
def test_unified_kv_and_speculative_decoding_stay_exact(tiny_f32_gguf, tmp_path, llm, extra):
    extra = [str(tiny_f32_gguf) if arg == "DRAFT" else arg for arg in extra]
    server = start(tiny_f32_gguf, tmp_path, *extra)
    try:
        prompts = long_prompts(llm, 2)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda p: server.complete(p, cache_prompt=False), prompts))
        assert [answer["tokens"] for answer in answers] == [greedy(llm, prompt) for prompt in prompts]
    finally:
        server.stop()


def test_context_shift_keeps_generating_past_the_slot(tiny_f32_gguf, tmp_path, llm):
    server = start(tiny_f32_gguf, tmp_path, "--context-shift", parallel=1)
    try:
        prompt = llm.tokenize(words(170, "Tango").encode(), add_bos=False)[:150]
        answer = server.complete(prompt, n_predict=100, n_keep=8, ignore_eos=True)
        assert len(answer["tokens"]) == 100  # 150 + 100 tokens in a 208-token slot: the context shifted
        before_shift = greedy(llm, prompt, n=N_CTX - 150 - 1)
        if llm._token_eos in before_shift:  # the server was asked to ignore it
            before_shift = before_shift[:before_shift.index(llm._token_eos)]
        assert len(before_shift) > 10 and answer["tokens"][:len(before_shift)] == before_shift
        assert server.alive()
    finally:
        server.stop()


def run_serve(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(serve_command(*args), env=server_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_serve_refuses_bad_settings_with_a_message(tiny_f32_gguf, tmp_path):
    beyond = run_serve("--model", tiny_f32_gguf, "--ctx", 1000, "--grp-attn-n", 2, "--grp-attn-w", 16)
    assert beyond.returncode == 2
    assert "reach" in beyond.stderr and "Traceback" not in beyond.stderr
    missing = run_serve("--model", tmp_path / "missing.gguf")
    assert missing.returncode == 2 and "missing.gguf" in missing.stderr and "Traceback" not in missing.stderr


def test_serve_defaults(tiny_f32_gguf):
    import argparse

    from selfextend_gguf.serve import add_serve_arguments, server_command

    parser = add_serve_arguments(argparse.ArgumentParser())
    command = server_command(parser.parse_args(["--model", str(tiny_f32_gguf)]))
    assert Path(command[0]).name == "llama-server"
    flags = dict(zip(command[1::2], command[2::2]))
    assert flags["--host"] == "127.0.0.1" and flags["--parallel"] == "1" and "--api-key" not in flags
    assert flags["--ctx-size"] == str(2 * N_CTX_TRAIN)  # twice the trained context per slot
    assert int(flags["--grp-attn-n"]) > 1 and flags["--grp-attn-w"] == "8"  # chosen: min(1024, 64/8)
    command = server_command(parser.parse_args(["--model", str(tiny_f32_gguf), "--ctx", "200", "--parallel", "3",
                                                "--", "--flash-attn", "off"]))
    assert command[-2:] == ["--flash-attn", "off"] and "600" in command


# ----------------------------------------------------------------------------- serve --doc (the page: test_browser.py)

def test_serve_doc_refuses_bad_documents_with_a_message(tiny_f32_gguf, tmp_path):
    image = tmp_path / "scan.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(16))
    book = tmp_path / "book.txt"
    book.write_text(words(6000, "Book"))  # past what any G reaches with W=60 on a trained context of 64
    for args, expected in [((tmp_path / "missing.txt",), "document not found"),
                           ((image,), "PNG image"),
                           ((book, "--grp-attn-w", 60), "use a smaller --grp-attn-w, or fewer documents"),
                           ((book, "--ctx", 100), "leaves no room to answer")]:
        done = run_serve("--model", tiny_f32_gguf, "--doc", *args)
        assert done.returncode == 2, done.stderr
        assert expected in done.stderr and "Traceback" not in done.stderr
        assert done.stderr.count("\n") == 1, done.stderr  # one line


def test_serve_doc_reads_the_documents_into_every_slot_and_stops_its_server_on_ctrl_c(tiny_f32_gguf, tmp_path):
    import signal

    notes = tmp_path / "notes.md"
    notes.write_text(words(60, "Sierra"))
    port = free_port()
    process = subprocess.Popen(serve_command("--model", tiny_f32_gguf, "--ctx", N_CTX, "--grp-attn-n", GROUP,
                                             "--grp-attn-w", WINDOW, "--parallel", 2, "--doc", notes, "--port", port),
                               env=server_env(), cwd=ROOT, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # its own process group, as a terminal's job
    try:
        lines = []
        while not lines or "ready:" not in lines[-1]:
            lines.append(process.stderr.readline())
            assert lines[-1], "".join(lines)[-3000:]
        url = f"http://127.0.0.1:{port}"
        listing = httpx.get(f"{url}/documents.json", timeout=TIMEOUT).json()
        assert [(doc["name"], doc["kind"]) for doc in listing["documents"]] == [("notes.md", "markdown")]
        assert 50 < listing["documents"][0]["tokens"] < listing["prompt_tokens"]
        assert listing["text"] == notes.read_text().strip()
        assert "<!doctype html>" in httpx.get(f"{url}/", timeout=TIMEOUT).text
        for slot in (0, 1):  # each slot holds the documents: a question evaluates only itself
            body = {"messages": [{"role": "user", "content": f"{listing['text']}\n\nstone river"}], "id_slot": slot,
                    "max_tokens": 2, "temperature": 0}
            answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=TIMEOUT).json()
            assert answer["timings"]["prompt_n"] < 20 < answer["usage"]["prompt_tokens"], (slot, answer)
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C
        assert process.wait(30) == 130
        with pytest.raises(httpx.TransportError):  # the server is gone with it
            httpx.get(f"{url}/health", timeout=5)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        process.stderr.close()
