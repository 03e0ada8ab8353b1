"""DiLoCo's memory (`sync.offload`, geotrain/sync/offload.py) and encoding on
the tensors' device (geotrain/sync/compression.py, quant.py).

On the CPU: the codec's device-generic encoder gives, byte for byte, the
payloads and residuals the CPU-only encoder gave before it (sha256 digests
recorded from that code, for every mode, error feedback on, three rounds);
offload on, off and auto give bit-identical global parameters through real
DiLoCo rounds, with the buffer-reuse path (unpinned) exercised. With CUDA (a
GPU machine; skipped here, saying why): CUDA-encoded bytes equal the CPU's, and
offload on and off on a GPU give the CPU run's global hashes.

    python -m pytest tests/test_offload.py -q
"""

from __future__ import annotations

import hashlib
import math
import threading
from fractions import Fraction

import numpy as np
import pytest
import torch

from geotrain import recipe
from geotrain.errors import RecipeError
from geotrain.store import RunStore
from geotrain.sync import quant
from geotrain.sync.compression import CodecError, decode, make_codec
from geotrain.sync.diloco import DiLoCo, RoundExchange, encode, model_params, params_hash
from geotrain.sync.offload import ModelCopies
from geotrain.train.model import build, config_for

pytestmark = pytest.mark.timeout(120)   # a guard against a hang, not a speed limit
torch.set_num_threads(1)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason=f"needs CUDA: torch {torch.__version__} sees no CUDA "
                                       f"device here (runs on a GPU machine)")

# ---- the codec: the same bytes as before, on every device ----------------------------

CASES = {
    "none": dict(name="none"),
    "none-ef": dict(name="none", error_feedback=True),
    "int8": dict(name="int8"),
    "int8-ef-b32": dict(name="int8", block=32, error_feedback=True),
    "int4-ef": dict(name="int4", error_feedback=True),
    "int4-ef-b7-decay": dict(name="int4", block=7, error_feedback=True, error_decay=0.9),
    "topk-4096-8": dict(name="topk", chunk=4096, value_bits=8),
    "topk-4096-4": dict(name="topk", chunk=4096, value_bits=4),
    "topk-4096-2": dict(name="topk", chunk=4096, value_bits=2),
    "topk-1000-4-5pc": dict(name="topk", chunk=1000, topk_fraction=0.05, value_bits=4),
    "topk-256-8": dict(name="topk", chunk=256, value_bits=8),
    "topk-256-4-2pc": dict(name="topk", chunk=256, topk_fraction=0.02, value_bits=4),
    "topk-256-2-decay": dict(name="topk", chunk=256, value_bits=2, error_decay=0.9),
    "topk-64-2-10pc": dict(name="topk", chunk=64, topk_fraction=0.1, value_bits=2),
    "topk-16-4-all": dict(name="topk", chunk=16, topk_fraction=1.0, value_bits=4),
    "topk-4096-4-noef": dict(name="topk", chunk=4096, value_bits=4, error_feedback=False),
}
# sha256 of three rounds' payloads and the final residuals (digest() below), recorded
# with the CPU-only encoder before encoding moved to the tensors' device. The decay
# cases were recorded on an AVX-512 CPU, whose x + β·e is fused (rounded once);
# the old code gave other bits where torch's kernel does not fuse (ATEN_CPU_CAPABILITY=
# default), the new one gives these everywhere.
GOLDEN = {
    "none": "1e1ddbea08ad642fbdf83041e90b4cddc85196a6e8eb229f9e8f543e26cdc085",
    "none-ef": "e686865b0ce8cd65d2eea56faa0163dc9d322173bbbe668a0b412d26f84e3148",
    "int8": "4ef24ef2c3480e96c55656b31829783949ca589ef3c7f79226af9b070971cbb9",
    "int8-ef-b32": "f2edb9d0f64d4f003227c34863678339d8bc4b7d658dc2e6422eed4e7e067da8",
    "int4-ef": "e8c6476ea49ae39083c872197d3f951720cee60277c2ca706bb5be97c98a433c",
    "int4-ef-b7-decay": "b617d3931eb07a8742d3269d8ab227edf1e20dd98820d96c9cb2f994350acf8d",
    "topk-4096-8": "544c5150720a6ae1b928674028fddedf84b72ad33253c9c955ddb4d0b54c33b1",
    "topk-4096-4": "44bf89469ffb1340b7353b88937800fc9c3efd160dfa38593f342d89146b3ab6",
    "topk-4096-2": "4872bfb2c8c0f13e70699c90c3e3362f09b1b099b449332e9a039b19c769202d",
    "topk-1000-4-5pc": "9d95c2b4ea57d1a7cbb60c77046409ad70068913a3c6cfb92c9ec2544590fef9",
    "topk-256-8": "35f2b1485986b734d9cd40810914b9105ad056007c9397a9bffb5dce9aee0176",
    "topk-256-4-2pc": "6f439afc417fe2f87a29a6fd2f18e54bccac88fbd5360f6cddfd6b8cb2dcb36e",
    "topk-256-2-decay": "bc7c232d308cbbab2b2ed98f910d8f40e35719d5830385c5de47aa483ef1d7f2",
    "topk-64-2-10pc": "379e0366272314b96041565e64186876e83904dd06c31f6abccdc0fa003b2c2a",
    "topk-16-4-all": "f244b681895f62a2f68054c8e445726f6d0a2f60db2e0bc09a17916387d5bf25",
    "topk-4096-4-noef": "e9475e50d262ba6eda7264b3c9ddbff55c74f723c4eb1a0a88c574853224dd00",
}
SHAPES = {"emb": (300, 37), "w": (4097,), "tail": (2, 4097), "bias": (5,), "gain": (),
          "empty": (0, 3), "ties": (1500,), "sparse": (3000,), "mixed": (64, 65)}


def _floats(g: torch.Generator, n: int, exp_lo: int, exp_hi: int) -> torch.Tensor:
    """n fp32 values built from random bits (sign, biased exponent in [exp_lo, exp_hi],
    mantissa): exactly the same on every machine, unlike randn."""
    sign = torch.randint(0, 2, (n,), generator=g, dtype=torch.int32) << 31
    exp = torch.randint(exp_lo, exp_hi + 1, (n,), generator=g, dtype=torch.int32) << 23
    mant = torch.randint(0, 1 << 23, (n,), generator=g, dtype=torch.int32)
    return (sign | exp | mant).view(torch.float32)


def inputs(rnd: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rnd)
    out = {}
    for name, shape in SHAPES.items():
        n = math.prod(shape)
        if name == "ties":      # five values: top-k ties at the threshold
            x = torch.tensor([-0.5, -0.25, 0.0, 0.25, 0.5])[torch.randint(0, 5, (n,), generator=g)]
        elif name == "sparse":  # mostly exact zeros: chunks with fewer than k non-zeros
            x = _floats(g, n, 115, 122) * (torch.randint(0, 300, (n,), generator=g) == 0)
        elif name == "mixed":   # magnitudes from 1e-9 to 1e3
            x = _floats(g, n, 97, 137)
        else:                   # magnitudes around 1e-3
            x = _floats(g, n, 112, 119)
        out[name] = x.view(shape)
    return out


@pytest.fixture
def denormals_kept():
    """IEEE subnormals for the test: the trainer flushes them process-wide
    (torch.set_flush_denormal), which another test in this process may have done."""
    flushed = (torch.tensor([1e-45]) * 1.0).item() == 0.0
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(flushed)


def digest(case: str, device: str = "cpu", offload: bool = True, rounds: int = 3) -> str:
    codec = make_codec(**CASES[case], offload=offload)
    h = hashlib.sha256()
    for r in range(rounds):
        h.update(codec.encode({n: t.to(device) for n, t in inputs(r).items()}))
    for n, e in sorted(codec.state_dict().items()):
        h.update(n.encode())
        h.update(e.cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("offload", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_encoding_gives_the_recorded_bytes(case, offload, denormals_kept):
    assert digest(case, offload=offload) == GOLDEN[case]


def test_the_recorded_inputs_tie_at_the_top_k_threshold():
    """The golden cases exercise the tie rule: rows whose k-th largest value is tied."""
    rows = inputs(0)["ties"][:1280].view(5, 256).abs()
    k = math.ceil(0.02 * 256)
    kth = rows.topk(k, dim=1).values[:, -1:]
    assert bool(((rows >= kth).sum(dim=1) > k).all())
    idx = quant.topk_indices(rows, k)
    assert torch.equal(idx, rows.topk(k, dim=1, sorted=False).indices.sort(dim=1).values)
    assert bool((idx[:, 1:] > idx[:, :-1]).all())


def _round_once(v: Fraction) -> float:
    """v rounded to the nearest fp32 (ties to even), exactly."""
    f = np.float32(float(v))     # within one fp32 ulp of the answer
    cands = [f, np.nextafter(f, np.float32(np.inf)), np.nextafter(f, np.float32(-np.inf))]
    best = min(abs(Fraction(float(c)) - v) for c in cands)
    near = [c for c in cands if abs(Fraction(float(c)) - v) == best]
    return float(near[0] if len(near) == 1 else
                 next(c for c in near if not int(np.array(c).view(np.int32)) & 1))


@pytest.mark.parametrize("beta", [0.9, 0.3, 1e-3, 0.0, 1.0])
def test_add_scaled_rounds_once(beta, denormals_kept):
    """x + β·e, rounded once from the exact value, whatever the CPU fuses."""
    g = torch.Generator().manual_seed(7)
    x = torch.cat([_floats(g, 600, 100, 140), _floats(g, 100, 0, 3),   # subnormals
                   torch.tensor([0.0, -0.0, 1.0, -1.0, -0.0])])
    e = torch.cat([_floats(g, 300, 100, 140), _floats(g, 300, 60, 90),   # far below x
                   _floats(g, 100, 0, 5), torch.tensor([-0.0, 0.0, -1e-30, 3.0, -0.0])])
    b = Fraction(float(np.float32(beta)))
    want = [_round_once(Fraction(xi) + b * Fraction(ei)) for xi, ei in zip(x.tolist(), e.tolist())]
    want[-1] = -0.0     # -0 + β·-0: the only exact zero that keeps a minus sign
    got = quant.add_scaled(x, e, beta)
    assert got.dtype == torch.float32
    assert got.tolist() == want
    assert torch.equal(torch.signbit(got), torch.signbit(torch.tensor(want)))


def test_a_bad_tensor_leaves_the_residual_as_it_was():
    """The in-place (offload) residual is checked before it is written."""
    for offload in (True, False):
        codec = make_codec("topk", chunk=256, offload=offload)
        codec.encode(inputs(0))
        before = codec.state_dict()
        bad = dict(inputs(1), zz=torch.tensor([1.0, float("nan")]))
        with pytest.raises(CodecError, match="'zz' holds NaN"):
            codec.encode(bad)
        after = codec.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[n], before[n]) for n in before)


# ---- DiLoCo: offload on, off and auto give the same bits ---------------------------------

CFG = config_for("tiny", 32, n_layer=2, d_model=32, n_head=2)


def commit_start(url: str) -> str:
    params = model_params(build(CFG, seed=0))
    digest = params_hash(params)
    RunStore(url).commit_global(0, {"model.safetensors": encode(params)}, {"hash": digest})
    return digest


def inner_update(model, gen: torch.Generator, scale: float = 1e-3) -> None:
    """A stand-in inner step: add values built from CPU random bits (the same on
    any device: an element-wise add), so runs compare bit for bit across devices."""
    with torch.no_grad():
        for p in model.parameters():
            step = _floats(gen, p.numel(), 110, 118).view(p.shape) * scale / 1e-3
            p.add_(step.to(p.device))


def run_site(url: str, site: str = "a", *, device: str = "cpu", offload: bool | None,
             overlap: bool, rounds: int = 4, h: int = 2, seed: int = 3, train: bool = False,
             liveness: bool = False, **exchange_kw) -> dict:
    model = build(CFG, seed=0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    codec = make_codec("topk", chunk=256, topk_fraction=0.05, value_bits=4)
    exchange = RoundExchange(RunStore(url), site, codec=codec, poll_s=0.01, **exchange_kw)
    gen = torch.Generator().manual_seed(seed)
    with DiLoCo(model, opt, exchange, inner_steps=h, overlap=overlap, offload=offload,
                liveness=liveness) as diloco:
        while diloco.training_round <= rounds:
            if train:
                xy = torch.randint(0, 256, (4, 17), generator=gen)
                _, loss = model(xy[:, :-1].to(device), xy[:, 1:].to(device))
                loss.backward()
                opt.step()
                opt.zero_grad()
            else:
                inner_update(model, gen)
            diloco.step(tokens=64)
        diloco.finish()
    return {"offload": diloco.offload, "hashes": [r.hash for r in diloco.history],
            "members": [r.members for r in diloco.history],
            "model": params_hash(model_params(model)), "global": params_hash(diloco.global_params),
            "residual": params_hash(codec.state_dict()), "codec_offload": codec.offload}


@pytest.mark.parametrize("overlap", [False, True])
def test_offload_on_off_auto_give_the_same_bits_on_cpu(tmp_path, overlap):
    runs = {}
    for offload in (None, True, False):
        url = f"file://{tmp_path}/{offload}"
        start = commit_start(url)
        runs[offload] = run_site(url, offload=offload, overlap=overlap, rounds=5)
        assert len({start, *runs[offload]["hashes"]}) == 6   # every round moved the model
    assert runs[None]["offload"] is False   # auto: a CPU model keeps its copies as they were
    assert runs[True]["offload"] is True and runs[True]["codec_offload"] is True
    assert runs[False]["codec_offload"] is False
    for key in ("hashes", "model", "global", "residual"):
        assert runs[True][key] == runs[False][key] == runs[None][key], key


def test_offload_with_real_training_is_bit_identical(tmp_path):
    out = []
    for offload in (True, False):
        url = f"file://{tmp_path}/{offload}"
        commit_start(url)
        out.append(run_site(url, offload=offload, overlap=True, rounds=3, train=True))
    assert out[0]["hashes"] == out[1]["hashes"] and out[0]["model"] == out[1]["model"]


def test_two_sites_one_offloading_stay_bit_identical(tmp_path):
    """Site a offloads, site b does not: every round ends on the same global bits,
    and swapping who offloads changes nothing."""
    results = {}
    for a_offloads in (True, False):
        url = f"file://{tmp_path}/{a_offloads}"
        commit_start(url)
        store = RunStore(url)
        for s in ("a", "b"):
            store.alive(s, "starting")
        out, errors = {}, []

        def site(name, offload, seed):
            try:
                out[name] = run_site(url, name, offload=offload, overlap=True, seed=seed,
                                     liveness=True, liveness_s=60.0)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        threads = [threading.Thread(target=site, args=("a", a_offloads, 1)),
                   threading.Thread(target=site, args=("b", not a_offloads, 2))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(100)
        assert not errors, errors[0]
        assert out["a"]["hashes"] == out["b"]["hashes"] and len(out["a"]["hashes"]) == 4
        assert out["a"]["members"] == [["a", "b"]] * 4, out["a"]["members"]
        results[a_offloads] = out["a"]["hashes"]
    assert results[True] == results[False]


def test_model_copies_reuse_their_buffers():
    model = build(CFG, seed=0)
    reuse, fresh = ModelCopies(model, offload=True), ModelCopies(model, offload=False)
    assert not reuse.pin   # a CPU model: nothing to pin
    first = reuse.of_model()
    ptrs = {n: t.data_ptr() for n, t in first.items()}
    assert params_hash(first) == params_hash(model_params(model))
    reuse.release(first)
    inner_update(model, torch.Generator().manual_seed(0))
    again = reuse.of_model()    # the released buffers, holding the new values
    assert {n: t.data_ptr() for n, t in again.items()} == ptrs
    assert params_hash(again) == params_hash(model_params(model))
    start = reuse.of_model()
    into_ptrs = {n: t.data_ptr() for n, t in start.items()}
    merged = {n: t + 1 for n, t in model_params(model).items()}
    assert reuse.copy(merged, into=start) is start
    assert {n: t.data_ptr() for n, t in start.items()} == into_ptrs
    assert params_hash(start) == params_hash(merged)
    made = fresh.copy(merged, into=start)
    assert made is not start and params_hash(made) == params_hash(merged)
    assert all(made[n].data_ptr() != merged[n].data_ptr() for n in made)
    # The pseudo-gradient from the parameters is start - model_params, bit for bit.
    want = {n: merged[n] - t for n, t in model_params(model).items()}
    assert params_hash(reuse.delta(start)) == params_hash(fresh.delta(merged)) == params_hash(want)


# ---- the recipe ----------------------------------------------------------------------------

def test_recipe_sync_offload(tmp_path):
    text = "name: demo\nsync: {{offload: {}}}\nsites:\n  - name: a\n"
    assert recipe.loads("name: demo\nsites:\n  - name: a\n").sync.offload == "auto"
    assert recipe.loads(text.format("true")).sync.offload is True
    assert recipe.loads(text.format("false")).sync.offload is False
    assert recipe.loads(text.format("auto")).sync.offload == "auto"
    with pytest.raises(RecipeError, match=r"sync\.offload: expected one of 'auto', True, False"):
        recipe.loads(text.format("maybe"))


# ---- on a GPU ------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("offload", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_encoding_gives_the_cpu_bytes(case, offload, denormals_kept):
    assert digest(case, device="cuda", offload=offload) == GOLDEN[case]


@needs_cuda
def test_cuda_kernels_match_the_cpu(denormals_kept):
    g = torch.Generator().manual_seed(11)
    x, e = _floats(g, 100_003, 90, 140), _floats(g, 100_003, 80, 130)
    for beta in (0.9, 1.0, 0.0):
        assert torch.equal(quant.add_scaled(x.cuda(), e.cuda(), beta).cpu(),
                           quant.add_scaled(x, e, beta))
    absmax = _floats(g, 100_003, 1, 250).abs()
    for qmax in (127, 7, 2):
        assert torch.equal(quant.bf16_scale(absmax.cuda(), qmax).cpu().view(torch.int16),
                           quant.bf16_scale(absmax, qmax).view(torch.int16))
    # ties at the threshold in most rows: zero padding, a few distinct magnitudes
    rows = torch.tensor([0.0, 0.25, 0.5, 1.0])[torch.randint(0, 4, (64, 4096), generator=g)]
    rows[::3, 100:] = 0
    for k in (1, 41, 64, 1000, 4096):
        assert torch.equal(quant.topk_indices(rows.cuda(), k).cpu(), quant.topk_indices(rows, k))


@needs_cuda
def test_cuda_residual_lives_where_offload_says():
    x = {n: t.cuda() for n, t in inputs(0).items()}
    held = {}
    for offload in (True, False):
        codec = make_codec("topk", chunk=256, offload=offload)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        payload = codec.encode(x)
        torch.cuda.synchronize()
        held[offload] = torch.cuda.memory_allocated() - base
        assert decode(payload).keys() == x.keys()
    residual_bytes = 4 * sum(t.numel() for t in x.values())
    assert held[True] == 0            # pinned host buffers, nothing left on the GPU
    assert held[False] >= residual_bytes


@needs_cuda
@pytest.mark.parametrize("overlap", [False, True])
def test_cuda_offload_on_off_give_the_cpu_runs_bits(tmp_path, overlap, denormals_kept):
    runs = {}
    for device, offload in (("cpu", False), ("cuda", None), ("cuda", True), ("cuda", False)):
        url = f"file://{tmp_path}/{device}-{offload}"
        commit_start(url)
        runs[device, offload] = run_site(url, device=device, offload=offload, overlap=overlap)
    assert runs["cuda", None]["offload"] is True   # auto: on for a model on a GPU
    for key in ("hashes", "model", "global", "residual"):
        assert len({r[key] for r in runs.values()}) == 1, key


@needs_cuda
def test_cuda_offload_keeps_the_snapshot_off_the_gpu(tmp_path):
    held = {}
    for offload in (True, False):
        url = f"file://{tmp_path}/{offload}"
        commit_start(url)
        model = build(CFG, seed=0).cuda()
        size = 4 * sum(p.numel() for p in model.parameters())
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        with DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1),
                    RoundExchange(RunStore(url), "a"), inner_steps=1, offload=offload,
                    liveness=False):
            torch.cuda.synchronize()
            held[offload] = torch.cuda.memory_allocated() - base
    assert held[True] == 0 and held[False] >= size
