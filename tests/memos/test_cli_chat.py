"""`memos chat` against the shared `memos serve` process, with piped standard input.

Replies are kept to a few tokens: the model is slow on CPU. What the command printed is checked
against what the daemon stored, read back through the SDK.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from memos.cli import app
from memos.client import Cube, MemosClient, User

ROOT = Path(__file__).resolve().parents[2]
SYSTEM = "You are a friendly assistant. Answer in one short sentence."
PAINTS = "Melanie paints sunrises over the lake every weekend."


@pytest.fixture
def user(daemon: Any) -> User:
    with MemosClient(daemon.url, api_key=daemon.admin_key) as admin:
        return admin.create_user(f"cli-chat-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def client(daemon: Any, user: User) -> Iterator[MemosClient]:
    with MemosClient(daemon.url, api_key=user.api_key, timeout=300) as c:
        yield c


@pytest.fixture
def cube(client: MemosClient) -> Cube:
    return client.create_cube("cli-chat")


@pytest.fixture
def memos(daemon: Any, user: User) -> Any:
    """`memos(*args, input=...)` runs the CLI as `user`, stdin piped from `input`."""
    runner = CliRunner()
    env = {"MEMOS_URL": daemon.url, "MEMOS_API_KEY": user.api_key, "MEMOS_TIMEOUT": None}

    def run(*args: str, input: str = "") -> Any:
        return runner.invoke(app, list(args), env=env, input=input)

    return run


def _opened(stderr: str, cube_id: str) -> str:
    first = stderr.splitlines()[0]
    prefix, verb = "chat ", f" on cube {cube_id}"
    assert first.startswith(prefix) and first.endswith(verb), stderr
    chat_id, how = first[len(prefix) : -len(verb)].split(" ")
    assert how in {"opened", "resumed"}
    return chat_id


def test_piped_lines_are_turns_replies_are_printed_and_notes_shown(
    memos: Any, client: MemosClient, cube: Cube
) -> None:
    client.add_memory(cube.id, PAINTS, speaker="Melanie")
    lines = "What does Melanie paint?\n/notes\n\n   \nThanks!\n"
    done = memos("chat", cube.id, "--system", SYSTEM, "--recall-top-k", "1", "--max-tokens", "4",
                 input=lines)  # fmt: skip
    assert done.exit_code == 0, (done.stdout, done.stderr, done.exception)
    chat_id = _opened(done.stderr, cube.id)
    assert done.stderr == f"chat {chat_id} opened on cube {cube.id}\n"  # no prompt when piped

    session = client.chat(cube.id, chat_id=chat_id)
    assert session.info.system == SYSTEM and session.info.recall is not None
    assert session.info.recall.top_k == 1
    history = session.history()
    assert [(m.role, m.content) for m in history[::2]] == [
        ("user", "What does Melanie paint?"), ("user", "Thanks!")
    ]  # fmt: skip
    first, second = history[1].content, history[3].content
    (note,) = done.stdout[len(first) + 1 :].split("\n")[:1]
    assert note.startswith("  [") and note.endswith(f"] Melanie: {PAINTS}")
    assert done.stdout == f"{first}\n{note}\n{second}\n"

    # --show-notes prints them after every reply; --chat resumes the same conversation.
    more = memos("chat", cube.id, "--chat", chat_id, "--show-notes", "--max-tokens", "4",
                 input="Where is the lake?\n")  # fmt: skip
    assert more.exit_code == 0, (more.stdout, more.stderr)
    assert more.stderr == f"chat {chat_id} resumed on cube {cube.id}\n"
    history = session.history()
    assert len(history) == 6 and history[4].content == "Where is the lake?"
    assert more.stdout.startswith(f"{history[5].content}\n  [")
    assert more.stdout.endswith(f"] Melanie: {PAINTS}\n")


def test_quit_unknown_commands_and_refused_turns(
    memos: Any, client: MemosClient, cube: Cube
) -> None:
    # 70000 tokens is over the route's bound: that turn is refused, the conversation goes on.
    done = memos("chat", cube.id, "--max-tokens", "70000",
                 input="/notes\n/frobnicate\nhello\n/quit\nnever sent\n")  # fmt: skip
    assert done.exit_code == 1
    chat_id = _opened(done.stderr, cube.id)
    err = done.stderr.splitlines()[1:]
    assert err[0].startswith("unknown command /frobnicate; /notes:")
    assert err[1].startswith("error: validation_error: ") and len(err) == 2, done.stderr
    assert done.stdout == "  (no reply yet)\n"
    assert client.chat(cube.id, chat_id=chat_id).history() == []  # "never sent" was not

    resumed_with_settings = memos("chat", cube.id, "--chat", chat_id, "--system", "x")
    assert resumed_with_settings.exit_code == 1
    assert resumed_with_settings.stderr.startswith("error: usage: --system and --recall-top-k")
    missing = memos("chat", cube.id, "--chat", "chat_nope")
    assert missing.exit_code == 1 and missing.stderr.startswith("error: ")


def test_a_real_process_with_piped_stdin_answers_each_line_and_ends_at_eof(
    daemon: Any, user: User, client: MemosClient, cube: Cube
) -> None:
    env = {**os.environ, "MEMOS_URL": daemon.url, "MEMOS_API_KEY": str(user.api_key)}
    done = subprocess.run(
        [sys.executable, "-m", "memos", "chat", cube.id, "--max-tokens", "4"],
        input="Hello there!\nHow are you?\n", cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    chat_id = _opened(done.stderr, cube.id)
    history = client.chat(cube.id, chat_id=chat_id).history()
    assert [m.content for m in history[::2]] == ["Hello there!", "How are you?"]
    assert done.stdout == f"{history[1].content}\n{history[3].content}\n"


def test_on_a_terminal_it_prompts_streams_and_quits(
    daemon: Any, user: User, client: MemosClient, cube: Cube
) -> None:
    env = {**os.environ, "MEMOS_URL": daemon.url, "MEMOS_API_KEY": str(user.api_key)}
    terminal, its_end = os.openpty()  # stdin is a terminal: the REPL prompts
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "memos", "chat", cube.id, "--max-tokens", "4", "--show-notes"],
            stdin=its_end, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env,
            text=True,
        )  # fmt: skip
        os.close(its_end)
        os.write(terminal, b"Hello there!\n/quit\nnever sent\n")
        out, err = proc.communicate(timeout=600)
    finally:
        os.close(terminal)
    assert proc.returncode == 0, err
    chat_id = _opened(err, cube.id)
    assert err.splitlines()[1].startswith("/notes: ")  # the commands, shown on a terminal
    history = client.chat(cube.id, chat_id=chat_id).history()
    assert [m.content for m in history[::2]] == ["Hello there!"]
    assert out == f"you> {history[1].content}\n  (no notes recalled)\nyou> "
