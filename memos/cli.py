"""The `memos` command line: run the daemon, and talk to one through the SDK.

`memos serve` builds `Settings` from the flags actually given (env `MEMOS_*` fills the rest) and
runs the daemon in the foreground. Every other command is a thin shell over `memos.client`:
`memos [--url URL] [--api-key KEY] <command> ...`, with `MEMOS_URL` / `MEMOS_API_KEY` as env
defaults and, failing a key, the admin key the daemon wrote to `<data dir>/admin.key`, so that
on the daemon's own machine `memos user create alice` just works.

Heavy imports (the daemon, settings and through them torch) happen inside the commands that need
them, so `memos --help` and the client commands start fast. SDK errors print
`error: <code>: <message>` on stderr and exit 1, without a traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import BaseModel, ValidationError
from tqdm import tqdm

from memos.client import DEFAULT_URL, Activation, MemoryInput, MemosClient, MemosError

MAX_BATCH = 1000  # the server refuses larger batches with 413

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


@dataclass(frozen=True)
class _Target:
    url: str
    api_key: str | None


def _parse_datetime(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not an ISO 8601 datetime") from None


def _parse_metadata(value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON: {exc.msg}") from None
    if not isinstance(parsed, dict):
        raise typer.BadParameter("must be a JSON object")
    return parsed


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
SessionOpt = Annotated[str | None, typer.Option("--session-id", help="Session id.")]
DateOpt = Annotated[
    datetime | None,
    typer.Option(parser=_parse_datetime, metavar="ISO8601", help="Naive means UTC."),
]
BatchOpt = Annotated[
    int, typer.Option("--batch-size", min=1, max=MAX_BATCH, help="Memories per request.")
]


@app.callback()
def main(
    ctx: typer.Context,
    url: Annotated[
        str, typer.Option("--url", envvar="MEMOS_URL", help="Daemon base URL.")
    ] = DEFAULT_URL,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="MEMOS_API_KEY",
            help="API key; default: the admin key in $MEMOS_DATA_DIR/admin.key if readable.",
        ),
    ] = None,
) -> None:
    ctx.obj = _Target(url=url, api_key=api_key)


def _admin_key() -> str | None:
    """The key in `<data dir>/admin.key`, data dir from `MEMOS_DATA_DIR` or the default."""
    data_dir = os.environ.get("MEMOS_DATA_DIR")
    if not data_dir:
        from memos.settings import default_data_dir  # lazy: settings pulls in the embedder config

        data_dir = str(default_data_dir())
    try:
        return (Path(data_dir) / "admin.key").read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _fail(code: str, message: str) -> NoReturn:
    typer.echo(f"error: {code}: {message}", err=True)
    raise typer.Exit(1)


@contextmanager
def _client(ctx: typer.Context) -> Iterator[MemosClient]:
    """An SDK client for the command; turns SDK errors into `error: code: message`, exit 1."""
    target: _Target = ctx.obj
    try:
        with MemosClient(target.url, api_key=target.api_key or _admin_key()) as client:
            yield client
    except MemosError as exc:
        _fail(exc.code, exc.message)


def _print_json(value: BaseModel | Sequence[BaseModel]) -> None:
    if isinstance(value, BaseModel):
        typer.echo(value.model_dump_json(indent=2))
    else:
        typer.echo(json.dumps([v.model_dump(mode="json") for v in value], indent=2))


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _short(text: str | None, width: int = 80) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _when(value: datetime | None) -> str:
    return value.isoformat(timespec="minutes") if value else ""


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
    wait: Annotated[bool, typer.Option(help="Wait for a background build.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Prefill a context once and store its KV cache (from --text, --memory-id or --session-id)."""
    with _client(ctx) as client:
        act = client.create_activation(
            cube_id, text, memory_id, session_id, bits=bits, budget_tokens=budget_tokens
        )
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
                    f"reused {part.reused_tokens}",
                    err=True,
                )


@app.command("import")
def import_(
    ctx: typer.Context,
    cube_id: Annotated[str | None, typer.Argument(help="Target cube (not with --locomo).")] = None,
    file: Annotated[
        Path | None, typer.Argument(exists=True, dir_okay=False, help="JSONL of memories.")
    ] = None,
    locomo: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="A LoCoMo JSON file: one cube each."),
    ] = None,
    batch_size: BatchOpt = 256,
) -> None:
    """Import memories: `import CUBE_ID FILE.jsonl`, or `import --locomo FILE`.

    A JSONL line is a memory object as the API returns it (e.g. from `memos export`): only
    content, session_id, speaker, timestamp and metadata are used; ids, versions and derived
    fields are assigned anew. The whole file is checked before anything is sent. Batches are
    atomic on the server, the import as a whole is not.
    """
    if locomo is not None:
        if cube_id is not None or file is not None:
            raise typer.BadParameter("--locomo takes no CUBE_ID or FILE: it creates the cubes")
        with _client(ctx) as client:
            _import_locomo(client, locomo, batch_size)
        return
    if cube_id is None or file is None:
        raise typer.BadParameter("give CUBE_ID and FILE, or --locomo FILE")
    items = _read_jsonl(file)
    with _client(ctx) as client:
        _upload(client, cube_id, items, batch_size, desc=cube_id)
    typer.echo(f"imported {len(items)} memories into {cube_id}")


def _read_jsonl(path: Path) -> list[MemoryInput]:
    fields = set(MemoryInput.model_fields)
    items: list[MemoryInput] = []
    with path.open(encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                items.append(MemoryInput.model_validate({k: obj[k] for k in fields & obj.keys()}))
            except ValidationError as exc:
                errors = exc.errors(include_url=False)
                why = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
                _fail("invalid_input", f"{path}:{lineno}: {why}")
            except ValueError as exc:  # includes json.JSONDecodeError
                _fail("invalid_input", f"{path}:{lineno}: {exc}")
    return items


def _upload(
    client: MemosClient, cube_id: str, items: Sequence[MemoryInput], batch_size: int, desc: str
) -> None:
    done = 0
    with tqdm(total=len(items), unit="mem", desc=desc) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            try:
                client.add_memories(cube_id, batch)
            except MemosError:
                bar.close()
                typer.echo(f"{done} of {len(items)} memories were stored before this", err=True)
                raise
            done += len(batch)
            bar.update(len(batch))


def _import_locomo(client: MemosClient, path: Path, batch_size: int) -> None:
    from memos.locomo import load_locomo

    try:
        conversations = load_locomo(path)
    except ValueError as exc:
        _fail("invalid_input", str(exc))
    for conv in conversations:
        a, b = conv.speakers
        cube = client.create_cube(conv.sample_id, f"LoCoMo conversation {conv.sample_id}: {a}, {b}")
        items = [
            MemoryInput(
                content=turn.render(),
                speaker=turn.speaker,
                session_id=f"session_{turn.session}",
                timestamp=turn.timestamp,
                metadata={"dia_id": turn.dia_id},
            )
            for turn in conv.turns
        ]
        _upload(client, cube.id, items, batch_size, desc=conv.sample_id)
        typer.echo(f"{conv.sample_id}\t{cube.id}\t{len(items)} turns")


@app.command()
def export(
    ctx: typer.Context,
    cube_id: str,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", dir_okay=False, help="Default: stdout.")
    ] = None,
) -> None:
    """Write every memory of a cube as JSONL (the input of `memos import`)."""
    with _client(ctx) as client:
        if output is None:
            for memory in client.iter_memories(cube_id):
                typer.echo(memory.model_dump_json())
            return
        # Written aside and renamed, so a failure half-way leaves no truncated export behind.
        partial = output.with_name(output.name + ".part")
        count = 0
        try:
            with partial.open("w", encoding="utf-8") as out:
                for memory in client.iter_memories(cube_id):
                    out.write(memory.model_dump_json() + "\n")
                    count += 1
            partial.replace(output)
        finally:
            partial.unlink(missing_ok=True)
    typer.echo(f"exported {count} memories to {output}", err=True)
