"""`memos chat CUBE_ID`: a conversation with the daemon's model and the cube's memory.

Each line read is one turn (`ChatSession.stream`): the reply is printed as it is decoded. On a
terminal the command prompts (`you> `) and says on stderr which chat it is (`--chat ID` resumes
it later); with standard input piped, it prints only the replies (one line each) and ends at
EOF, so `printf 'hi\\nbye\\n' | memos chat CUBE` is a script. Commands: `/notes` shows the
notes recalled into the last reply, `/quit` ends. A turn the server refuses (`chat_busy`, a
429) prints `error: <code>: <message>` on stderr and the conversation goes on; the exit status
is then 1. Ctrl-C during a reply stops it (the server stores neither side of that turn).

Registered on the app by `memos.cli`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Annotated

import typer

from memos.cli_support import fail, sdk_client, short
from memos.client import ChatReply, MemosClient, MemosConnectionError, MemosError, NotFound
from memos.client_chat import ChatSession

COMMANDS = "/notes: the notes recalled into the last reply; /quit: end (or EOF)"
PROMPT = "you> "


def chat(
    ctx: typer.Context,
    cube_id: str,
    chat_id: Annotated[
        str | None, typer.Option("--chat", help="Resume this chat instead of opening one.")
    ] = None,
    system: Annotated[
        str | None, typer.Option(help="System prompt of a new chat (default: the model's own).")
    ] = None,
    recall_top_k: Annotated[
        int | None,
        typer.Option(min=0, help="Notes recalled a turn, for a new chat (default: the server's)."),
    ] = None,
    show_notes: Annotated[
        bool, typer.Option("--show-notes", help="Print the recalled notes after each reply.")
    ] = False,
    max_tokens: Annotated[
        int | None, typer.Option(min=1, help="Longest reply, in tokens (server default).")
    ] = None,
) -> None:
    """Chat with the daemon's model over the cube's memory: each line is a turn, stored as a
    memory with the reply. Interactive on a terminal; with piped input, one message per line,
    the replies printed, the end at EOF. `/notes` shows the last reply's recalled notes,
    `/quit` ends."""
    if chat_id is not None and (system is not None or recall_top_k is not None):
        fail("usage", "--system and --recall-top-k set up a new chat; a resumed one keeps its own")
    interactive = sys.stdin.isatty()
    failed = False
    with sdk_client(ctx) as client:
        if chat_id is not None:
            session = client.chat(cube_id, chat_id=chat_id)
        else:
            session = client.chat(cube_id, system=system, recall_top_k=recall_top_k)
        verb = "resumed" if chat_id is not None else "opened"
        typer.echo(f"chat {session.id} {verb} on cube {cube_id}", err=True)
        if interactive:
            typer.echo(COMMANDS, err=True)
        last: ChatReply | None = None
        for line in _lines(interactive):
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit"):
                break
            if text == "/notes":
                _print_notes(client, session, last)
                continue
            if text.startswith("/"):
                typer.echo(f"unknown command {text.split()[0]}; {COMMANDS}", err=True)
                continue
            try:
                last = _turn(session, text, max_tokens) or last
            except MemosConnectionError:
                raise  # the daemon is gone: `sdk_client` reports it and exits
            except MemosError as exc:
                typer.echo(f"error: {exc.code}: {exc.message}", err=True)
                failed = True
                continue
            if show_notes and last is not None:
                _print_notes(client, session, last)
    if failed:
        raise typer.Exit(1)


def _lines(interactive: bool) -> Iterator[str]:
    """The user's lines: prompted on a terminal (Ctrl-C or Ctrl-D ends), else stdin's."""
    if not interactive:
        yield from sys.stdin
        return
    while True:
        try:
            yield input(PROMPT)
        except (EOFError, KeyboardInterrupt):
            typer.echo(err=True)
            return


def _turn(session: ChatSession, text: str, max_tokens: int | None) -> ChatReply | None:
    """Stream one reply to stdout; None if Ctrl-C stopped it (nothing was stored)."""
    with session.stream(text, max_tokens=max_tokens) as stream:
        try:
            for piece in stream:
                typer.echo(piece, nl=False)
        except KeyboardInterrupt:
            typer.echo("\n[stopped: this turn was not stored]", err=True)
            return None
    typer.echo()
    return stream.reply


def _print_notes(client: MemosClient, session: ChatSession, reply: ChatReply | None) -> None:
    """The last reply's recalled notes, best first: `  [score] speaker: content`."""
    if reply is None:
        typer.echo("  (no reply yet)")
        return
    if not reply.recalled:
        typer.echo("  (no notes recalled)")
        return
    for cited in reply.recalled:
        try:
            memory = client.get_memory(session.cube_id, cited.memory_id)
        except NotFound:  # deleted since the turn
            typer.echo(f"  [{cited.score:.2f}] ({cited.memory_id} is gone)")
            continue
        who = f"{memory.speaker}: " if memory.speaker else ""
        typer.echo(f"  [{cited.score:.2f}] {who}{short(memory.content, 100)}")
