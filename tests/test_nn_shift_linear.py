"""mfconvert.nn.ShiftLinear and the weight/activation arithmetic of nn/pow2 against NumPy."""
import numpy as np
import pytest
import torch

from mfconvert.nn import ShiftLinear, pow2
from tests import numpy_reference as ref


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
@pytest.mark.parametrize("scale", ["channel", "tensor", "none"])
def test_rounding_matches_deepshift_rule(bits, scale):
    rng = np.random.default_rng(bits)
    w = rng.normal(0, 0.3, size=(17, 33)) * rng.choice([1e-6, 1, 5], size=(17, 1))
    w[0, :5] = 0.0
    e = pow2.channel_exponents(torch.from_numpy(w), scale)
    if scale == "channel":
        np.testing.assert_array_equal(e.numpy(), ref.channel_exponent(w))
    codes = pow2.round_to_codes(torch.from_numpy(w), e, bits).numpy().astype(np.int64)
    sign, m = ref.round_weight_pow2(w, e.numpy(), bits)
    np.testing.assert_array_equal(codes >> (bits - 1), sign)
    np.testing.assert_array_equal(codes & (2 ** (bits - 1) - 1), m)
    # Decoding gives ±2^(e-m): the nearest power of two in log distance within the range.
    decoded = pow2.decode_codes(torch.from_numpy(codes.astype(np.uint8)), e, bits).numpy()
    z = 2 ** (bits - 1) - 1
    expect = np.where(m == z, 0.0, np.where(sign == 1, -1.0, 1.0) * 2.0 ** (e.numpy()[:, None] - m))
    np.testing.assert_array_equal(decoded, expect.astype(np.float32))


@pytest.mark.parametrize("bits", [2, 3, 5])
@pytest.mark.parametrize("count", [1, 7, 8, 13, 1000])
def test_pack_unpack_roundtrip_and_bit_order(bits, count):
    rng = np.random.default_rng(count)
    codes = rng.integers(0, 2 ** bits, size=count, dtype=np.uint8)
    packed = pow2.pack_codes(codes, bits)
    assert packed.size == -(-count * bits // 8)
    np.testing.assert_array_equal(pow2.unpack_codes(packed, count, bits), codes)
    # LSB first: bit k of the stream is bit k%8 of byte k//8 (docs/ops.md).
    stream = int.from_bytes(packed.tobytes(), "little")
    for j in (0, count // 2, count - 1):
        assert (stream >> (j * bits)) & (2 ** bits - 1) == codes[j]


def test_quantize_activation_matches_reference_including_saturation_and_nan():
    x = np.array([0.0, 1.5, -1.5, 1e-7, -1e-7, 3.3e4, -3.3e4, 1e30, -np.inf, np.inf, np.nan], np.float32)
    for act_bits, frac in [(32, 16), (16, 8), (8, 4), (20, -3)]:
        got = pow2.quantize_activation(torch.from_numpy(x), act_bits, frac).numpy()
        np.testing.assert_array_equal(got, ref.quantize(x, act_bits, frac))
    q = pow2.quantize_activation(torch.tensor([-1e-7, 32768.0, -40000.0, np.nan]), 32, 16).tolist()
    assert q == [-1, 2 ** 31 - 1, -2 ** 31, 0]   # floor, saturation both ways, NaN → 0


@pytest.mark.parametrize("shape,in_f,out_f", [((1, 64), 64, 48), ((2, 3, 7, 33), 33, 5), ((0, 16), 16, 8)])
@pytest.mark.parametrize("fmt", [(5, 32, 16), (3, 16, 8), (4, 8, 3)])
def test_integer_forward_is_the_spec_exactly(shape, in_f, out_f, fmt):
    bits, act_bits, frac = fmt
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f)
    layer = ShiftLinear.from_linear(lin, weight_bits=bits, act_bits=act_bits, act_frac_bits=frac).eval()
    x = torch.randn(*shape) * 4
    codes = layer.codes().numpy().astype(np.int64)
    expect = ref.shift_linear(x.numpy(), codes >> (bits - 1), codes & (2 ** (bits - 1) - 1),
                              layer.exponent.numpy(), lin.bias.detach().numpy(), bits, act_bits, frac)
    got = layer(x).numpy()
    assert got.dtype == np.float32 and got.shape == expect.shape
    np.testing.assert_array_equal(got, expect)


def test_integer_forward_wraps_like_int32():
    layer = ShiftLinear(4, 1, bias=False).eval()
    layer.load_float_weight(torch.ones(1, 4))          # every weight 2^0, shift 0
    x = torch.full((1, 4), 30000.0)                    # 4 × 30000·2^16 overflows int32
    acc = (4 * 30000 * 2 ** 16 + 2 ** 31) % 2 ** 32 - 2 ** 31
    assert layer(x).item() == np.float32(acc) * np.float32(2.0 ** -16)


def test_float_training_forward_tracks_integer_forward_and_has_gradients():
    torch.manual_seed(1)
    lin = torch.nn.Linear(96, 40)
    for mode in ("Q", "PS"):
        layer = ShiftLinear.from_linear(lin, mode=mode)
        x = torch.randn(8, 96)
        y_float = layer.train()(x)
        y_int = layer.eval()(x)
        # Float emulation differs from the integer kernel only by the per-term floor of x_q >> m:
        # at most in_features · 2^-16 · max|w| (measured ≈ 1e-5 here).
        assert (y_float - y_int).abs().max().item() < 96 * 2 ** -16
        layer.train()
        y = layer(x)
        y.square().mean().backward()
        params = [layer.weight] if mode == "Q" else [layer.shift, layer.sign]
        for p in params + [layer.bias]:
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_q_and_ps_round_to_the_same_codes_and_from_codes_roundtrips():
    torch.manual_seed(2)
    lin = torch.nn.Linear(50, 30)
    q = ShiftLinear.from_linear(lin, mode="Q")
    ps = ShiftLinear.from_linear(lin, mode="PS")
    assert torch.equal(q.codes(), ps.codes())
    again = ShiftLinear.from_codes(q.codes(), q.exponent, lin.bias)
    assert torch.equal(again.codes(), q.codes())
    x = torch.randn(5, 50)
    assert torch.equal(again.eval()(x), q.eval()(x))


@pytest.mark.parametrize("terms", [2, 3])
def test_terms_round_greedily_and_forward_is_the_spec(terms):
    """T terms: codes are the greedy rounding of the residuals; the integer forward is the
    one-term spec over the input repeated T times (term t of input i at column t·in + i)."""
    torch.manual_seed(terms)
    lin = torch.nn.Linear(40, 24)
    layer = ShiftLinear.from_linear(lin, terms=terms).eval()
    codes = layer.codes().numpy().astype(np.int64)
    assert codes.shape == (terms, 24, 40)
    w = lin.weight.detach().numpy()
    for t, (sign, m) in enumerate(ref.round_weight_terms(w, layer.exponent.numpy(), 5, terms)):
        np.testing.assert_array_equal(codes[t] >> 4, sign)
        np.testing.assert_array_equal(codes[t] & 15, m)
    x = torch.randn(3, 7, 40) * 4
    wide = np.concatenate([x.numpy()] * terms, axis=-1)
    flat = np.concatenate(list(codes), axis=1)            # [out, terms·in]
    expect = ref.shift_linear(wide, flat >> 4, flat & 15, layer.exponent.numpy(), lin.bias.detach().numpy(),
                              5, 32, 16)
    np.testing.assert_array_equal(layer(x).numpy(), expect)
    # Each term shrinks the weight error: measured 0.19 → 0.04 → 0.008 of |W| for 1, 2, 3 terms.
    error = (pow2.decode_codes(layer.codes(), layer.exponent, 5) - lin.weight).norm() / lin.weight.norm()
    assert error < 0.25 ** (terms - 1) * 0.2
    # From codes (as read from ONNX) the same codes come back, and training tracks the integers.
    again = ShiftLinear.from_codes(layer.codes(), layer.exponent, lin.bias)
    assert torch.equal(again.codes(), layer.codes()) and again.terms == terms
    assert (again.train()(x) - layer(x)).abs().max().item() < terms * 40 * 2 ** -16
    with pytest.raises(ValueError, match="PS"):
        ShiftLinear(4, 4, mode="PS", terms=2)


def test_rounding_rejects_nan_weights():
    w = torch.ones(2, 2)
    w[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        pow2.round_to_codes(w, torch.zeros(2, dtype=torch.int8), 5)
