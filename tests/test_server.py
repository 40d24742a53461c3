"""The real server process (`python -m selfextend_gguf.server`) on the tiny fixture model.

One server for most tests: trained context 64, n_ctx 200, Self-Extend G=4, W=16 (which reaches
(64 - 16 + 4) * 4 = 208 tokens), an API key and a state directory. Clients are the `openai`
package and httpx, on loopback, with timeouts.
"""
import concurrent.futures
import json
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

ROOT = Path(__file__).resolve().parents[1]
N_CTX, GROUP, WINDOW, N_CTX_TRAIN = 200, 4, 16, 64
API_KEY = "test-key"
TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env() -> dict:
    """This environment, less variables the server would read as settings (pydantic-settings
    reads e.g. PORT, API_KEY, N_CTX, as llama-cpp-python's server does)."""
    from selfextend_gguf.server import SelfExtendConfigFile, SelfExtendModelSettings

    names = set(SelfExtendConfigFile.model_fields) | set(SelfExtendModelSettings.model_fields)
    env = {key: value for key, value in os.environ.items() if key.lower() not in names}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_server_command(*args, timeout=60) -> subprocess.CompletedProcess:
    """The server command, for invocations that must fail before serving."""
    return subprocess.run([sys.executable, "-m", "selfextend_gguf.server", *args], env=server_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


class ServerProcess:
    def __init__(self, args, log_path: Path, port: int, api_key=None):
        self.url = f"http://127.0.0.1:{port}"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "selfextend_gguf.server", *args],
                                        env=server_env(), cwd=ROOT, stdout=self._log,
                                        stderr=subprocess.STDOUT)
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
                if httpx.get(f"{self.url}/v1/models", headers=self.headers, timeout=2).status_code == 200:
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

    def info(self) -> dict:
        response = httpx.get(f"{self.url}/v1/selfextend", headers=self.headers, timeout=TIMEOUT)
        response.raise_for_status()
        return response.json()

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


@pytest.fixture(scope="module")
def server(tiny_f32_gguf, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    port = free_port()
    process = ServerProcess(["--model", str(tiny_f32_gguf), "--ctx", str(N_CTX), "--grp-attn-n", str(GROUP),
                             "--grp-attn-w", str(WINDOW), "--port", str(port), "--api-key", API_KEY,
                             "--state-dir", str(folder / "states")],
                            folder / "server.log", port, api_key=API_KEY)
    process.state_dir, process.model = folder / "states", str(tiny_f32_gguf)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=TIMEOUT) as http:
        yield http


def words(n: int, start: str) -> str:
    """A prompt of about n tokens (the fixture's byte-level BPE: ~0.83 tokens per letter)
    starting with `start`, so that prompts of different tests share no prefix."""
    text = start
    vocabulary = ["stone", "river", "lamp", "quiet", "mint", "harbor", "violet", "ember", "copper"]
    i = 0
    while len(text) < 1.2 * n:
        text += " " + vocabulary[i % len(vocabulary)]
        i += 7
    return text


def complete(client, prompt, max_tokens=16, **kwargs):
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                     **kwargs)


def chat(client, content, max_tokens=16):
    response = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                              max_tokens=max_tokens, temperature=0)
    return response.choices[0].message.content


def stream_chat(client, content, max_tokens=16):
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                            max_tokens=max_tokens, temperature=0, stream=True)
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def test_models_tokenize_and_settings(server, client, http):
    assert [model.id for model in client.models.list()] == [server.model]
    tokens = http.post("/v1/tokenize", json={"input": "hello world"}).json()["tokens"]
    assert tokens == http.post("/extras/tokenize", json={"input": "hello world"}).json()["tokens"]
    assert len(tokens) > 1
    info = server.info()
    assert (info["grp_attn_n"], info["grp_attn_w"], info["n_ctx"], info["n_ctx_train"]) == \
        (GROUP, WINDOW, N_CTX, N_CTX_TRAIN)
    assert info["max_context"] == 208
    # no cross-origin access: a web page elsewhere cannot read the answers
    assert "access-control-allow-origin" not in http.get("/v1/models", headers={"Origin": "http://example.com"}).headers


def test_chat_streaming_and_not_give_the_same_answer(client):
    content = words(30, "Alpha")
    answer = chat(client, content)
    assert answer
    assert stream_chat(client, content) == answer


def test_prompt_past_the_trained_context_is_answered_as_llama_answers_it(client, tiny_f32_gguf):
    from selfextend_gguf import Llama

    prompt = words(150, "Bravo")
    content = words(120, "Charlie")
    served = complete(client, prompt, max_tokens=24)
    assert N_CTX_TRAIN < served.usage.prompt_tokens < N_CTX
    served_chat = chat(client, content, max_tokens=24)

    llm = Llama(str(tiny_f32_gguf), n_ctx=N_CTX, grp_attn_n=GROUP, grp_attn_w=WINDOW, verbose=False)
    server_default = {"repeat_penalty": 1.1}  # llama-cpp-python's server default; Llama's is 1.0
    try:
        direct = llm.create_completion(prompt, max_tokens=24, temperature=0, **server_default)
        assert served.choices[0].text == direct["choices"][0]["text"]
        assert served.usage.completion_tokens == direct["usage"]["completion_tokens"]
        llm.reset()
        direct_chat = llm.create_chat_completion([{"role": "user", "content": content}], max_tokens=24,
                                                 temperature=0, **server_default)
        assert served_chat == direct_chat["choices"][0]["message"]["content"]
    finally:
        llm.close()


@pytest.mark.parametrize("n_tokens", [230, 400])  # 230: past n_ctx, inside llama.cpp's rounded-up 256
@pytest.mark.parametrize("stream", [False, True])
def test_prompt_past_the_limit_is_a_400_that_says_the_limit(client, n_tokens, stream):
    with pytest.raises(openai.BadRequestError) as error:
        complete(client, words(n_tokens, "Delta"), stream=stream)
    assert error.value.status_code == 400
    assert f"maximum context length is {N_CTX} tokens" in str(error.value)
    assert error.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match=f"maximum context length is {N_CTX} tokens"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": words(n_tokens, "Echo")}],
                                       stream=stream)


def test_completion_is_clipped_to_the_context(client):
    prompt = words(185, "Foxtrot")
    response = complete(client, prompt, max_tokens=100)
    assert response.usage.prompt_tokens < N_CTX
    assert response.usage.total_tokens <= N_CTX
    assert response.choices[0].finish_reason in ("length", "stop")


def test_api_key_is_required(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=TIMEOUT).status_code == 401
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi"}, timeout=TIMEOUT).status_code == 401
    assert httpx.get(f"{server.url}/v1/models", timeout=TIMEOUT).status_code == 401
    assert httpx.get(f"{server.url}/v1/selfextend", timeout=TIMEOUT).status_code == 401
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0, timeout=TIMEOUT)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


@pytest.mark.parametrize("path,content", [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}'),  # malformed JSON
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 3'),
    ("/v1/chat/completions", b'{"messages": "hi"}'),  # wrong types
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}'),
    ("/v1/completions", b'{"prompt": "hi", "temperature": "hot"}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "hi"}]}'),
])
def test_malformed_requests_are_rejected(http, path, content):
    response = http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code in (400, 422), response.text
    assert http.post("/v1/completions", json={"prompt": "Golf", "max_tokens": 2}).status_code == 200


def test_concurrent_clients_each_get_their_own_answer(client):
    prompts = [words(20 + 10 * i, f"{name}") for i, name in
               enumerate(["Hotel", "India", "Juliet", "Kilo", "Lima", "Mike", "November", "Oscar"])]

    def ask(i):  # half of the clients stream
        if i % 2:
            stream = complete(client, prompts[i], stream=True)
            return "".join(chunk.choices[0].text for chunk in stream)
        return complete(client, prompts[i]).choices[0].text

    sequential = [ask(i) for i in range(len(prompts))]
    assert len(set(sequential)) == len(prompts)  # distinct answers: a mix-up would show
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        concurrent_answers = list(pool.map(ask, range(len(prompts))))
    assert concurrent_answers == sequential


STREAMING_CLIENT = textwrap.dedent("""
    import json, sys, httpx
    url, key = sys.argv[1], sys.argv[2]
    body = {"prompt": "Papa stone river lamp", "max_tokens": 150, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": "Bearer " + key}) as response:
        for line in response.iter_lines():
            print(line, flush=True)
""")


def test_server_survives_a_client_killed_mid_stream(server, client):
    expected = complete(client, "Quebec stone river").choices[0].text
    killed = subprocess.Popen([sys.executable, "-c", STREAMING_CLIENT, server.url, API_KEY],
                              stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:  # wait for the first token
            line = killed.stdout.readline()
            if line.startswith("data:") or not line:
                break
        assert line.startswith("data:"), "the stream never started"
    finally:
        killed.kill()
        killed.wait(10)
        killed.stdout.close()
    assert complete(client, "Quebec stone river").choices[0].text == expected
    assert server.alive()


def test_prefix_reuse_and_saved_state(server, client, http):
    document = words(150, "Romeo")
    first, second = document + " Question one:", document + " Question two:"

    def evaluated(prompt):
        before = server.info()["tokens_evaluated"]
        response = complete(client, prompt, max_tokens=8)
        return response, server.info()["tokens_evaluated"] - before

    response, cold = evaluated(first)
    assert cold >= response.usage.prompt_tokens > N_CTX_TRAIN
    saved = http.post("/v1/selfextend/state/save", json={"name": "romeo"}).json()
    assert saved["n_tokens"] >= response.usage.prompt_tokens
    assert (server.state_dir / "romeo.llama-state.npz").is_file()

    response, warm = evaluated(second)  # the document is reused from the cache
    assert warm < 30 < response.usage.prompt_tokens
    answer = response.choices[0].text

    evaluated(words(40, "Sierra"))  # another prompt replaces the cache
    loaded = http.post("/v1/selfextend/state/load", json={"name": "romeo"})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["n_tokens"] == saved["n_tokens"]
    response, after_load = evaluated(second)
    assert after_load == warm
    assert response.choices[0].text == answer


def test_state_names_stay_inside_the_state_dir(server, http):
    for name in ["../escape", "/etc/passwd", "a/b", ".hidden", ""]:
        assert http.post("/v1/selfextend/state/save", json={"name": name}).status_code == 422
    assert http.post("/v1/selfextend/state/load", json={"name": "missing"}).status_code == 404
    assert sorted(p.name for p in server.state_dir.parent.iterdir()) == ["server.log", "states"]


def test_config_file_sets_self_extend(tiny_f32_gguf, tmp_path):
    port = free_port()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"port": port, "models": [
        {"model": str(tiny_f32_gguf), "model_alias": "tiny", "n_ctx": 300, "grp_attn_n": "auto"}]}))
    server = ServerProcess(["--config", str(config)], tmp_path / "server.log", port)
    try:
        info = server.info()
        assert info["n_ctx"] == 300 and info["grp_attn_n"] > 1 and info["max_context"] >= 300
        assert httpx.get(f"{server.url}/v1/models", timeout=TIMEOUT).json()["data"][0]["id"] == "tiny"
        response = httpx.post(f"{server.url}/v1/selfextend/state/save", json={"name": "x"}, timeout=TIMEOUT)
        assert response.status_code == 403 and "--state-dir" in response.text
    finally:
        server.stop()


def test_bad_settings_exit_with_a_message(tiny_f32_gguf, tmp_path):
    beyond = run_server_command("--model", str(tiny_f32_gguf), "--ctx", "1000", "--grp-attn-n", "2",
                                "--grp-attn-w", "16")
    assert beyond.returncode == 2
    assert "reach" in beyond.stderr and "Traceback" not in beyond.stderr
    missing = run_server_command("--model", str(tmp_path / "missing.gguf"))
    assert missing.returncode == 2 and "not found" in missing.stderr
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"models": [{"model": str(tiny_f32_gguf)}]}))
    mixed = run_server_command("--config", str(config), "--ctx", "100")
    assert mixed.returncode == 2 and "--ctx" in mixed.stderr and "config file" in mixed.stderr


def test_defaults_bind_to_loopback(tiny_f32_gguf, tmp_path):
    import argparse
    from selfextend_gguf.server import add_serve_arguments, settings_from_args

    parser = add_serve_arguments(argparse.ArgumentParser())
    server, models = settings_from_args(parser.parse_args(["--model", str(tiny_f32_gguf)]))
    assert (server.host, server.port, server.api_key, server.interrupt_requests) == ("127.0.0.1", 8000, None, False)
    assert models[0].grp_attn_n == "auto" and models[0].logits_all is False
    config = tmp_path / "config.yaml"
    config.write_text(f"host: 0.0.0.0\nmodels:\n  - model: {tiny_f32_gguf}\n    grp_attn_n: 4\n    grp_attn_w: 16\n")
    server, models = settings_from_args(parser.parse_args(["--config", str(config), "--host", "127.0.0.1",
                                                           "--api-key", "k"]))
    assert (server.host, server.api_key, models[0].grp_attn_n, models[0].grp_attn_w) == ("127.0.0.1", "k", 4, 16)
