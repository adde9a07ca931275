"""The JSONL commands: `memos import` and `memos export` (format: `memos.jsonl_format`).

Registered on the app by `memos.cli`; the planning and resuming live in `memos.importer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from tqdm import tqdm

from memos.cli_support import BatchOpt, fail, sdk_client
from memos.client import Cube, MemosClient
from memos.importer import ImportRefused, PartialImport, Target, plan_by_name, plan_into, upload
from memos.jsonl_format import JsonlFile, Limits, read_jsonl, summarize


def import_(
    ctx: typer.Context,
    args: Annotated[
        list[str],
        typer.Argument(
            metavar="ARGS", show_default=False, help="CUBE_ID FILE; with --create: FILE..."
        ),
    ],
    create: Annotated[
        bool,
        typer.Option("--create", help="One new cube per FILE, named after it (a.jsonl: a)."),
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue an interrupted import: skip the lines the cube holds."
        ),
    ] = False,
    skip_existing: Annotated[
        bool, typer.Option("--skip-existing", help="With --create: leave existing cubes alone.")
    ] = False,
    description: Annotated[
        str | None, typer.Option(help="With --create: the new cubes' description.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check and plan only; write nothing.")
    ] = False,
    batch_size: BatchOpt = 256,
    batch_bytes: Annotated[
        int, typer.Option(min=1024, help="About this many bytes of JSON per request.")
    ] = 4 << 20,
    max_content_bytes: Annotated[
        int,
        typer.Option(
            envvar="MEMOS_LIMITS__MAX_CONTENT_BYTES", min=1, help="The daemon's content limit."
        ),
    ] = Limits.max_content_bytes,
) -> None:
    """Import memories from JSONL: `import CUBE_ID FILE`, or `import --create FILE...`.

    The format is in the README ("JSONL import and export"); `memos export` writes it. Every
    line of every file is checked, and every target cube looked up, before anything is written:
    one bad line (a timestamp without a time zone, empty content...) and nothing is imported.
    Requests are atomic batches sent in file order; if one fails, the earlier ones stay, and
    `--resume` later continues after them, once it has checked that the cube holds exactly the
    file's first lines. With `--create`, a cube you already own by a file's name stops the
    import unless `--skip-existing` (leave it) or `--resume` (continue it) is given.
    """
    paths, names = _import_args(args, create, resume, skip_existing, description)
    files = [read_jsonl(path, Limits(max_content_bytes)) for path in paths]
    _refuse_bad_lines(files)
    with sdk_client(ctx) as client:
        try:
            if create:
                existing = "skip" if skip_existing else "resume" if resume else "refuse"
                targets = plan_by_name(client, list(zip(names, files, strict=True)), existing)
            else:
                targets = [plan_into(client, args[0], files[0], resume)]
                _note_appending(targets[0], resume)
        except ImportRefused as exc:
            fail(exc.code, exc.message)
        for target in targets:
            if dry_run:
                typer.echo(_import_report(target, None, 0, dry_run=True))
                continue
            cube = target.cube or client.create_cube(
                target.name, description or f"imported from {target.file.path.name}"
            )
            sent = _send(client, cube, target, batch_size, batch_bytes)
            typer.echo(_import_report(target, cube, sent, dry_run=False))


def _import_args(
    args: list[str], create: bool, resume: bool, skip_existing: bool, description: str | None
) -> tuple[list[Path], list[str]]:
    """The files to read and, with --create, the cube name of each; usage errors exit 2."""
    if resume and skip_existing:
        raise typer.BadParameter("--resume or --skip-existing, not both")
    if not create:
        if len(args) != 2:
            raise typer.BadParameter("give CUBE_ID and FILE, or --create FILE...")
        if skip_existing or description is not None:
            raise typer.BadParameter("--skip-existing and --description go with --create")
    paths = [Path(a) for a in (args if create else args[1:])]
    for path in paths:
        if not path.is_file():
            raise typer.BadParameter(f"{path} is not a file")
    names = [path.stem for path in paths]
    if create and len(set(names)) < len(names):
        raise typer.BadParameter("two files would make cubes of the same name")
    return paths, names


def _note_appending(target: Target, resume: bool) -> None:
    cube = target.cube
    if resume or cube is None or cube.stats is None or not cube.stats.memories:
        return
    typer.echo(
        f"note: cube {cube.id} already holds {cube.stats.memories} memories; the file's are "
        "added after them (--resume continues an interrupted import of this file instead)",
        err=True,
    )


def _refuse_bad_lines(files: Sequence[JsonlFile]) -> None:
    problems = [p for f in files for p in f.problems]
    if problems:
        for line in summarize(problems):
            typer.echo(line, err=True)
        fail("invalid_input", f"{len(problems)} invalid lines; nothing was imported")
    for f in files:
        if f.unknown_fields:
            fields = ", ".join(f"{k} ({n} lines)" for k, n in sorted(f.unknown_fields.items()))
            typer.echo(f"{f.path}: ignored fields not in the import format: {fields}", err=True)


def _send(client: MemosClient, cube: Cube, target: Target, batch_size: int, max_bytes: int) -> int:
    lines = target.to_send
    with tqdm(total=len(lines), unit="mem", desc=target.name) as bar:
        try:
            return upload(client, cube.id, lines, batch_size, max_bytes, bar.update)
        except PartialImport as exc:
            bar.close()
            _explain_partial(target, cube, exc)
            fail(exc.error.code, exc.error.message)


def _explain_partial(target: Target, cube: Cube, exc: PartialImport) -> None:
    stored = target.present + exc.stored
    first, last = exc.failed[0].lineno, exc.failed[-1].lineno
    said = f"{target.file.path}: the first {stored} of {len(target.file.lines)} memories are in "
    if exc.unknown:  # no reply: the batch may have been committed all the same
        typer.echo(
            f"{said}cube {cube.id}, and lines {first} to {last} may be too (no reply came); "
            "the same command with --resume checks which and continues after them",
            err=True,
        )
    else:
        typer.echo(
            f"{said}cube {cube.id}; once the cause is fixed, the same command with --resume "
            f"continues from line {first}",
            err=True,
        )


def _import_report(target: Target, cube: Cube | None, sent: int, dry_run: bool) -> str:
    cube_id = cube.id if cube else target.cube.id if target.cube else "(new)"
    if target.skip:
        return f"{target.name}\t{cube_id}\tskipped: the cube exists"
    count = len(target.to_send) if dry_run else sent
    verb = "would import" if dry_run else "imported"
    present = f" ({target.present} already present)" if target.present else ""
    return f"{verb} {count} memories into {cube_id}{present}\t{target.file.path}"


def export(
    ctx: typer.Context,
    cube_id: str,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", dir_okay=False, help="Default: stdout.")
    ] = None,
) -> None:
    """Write every memory of a cube as JSONL (the input of `memos import`)."""
    with sdk_client(ctx) as client:
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
