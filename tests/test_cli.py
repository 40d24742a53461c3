"""The selfextend-gguf command, driven as a user drives it (subprocesses, a pseudo-terminal) on the
tiny fixture model: trained context 64, so a few hundred tokens of document need Self-Extend."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from selfextend_gguf.gguf_info import ModelInfo
from selfextend_gguf.testing.cli import cli_env, run_cli

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is the pass key?"
FOLLOW_UP = "Say it again."


def selfextend_gguf(*args, stdin: str = "") -> subprocess.CompletedProcess:
    return run_cli(*args, stdin=stdin)


@pytest.fixture(scope="module")
def document(tmp_path_factory) -> Path:
    """About 380 tokens for the tiny model's byte-level vocabulary: 6 times its trained context."""
    sys.path.insert(0, str(ROOT / "examples"))
    from make_long_document import long_document
    path = tmp_path_factory.mktemp("docs") / "long.txt"
    path.write_text(long_document(n_tokens=120, key=4242), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- run

def test_run_json(tiny_f32_gguf, document):
    result = selfextend_gguf("run", "--model", tiny_f32_gguf, "--doc", document, "-p", QUESTION, "-n", 6, "--json")
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert set(output) == {"text", "finish_reason", "model", "n_ctx", "n_ctx_train", "grp_attn_n", "grp_attn_w",
                           "prompt_tokens", "prompt_seconds", "prompt_tokens_per_second", "generated_tokens",
                           "generation_seconds", "tokens_per_second"}
    assert isinstance(output["text"], str)
    assert output["n_ctx_train"] == 64 and output["prompt_tokens"] > 300
    assert output["n_ctx"] >= output["prompt_tokens"] + 6
    assert output["grp_attn_n"] > 1 and output["grp_attn_w"] == 8  # auto: W = trained context / 8
    assert 1 <= output["generated_tokens"] <= 6 + 3
    assert output["prompt_tokens_per_second"] > 0 and output["tokens_per_second"] > 0
    assert "llama_" not in result.stderr  # llama.cpp's logs are off without --verbose


def test_run_streams_the_answer_to_stdout_and_reports_on_stderr(tiny_f32_gguf, document):
    result = selfextend_gguf("run", "--model", tiny_f32_gguf, "--doc", document, "--raw", "-p", "The pass key is",
                             "-n", 4, "--grp-attn-n", 16, "--grp-attn-w", 16)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and len(result.stdout) > 1
    assert "Self-Extend G=16, W=16" in result.stderr and "read long.txt" in result.stderr


def model_info(n_ctx_train: int, sliding_window: int | None = None, architecture: str = "llama") -> ModelInfo:
    """What plan_context reads of a model file, without one."""
    return ModelInfo(path=Path(f"{architecture}.gguf"), architecture=architecture, n_ctx_train=n_ctx_train,
                     rope_freq_base=None, rope_scaling_type=None, rope_dimension_count=None, file_type=None,
                     size_bytes=0, sliding_window=sliding_window)


def test_plan_context_sizes_and_chooses():
    from selfextend_gguf.chat import SetupError, plan_context
    from selfextend_gguf.settings import SelfExtend, max_context
    model = model_info(8192)
    assert plan_context(6000, model).self_extend == SelfExtend()          # fits: Self-Extend off
    plan = plan_context(14000, model)
    assert plan.n_ctx == 14000 and plan.self_extend == SelfExtend(3, 1024) and plan.reach >= 14000
    assert plan_context(14000, model, grp_attn_w=512).self_extend == SelfExtend(3, 512)
    assert plan_context(14000, model, n_ctx=20000).n_ctx == 20000
    with pytest.raises(SetupError, match=r"--grp-attn-n 3 reaches it"):
        plan_context(16000, model, grp_attn_n=2)                           # G=2 reaches 15,360
    assert max_context(8192, SelfExtend(3, 1024)) >= 16000
    # the hint's G is for the window the model allows: at least its sliding window (W=2048 needs G=3)
    with pytest.raises(SetupError, match=r"--grp-attn-n 2 reaches it"):
        plan_context(15000, model, grp_attn_n=1)
    with pytest.raises(SetupError, match=r"--grp-attn-n 3 reaches it"):
        plan_context(15000, model_info(8192, sliding_window=2048), grp_attn_n=1)


def test_plan_context_refuses_an_architecture_in_the_clis_spelling():
    from selfextend_gguf.chat import SetupError, plan_context
    mamba = model_info(8192, architecture="mamba")
    with pytest.raises(SetupError, match=r"architecture mamba has a recurrent .*Run it without Self-Extend "
                                         r"\(--grp-attn-n 1\)$"):
        plan_context(14000, mamba)                                           # auto turns it on
    with pytest.raises(SetupError, match=r"\(--grp-attn-n 1\)$"):
        plan_context(6000, mamba, grp_attn_n=4)                              # asked for
    assert plan_context(6000, mamba).self_extend.group_size == 1             # auto, not needed: it runs


# ----------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny_f32_gguf) -> dict:
    folder = tmp_path_factory.mktemp("bad")
    files = {"folder": folder / "a-folder", "empty": folder / "empty.txt", "latin1": folder / "latin1.txt",
             "binary": folder / "data.bin", "text_model": folder / "model.gguf", "truncated": folder / "cut.gguf",
             "cut_pdf": folder / "cut.pdf", "image": folder / "photo.txt"}
    files["folder"].mkdir()
    files["empty"].write_text("  \n\n")
    files["latin1"].write_bytes("Caf\xe9 cr\xe8me, na\xefve fa\xe7ade.".encode("latin-1"))
    files["binary"].write_bytes(b"\x00\x01\x02GGUF" * 100)
    files["text_model"].write_text("not a model")
    files["truncated"].write_bytes(Path(tiny_f32_gguf).read_bytes()[:1000])
    files["cut_pdf"].write_bytes(b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog")
    files["image"].write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    return files


BAD_INPUTS = {
    # name: (arguments, with {model}, {doc} and bad_files' names in braces; exit code; message)
    "missing model": (["--model", "/no/such/model.gguf"], 2, "model file not found: /no/such/model.gguf"),
    "not GGUF": (["--model", "{text_model}"], 2, "is not a GGUF file"),
    "truncated GGUF": (["--model", "{truncated}"], 2, "not a readable GGUF file"),
    "missing document": (["--doc", "/no/such/notes.md"], 2, "document not found: /no/such/notes.md"),
    "folder without documents": (["--doc", "{folder}"], 2, "has no documents (text, markdown, pdf"),
    "truncated PDF": (["--doc", "{cut_pdf}"], 2, "is a truncated PDF (no %%EOF at its end)"),
    "image as document": (["--doc", "{image}"], 2, "is a JPEG image, not a type read here"),
    "empty document": (["--doc", "{empty}"], 2, "is empty"),
    "non-UTF-8 document": (["--doc", "{latin1}"], 2, "is not UTF-8 text (byte 0xe9 at offset 3)"),
    "binary document": (["--doc", "{binary}"], 2, "looks like a binary file"),
    "missing prompt file": (["-f", "/no/such/prompt.txt"], 2, "prompt file not found"),
    "prompt file is a folder": (["-f", "{folder}"], 2, "is a folder; pass the files in it"),
    "G not a number": (["--grp-attn-n", "many"], 2, "--grp-attn-n: must be an integer >= 1 or 'auto'"),
    "G zero": (["--grp-attn-n", "0"], 2, "--grp-attn-n: must be an integer >= 1 or 'auto'"),
    "W zero": (["--grp-attn-w", "0"], 2, "--grp-attn-w: must be an integer >= 1"),
    "W past the trained context": (["--grp-attn-w", "64"], 2, "--grp-attn-w 64 must be smaller than the model's "
                                   "trained context (64 tokens)"),
    # (64 - 8 + 4) * 2 = 120 tokens reached; the document needs about 400
    "document beyond G's reach": (["--grp-attn-n", "2", "--grp-attn-w", "8"], 2,
                                  r"more than --grp-attn-n 2 --grp-attn-w 8 reach with a model trained on 64 tokens "
                                  r"\(120\); --grp-attn-n \d+ reaches it"),
    "Self-Extend off, document too long": (["--grp-attn-n", "1"], 2, "more than Self-Extend off"),
    "ctx smaller than the document": (["--ctx", "100"], 2, "leaves no room to answer"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_with_a_message(case, tiny_f32_gguf, document, bad_files):
    arguments, code, message = BAD_INPUTS[case]
    names = {"model": tiny_f32_gguf, "doc": document, **bad_files}
    arguments = [a.format(**names) for a in arguments]
    base = ["run", "--model", tiny_f32_gguf, "--doc", document, "-n", "4"]
    if "-f" not in arguments:
        base += ["-p", QUESTION]
    result = selfextend_gguf(*base, *arguments)
    assert result.returncode == code, result.stderr
    assert re.search(message if "\\" in message else re.escape(message), result.stderr), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_document(tiny_f32_gguf, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hidden")
    secret.chmod(0)
    result = selfextend_gguf("run", "--model", tiny_f32_gguf, "--doc", secret, "-p", QUESTION)
    assert result.returncode == 2 and "cannot read document" in result.stderr


def test_info_without_loading_the_model(tiny_f32_gguf):
    result = selfextend_gguf("info", "--model", tiny_f32_gguf, "--ctx", 1000)
    assert result.returncode == 0, result.stderr
    assert re.search(r"architecture\s+llama", result.stdout) and re.search(r"trained context\s+64 tokens", result.stdout)
    assert re.search(r"quantization\s+F32", result.stdout)
    assert re.search(r"--ctx 1,000: --grp-attn-n \d+ --grp-attn-w 8, reaching [\d,]+ tokens", result.stdout)
    bad = selfextend_gguf("info", "--model", tiny_f32_gguf, "--ctx", 1000, "--grp-attn-n", 2)
    assert bad.returncode == 2 and "beyond what --grp-attn-n 2, --grp-attn-w 8 reach" in bad.stderr


# ----------------------------------------------------------------------------- chat

def chat_arguments(model, document):
    return ["chat", "--model", model, "--doc", document, "-n", 8, "--temp", 0]


def numbers(pattern: str, text: str) -> list[int]:
    match = re.findall(pattern, text)
    assert match, f"no {pattern!r} in:\n{text}"
    return [int(n.replace(",", "")) for n in match[-1]] if isinstance(match[-1], tuple) else [int(match[-1].replace(",", ""))]


@pytest.fixture(scope="module")
def chat_transcript(tiny_f32_gguf, document, tmp_path_factory):
    """A scripted chat in a pseudo-terminal: two questions with /stats after each, then /save.
    Returns (transcript, session file)."""
    pexpect = pytest.importorskip("pexpect")
    session_file = tmp_path_factory.mktemp("session") / "talk.session"
    child = pexpect.spawn(sys.executable, ["-m", "selfextend_gguf", *map(str, chat_arguments(tiny_f32_gguf, document))],
                          env=cli_env(), encoding="utf-8", timeout=60, dimensions=(50, 200))
    transcript = []
    child.logfile_read = _Collect(transcript)
    for line in (QUESTION, "/stats", FOLLOW_UP, "/stats", f"/save {session_file}", "/exit"):
        child.expect_exact("> ")
        child.sendline(line)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, "".join(transcript)
    return "".join(transcript).replace("\r", ""), session_file


class _Collect:
    def __init__(self, parts):
        self.parts = parts

    def write(self, text):
        self.parts.append(text)

    def flush(self):
        pass


def test_chat_streams_answers_and_reads_the_document_once(chat_transcript, tiny_f32_gguf, document):
    transcript, session_file = chat_transcript
    document_tokens = numbers(r"read long\.txt: ([\d,]+) tokens", transcript)[0]
    first, second = transcript.split("> /stats")[:2]
    # the streamed answer: what the saved conversation recorded, printed after the question
    from selfextend_gguf import state_file
    messages = state_file.read(session_file).meta["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    answer = messages[1]["content"]
    assert answer.strip() and answer.strip()[:4] in first.split(QUESTION, 1)[1]

    evaluated_after_first = numbers(r"evaluated\s+([\d,]+) tokens in all", second)[0]
    evaluated_after_second = numbers(r"evaluated\s+([\d,]+) tokens in all", transcript)[0]
    prompt, new, cached = numbers(r"prompt ([\d,]+) tokens: ([\d,]+) evaluated in [\d.]+ s, ([\d,]+) from the cache", transcript)
    assert cached >= document_tokens and new < 30 and prompt == new + cached
    assert evaluated_after_second - evaluated_after_first < 50  # the follow-up did not read the document again
    assert f"saved the session to {session_file}" in transcript


def test_saved_session_gives_the_same_next_token_logits(chat_transcript, tiny_f32_gguf, document):
    """The file /save wrote, loaded into a new session, continues exactly as an uninterrupted session."""
    from selfextend_gguf.chat import open_session
    from selfextend_gguf.documents import load_documents
    from selfextend_gguf.llama import llama_cpp  # bound to the patched library
    _, session_file = chat_transcript

    def chat_session():  # what `chat_arguments` opens
        return open_session(tiny_f32_gguf, load_documents([document]), max_answer_tokens=8,
                            sampling={"temperature": 0.0})

    def next_token_logits(session, question):
        captured = []
        session.sampling["logits_processor"] = llama_cpp.LogitsProcessorList(
            [lambda input_ids, logits: captured.append(logits.copy()) or logits])
        list(session.ask(question, max_tokens=1))
        return captured[0]

    uninterrupted = chat_session()
    uninterrupted.ingest()
    for question in (QUESTION, FOLLOW_UP):
        list(uninterrupted.ask(question))
    expected = next_token_logits(uninterrupted, "And once more?")
    del uninterrupted

    resumed = chat_session()
    resumed.load(session_file)
    assert resumed.n_used > 300 and len(resumed.messages) == 4
    np.testing.assert_array_equal(next_token_logits(resumed, "And once more?"), expected)


def test_loading_into_other_settings_is_refused(chat_transcript, tiny_f32_gguf, document):
    _, session_file = chat_transcript
    result = selfextend_gguf(*chat_arguments(tiny_f32_gguf, document), "--grp-attn-n", 100,
                             stdin=f"/load {session_file}\n/exit\n")
    assert result.returncode == 0
    assert re.search(r"was saved with other settings: grp_attn_n=\d+ \(this chat: 100\)", result.stderr), result.stderr
    other_model = selfextend_gguf("chat", "--model", Path(tiny_f32_gguf).with_name("tiny-f16.gguf"), "--doc", document,
                                  stdin=f"/load {session_file}\n/exit\n")
    assert "was saved with the model" in other_model.stderr and "load it with --model" in other_model.stderr


def test_a_cut_or_edited_session_file_is_refused_and_the_session_goes_on(chat_transcript, tiny_f32_gguf, document,
                                                                         tmp_path):
    """No pickle: the file is numpy arrays and JSON, checked whole (sha256) before the context is touched."""
    import zipfile

    from selfextend_gguf import state_file
    from selfextend_gguf.chat import SessionFileError, open_session
    from selfextend_gguf.documents import load_documents

    _, session_file = chat_transcript
    data = session_file.read_bytes()
    with zipfile.ZipFile(session_file) as archive:
        assert sorted(archive.namelist()) == ["input_ids.npy", "llama_state.npy", "meta.npy", "scores.npy"]
    cut, edited, other = tmp_path / "cut.session", tmp_path / "edited.session", tmp_path / "other.session"
    cut.write_bytes(data[: len(data) // 2])
    middle = len(data) // 2  # inside llama_state, the largest array (stored uncompressed)
    edited.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
    other.write_text("not a session")

    session = open_session(tiny_f32_gguf, load_documents([document]), max_answer_tokens=4,
                           sampling={"temperature": 0.0})
    session.ingest()
    before = (session.n_used, list(session.messages))
    for path, message in [(cut, "damaged: cut short"), (edited, "damaged: cut short or changed"),
                          (other, "not a selfextend-gguf state file")]:
        with pytest.raises(SessionFileError, match=message):
            session.load(path)
        assert (session.n_used, session.messages) == before
    assert list(session.ask("Still there?", max_tokens=2))  # the session goes on
    # a file whose zip is whole but whose settings were edited: the checksum catches it
    saved = np.load(session_file, allow_pickle=False)
    arrays = {name: saved[name] for name in saved.files}
    meta = json.loads(str(arrays["meta"]))
    arrays["meta"] = np.array(json.dumps(meta | {"grp_attn_n": 1}))
    np.savez(tmp_path / "settings-edited.npz", **arrays)
    with pytest.raises(state_file.StateFileError, match="do not match their checksum"):
        state_file.read(tmp_path / "settings-edited.npz")


def test_ctrl_c_stops_the_answer_not_the_chat(tiny_f32_gguf, document):
    pexpect = pytest.importorskip("pexpect")
    arguments = ["-m", "selfextend_gguf", "chat", "--model", tiny_f32_gguf, "--doc", document, "-n", 100000,
                 "--temp", 0]
    # a job started with & by a non-interactive shell (e.g. a CI script run in the background) inherits
    # SIGINT ignored, and then Python ignores it too: give the chat the default Ctrl-C, as a terminal does
    child = pexpect.spawn(sys.executable, list(map(str, arguments)), env=cli_env(), encoding="utf-8", timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect_exact("> ")
    child.sendline("Why?")  # the tiny model's greedy answer runs for about 1,300 tokens
    child.expect(r"Why\?\r*\n")  # the echoed question
    child.expect(r"\S")  # the answer is streaming
    child.sendcontrol("c")
    child.expect_exact("(stopped)")
    child.expect_exact("> ")
    child.sendline("/stats")
    child.expect(r"last answer\s+prompt")
    child.expect_exact("> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_no_room_left_in_a_long_chat(tiny_f32_gguf, document):
    """A context with room for about two answers: the third question is refused, /reset makes room."""
    size = json.loads(selfextend_gguf("run", "--model", tiny_f32_gguf, "--doc", document, "-p", QUESTION, "-n", 1,
                                      "--json").stdout)["prompt_tokens"]
    questions = "\n".join([QUESTION] * 4)
    result = selfextend_gguf(*chat_arguments(tiny_f32_gguf, document), "--ctx", size + 50,
                             stdin=f"{questions}\n/reset\n{QUESTION}\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "no room left in the context" in result.stderr and "/reset starts the conversation over" in result.stderr
    after_reset = result.stderr.split("the conversation is cleared")[1]
    assert "tokens at" in after_reset and "no room left" not in after_reset
