"""Triton kernels with pure-torch references (quantize/pack, unpack/dequantize).

Arrives with the activation-memory issue; the package exists so the layout is fixed from day one.
"""
