"""Tests of DiLoCo through the run store (geotrain/sync/diloco.py).

Checked against references: one site with H=1, outer lr 1 and no momentum is
plain AdamW; the outer step is hand-written Nesterov SGD and torch's SGD; two
sites in threads end every round with bit-identical global parameters.

    python -m pytest tests/test_sync.py -q
"""

import copy
import threading
import time

import pytest
import torch

from geotrain.store import RunStore
from geotrain.sync.diloco import (DiLoCo, RoundExchange, SyncError, decode, encode, model_params,
                                  outer_step, params_hash, weighted_mean)
from geotrain.train.model import build, config_for

pytestmark = pytest.mark.timeout(60)
torch.set_num_threads(1)

CFG = config_for("tiny", 32, n_layer=2, d_model=32, n_head=2)


def batch(gen: torch.Generator, b: int = 4, t: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    xy = torch.randint(0, 256, (b, t + 1), generator=gen)
    return xy[:, :-1], xy[:, 1:]


def train_step(model, opt, x, y) -> float:
    _, loss = model(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def commit_start(store: RunStore, model) -> str:
    params = model_params(model)
    digest = params_hash(params)
    store.commit_global(0, {"model.safetensors": encode(params)}, {"hash": digest})
    return digest


def rand_tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(4, 5, generator=gen), "b": torch.randn(5, generator=gen)}


# ---- one site is plain training -------------------------------------------------

def assert_same_training(name, p, q, step):
    """p == q to 1e-6, except the attention's key bias: its true gradient is zero
    (softmax ignores a constant added to every score of a query), so what it gets
    is float noise that AdamW (eps 1e-8) amplifies from the 1-ulp differences of
    global - (global - local) into ~1e-5 drifts. It gets a loose bound."""
    if name.endswith("attn.qkv.bias"):
        d = CFG.d_model
        assert torch.allclose(p[d:2 * d], q[d:2 * d], atol=1e-4, rtol=0), f"step {step}: {name} (key) diverged"
        p, q = torch.cat([p[:d], p[2 * d:]]), torch.cat([q[:d], q[2 * d:]])
    assert torch.allclose(p, q, atol=1e-6, rtol=0), f"step {step}: {name} diverged"


def test_one_site_h1_is_adamw(tmp_path):
    store = RunStore("file://" + str(tmp_path))
    model = build(CFG, seed=0)
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    commit_start(store, model)
    gen = torch.Generator().manual_seed(1)
    hashes = {}
    with DiLoCo(model, opt, RoundExchange(store, "a", ["a"]), inner_steps=1,
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
    exchange = RoundExchange(RunStore("file://" + str(tmp_path)), "a", ["a"])
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
    with DiLoCo(model, opt, RoundExchange(store, "a", ["a"]), inner_steps=3) as diloco:
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


# ---- two sites --------------------------------------------------------------------

def test_two_sites_in_threads_are_bit_identical(tmp_path):
    url = "file://" + str(tmp_path)
    start = build(CFG, seed=0)
    start_hash = commit_start(RunStore(url), start)
    rounds, h = 4, 3
    out: dict[str, dict] = {}
    errors: list[BaseException] = []

    def site(name: str, seed: int, batch_size: int) -> None:
        try:
            model = build(CFG, seed=0)
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
            exchange = RoundExchange(RunStore(url), name, ["a", "b"], timeout_s=30, poll_s=0.01)
            gen = torch.Generator().manual_seed(seed)
            with DiLoCo(model, opt, exchange, inner_steps=h) as diloco:
                for _ in range(rounds * h):
                    x, y = batch(gen, b=batch_size)
                    train_step(model, opt, x, y)
                    diloco.step(tokens=x.numel())
            out[name] = {"history": diloco.history, "final": params_hash(model_params(model))}
        except BaseException as e:  # noqa: BLE001 - re-raised by the main thread
            errors.append(e)

    threads = [threading.Thread(target=site, args=("a", 10, 4)),
               threading.Thread(target=site, args=("b", 20, 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    assert not errors, errors[0]
    a, b = out["a"]["history"], out["b"]["history"]
    assert [r.round for r in a] == [r.round for r in b] == [1, 2, 3, 4]
    assert [r.hash for r in a] == [r.hash for r in b]
    assert len({start_hash, *(r.hash for r in a)}) == rounds + 1  # every round moved the model
    assert out["a"]["final"] == out["b"]["final"] == a[-1].hash
    assert a[0].members == ["a", "b"] and a[0].bytes_received == b[0].bytes_sent > 0

    store = RunStore(url)
    assert store.committed_rounds() == [0, 1, 2, 3, 4]
    for res in a:
        results = store.results(res.round)
        assert set(results) == {"a", "b"}
        assert results["a"]["hash"] == results["b"]["hash"] == res.hash
        assert store.read_global(res.round)[1]["hash"] == res.hash

    # Round 1 by hand from what the store holds: tokens 4*16 vs 2*16 per step.
    parts = []
    for s in ("a", "b"):
        payload, manifest = store.read_contribution(1, s)
        parts.append((s, decode(payload), float(manifest["tokens"])))
    assert [p[2] for p in parts] == [h * 4 * 16, h * 2 * 16]
    theta = model_params(start)
    outer_step(theta, weighted_mean(parts), {}, 0.7, 0.9, True)
    assert params_hash(theta) == a[0].hash


def test_gather_times_out_naming_the_missing_site(tmp_path):
    store = RunStore("file://" + str(tmp_path))
    exchange = RoundExchange(store, "a", ["a", "b", "c"], timeout_s=0.5, poll_s=0.02)
    store.put_contribution(1, "c", encode({"w": torch.zeros(2)}), {"tokens": 1})
    exchange.publish(1, {"w": torch.ones(2)}, tokens=4, steps=1)
    t0 = time.monotonic()
    with pytest.raises(SyncError, match=r"round 1: no contribution from b within 0.5 s"):
        exchange.gather(1)
    assert 0.5 <= time.monotonic() - t0 < 3.0


def test_gather_stops_when_asked(tmp_path):
    exchange = RoundExchange(RunStore("file://" + str(tmp_path)), "a", ["a", "b"], timeout_s=30)
    exchange.publish(1, {"w": torch.ones(2)}, tokens=4, steps=1)
    with pytest.raises(SyncError, match="stopped"):
        exchange.gather(1, should_stop=lambda: True)


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
