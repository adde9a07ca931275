"""The cube domain: notes, links, retrieval indexes, activation store, episodes.

Nothing here knows about HTTP or SQL; the daemon (`memos`) feeds it plain data.
"""
