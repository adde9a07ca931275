"""`python -m memos ...` is the same as the `memos` command."""

from memos.cli import app

app()
