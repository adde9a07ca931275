"""The `memos` command line: run the daemon, and talk to one through the SDK.

`memos serve` builds `Settings` from the flags actually given (env `MEMOS_*` fills the rest) and
runs the daemon in the foreground. Every other command is a thin shell over `memos.client`:
`memos [--url URL] [--api-key KEY] <command> ...`, with `MEMOS_URL` / `MEMOS_API_KEY` as env
defaults. Without a URL the daemon is found where `memos serve` would bind with the same
environment (`MEMOS_HOST`, `MEMOS_PORT`, or the TOML file `MEMOS_CONFIG_FILE` names), and without
a key the CLI uses the admin key the daemon wrote to `<data dir>/admin.key`, so that on the
daemon's own machine `memos user create alice` just works.

Heavy imports (the daemon, settings and through them torch) happen inside the commands that need
them, so `memos --help` and the client commands start fast. SDK errors print
`error: <code>: <message>` on stderr and exit 1, without a traceback. What the commands share
is in `memos.cli_support` (imported under the short private names the commands use); `import`
and `export` are in `memos.cli_jsonl`, `chat` in `memos.cli_chat`.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from memos.cli_chat import chat
from memos.cli_jsonl import export, import_
from memos.cli_support import DEFAULT_TIMEOUT_S, CliTarget, DateOpt, JsonOpt, SessionOpt
from memos.cli_support import fail as _fail
from memos.cli_support import parse_metadata as _parse_metadata
from memos.cli_support import print_json as _print_json
from memos.cli_support import print_table as _print_table
from memos.cli_support import sdk_client as _client
from memos.cli_support import short as _short
from memos.cli_support import when as _when
from memos.client import Activation, Cube, MemoryInput

app = typer.Typer(
    help="memosd: a memory daemon for LLM apps.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs reflow instead of keeping source breaks
)
user_app = typer.Typer(help="Manage users (admin key).", no_args_is_help=True)
cube_app = typer.Typer(help="Manage memory cubes.", no_args_is_help=True)
key_app = typer.Typer(help="Your own API keys.", no_args_is_help=True)
app.add_typer(user_app, name="user")
app.add_typer(key_app, name="key")
activation_app = typer.Typer(
    help="Activation memory: KV caches of the daemon's model.", no_args_is_help=True
)
app.add_typer(cube_app, name="cube")
app.add_typer(activation_app, name="activation")


@app.callback()
def main(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            envvar="MEMOS_URL",
            help="Daemon base URL; default: http://$MEMOS_HOST:$MEMOS_PORT (127.0.0.1:8765), "
            "where `memos serve` binds.",
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="MEMOS_API_KEY",
            help="API key; default: the admin key in $MEMOS_DATA_DIR/admin.key if readable.",
        ),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(envvar="MEMOS_TIMEOUT", min=1, help="Seconds to wait for each request."),
    ] = DEFAULT_TIMEOUT_S,
) -> None:
    ctx.obj = CliTarget(url=url, api_key=api_key, timeout=timeout)


# --------------------------------------------------------------------------- daemon


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address [env MEMOS_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [env MEMOS_PORT].")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Data directory [env MEMOS_DATA_DIR].")
    ] = None,
) -> None:
    """Run the daemon in the foreground."""
    from memos.daemon import serve as run_daemon  # lazy: imports the whole server stack
    from memos.settings import Settings

    # Only the flags given: the rest must come from MEMOS_* env vars (or the TOML file).
    overrides: dict[str, Any] = {"host": host, "port": port, "data_dir": data_dir}
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        _fail("invalid_settings", str(exc))
    run_daemon(settings)


# --------------------------------------------------------------------------- users and cubes


@user_app.command("create")
def user_create(ctx: typer.Context, name: str, as_json: JsonOpt = False) -> None:
    """Create a user and print its id and API key (shown only once)."""
    with _client(ctx) as client:
        user = client.create_user(name)
    if as_json:
        _print_json(user)
    else:
        typer.echo(f"id: {user.id}\napi_key: {user.api_key}")


@cube_app.command("create")
def cube_create(
    ctx: typer.Context,
    name: str,
    description: Annotated[str | None, typer.Option(help="Free text.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a cube owned by the caller and print its id."""
    with _client(ctx) as client:
        cube = client.create_cube(name, description)
    if as_json:
        _print_json(cube)
    else:
        typer.echo(f"id: {cube.id}\nname: {cube.name}")


@cube_app.command("list")
def cube_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Cubes the caller owns or was granted."""
    with _client(ctx) as client:
        cubes = client.list_cubes()
    if as_json:
        _print_json(cubes)
        return
    rows = [[c.id, c.name, _when(c.created_at), _short(c.description, 50)] for c in cubes]
    _print_table(["ID", "NAME", "CREATED", "DESCRIPTION"], rows)


def _cube_fields(cube: Cube) -> list[tuple[str, object]]:
    fields: list[tuple[str, object]] = [
        ("id", cube.id), ("name", cube.name), ("description", cube.description or ""),
        ("owner_id", cube.owner_id), ("role", cube.role or ""), ("created", _when(cube.created_at)),
    ]  # fmt: skip
    if (stats := cube.stats) is not None:
        fields += [
            ("memories", stats.memories),
            ("activations", stats.activations),
            ("bytes", stats.bytes),
            ("enrichment_pending", stats.enrichment_pending),
        ]
    return fields


@cube_app.command("show")
def cube_show(ctx: typer.Context, cube_id: str, as_json: JsonOpt = False) -> None:
    """A cube and its stats: memories, activations, bytes stored, notes awaiting enrichment."""
    with _client(ctx) as client:
        cube = client.get_cube(cube_id)
    if as_json:
        _print_json(cube)
    else:
        typer.echo("\n".join(f"{key}: {value}" for key, value in _cube_fields(cube)))


@cube_app.command("delete")
def cube_delete(
    ctx: typer.Context,
    cube_id: str,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a cube with its memories and activations (owner only; cannot be undone).

    Asks first, on stderr, and reads the answer from stdin; without an answer (stdin closed or
    empty, as in a script) nothing is deleted unless `--yes` is given.
    """
    with _client(ctx) as client:
        cube = client.get_cube(cube_id)
        if cube.role not in (None, "owner"):  # the server would refuse too, after the question
            _fail(
                "forbidden", f"your role on cube {cube.id!r} is {cube.role}; deleting needs owner"
            )
        if not yes:
            _confirm_delete(cube)
        client.delete_cube(cube.id)
    typer.echo(f"deleted {cube.id}")


def _confirm_delete(cube: Cube) -> None:
    """Ask on stderr, read the answer from stdin: stdout stays for the result alone."""
    stats = cube.stats
    held = f" with {stats.memories} memories and {stats.activations} activations" if stats else ""
    typer.echo(f"Delete cube {cube.name!r} ({cube.id}){held}? [y/N]: ", nl=False, err=True)
    try:
        answer = sys.stdin.readline() if sys.stdin is not None else ""
    except (OSError, ValueError):  # stdin closed (`<&-`) or unreadable
        answer = ""
    if not answer:  # end of input (closed, empty, /dev/null): nobody can answer
        typer.echo(err=True)
        _fail(
            "confirmation_required",
            f"no answer on stdin, so cube {cube.id} was not deleted; pass --yes to delete "
            "without asking",
        )
    if answer.strip().lower() not in ("y", "yes"):
        typer.echo(f"not deleted: {cube.id}", err=True)
        raise typer.Exit(1)


class GrantRole(StrEnum):
    reader = "reader"
    writer = "writer"


@cube_app.command("grant")
def cube_grant(
    ctx: typer.Context,
    cube_id: str,
    user_id: str,
    role: Annotated[
        GrantRole, typer.Option("--role", help="reader: read and search; writer: also write.")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Let another user read (or write) a cube you own; granting again changes the role."""
    with _client(ctx) as client:
        grant = client.grant(cube_id, user_id, role.value)
    if as_json:  # the grant as the server answered it (no `created_at`: only listings have it)
        typer.echo(grant.model_dump_json(indent=2, exclude_none=True))
    else:
        typer.echo(f"granted {grant.role} on {grant.cube_id} to {grant.user_id}")


@user_app.command("list")
def user_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Every user, oldest first (admin key)."""
    with _client(ctx) as client:
        users = client.list_users()
    if as_json:
        _print_json(users)
        return
    rows = [[u.id, u.name, "yes" if u.is_admin else "", _when(u.created_at)] for u in users]
    _print_table(["ID", "NAME", "ADMIN", "CREATED"], rows)


@cube_app.command("grants")
def cube_grants(ctx: typer.Context, cube_id: str, as_json: JsonOpt = False) -> None:
    """Who else may use the cube (owner only)."""
    with _client(ctx) as client:
        grants = client.list_grants(cube_id)
    if as_json:
        _print_json(grants)
        return
    _print_table(
        ["USER", "ROLE", "SINCE"], [[g.user_id, g.role, _when(g.created_at)] for g in grants]
    )


@cube_app.command("revoke")
def cube_revoke(ctx: typer.Context, cube_id: str, user_id: str) -> None:
    """Take a user's grant on the cube away (owner only); they lose it at once."""
    with _client(ctx) as client:
        client.revoke_grant(cube_id, user_id)
    typer.echo(f"revoked: {user_id} on {cube_id}")


@key_app.command("list")
def key_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Your API keys, revoked ones included (never their secrets)."""
    with _client(ctx) as client:
        keys = client.list_keys()
    if as_json:
        _print_json(keys)
        return
    rows = [[k.id, k.name, k.prefix + "…", _when(k.created_at), _when(k.revoked_at)] for k in keys]
    _print_table(["ID", "NAME", "PREFIX", "CREATED", "REVOKED"], rows)


@key_app.command("create")
def key_create(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Option(help="A label to tell keys apart.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an API key for yourself and print it (shown only once)."""
    with _client(ctx) as client:
        key = client.create_key(name)
    if as_json:
        _print_json(key)
    else:
        typer.echo(f"id: {key.id}\napi_key: {key.api_key}")


@key_app.command("revoke")
def key_revoke(ctx: typer.Context, key_id: str) -> None:
    """Revoke one of your keys; it stops working at once. Your last key cannot be revoked."""
    with _client(ctx) as client:
        client.revoke_key(key_id)
    typer.echo(f"revoked: {key_id}")


# --------------------------------------------------------------------------- memories


@app.command()
def add(
    ctx: typer.Context,
    cube_id: str,
    content: str,
    session_id: SessionOpt = None,
    speaker: Annotated[str | None, typer.Option(help="Who said it.")] = None,
    timestamp: DateOpt = None,
    metadata: Annotated[str | None, typer.Option(metavar="JSON", help="A JSON object.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Store one memory and print its id."""
    item = MemoryInput(
        content=content,
        session_id=session_id,
        speaker=speaker,
        timestamp=timestamp,
        metadata=_parse_metadata(metadata),
    )
    with _client(ctx) as client:
        (memory,) = client.add_memories(cube_id, [item])
    if as_json:
        _print_json(memory)
    else:
        typer.echo(f"id: {memory.id}")


@app.command()
def search(
    ctx: typer.Context,
    cube_id: str,
    query: str,
    top_k: Annotated[int, typer.Option(min=1, help="How many hits.")] = 10,
    session_id: SessionOpt = None,
    since: DateOpt = None,
    until: DateOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Search a cube; a table of hits, best first."""
    with _client(ctx) as client:
        result = client.search(cube_id, query, top_k, session_id, since, until)
    if as_json:
        _print_json(result)
        return
    rows = [
        [f"{h.score:.3f}", h.memory.id, _when(h.memory.timestamp), h.memory.speaker or "",
         _short(h.memory.content)]
        for h in result.hits
    ]  # fmt: skip
    _print_table(["SCORE", "ID", "TIMESTAMP", "SPEAKER", "CONTENT"], rows)
    typer.echo(f"{len(result.hits)} hits in {result.took_ms:.1f} ms", err=True)


# --------------------------------------------------------------------------- activations


def _activation_row(a: Activation) -> list[str]:
    state = f"{a.state} {a.progress:.0%}" if a.state == "building" else a.state
    return [a.id, state, str(a.tokens), str(a.kept_tokens), str(a.bits), str(a.bytes),
            _when(a.created_at)]  # fmt: skip


ACTIVATION_HEADERS = ["ID", "STATE", "TOKENS", "KEPT", "BITS", "BYTES", "CREATED"]


@activation_app.command("create")
def activation_create(
    ctx: typer.Context,
    cube_id: str,
    text: Annotated[str | None, typer.Option(help="Build from this text.")] = None,
    memory_id: Annotated[
        list[str] | None, typer.Option("--memory-id", help="Build from memories (repeat).")
    ] = None,
    session_id: SessionOpt = None,
    bits: Annotated[int, typer.Option(help="16 (none), 8, 4 or 2.")] = 16,
    budget_tokens: Annotated[
        int | None, typer.Option(min=1, help="Keep at most this many tokens.")
    ] = None,
    episodic_budget: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Episodic: one cache of at most this many tokens per episode of the "
            "conversation (--session-id or --memory-id).",
        ),
    ] = None,
    episodes: Annotated[int, typer.Option(min=1, help="Episodic: how many episodes.")] = 4,
    wait: Annotated[bool, typer.Option(help="Wait for a background build.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Prefill a context once and store its KV cache (from --text, --memory-id or --session-id);
    with --episodic-budget, one cache per episode of the conversation."""
    episodic = None
    if episodic_budget is not None:
        episodic = {"episodes": episodes, "budget_tokens": episodic_budget}
    with _client(ctx) as client:
        act = client.create_activation(
            cube_id, text, memory_id, session_id, bits=bits, budget_tokens=budget_tokens,
            episodic=episodic,
        )  # fmt: skip
        if wait and act.state == "building":
            act = client.wait_activation(cube_id, act.id)
    if as_json:
        _print_json(act)
    else:
        _print_table(ACTIVATION_HEADERS, [_activation_row(act)])


@activation_app.command("list")
def activation_list(ctx: typer.Context, cube_id: str, as_json: JsonOpt = False) -> None:
    """The cube's activations, oldest first."""
    with _client(ctx) as client:
        items = client.list_activations(cube_id)
    if as_json:
        _print_json(items)
    else:
        _print_table(ACTIVATION_HEADERS, [_activation_row(a) for a in items])


@activation_app.command("get")
def activation_get(
    ctx: typer.Context, cube_id: str, activation_id: str, as_json: JsonOpt = False
) -> None:
    with _client(ctx) as client:
        act = client.get_activation(cube_id, activation_id)
    if as_json:
        _print_json(act)
    else:
        _print_table(ACTIVATION_HEADERS, [_activation_row(act)])


@activation_app.command("delete")
def activation_delete(ctx: typer.Context, cube_id: str, activation_id: str) -> None:
    with _client(ctx) as client:
        client.delete_activation(cube_id, activation_id)
    typer.echo(f"deleted {activation_id}")


@app.command()
def generate(
    ctx: typer.Context,
    cube_id: str,
    prompt: str,
    activation_id: Annotated[
        str | None, typer.Option("--activation", help="Reuse this activation's KV cache.")
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1)] = 64,
    as_json: JsonOpt = False,
) -> None:
    """Answer a prompt with the daemon's model: the text as it is decoded, then the timings
    on stderr."""
    with _client(ctx) as client:
        if as_json:
            _print_json(client.generate(cube_id, prompt, activation_id, max_tokens))
            return
        for part in client.generate_stream(cube_id, prompt, activation_id, max_tokens):
            if isinstance(part, str):
                typer.echo(part, nl=False)
            else:
                typer.echo()
                typer.echo(
                    f"ttft {part.ttft_ms:.1f} ms, prompt {part.prompt_tokens} tokens, "
                    f"reused {part.reused_tokens}"
                    + (f", episode {part.episode}" if part.episode is not None else ""),
                    err=True,
                )


# --------------------------------------------------------------------------- import, export

app.command("import")(import_)
app.command()(export)

# --------------------------------------------------------------------------- chat, MCP

app.command()(chat)


@app.command()
def mcp(ctx: typer.Context) -> None:
    """Serve the Model Context Protocol on stdin/stdout (for agents and IDEs): tools
    `add_memories`, `search` and `chat`, acting with this CLI's key on the daemon at its URL
    (`MEMOS_API_KEY`, `MEMOS_URL`)."""
    from memos.cli_support import admin_key, daemon_url
    from memos.mcp_server import serve_stdio  # lazy: the mcp package is only needed here

    target: CliTarget = ctx.obj
    serve_stdio(target.url or daemon_url(), target.api_key or admin_key(), target.timeout)
