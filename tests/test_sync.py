"""Tests of DiLoCo's numerics against references (geotrain/sync/diloco.py).

One site with H=1, outer lr 1 and no momentum is plain AdamW; the outer step is
hand-written Nesterov SGD and torch's SGD; the weighted mean weighs tokens and is
bit-identical in any order; encoding is exact and the hash sees one ulp. Several
sites: tests/test_sync_sites.py; deciding a round: tests/test_sync_decide.py; round
windows and changed contributions: tests/test_sync_windows.py.

    python -m pytest tests/test_sync.py -q
"""

import copy

import pytest
import torch

from geotrain.store import RunStore
from geotrain.sync.diloco import (DiLoCo, RoundExchange, SyncError, decode, encode, model_params,
                                  outer_step, params_hash, weighted_mean)
from geotrain.train.model import build
from tests.sync_helpers import CFG, assert_same_training, batch, commit_start, train_step

# A guard against a hang, not a speed limit: nothing here waits on how fast the machine is.
pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)


def rand_tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(4, 5, generator=gen), "b": torch.randn(5, generator=gen)}


# ---- one site is plain training -------------------------------------------------

def test_one_site_h1_is_adamw(tmp_path):
    store = RunStore("file://" + str(tmp_path))
    model = build(CFG, seed=0)
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    commit_start(store, model)
    gen = torch.Generator().manual_seed(1)
    hashes = {}
    with DiLoCo(model, opt, RoundExchange(store, "a"), inner_steps=1,
                outer_lr=1.0, outer_momentum=0.0) as diloco:
        for step in range(1, 9):
            x, y = batch(gen)
            train_step(model, opt, x, y)
            train_step(ref, ref_opt, x, y)
            result = diloco.step(tokens=x.numel())
            assert result is not None and result.round == step and diloco.round == step
            for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
                assert_same_training(name, p, q, step)
            params = model_params(model)
            assert result.hash == params_hash(params)  # the model holds the new global state
            hashes[step] = result.hash
    first = model_params(build(CFG, seed=0))
    assert any(not torch.allclose(first[n], params[n], atol=1e-4) for n in params), "nothing trained"
    assert store.committed_rounds() == list(range(9))
    assert len(set(hashes.values())) == 8
    for r, digest in hashes.items():
        files, manifest = store.read_global(r)
        assert manifest["hash"] == digest and manifest["members"] == ["a"]
        assert params_hash(decode(files["model.safetensors"])) == digest
        assert "outer.safetensors" not in files  # no momentum, no outer state
        assert store.results(r) == {"a": {"hash": digest, "site": "a", "round": r}}


def test_enter_without_committed_state_fails(tmp_path):
    model = build(CFG, seed=0)
    exchange = RoundExchange(RunStore("file://" + str(tmp_path)), "a")
    with pytest.raises(SyncError, match="no committed global state"):
        with DiLoCo(model, torch.optim.AdamW(model.parameters()), exchange, inner_steps=1):
            pass


def test_step_syncs_every_h_steps(tmp_path):
    store = RunStore("file://" + str(tmp_path))
    model = build(CFG, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    commit_start(store, model)
    gen = torch.Generator().manual_seed(2)
    results = []
    with DiLoCo(model, opt, RoundExchange(store, "a"), inner_steps=3) as diloco:
        for _ in range(7):
            x, y = batch(gen)
            train_step(model, opt, x, y)
            results.append(diloco.step(tokens=x.numel()))
    assert [r is not None for r in results] == [False, False, True, False, False, True, False]
    assert store.committed_rounds() == [0, 1, 2]
    _, manifest = store.read_contribution(2, "a")
    assert manifest["tokens"] == 3 * 4 * 16 and manifest["inner_steps"] == 3
    files, _ = store.read_global(2)
    assert set(decode(files["outer.safetensors"])) == set(model_params(model))  # momentum saved


# ---- the outer optimizer -----------------------------------------------------------

def reference_outer(theta, grads, lr, mu, nesterov):
    """Nesterov/heavy-ball SGD written out: buf = mu*buf + g; d = g + mu*buf or buf."""
    theta = {n: t.clone() for n, t in theta.items()}
    buf = {n: torch.zeros_like(t) for n, t in theta.items()}
    for g in grads:
        for n in theta:
            buf[n] = mu * buf[n] + g[n]
            d = g[n] + mu * buf[n] if nesterov else buf[n]
            theta[n] = theta[n] - lr * d
    return theta


def torch_sgd(theta, grads, lr, mu, nesterov):
    params = {n: torch.nn.Parameter(t.clone()) for n, t in theta.items()}
    # torch refuses nesterov without momentum; with mu = 0 both are plain SGD
    opt = torch.optim.SGD(params.values(), lr=lr, momentum=mu, nesterov=nesterov and mu > 0)
    for g in grads:
        for n, p in params.items():
            p.grad = g[n].clone()
        opt.step()
    return {n: p.detach() for n, p in params.items()}


@pytest.mark.parametrize("mu,nesterov", [(0.9, True), (0.0, True), (0.5, False)])
def test_outer_step_matches_references(mu, nesterov):
    gen = torch.Generator().manual_seed(3)
    theta0 = rand_tensors(gen)
    grads = [rand_tensors(gen) for _ in range(3)]
    lr = 0.7
    theta = {n: t.clone() for n, t in theta0.items()}
    buf: dict[str, torch.Tensor] = {}
    for g in grads:
        outer_step(theta, g, buf, lr, mu, nesterov)
    expected = reference_outer(theta0, grads, lr, mu, nesterov)
    sgd = torch_sgd(theta0, grads, lr, mu, nesterov)
    for n in theta0:
        assert torch.allclose(theta[n], expected[n], atol=1e-6, rtol=0), n
        assert torch.allclose(theta[n], sgd[n], atol=1e-6, rtol=0), n
        assert not torch.allclose(theta[n], theta0[n], atol=1e-3)
    if mu:
        assert set(buf) == set(theta0)
        g_sum = {n: sum(mu ** (2 - i) * g[n] for i, g in enumerate(grads)) for n in theta0}
        for n in theta0:
            assert torch.allclose(buf[n], g_sum[n], atol=1e-6, rtol=0)
    else:
        assert buf == {}  # no momentum: no state to keep or commit
        for n in theta0:
            plain = theta0[n] - lr * sum(g[n] for g in grads)
            assert torch.allclose(theta[n], plain, atol=1e-6, rtol=0)


def test_nesterov_differs_from_heavy_ball():
    gen = torch.Generator().manual_seed(4)
    theta0, grads = rand_tensors(gen), [rand_tensors(gen) for _ in range(3)]
    a, b = ({n: t.clone() for n, t in theta0.items()} for _ in range(2))
    buf_a, buf_b = {}, {}
    for g in grads:
        outer_step(a, g, buf_a, 0.7, 0.9, True)
        outer_step(b, g, buf_b, 0.7, 0.9, False)
    assert not torch.allclose(a["w"], b["w"], atol=1e-3)


# ---- weighted mean ------------------------------------------------------------------

def test_weighted_mean_weights_by_tokens():
    gen = torch.Generator().manual_seed(5)
    da, db = rand_tensors(gen), rand_tensors(gen)
    out = weighted_mean([("a", da, 100.0), ("b", db, 300.0)])
    for n in da:
        assert torch.allclose(out[n], 0.25 * da[n] + 0.75 * db[n], atol=1e-6, rtol=0)
    equal = weighted_mean([("a", da, 5.0), ("b", db, 5.0)])
    for n in da:
        assert torch.allclose(equal[n], (da[n] + db[n]) / 2, atol=1e-6, rtol=0)
    alone = weighted_mean([("a", da, 7.0)])
    assert all(torch.equal(alone[n], da[n]) for n in da)


def test_weighted_mean_is_bit_identical_in_any_order():
    gen = torch.Generator().manual_seed(6)
    parts = [(s, rand_tensors(gen), w) for s, w in (("c", 3.0), ("a", 1.0), ("b", 7.0))]
    reference = weighted_mean(parts)
    for order in ([0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]):
        out = weighted_mean([parts[i] for i in order])
        assert params_hash(out) == params_hash(reference), order


def test_weighted_mean_triple_weight_counts_three_times():
    gen = torch.Generator().manual_seed(7)
    da, db = rand_tensors(gen), rand_tensors(gen)
    heavy = weighted_mean([("a", da, 3.0), ("b", db, 1.0)])
    copies = weighted_mean([("a1", da, 1.0), ("a2", da, 1.0), ("a3", da, 1.0), ("b", db, 1.0)])
    for n in da:
        assert torch.allclose(heavy[n], copies[n], atol=1e-6, rtol=0)
        assert not torch.allclose(heavy[n], (da[n] + db[n]) / 2, atol=1e-3)


# ---- encoding -------------------------------------------------------------------

def test_encode_decode_round_trip_is_exact():
    gen = torch.Generator().manual_seed(8)
    tensors = {"w": torch.randn(3, 7, generator=gen), "b": torch.randn(7, generator=gen),
               "tiny": torch.tensor([1e-45, -0.0, float("inf")]),
               "strided": torch.randn(6, 4, generator=gen).t()}
    back = decode(encode(tensors))
    assert set(back) == set(tensors)
    for n, t in tensors.items():
        assert back[n].dtype == t.dtype and back[n].shape == t.shape
        assert torch.equal(back[n].view(torch.int32), t.contiguous().view(torch.int32)), n
    assert params_hash(back) == params_hash(tensors)


def test_params_hash_sees_one_ulp():
    gen = torch.Generator().manual_seed(9)
    tensors = {"w": torch.randn(8, 8, generator=gen), "b": torch.randn(8, generator=gen)}
    digest = params_hash(tensors)
    assert params_hash({n: t.clone() for n, t in tensors.items()}) == digest
    nudged = {n: t.clone() for n, t in tensors.items()}
    nudged["w"][3, 5] = torch.nextafter(nudged["w"][3, 5], torch.tensor(float("inf")))
    assert not torch.equal(nudged["w"], tensors["w"])
    assert params_hash(nudged) != digest
    # names count too: the same bytes under another name are another model
    assert params_hash({"v": tensors["w"], "b": tensors["b"]}) != digest
