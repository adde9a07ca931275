"""Local inference runtime: model loading, prefill, KV capture, compression, injection, generation.

Arrives with the activation-memory issue; the package exists so the layout is fixed from day one.
"""
