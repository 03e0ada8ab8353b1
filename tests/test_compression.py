"""Unit tests for the pseudo-gradient codecs (geotrain/sync/compression.py):
error bounds, exact sizes, error feedback, determinism, and rejection of bad
payloads and non-finite inputs. Fast: no store, no processes."""

import math
import struct
import zlib

import pytest
import torch

from geotrain.errors import GeotrainError
from geotrain.sync import compression as C
from geotrain.sync import quant
from geotrain.sync.compression import CODECS, CodecError, decode, make_codec, payload_info

SHAPES = [(), (1,), (7,), (63,), (64,), (65,), (1000, 37), (3, 5, 129), (4096,), (2, 4097),
          (0, 3)]


def _random(shape, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if kind == "normal":
        x = torch.randn(n, generator=g) * 1e-3
    elif kind == "heavy":        # Cauchy-like tails and magnitudes from 1e-9 to 1e3
        x = torch.randn(n, generator=g) / torch.randn(n, generator=g).abs().clamp_min(1e-6)
        x = x * 10.0 ** torch.randint(-9, 0, (n,), generator=g).float()
    else:
        raise AssertionError(kind)
    return x.view(shape)


def _tensors(kind: str, seed: int = 0) -> dict:
    return {f"t{i}": _random(s, kind, seed + i) for i, s in enumerate(SHAPES)}


def _block_bound(x: torch.Tensor, width: int, qmax: int) -> torch.Tensor:
    """Per value: absmax of its block / qmax · (1 + 2^-7) / 2, the documented bound."""
    flat = x.reshape(-1)
    n = flat.numel()
    rows = torch.zeros(math.ceil(n / width) * width)
    rows[:n] = flat
    absmax = rows.view(-1, width).abs().amax(dim=1, keepdim=True)
    bound = (absmax / qmax * (1 + 2 ** -7) / 2).expand(-1, width).reshape(-1)[:n]
    return bound * (1 + 1e-6) + flat.abs() * 2 ** -23


@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_none_is_exact(kind):
    t = _tensors(kind)
    t["half"] = torch.randn(5, 3).to(torch.float16)
    out = decode(make_codec("none").encode(t))
    assert sorted(out) == sorted(t)
    for name, x in t.items():
        assert out[name].dtype == torch.float32 and out[name].device.type == "cpu"
        assert out[name].shape == x.shape
        assert torch.equal(out[name], x.to(torch.float32))


@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize("name,qmax", [("int8", 127), ("int4", 7)])
@pytest.mark.parametrize("block", [64, 7])
def test_blockwise_within_bound(kind, name, qmax, block):
    t = _tensors(kind)
    out = make_codec(name, block=block).decode(make_codec(name, block=block).encode(t))
    for key, x in t.items():
        assert out[key].shape == x.shape and out[key].dtype == torch.float32
        err = (out[key] - x).abs().reshape(-1)
        assert bool((err <= _block_bound(x, block, qmax)).all()), key
        # and the grid is actually used: int8 is far tighter than int4
    x = t["t6"]
    rel = ((out["t6"] - x).norm() / x.norm()).item()
    assert rel < (0.01 if name == "int8" else 0.2)


@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("chunk", [256, 1024])          # one-byte and two-byte indices
def test_topk_keeps_the_largest_per_chunk_within_bound(kind, bits, chunk):
    frac = 0.05
    codec = make_codec("topk", chunk=chunk, topk_fraction=frac, value_bits=bits,
                       error_feedback=False)
    k = math.ceil(frac * chunk)
    t = _tensors(kind)
    p = codec.encode(t)
    modes = {e.mode for e in payload_info(p).tensors}
    assert modes == {"b8", f"{'s' if chunk <= 256 else 'k'}{bits}"}
    out = decode(p)
    for key, x in t.items():
        flat, got = x.reshape(-1), out[key].reshape(-1)
        n = flat.numel()
        if n < chunk:        # sent dense as int8 blocks
            assert bool(((got - flat).abs() <= _block_bound(x, 64, 127)).all()), key
            continue
        nc = math.ceil(n / chunk)
        xp = torch.zeros(nc * chunk)
        xp[:n] = flat
        gp = torch.zeros(nc * chunk)
        gp[:n] = got
        xp, gp = xp.view(nc, chunk), gp.view(nc, chunk)
        kth = xp.abs().topk(k, dim=1).values[:, -1:]          # k-th largest |x| per chunk
        kept = gp != 0
        assert bool((kept.sum(dim=1) <= k).all())
        assert bool((xp.abs()[kept] >= kth.expand_as(xp)[kept]).all()), key
        # values above the k-th largest are all kept, within the bound of their chunk
        absmax_kept = xp.abs().topk(k, dim=1).values[:, :1]
        bound = (absmax_kept / (2 ** (bits - 1) - 1) * (1 + 2 ** -7) / 2) * (1 + 1e-6)
        big = xp.abs() > kth
        assert bool(((gp - xp).abs()[big] <= (bound.expand_as(xp)[big] + xp.abs()[big] * 2 ** -23)).all())
        assert bool((gp[xp.abs() < kth] == 0).all())     # the rest is not sent


def _header_bytes(data: bytes) -> int:
    return payload_info(data).header_bytes


@pytest.mark.timeout(60)
def test_payload_sizes_match_the_formulas():
    n = 4096 * 256
    x = {"w": torch.randn(n)}
    sizes = {}
    for name in CODECS:
        codec = make_codec(name)
        p = codec.encode(x)
        assert len(p) == codec.predict_size({"w": (n,)})
        sizes[name] = len(p) - _header_bytes(p)
    assert sizes["none"] == 4 * n
    assert sizes["int8"] == n + 2 * (n // 64)                       # ≈ 1/4 of fp32 + scales
    assert sizes["int4"] == n // 2 + 2 * (n // 64)
    k, nc = math.ceil(0.01 * 4096), n // 4096
    assert sizes["topk"] == 2 * nc + 2 * nc * k + math.ceil(nc * k / 2)
    # ≈ 1/100 × (2 B index + 0.5 B value) / 4 B of fp32, within the ceil and the scales
    assert sizes["topk"] / (4 * n) == pytest.approx(0.01 * 2.5 / 4, rel=0.03)
    assert sizes["int8"] / (4 * n) == pytest.approx(0.25, rel=0.04)


@pytest.mark.parametrize("chunk,frac,table", [
    (4096, 0.01, {8: 0.0305, 4: 0.0255, 2: 0.0230}), (256, 0.01, {8: 0.0313, 4: 0.0254, 2: 0.0225}),
    (256, 0.02, {8: 0.0547, 4: 0.0430, 2: 0.0371}), (16, 0.1, {}), (255, 0.05, {}), (257, 0.05, {})])
def test_topk_modes_sizes_and_index_width(chunk, frac, table):
    """Scales + indices (one byte up to chunk 256, else two) + packed codes; the
    bytes per parameter are the module docstring's table (to its 4 digits)."""
    n = 4096 * 64                       # whole chunks, but for 255 and 257
    for bits in (8, 4, 2):
        codec = make_codec("topk", chunk=chunk, topk_fraction=frac, value_bits=bits)
        p = codec.encode({"w": torch.randn(n)})
        assert len(p) == codec.predict_size({"w": (n,)})
        mode, index = (f"s{bits}", 1) if chunk <= 256 else (f"k{bits}", 2)
        assert payload_info(p).tensors[0].mode == codec.mode(n) == mode
        k, nc, body = math.ceil(frac * chunk), math.ceil(n / chunk), len(p) - _header_bytes(p)
        assert body == 2 * nc + index * nc * k + math.ceil(nc * k * bits / 8)
        if table:
            assert body / n == pytest.approx(table[bits], abs=6e-5), bits


def test_header_overhead_is_small_for_a_model():
    # names and shapes of a 4-layer GPT: ~40 tensors
    shapes = {"tok_emb.weight": (256, 128), "pos_emb.weight": (256, 128), "ln_f.weight": (128,)}
    for i in range(4):
        for part, s in [("ln1.weight", (128,)), ("ln2.weight", (128,)),
                        ("attn.qkv.weight", (384, 128)), ("attn.proj.weight", (128, 128)),
                        ("mlp.fc.weight", (512, 128)), ("mlp.proj.weight", (128, 512)),
                        ("attn.qkv.bias", (384,)), ("mlp.fc.bias", (512,))]:
            shapes[f"blocks.{i}.{part}"] = s
    p = make_codec("topk").encode({k: torch.randn(s) for k, s in shapes.items()})
    info = payload_info(p)
    assert len(info.tensors) == len(shapes)
    assert info.header_bytes < 400          # vs ~20 kB of body: under 2 %
    assert info.header_bytes / len(p) < 0.02


@pytest.mark.parametrize("name,kw", [("topk", {"value_bits": 4}), ("topk", {"value_bits": 8}),
                                     ("topk", {"value_bits": 2}),
                                     ("topk", {"chunk": 100, "topk_fraction": 0.03}),
                                     ("topk", {"chunk": 64, "value_bits": 2}),
                                     ("int4", {"error_feedback": True}),
                                     ("int8", {"error_feedback": True})])
def test_error_feedback_conserves_the_sum(name, kw):
    codec = make_codec(name, **kw)
    assert codec.error_feedback
    shapes = {"a": (50, 97), "b": (13,), "c": ()}
    sent = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}
    total = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}
    for r in range(20):
        x = {k: _random(s, "normal", seed=100 * r + i) for i, (k, s) in enumerate(shapes.items())}
        out = decode(codec.encode(x))
        for k in shapes:
            sent[k] += out[k].double()
            total[k] += x[k].double()
    residual = codec.state_dict()
    for k in shapes:
        scale = total[k].abs().max().item()
        assert torch.allclose(sent[k] + residual[k].double(), total[k], atol=1e-5 * scale, rtol=0)


def test_error_feedback_eventually_sends_what_topk_keeps_dropping():
    chunk, k = 256, 3
    x = torch.zeros(chunk)
    x[:k] = 1.0           # the same k big values win every round on their own ...
    x[100] = 0.05         # ... and this small one never would
    with_ef = make_codec("topk", chunk=chunk, topk_fraction=k / chunk)
    without = make_codec("topk", chunk=chunk, topk_fraction=k / chunk, error_feedback=False)
    got_with = [decode(with_ef.encode({"x": x}))["x"][100].item() for _ in range(60)]
    got_without = [decode(without.encode({"x": x}))["x"][100].item() for _ in range(60)]
    assert all(v == 0 for v in got_without)
    assert any(v != 0 for v in got_with)
    # what was sent plus what is still owed is exactly what came in
    owed = with_ef.state_dict()["x"][100].item()
    assert sum(got_with) + owed == pytest.approx(60 * 0.05, rel=1e-4)


@pytest.mark.parametrize("chunk,bits", [(1024, 4), (1024, 2), (256, 2), (128, 8)])
def test_error_feedback_running_sum_tracks_a_fixed_vector(chunk, bits):
    g = _random((8192,), "normal", seed=7)
    codec = make_codec("topk", chunk=chunk, topk_fraction=0.02, value_bits=bits)
    running = torch.zeros_like(g)
    rel = {}
    for t in range(1, 401):
        running += decode(codec.encode({"g": g}))["g"]
        if t in (25, 100, 400):
            rel[t] = ((running - t * g).norm() / (t * g).norm()).item()
    assert rel[400] < rel[100] < rel[25]
    assert rel[400] < 0.1
    # and without error feedback it never gets there: most coordinates are never sent
    plain = make_codec("topk", chunk=chunk, topk_fraction=0.02, value_bits=bits,
                       error_feedback=False)
    once = decode(plain.encode({"g": g}))["g"]
    assert ((400 * once - 400 * g).norm() / (400 * g).norm()).item() > 0.5


@pytest.mark.parametrize("name", CODECS)
def test_deterministic_bytes(name):
    t = _tensors("heavy", seed=3)
    t["sparse"] = torch.zeros(10_000)       # ties everywhere
    t["sparse"][::997] = 1.0
    a = make_codec(name).encode(t)
    b = make_codec(name).encode(dict(reversed(list(t.items()))))
    assert a == b
    assert sorted(decode(a)) == sorted(t)


def test_zero_decay_is_no_error_feedback():
    x = {"w": torch.randn(5000)}
    a, b = make_codec("topk", error_decay=0.0), make_codec("topk", error_feedback=False)
    for _ in range(3):
        assert a.encode(x) == b.encode(x)


@pytest.mark.parametrize("name", CODECS)
def test_truncated_or_corrupted_payload_raises(name):
    p = make_codec(name).encode({"w": torch.randn(3, 1500), "b": torch.randn(5)})
    cuts = sorted(set(range(0, 40)) | set(range(len(p) - 40, len(p))) | {len(p) // 2})
    for cut in cuts:
        with pytest.raises(CodecError):
            decode(p[:cut])
    with pytest.raises(CodecError):
        decode(p + b"\0")
    for pos in [0, 3, 5, 9, 13, len(p) // 2, len(p) - 1]:
        bad = bytearray(p)
        bad[pos] ^= 0x41
        with pytest.raises(CodecError):
            decode(bytes(bad))


def _valid_topk(chunk: int = 512, bits: int = 8):
    """A top-k payload's header and body, 2 chunks of `chunk` values, k = chunk/10."""
    n = 2 * chunk
    codec = make_codec("topk", chunk=chunk, topk_fraction=0.1, value_bits=bits)
    p = codec.encode({"w": torch.randn(n, generator=torch.Generator().manual_seed(chunk + bits))})
    info = payload_info(p)
    header = {"codec": "topk", "block": info.block, "chunk": info.chunk, "k": info.k,
              "t": [["w", [n], codec.mode(n)]]}
    return header, bytearray(p[info.header_bytes:])


@pytest.mark.parametrize("change", [
    lambda h, b: h["t"][0].__setitem__(1, [1025]),         # shape does not match the body
    lambda h, b: h["t"][0].__setitem__(2, "b4"),           # mode the codec never uses
    lambda h, b: h["t"][0].__setitem__(2, "k4"),           # other value bits: other sizes
    lambda h, b: h["t"][0].__setitem__(2, "s8"),           # byte indices for a 512 chunk
    lambda h, b: h.__setitem__("codec", "zip"),
    lambda h, b: h.__setitem__("k", 513),                  # k > chunk
    lambda h, b: h.__setitem__("k", 51),                   # k disagrees with the body
    lambda h, b: h.__setitem__("chunk", 70000),
    lambda h, b: h.__setitem__("t", h["t"] * 2),           # duplicate name
    lambda h, b: h.__setitem__("t", [["w", [-1], "k8"]]),
    lambda h, b: h.__setitem__("t", "w"),
    lambda h, b: h.__setitem__("t", [["w", [1024], ["k8"]]]),
    lambda h, b: h.__setitem__("t", [["w", [1024], "k8", 1]]),
    lambda h, b: h.__setitem__("t", [["w", [2 ** 40], "k8"]]),
    lambda h, b: h.__setitem__("t", [["w", [2 ** 39, 2 ** 39], "k8"]]),
    lambda h, b: h.__setitem__("block", True),
    lambda h, b: h.pop("k"),
    lambda h, b: b.__setitem__(slice(4, 6), struct.pack("<H", 512)),   # index outside its chunk
    lambda h, b: b.__setitem__(slice(4, 8), b[6:8] + b[4:6]),          # indices out of order
    lambda h, b: b.__setitem__(slice(0, 2), b"\x80\xbf"),               # scale -1.0 (bf16)
    lambda h, b: b.__setitem__(slice(0, 2), b"\x80\x7f"),               # scale +inf
])
def test_inconsistent_header_or_body_raises(change):
    header, body = _valid_topk()
    C.decode(C._pack(header, [bytes(body)]))          # the unmodified one is fine
    change(header, body)
    with pytest.raises(CodecError):
        decode(C._pack(header, [bytes(body)]))


@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_two_bit_values_within_their_bound(kind):
    """2-bit codes {-1, 0, 1, 2}·scale, the scale signed like the chunk's largest
    kept value: |x - x_hat| <= min(|x|, |scale|), and <= |scale|/2 but for the
    other side's values beyond 1.5·|scale| (module docstring, Bounds)."""
    chunk, k = 256, 13
    x = _random((64 * chunk,), kind, seed=5).view(64, chunk)
    idx, q, scale = quant.topk_encode_(rows := x.clone(), k, 2)
    assert int(q.min()) >= -1 and int(q.max()) <= 2 and torch.equal(quant.unpack2(quant.pack2(q), q.numel()), q.view(-1))
    vals = x.gather(1, idx)
    got = quant.topk_decode(idx, q, scale, chunk, x.numel()).view(64, chunk).gather(1, idx)
    s, absmax = scale.float()[:, None], vals.abs().amax(1, keepdim=True)
    assert bool(((s < 0) == (vals.gather(1, vals.abs().argmax(1, keepdim=True)) < 0)).all())
    assert bool(((s.abs() >= absmax / 2) & (s.abs() <= absmax / 2 * (1 + 2 ** -7))).all())
    err, tol = (got - vals).abs(), 1 + 1e-6
    near = vals * s.sign() > -1.5 * s.abs()          # all but the far other side
    assert bool((err <= torch.minimum(vals.abs(), s.abs()) * tol).all())
    assert bool((err[near] <= (s.abs() / 2 * tol).expand_as(err)[near]).all())
    assert bool((rows.gather(1, idx) == vals - got).all())   # the residual is what was lost
    codec = make_codec("topk", chunk=chunk, topk_fraction=k / chunk, value_bits=2, error_feedback=False)
    out = decode(codec.encode({"x": x}))["x"].view(64, chunk)
    assert torch.equal(out.gather(1, idx), got) and (out - x).norm() < x.norm()


def _edit(body: bytearray, at: int, data: bytes) -> bytearray:
    return body[:at] + data + body[at + len(data):]


@pytest.mark.parametrize("chunk,bits", [(64, 8), (64, 4), (64, 2), (512, 2), (256, 2)])
def test_malformed_byte_index_and_two_bit_payloads_raise(chunk, bits):
    header, body = _valid_topk(chunk, bits)
    k, mode = header["k"], header["t"][0][2]
    bodies = [body[:-cut] for cut in (1, 2, 3, len(body) // 2)] + [body + b"\0"]   # sizes
    bodies.append(_edit(body, 0, b"\xc0\x7f"))                                    # NaN scale
    if bits != 2:
        bodies.append(_edit(body, 0, b"\x80\xbf"))      # a negative scale means nothing here
    if chunk <= 256:          # one byte per index after the two bf16 scales: the first
        bodies += [_edit(body, 4 + k - 1, bytes([v])) for v in (chunk, 255) if chunk <= v < 256]
        bodies.append(_edit(body, 4, body[5:6] + body[4:5]))  # chunk's last index; order
    headers = [{**header, "k": k + 1}, {**header, "k": k - 1}] + [
        {**header, "t": [["w", shape, m]]} for shape, m in
        [([2 * chunk + 1], mode), ([2 * chunk], "ks"[mode[0] == "k"] + mode[1:]), ([2 * chunk], mode[0] + "48"[bits == 4])]]
    for h, b in [(header, b) for b in bodies] + [(h, body) for h in headers]:
        with pytest.raises(CodecError):
            decode(C._pack(h, [bytes(b)]))
    if bits == 2:             # a negative 2-bit scale is its chunk's sign, not an error
        good, flipped = (decode(C._pack(header, [bytes(_edit(body, 1, bytes([body[1] ^ f])))]))
                         ["w"][:chunk] for f in (0, 0x80))
        assert torch.equal(flipped, -good)


def test_foreign_bytes_raise():
    for data in [b"", b"GTC", b"not a payload at all, just text", zlib.compress(b"x" * 100)]:
        with pytest.raises(CodecError):
            decode(data)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", CODECS)
def test_non_finite_input_raises_and_keeps_state(name, bad):
    codec = make_codec(name, error_feedback=True)
    codec.encode({"a": torch.randn(5000), "z": torch.randn(10)})
    before = codec.state_dict()
    x = torch.randn(10)
    x[3] = bad
    with pytest.raises(CodecError, match="'z'"):
        codec.encode({"a": torch.randn(5000), "z": x})
    after = codec.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_non_float_and_shape_change_raise():
    codec = make_codec("topk")
    with pytest.raises(CodecError, match="dtype"):
        codec.encode({"a": torch.arange(5)})
    codec.encode({"a": torch.randn(5000)})
    with pytest.raises(CodecError, match="shape"):
        codec.encode({"a": torch.randn(5001)})
    codec.reset()
    codec.encode({"a": torch.randn(5001)})


def test_state_dict_round_trip():
    a = make_codec("topk", chunk=512, topk_fraction=0.02)
    rounds = [{"w": torch.randn(40, 50), "b": torch.randn(30)} for _ in range(4)]
    for x in rounds[:3]:
        a.encode(x)
    state = a.state_dict()
    assert set(state) == {"w", "b"} and state["w"].shape == (40, 50)
    b = make_codec("topk", chunk=512, topk_fraction=0.02)
    b.load_state_dict(state)
    assert a.encode(rounds[3]) == b.encode(rounds[3])
    assert make_codec("int8").state_dict() == {}
    with pytest.raises(CodecError):
        b.load_state_dict({"w": torch.full((40, 50), float("nan"))})


@pytest.mark.parametrize("kw", [{"topk_fraction": 0}, {"topk_fraction": 1.5}, {"chunk": 70000},
                                {"value_bits": 3}, {"value_bits": 1}, {"block": 0},
                                {"error_decay": 2}])
def test_bad_settings_raise(kw):
    with pytest.raises(CodecError):
        make_codec("topk", **kw)
    with pytest.raises(CodecError, match="valid: none, int8, int4, topk"):
        make_codec("zstd")
    assert issubclass(CodecError, GeotrainError)


def test_empty_and_scalar_payloads():
    for name in CODECS:
        assert decode(make_codec(name).encode({})) == {}
        out = decode(make_codec(name).encode({"s": torch.tensor(-2.5), "zz": torch.zeros(0)}))
        assert out["zz"].shape == (0,)      # an empty tensor last: zero bytes at the very end
        # one value is its own absmax: only the bf16 rounding of the scale is lost
        assert out["s"].shape == () and abs(out["s"].item() + 2.5) <= 2.5 * 2 ** -7


@pytest.mark.parametrize("bits", [4, 8])
def test_stored_scale_bound_and_no_clipping(bits):
    """The docstring's bound, literally: |x - x_hat| <= stored scale / 2, and the
    scale, rounded up to bf16, never makes the absmax clip."""
    x = _random((10_000,), "heavy", seed=11)
    q, scale = quant.block_encode(x, 64, bits)
    x_hat = quant.block_decode(q, scale, 64)
    s = scale.float().repeat_interleave(64)[:x.numel()]
    assert bool(((x - x_hat).abs() <= s / 2 * (1 + 2 ** -20)).all())
    absmax = torch.nn.functional.pad(x, (0, 64 - x.numel() % 64)).view(-1, 64).abs().amax(1)
    assert bool((scale.float() * quant.QMAX[bits] >= absmax).all())
    assert int(q.abs().max()) <= quant.QMAX[bits]
    assert torch.equal(decode(make_codec(f"int{bits}").encode({"x": x}))["x"], x_hat)


@pytest.mark.timeout(120)
def test_diloco_on_least_squares_with_compressed_pseudo_gradients():
    """Two sites, H local GD steps on their own least-squares data, outer
    Nesterov on the decoded average (geotrain's own outer_step): int8 matches
    fp32, and top-k 2 % converges with error feedback but not without it."""
    from geotrain.sync.diloco import outer_step
    g = torch.Generator().manual_seed(0)
    d, m, sites = 1024, 256, 2
    A = [torch.randn(m, d, generator=g) / d ** 0.5 for _ in range(sites)]
    truth = torch.randn(d, generator=g)
    b = [a @ truth for a in A]

    def run(name, **kw):
        theta, momentum = {"w": torch.zeros(d)}, {}
        codecs = [make_codec(name, chunk=256, topk_fraction=0.02, **kw) for _ in range(sites)]
        for _ in range(40):
            deltas = []
            for s in range(sites):
                x = theta["w"].clone()
                for _ in range(5):
                    x -= 0.5 * 2 * A[s].T @ (A[s] @ x - b[s]) / m
                deltas.append(decode(codecs[s].encode({"w": theta["w"] - x}))["w"])
            outer_step(theta, {"w": sum(deltas) / sites}, momentum, 0.7, 0.9, True)
        return sum(((a @ theta["w"] - bb) ** 2).mean().item() for a, bb in zip(A, b)) / sites

    start = sum((bb ** 2).mean().item() for bb in b) / sites
    fp32, int8 = run("none"), run("int8")
    topk_ef, topk_plain = run("topk"), run("topk", error_feedback=False)
    assert fp32 < 0.05 * start
    assert int8 == pytest.approx(fp32, rel=0.05)
    assert topk_ef < 0.3 * start
    assert topk_ef < 0.5 * topk_plain


@pytest.mark.parametrize("chunk,bits", [(512, 8), (64, 4), (64, 2), (512, 2)])
def test_fuzzed_headers_raise_only_codec_errors(chunk, bits):
    """Any header value of any type, with a valid checksum: decode either
    succeeds or raises CodecError, never another exception."""
    import random
    rng = random.Random(chunk + bits)
    junk = [None, -1, 0, 1, 7, 64, 2 ** 70, 1.5, "x", "k4", "b8", "s2", "k2", "s8", [], [1], {},
            True, [-3], [[]]]
    for _ in range(300):
        header, body = _valid_topk(chunk, bits)
        target = rng.choice(["codec", "block", "chunk", "k", "t", "entry", "shape", "mode", "name"])
        value = rng.choice(junk)
        if target in ("entry", "shape", "mode", "name"):
            pos = {"entry": None, "name": 0, "shape": 1, "mode": 2}[target]
            if pos is None:
                header["t"][0] = value
            else:
                header["t"][0][pos] = value
        else:
            header[target] = value
        if rng.random() < 0.3:
            body = body[:rng.randrange(len(body) + 1)]
        try:
            decode(C._pack(header, [bytes(body)]))
        except CodecError:
            pass
