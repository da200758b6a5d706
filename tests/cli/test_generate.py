"""`pagoda generate` and `pagoda chat` stream the same text the offline API produces."""

from __future__ import annotations

import io

import pytest

from pagoda import LLM, SamplingParams
from pagoda.cli.generate import stream_to
from pagoda.cli.main import main
from tests.utils import tiny_chat_model

ARGS = ["--kv-cache-memory", "16MiB", "--max-tokens", "12", "--temperature", "0"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_dir):
    return str(tiny_chat_model(tmp_path_factory.mktemp("tiny"), smollm2_dir))


@pytest.fixture(scope="module")
def offline(tiny_model):
    return LLM(tiny_model, kv_cache_memory=16 << 20)


def test_stream_to_writes_each_new_piece():
    class Out:
        def __init__(self, text):
            self.outputs = [type("C", (), {"text": text})()]
    sink = io.StringIO()
    assert stream_to(sink, [Out("Hel"), Out("Hello"), Out("Hello!")]) == "Hello!"
    assert sink.getvalue() == "Hello!\n"


def test_generate_raw_matches_offline(tiny_model, offline, capsys):
    assert main(["generate", "The sky is", "--model", tiny_model, "--raw", *ARGS]) == 0
    expected = offline.generate(["The sky is"], SamplingParams(temperature=0, max_tokens=12))
    assert capsys.readouterr().out == expected[0].outputs[0].text + "\n"


def test_generate_applies_the_chat_template(tiny_model, offline, capsys):
    assert main(["generate", "Hi there", "--model", tiny_model, *ARGS]) == 0
    expected = offline.chat([{"role": "user", "content": "Hi there"}],
                            SamplingParams(temperature=0, max_tokens=12))
    assert capsys.readouterr().out == expected[0].outputs[0].text + "\n"


def test_chat_keeps_the_conversation(tiny_model, offline, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAnd again\n\n"))
    assert main(["chat", "--model", tiny_model, *ARGS]) == 0
    params = SamplingParams(temperature=0, max_tokens=12)
    first = offline.chat([{"role": "user", "content": "Hello"}], params)[0].outputs[0].text
    second = offline.chat([{"role": "user", "content": "Hello"},
                           {"role": "assistant", "content": first},
                           {"role": "user", "content": "And again"}], params)[0].outputs[0].text
    assert capsys.readouterr().out.split("> ")[1:] == [first + "\n", second + "\n", ""]


def test_run_answers_a_prompt_once_or_chats_like_ollama(tiny_model, offline, capsys,
                                                        monkeypatch):
    params = SamplingParams(temperature=0, max_tokens=12)
    assert main(["run", tiny_model, "Hi there", *ARGS]) == 0
    answer = offline.chat([{"role": "user", "content": "Hi there"}], params)[0].outputs[0].text
    assert capsys.readouterr().out == answer + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n\n"))
    assert main(["run", tiny_model, *ARGS]) == 0
    first = offline.chat([{"role": "user", "content": "Hello"}], params)[0].outputs[0].text
    assert capsys.readouterr().out.split("> ")[1:] == [first + "\n", ""]


def test_chat_shows_no_info_lines_once_the_prompt_is_up(tiny_model, capsys, monkeypatch):
    from pagoda.logger import get_logger
    monkeypatch.delenv("PAGODA_LOG_LEVEL", raising=False)
    lines = iter(["Hello", ""])

    def typed(prompt: str) -> str:
        get_logger("pagoda.engine").info("an engine note")  # what used to cut into the prompt
        get_logger("pagoda.engine").warning("a warning")
        return next(lines)
    monkeypatch.setattr("builtins.input", typed)
    try:
        assert main(["chat", "--model", tiny_model, *ARGS]) == 0
    finally:
        import logging
        logging.getLogger("pagoda").setLevel(logging.INFO)
    err = capsys.readouterr().err
    assert "an engine note" not in err and "a warning" in err


def test_make_generate_completes_the_sentence(smollm2_dir, capsys):
    """`make generate`'s own command line (read from the Makefile) answers what a user
    expects from "The capital of France is"."""
    import shlex
    from pathlib import Path
    makefile = (Path(__file__).parents[2] / "Makefile").read_text()
    line = next(line for line in makefile.splitlines() if "$(PAGODA) generate" in line)
    argv = shlex.split(line.split("$(PAGODA)", 1)[1])
    assert main([*argv, "--model", str(smollm2_dir), "--kv-cache-memory", "64MiB",
                 "--max-model-len", "512"]) == 0
    assert capsys.readouterr().out == " Paris.\n"
