"""Backend selection and the public entry points (`kernels.dispatch`)."""

from __future__ import annotations

import re

import pytest
import torch

import kernels.dispatch as dispatch
from kernels import (
    BACKENDS,
    QuantizationError,
    dequantize,
    dequantize_reference,
    quantize,
    quantize_reference,
    resolve_backend,
    triton_available,
)
from tests.kernels.conftest import DEVICE, ON_GPU, random_kv


def test_backends() -> None:
    assert BACKENDS == ("auto", "torch", "triton")
    assert triton_available()  # triton is a dev dependency
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    assert resolve_backend("torch", torch.device("cuda")) == "torch"
    assert resolve_backend("triton", torch.device("cpu")) == "triton"


def test_unknown_backend() -> None:
    x = random_kv((1, 1, 32, 64), torch.float32)
    message = "backend='cuda' is unknown; allowed: ('auto', 'torch', 'triton')"
    with pytest.raises(QuantizationError, match=f"^{re.escape(message)}$"):
        quantize(x, bits=4, group_size=32, axis="token", backend="cuda")
    q = quantize(x, bits=4, group_size=32, axis="token")
    with pytest.raises(QuantizationError, match=f"^{re.escape(message)}$"):
        dequantize(q, backend="cuda")


def test_triton_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    x = random_kv((1, 1, 32, 64), torch.float32)
    message = "backend='triton' is unavailable: triton is not installed; use 'torch' or 'auto'"
    with pytest.raises(QuantizationError, match=f"^{re.escape(message)}$"):
        quantize(x, bits=4, group_size=32, axis="token", backend="triton")
    # "auto" quietly uses the reference instead.
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    q = quantize(x, bits=4, group_size=32, axis="token", backend="auto")
    assert torch.equal(q.packed, quantize_reference(x, bits=4, group_size=32, axis="token").packed)


def test_auto_picks_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(dispatch, "quantize_reference", lambda x, **kw: calls.append("q"))
    quantize(torch.zeros(1, 1, 32, 64), bits=4, group_size=32, axis="token")
    assert calls == ["q"]


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_auto_picks_triton_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "quantize_reference", lambda x, **kw: pytest.fail("torch ran"))
    q = quantize(random_kv((1, 1, 32, 64), torch.float16), bits=4, group_size=32, axis="token")
    assert q.packed.is_cuda


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_validates_before_dispatch(backend: str) -> None:
    x = random_kv((1, 1, 40, 64), torch.float16)
    with pytest.raises(QuantizationError, match="^tokens=40 is not a multiple of group_size=32"):
        quantize(x, bits=2, group_size=32, axis="channel", backend=backend)


def test_dequantize_dtype() -> None:
    x = random_kv((1, 2, 64, 64), torch.bfloat16)
    q = quantize(x, bits=8, group_size=64, axis="channel")
    assert q.device == DEVICE
    assert dequantize(q).dtype == torch.bfloat16
    full = dequantize(q, dtype=torch.float32)
    assert full.dtype == torch.float32
    assert torch.equal(full, dequantize_reference(q, dtype=torch.float32))
    message = "dtype=torch.int32 is not supported; allowed: "
    with pytest.raises(QuantizationError, match=f"^{re.escape(message)}"):
        dequantize(q, dtype=torch.int32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("bits", "axis"), [(2, "token"), (4, "channel"), (8, "token")])
def test_dequantize_into_a_slice_of_a_larger_tensor(
    backend: str, dtype: torch.dtype, bits: int, axis: str
) -> None:
    # The quantized span of a layer between 4 sinks and 8 residual tokens, heads strided.
    x = random_kv((1, 3, 64, 64), torch.float32)
    q = quantize(x, bits=bits, group_size=32, axis=axis)  # type: ignore[arg-type]
    layer = torch.full((1, 3, 76, 64), 7.0, dtype=dtype, device=DEVICE)
    span = layer[:, :, 4:68]
    assert dequantize(q, dtype=dtype, backend=backend, out=span) is span
    expected = dequantize_reference(q, dtype=dtype)
    if backend == "torch":
        assert torch.equal(span, expected)
    else:  # one ulp apart at most, see test_triton_quant
        torch.testing.assert_close(span, expected)
    assert bool((layer[:, :, :4] == 7).all() and (layer[:, :, 68:] == 7).all())  # untouched


def test_dequantize_refuses_an_out_that_does_not_fit() -> None:
    q = quantize(random_kv((1, 2, 64, 64), torch.float32), bits=4, group_size=32, axis="token")
    for out in (
        torch.empty(1, 2, 63, 64, device=DEVICE),
        torch.empty(1, 2, 64, 64, dtype=torch.float16, device=DEVICE),
        torch.empty(1, 2, 64, 64, device="meta"),
    ):
        with pytest.raises(QuantizationError, match=r"^out is torch\.float"):
            dequantize(q, out=out)


def test_kivi_keys_and_values() -> None:
    # The KIVI pairing: keys per-channel, values per-token, same tensor shape.
    keys = random_kv((1, 2, 64, 128), torch.float16, seed=1)
    values = random_kv((1, 2, 64, 128), torch.float16, seed=2)
    qk = quantize(keys, bits=2, group_size=32, axis="channel")
    qv = quantize(values, bits=2, group_size=32, axis="token")
    assert qk.scale.shape == (1, 2, 2, 128) and qv.scale.shape == (1, 2, 64, 4)
    assert qk.packed.shape == qv.packed.shape == (1, 2, 64, 32)
    # float16 originals: 32768 bytes each; 2-bit codes 4096 bytes + 512 groups x (2 + 2) bytes.
    assert qk.nbytes() == qv.nbytes() == 4096 + 512 * 4 == 6144
