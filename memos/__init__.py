"""memosd: a memory operating system daemon for LLM apps."""

__version__ = "0.1.0"
