"""What every `memos` client command shares: finding the daemon and a key, errors, printing.

The daemon is found where `memos serve` would bind with the same environment: `MEMOS_HOST` and
`MEMOS_PORT`, else the TOML file `MEMOS_CONFIG_FILE` names, else 127.0.0.1:8765 (a wildcard
bind address is reached over loopback). The key defaults to the admin key the daemon wrote to
`<data dir>/admin.key`, the data dir found the same way. These are read here directly, not
through `Settings`, which would pull in torch and slow every command down.

SDK errors become `error: <code>: <message>` on stderr and exit status 1, without a traceback.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import BaseModel

from memos.client import MemosClient, MemosError
from memos.jsonl_format import parse_timestamp

MAX_BATCH = 1000  # the server refuses larger batches with 413
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8765  # Settings' defaults
LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "": DEFAULT_HOST}
# Per request. Generous: the first activation or generate loads the model (~20 s, more on a busy
# host) and an import batch embeds up to 1000 memories; a dead daemon is refused at once anyway.
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class CliTarget:
    """The global options, kept on the typer context for the commands."""

    url: str | None  # None: where the daemon binds (`daemon_url`)
    api_key: str | None
    timeout: float = DEFAULT_TIMEOUT_S


def daemon_setting(name: str) -> str | None:
    """A daemon setting where `Settings` reads it: `MEMOS_<NAME>`, else the TOML file."""
    if value := os.environ.get(f"MEMOS_{name.upper()}"):
        return value
    if not (toml_path := os.environ.get("MEMOS_CONFIG_FILE")):
        return None
    try:
        with open(toml_path, "rb") as toml:
            found = tomllib.load(toml).get(name)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        fail("invalid_settings", f"cannot read MEMOS_CONFIG_FILE {toml_path}: {exc}")
    return None if found is None else str(found)


def daemon_url() -> str:
    """`http://HOST:PORT` of a daemon started with this environment."""
    host = daemon_setting("host") or DEFAULT_HOST
    port = daemon_setting("port") or str(DEFAULT_PORT)
    if not port.isdigit() or not 0 < int(port) < 65_536:
        fail("invalid_settings", f"port {port!r} is not one a client can reach; set MEMOS_URL")
    host = LOOPBACK.get(host, host)
    if ":" in host and not host.startswith("["):  # an IPv6 address
        host = f"[{host}]"
    return f"http://{host}:{int(port)}"


def admin_key() -> str | None:
    """The key in `<data dir>/admin.key`, if readable."""
    data_dir = daemon_setting("data_dir")
    if not data_dir:
        from memos.settings import default_data_dir  # lazy: settings pulls in the embedder config

        data_dir = str(default_data_dir())
    try:
        return (Path(data_dir) / "admin.key").read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def fail(code: str, message: str) -> NoReturn:
    typer.echo(f"error: {code}: {message}", err=True)
    raise typer.Exit(1)


@contextmanager
def sdk_client(ctx: typer.Context) -> Iterator[MemosClient]:
    """An SDK client for the command; turns SDK errors into `error: code: message`, exit 1."""
    target: CliTarget = ctx.obj
    try:
        url = target.url or daemon_url()
        key = target.api_key or admin_key()
        with MemosClient(url, api_key=key, timeout=target.timeout) as client:
            yield client
    except MemosError as exc:
        fail(exc.code, exc.message)


# --------------------------------------------------------------------------- options


def parse_datetime(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_timestamp(value)  # a zone is required, as the API requires it
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def parse_metadata(value: str | None) -> dict[str, Any] | None:
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
    typer.Option(parser=parse_datetime, metavar="ISO8601", help="With a time zone: Z or +02:00."),
]
BatchOpt = Annotated[
    int, typer.Option("--batch-size", min=1, max=MAX_BATCH, help="Memories per request.")
]


# --------------------------------------------------------------------------- printing


def print_json(value: BaseModel | Sequence[BaseModel]) -> None:
    if isinstance(value, BaseModel):
        typer.echo(value.model_dump_json(indent=2))
    else:
        typer.echo(json.dumps([v.model_dump(mode="json") for v in value], indent=2))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def short(text: str | None, width: int = 80) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def when(value: datetime | None) -> str:
    return value.isoformat(timespec="minutes") if value else ""
