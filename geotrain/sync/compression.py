"""Codecs for pseudo-gradients: what a site uploads to the run store each round.

    codec = make_codec("topk")            # one per site: it holds error feedback
    payload = codec.encode(delta)         # bytes for the store; len() is the wire cost
    delta_hat = decode(payload)           # any site, any codec: the header says which

Codecs (bytes per parameter at the defaults, fp32 is 4):

- `none`  fp32, lossless.                                         4
- `int8`  blockwise absmax, `block` values share a bf16 scale     1 + 2/block   (1.031)
- `int4`  the same with 4-bit codes, two per byte                 0.5 + 2/block (0.531)
- `topk`  per chunk of `chunk` values keep the k = ceil(fraction·chunk)
          largest |v| as an in-chunk index + a 2-, 4- or 8-bit code, one
          bf16 scale per chunk; error feedback on by default. The index is
          uint16, or one byte when chunk <= 256 (i = 2 or 1):   (i + bits/8)·k/chunk + 2/chunk
              chunk 4096, 1 % (k 41):   8-bit 0.0305 · 4-bit 0.0255 · 2-bit 0.0230
              chunk  256, 1 % (k 3):    8-bit 0.0313 · 4-bit 0.0254 · 2-bit 0.0225
              chunk  256, 2 % (k 6):    8-bit 0.0547 · 4-bit 0.0430 · 2-bit 0.0371
          (measured by tests/test_compression.py; the default is chunk 4096, 4-bit)
          Tensors smaller than one chunk (LayerNorm gains, biases) go dense
          as int8 blocks.

Bounds (geotrain/sync/quant.py): for every value, |x - x_hat| <= scale/2
with scale <= absmax/qmax·(1 + 2^-7) of its block (int8, int4) or of the
kept values of its chunk (topk); qmax is 127 for 8 bits, 7 for 4 bits.
2-bit top-k codes are {-1, 0, 1, 2}·scale, |scale| <= absmax/2·(1 + 2^-7),
the scale's sign that of the chunk's largest kept value: |x - x_hat| <=
min(|x|, |scale|), and <= |scale|/2 but for opposite-sign values beyond 1.5·|scale|.
What top-k drops or rounds away stays in the site's residual e and is sent
in a later round: x' = x + β·e, send C(x'), e <- x' - decode(C(x')).

Encoding runs on the device the tensors are on (a GPU encodes its own
pseudo-gradient; only the packed arrays come to the CPU) and gives the same
bytes on every device (geotrain/sync/quant.py says how). With `offload` (on by
default) the residual lives in host memory, one buffer per tensor reused every
round — pinned when the tensors come from a GPU, so the copies each way are
fast — and the GPU holds it only while encoding; without it, the residual stays
on the tensors' device. Decoding, of untrusted bytes, runs on the CPU.

Wire format, little-endian:

    b"GTC" | version u8 | header_len u32 | crc32(header + body) u32 |
    header: zlib(JSON {"codec", "block", "chunk", "k", "t": [[name, shape, mode], ...]}) |
    body: per tensor in header order, its sections back to back

modes and their sections: f32 (values f4) · b8 (scales bf16, codes i1) ·
b4 (scales bf16, codes packed u1) · k8 (scales bf16, indices u2, codes i1) ·
k4, k2 (scales bf16, indices u2, codes packed u1: 2 or 4 a byte) · s8, s4, s2
(the same with u1 indices, for chunk <= 256). Names are sorted, so the same
tensors give the same bytes. A truncated, corrupted or inconsistent payload
(an index >= chunk or out of order, one-byte indices with chunk > 256)
raises CodecError; so does a non-finite value on either side. Decoding is
bounded before it allocates: the header inflates to at most a limit (derived
from the expected tensors, or MAX_HEADER_BYTES), and its declared tensors must
be the expected names and shapes (or hold at most MAX_NUMEL values).
"""

from __future__ import annotations

import json
import math
import struct
import sys
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from geotrain.errors import GeotrainError
from geotrain.sync import quant

Tensors = dict[str, torch.Tensor]
Expected = Mapping[str, Sequence[int]]   # the model's tensors: name -> shape
# Without an expected spec, the most a payload may declare: values in all (8 GiB
# as fp32; a top-k payload of a few MB could otherwise declare 1e11) and bytes
# of decompressed header (a 100k-tensor model with long names is ~15 MB).
MAX_NUMEL = 1 << 31
MAX_HEADER_BYTES = 16 << 20
CODECS = ("none", "int8", "int4", "topk")
VERSION = 1
_PREFIX = struct.Struct("<3sBII")       # magic, version, header length, crc32
_MAGIC = b"GTC"
# Top-k modes: (index dtype, value bits); 's' modes have one-byte indices.
_TOPK = {"k8": ("<u2", 8), "k4": ("<u2", 4), "k2": ("<u2", 2),
         "s8": ("u1", 8), "s4": ("u1", 4), "s2": ("u1", 2)}
BYTE_INDEX_CHUNK = 256                  # the largest chunk whose indices fit a byte
_MODES = {"none": {"f32"}, "int8": {"b8"}, "int4": {"b4"}, "topk": {*_TOPK, "b8"}}
assert sys.byteorder == "little", "the wire format is written with native little-endian buffers"


class CodecError(GeotrainError):
    """A codec setting is invalid, a tensor cannot be sent (non-finite), or a
    payload is truncated, corrupted or inconsistent with its header."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    mode: str


@dataclass(frozen=True)
class PayloadInfo:
    """What a payload's header says, without decoding the tensors."""
    codec: str
    block: int
    chunk: int
    k: int
    tensors: tuple[TensorEntry, ...]
    header_bytes: int        # prefix + compressed header: the overhead on the wire
    total_bytes: int


def _sections(mode: str, n: int, block: int, chunk: int, k: int) -> list[tuple[str, int]]:
    """(numpy dtype, count) of each section of one tensor's body."""
    nb, nc = -(-n // block), -(-n // chunk)        # exact integer ceilings
    if mode in _TOPK:
        index, bits = _TOPK[mode]
        codes = ("i1", nc * k) if bits == 8 else ("u1", -(-nc * k * bits // 8))
        return [("<i2", nc), (index, nc * k), codes]
    return {
        "f32": [("<f4", n)],
        "b8": [("<i2", nb), ("i1", n)],
        "b4": [("<i2", nb), ("u1", -(-n // 2))],
    }[mode]


def _section_bytes(mode: str, n: int, block: int, chunk: int, k: int) -> int:
    return sum(np.dtype(dt).itemsize * c for dt, c in _sections(mode, n, block, chunk, k))


def _pack(header: dict, body: list) -> bytes:
    """Prefix + compressed header + the body buffers, copied once."""
    raw = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    crc = zlib.crc32(raw)
    for buf in body:
        crc = zlib.crc32(buf, crc)
    return b"".join([_PREFIX.pack(_MAGIC, VERSION, len(raw), crc), raw, *body])


def _bad(msg: str) -> CodecError:
    return CodecError(f"bad pseudo-gradient payload: {msg}")


def _header_limit(expect: Expected | None) -> int:
    """Most bytes a header may decompress to: twice what the expected tensors'
    entries take in JSON (any mode) plus 4 KiB for the rest, or MAX_HEADER_BYTES
    without a spec. Decompression stops there: a small zlib stream that would
    inflate to gigabytes (a bomb) is rejected, never allocated."""
    if expect is None:
        return MAX_HEADER_BYTES
    entries = [[n, list(s), "k8"] for n, s in expect.items()]
    return 2 * len(json.dumps(entries, separators=(",", ":"))) + 4096


def _read_header(data: bytes, max_header: int = 0) -> tuple[dict, int]:
    """Check prefix and checksum, parse the header (decompressing at most
    `max_header` bytes, MAX_HEADER_BYTES if 0); return it and the body offset."""
    if len(data) < _PREFIX.size:
        raise _bad(f"{len(data)} bytes is shorter than the {_PREFIX.size}-byte prefix (truncated)")
    magic, version, hlen, crc = _PREFIX.unpack_from(data)
    if magic != _MAGIC:
        raise _bad(f"starts with {magic!r}, not {_MAGIC!r} (not a geotrain codec payload)")
    if version != VERSION:
        raise _bad(f"format version {version}; this geotrain reads version {VERSION}")
    start = _PREFIX.size + hlen
    if len(data) < start:
        raise _bad(f"header of {hlen} bytes does not fit in {len(data)} bytes (truncated)")
    view = memoryview(data)
    if zlib.crc32(view[start:], zlib.crc32(view[_PREFIX.size:start])) != crc:
        raise _bad(f"checksum mismatch over {len(data)} bytes (truncated or corrupted)")
    limit = max_header or MAX_HEADER_BYTES
    try:
        z = zlib.decompressobj()
        raw = z.decompress(view[_PREFIX.size:start], limit)
        if z.unconsumed_tail or not z.eof:
            raise _bad(f"header does not end within {limit} decompressed bytes "
                       f"(truncated, or a decompression bomb)")
        header = json.loads(raw)
    except (zlib.error, ValueError, RecursionError) as e:
        raise _bad(f"unreadable header ({e})") from None
    return header, start


def _check_int(header: dict, key: str, lo: int, hi: int) -> int:
    v = header.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _bad(f"header field {key!r} is {v!r}; expected an integer in [{lo}, {hi}]")
    return v


def payload_info(data: bytes, expect: Expected | None = None,
                 max_numel: int | None = None) -> PayloadInfo:
    """Validate a payload's prefix, checksum, header and size; return its header.

    With `expect` ({name: shape}, the model's tensors) the header must list
    exactly those names with exactly those shapes; without it the tensors may
    hold at most `max_numel` values in all (MAX_NUMEL by default). Both are
    checked on the header alone, before anything is allocated, so no payload
    can make decode() expand beyond the model (top-k: chunk/k values per kept
    one)."""
    header, start = _read_header(data, _header_limit(expect))
    if not isinstance(header, dict) or header.get("codec") not in CODECS:
        raise _bad(f"header names codec {header.get('codec') if isinstance(header, dict) else header!r}; "
                   f"valid: {', '.join(CODECS)}")
    codec = header["codec"]
    block = _check_int(header, "block", 1, 1 << 20)
    chunk = _check_int(header, "chunk", 1, 65536)
    k = _check_int(header, "k", 1, chunk)
    if not isinstance(header.get("t"), list):
        raise _bad("header has no tensor list 't'")
    entries, seen, expected, numel = [], set(), start, 0
    if expect is not None:
        limit = sum(math.prod(s) for s in expect.values())
    else:
        limit = MAX_NUMEL if max_numel is None else max_numel
    for e in header["t"]:
        ok = (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str)
              and isinstance(e[2], str) and isinstance(e[1], list) and all(isinstance(d, int) and not isinstance(d, bool)
                                                 and 0 <= d < 1 << 40 for d in e[1]))
        if not ok:
            raise _bad(f"tensor entry {e!r} is not [name, shape, mode]")
        name, shape, mode = e[0], tuple(e[1]), e[2]
        if mode not in _MODES[codec]:
            raise _bad(f"tensor {name!r} has mode {mode!r}; codec {codec} uses "
                       f"{', '.join(sorted(_MODES[codec]))}")
        if mode[0] == "s" and chunk > BYTE_INDEX_CHUNK:
            raise _bad(f"tensor {name!r} has one-byte indices (mode {mode!r}) but chunk is "
                       f"{chunk}; they address at most {BYTE_INDEX_CHUNK}")
        if name in seen:
            raise _bad(f"tensor {name!r} appears twice")
        seen.add(name)
        if expect is not None:
            if name not in expect:
                raise _bad(f"tensor {name!r} is not one of the model's")
            if shape != tuple(expect[name]):
                raise _bad(f"tensor {name!r} has shape {list(shape)}; the model's is "
                           f"{list(expect[name])}")
        numel += math.prod(shape)
        if numel > limit:
            raise _bad(f"header declares more than {limit} values in all (the most this "
                       f"decode accepts)")
        entries.append(TensorEntry(name, shape, mode))
        expected += _section_bytes(mode, math.prod(shape), block, chunk, k)
    if expect is not None and seen != set(expect):
        missing = sorted(set(expect) - seen)
        raise _bad(f"{len(missing)} of the model's tensors missing: "
                   f"{', '.join(map(repr, missing[:5]))}{', ...' if len(missing) > 5 else ''}")
    if expected != len(data):
        raise _bad(f"header describes {expected} bytes but the payload has {len(data)}")
    return PayloadInfo(codec, block, chunk, k, tuple(entries), start, len(data))


def decode(data: bytes, expect: Expected | None = None, max_numel: int | None = None) -> Tensors:
    """Any codec's payload -> {name: fp32 CPU tensor}; raises CodecError if it is
    truncated, corrupted, inconsistent or holds a non-finite value — or, with
    `expect` ({name: shape}), names other tensors or other shapes; sizes are
    checked on the header before anything is allocated (see payload_info)."""
    info = payload_info(data, expect, max_numel)
    out: Tensors = {}
    off = info.header_bytes
    for e in info.tensors:
        n = math.prod(e.shape)
        arrays = []
        for dt, count in _sections(e.mode, n, info.block, info.chunk, info.k):
            arr = np.frombuffer(data, dtype=dt, count=count, offset=off)
            off += arr.nbytes
            # A copy: aligned, writable, native order; uint16 indices widen to int64.
            arrays.append(torch.from_numpy(arr.astype(np.int64 if dt == "<u2" else dt[-2:])))
        x = _decode_tensor(e, arrays, n, info)
        if not quant.all_finite(x):
            raise _bad(f"tensor {e.name!r} decodes to non-finite values")
        out[e.name] = x.view(e.shape)
    return out


def _decode_tensor(e: TensorEntry, arrays: list[torch.Tensor], n: int, info: PayloadInfo
                   ) -> torch.Tensor:
    if e.mode == "f32":
        return arrays[0]
    scale = arrays[0].view(torch.bfloat16)
    signed = e.mode in ("k2", "s2")     # 2-bit scales carry a sign (quant.topk_encode_)
    if not bool(torch.isfinite(scale).all()) or (not signed and bool((scale < 0).any())):
        raise _bad(f"tensor {e.name!r} has a negative or non-finite scale")
    if e.mode in ("b8", "b4"):
        q = arrays[1] if e.mode == "b8" else quant.unpack4(arrays[1], n)
        return quant.block_decode(q, scale, info.block)
    nc, k = scale.numel(), info.k
    idx = arrays[1].to(torch.int64).view(nc, k)
    if bool((idx >= info.chunk).any()) or bool((idx[:, 1:] <= idx[:, :-1]).any()):
        raise _bad(f"tensor {e.name!r} has indices outside its chunk or not strictly increasing")
    q = quant.unpack(arrays[2], _TOPK[e.mode][1], nc * k)
    return quant.topk_decode(idx, q.view(nc, k), scale, info.chunk, n)


class Codec:
    """One site's codec. `encode` folds in and updates the error-feedback
    residual when enabled; `decode` is stateless. Residuals are checkpointed
    with `state_dict` / `load_state_dict`."""

    def __init__(self, name: str, *, topk_fraction: float, chunk: int, value_bits: int,
                 block: int, error_feedback: bool, error_decay: float = 1.0,
                 offload: bool = True):
        self.name, self.chunk, self.value_bits, self.block = name, chunk, value_bits, block
        self.topk_fraction, self.error_feedback, self.error_decay = (
            topk_fraction, error_feedback, error_decay)
        # Residuals in host buffers updated in place (pinned for GPU tensors),
        # or where the tensors are: see the module docstring.
        self.offload = offload
        self.k = min(chunk, math.ceil(topk_fraction * chunk))
        self._residual: Tensors = {}

    def __repr__(self) -> str:
        extra = (f", topk_fraction={self.topk_fraction}, chunk={self.chunk}, k={self.k}, "
                 f"value_bits={self.value_bits}" if self.name == "topk" else "")
        return (f"Codec({self.name!r}, block={self.block}{extra}, "
                f"error_feedback={self.error_feedback})")

    def mode(self, numel: int) -> str:
        """How a tensor of `numel` values travels under this codec."""
        if self.name == "topk":
            if numel < self.chunk:
                return "b8"
            return f"{'s' if self.chunk <= BYTE_INDEX_CHUNK else 'k'}{self.value_bits}"
        return {"none": "f32", "int8": "b8", "int4": "b4"}[self.name]

    def _header(self, entries: list[list]) -> dict:
        return {"codec": self.name, "block": self.block, "chunk": self.chunk, "k": self.k,
                "t": entries}

    def predict_size(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """Exactly len(self.encode(t)) for tensors t of these shapes."""
        entries = [[n, list(shapes[n]), self.mode(math.prod(shapes[n]))] for n in sorted(shapes)]
        body = sum(_section_bytes(m, math.prod(s), self.block, self.chunk, self.k)
                   for _, s, m in entries)
        return len(_pack(self._header(entries), [])) + body

    def encode(self, tensors: Tensors) -> bytes:
        """The payload of these tensors (any device, any float dtype); folds in
        and updates the error-feedback residual. A tensor that cannot be sent
        raises CodecError before anything changes."""
        names = sorted(tensors)
        for name in names:
            self._check(name, tensors[name])
        entries, parts = [], []
        updated: Tensors = {}
        pinned: set[torch.device] = set()   # GPUs that copy into pinned buffers
        for name in names:
            t = tensors[name]
            x = t.detach().to(torch.float32).reshape(-1)
            e = self._residual.get(name) if self.error_feedback else None
            if e is not None:
                e = e.reshape(-1).to(x.device, non_blocking=True)
            mode = self.mode(x.numel())
            arrays, residual = self._encode_one(x, e, mode)
            entries.append([name, list(t.shape), mode])
            parts.extend(np.ascontiguousarray(a) for a in arrays)
            if not self.error_feedback:
                continue
            if self.offload:   # into this tensor's host buffer, in place
                buf = self._host_buffer(name, t.shape, pin=x.is_cuda)
                buf.view(-1).copy_(residual, non_blocking=True)
                if x.is_cuda:
                    pinned.add(x.device)
            else:
                updated[name] = residual.view(t.shape)
        for device in pinned:   # the residual copies land before anyone reads the buffers
            torch.cuda.synchronize(device)
        payload = _pack(self._header(entries), parts)
        self._residual.update(updated)   # only once the whole payload is built
        return payload

    def _check(self, name: str, t: torch.Tensor) -> None:
        if not (t.is_floating_point()):
            raise CodecError(f"tensor {name!r} has dtype {t.dtype}; codecs send floating-point "
                             f"pseudo-gradients")
        if not quant.all_finite(t.detach().to(torch.float32)):
            raise CodecError(f"tensor {name!r} holds NaN or inf; a site must not publish "
                             f"a non-finite pseudo-gradient")
        e = self._residual.get(name) if self.error_feedback else None
        if e is not None and e.shape != t.shape:
            raise CodecError(f"tensor {name!r} has shape {tuple(t.shape)} but its "
                             f"error-feedback residual has {tuple(e.shape)}; "
                             f"reset() the codec or load a matching state")

    def _host_buffer(self, name: str, shape: torch.Size, pin: bool) -> torch.Tensor:
        """The host buffer holding `name`'s residual, allocated once (pinned for
        a GPU tensor's) and then reused: its old value was read before this."""
        buf = self._residual.get(name)
        if buf is None or buf.device.type != "cpu" or (pin and not buf.is_pinned()):
            buf = torch.empty(shape, dtype=torch.float32, pin_memory=pin)
            self._residual[name] = buf
        return buf

    def _encode_one(self, x: torch.Tensor, e: torch.Tensor | None, mode: str
                    ) -> tuple[list[np.ndarray], torch.Tensor | None]:
        """The body sections of x' = x + β·e (computed on x's device, then
        brought to the CPU), and (with error feedback) the new residual
        x' - x_hat on x's device, computed with the same ops as decode()."""
        if e is not None and mode not in _TOPK:
            x = quant.add_scaled(x, e, self.error_decay)
        if mode == "f32":
            return [x.cpu().numpy()], torch.zeros_like(x) if self.error_feedback else None
        if mode in ("b8", "b4"):
            bits = 8 if mode == "b8" else 4
            q, scale = quant.block_encode(x, self.block, bits)
            codes = q if bits == 8 else quant.pack4(q)
            residual = x - quant.block_decode(q, scale, self.block) if self.error_feedback else None
            return [scale.view(torch.int16).cpu().numpy(), codes.cpu().numpy()], residual
        n = x.numel()
        nc = math.ceil(n / self.chunk)
        rows = x.new_empty(nc * self.chunk)   # ours: overwritten below
        rows[:n] = x if e is None else quant.add_scaled(x, e, self.error_decay)
        rows[n:] = 0
        idx, q, scale = quant.topk_encode_(rows.view(nc, self.chunk), self.k, self.value_bits)
        index = idx.to(torch.int32).cpu().numpy().astype(_TOPK[mode][0])
        return [scale.view(torch.int16).cpu().numpy(), index,
                quant.pack(q, self.value_bits).cpu().numpy()], rows[:n]

    def decode(self, data: bytes, expect: Expected | None = None) -> Tensors:
        return decode(data, expect)

    def state_dict(self) -> Tensors:
        """The error-feedback residuals as fp32 CPU tensors (empty without error feedback)."""
        return {n: e.to("cpu", copy=True) for n, e in self._residual.items()}

    def load_state_dict(self, state: Tensors) -> None:
        loaded = {}
        for n, e in state.items():
            e = e.detach().to("cpu", torch.float32).clone()
            if not bool(torch.isfinite(e).all()):
                raise CodecError(f"error-feedback residual {n!r} holds NaN or inf")
            loaded[n] = e
        self._residual = loaded

    def reset(self) -> None:
        self._residual = {}


def make_codec(name: str, *, topk_fraction: float = 0.01, chunk: int = 4096,
               value_bits: int = 4, block: int = 64, error_feedback: bool | None = None,
               error_decay: float = 1.0, offload: bool = True) -> Codec:
    """A codec by name (see CODECS). `value_bits` (2, 4 or 8) is for top-k values;
    `chunk` (top-k) sets the index width: one byte up to 256, else two;
    `block` is the int8/int4 scale block; `error_feedback` defaults to on for
    topk only; `error_decay` (β, SparseLoCo) scales the residual carried in;
    `offload` keeps the residual in host memory (see the module docstring)."""
    if name not in CODECS:
        raise CodecError(f"unknown codec {name!r}; valid: {', '.join(CODECS)}")
    if not 0 < topk_fraction <= 1:
        raise CodecError(f"topk_fraction is {topk_fraction}; it must be in (0, 1]")
    if not 1 <= chunk <= 65536:
        raise CodecError(f"chunk is {chunk}; it must be in [1, 65536] (indices are uint16)")
    if value_bits not in (2, 4, 8):
        raise CodecError(f"value_bits is {value_bits}; valid: 2, 4, 8")
    if not 1 <= block <= 1 << 20:
        raise CodecError(f"block is {block}; it must be in [1, {1 << 20}]")
    if not 0 <= error_decay <= 1:
        raise CodecError(f"error_decay is {error_decay}; it must be in [0, 1]")
    ef = (name == "topk") if error_feedback is None else bool(error_feedback)
    return Codec(name, topk_fraction=topk_fraction, chunk=chunk, value_bits=value_bits,
                 block=block, error_feedback=ef, error_decay=error_decay, offload=offload)
