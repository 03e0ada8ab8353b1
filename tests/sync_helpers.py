"""What the DiLoCo test files (tests/test_sync*.py) share: a tiny model, a batch and an
inner step, the committed round 0, the check that two trainings agree, sites trained in
threads through one run store, a contribution published by hand, and a one-site run
store ready for the built-in trainer."""

import threading

import torch

from geotrain.store import RunStore
from geotrain.sync.diloco import DiLoCo, RoundExchange, encode, model_params, params_hash
from geotrain.train.model import build, config_for

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


def run_sites(url, specs, rounds, h, overlap=False, exchange_cls=RoundExchange, fragments=1,
              **exchange_kw):
    """Train sites in threads; specs: {name: (data seed, batch size)}.

    Liveness is not what these runs test: a site counts as alive for 60 s after
    its last beat (not the 4 s default), so a busy machine that delays a beat
    thread cannot make one site decide a round without the other."""
    out: dict[str, dict] = {}
    errors: list[BaseException] = []
    exchange_kw.setdefault("liveness_s", 60.0)

    def site(name: str, seed: int, batch_size: int) -> None:
        try:
            model = build(CFG, seed=0)
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
            exchange = exchange_cls(RunStore(url), name, poll_s=0.01, **exchange_kw)
            gen = torch.Generator().manual_seed(seed)
            with DiLoCo(model, opt, exchange, inner_steps=h, overlap=overlap,
                        fragments=fragments) as diloco:
                while diloco.training_round <= rounds:
                    x, y = batch(gen, b=batch_size)
                    train_step(model, opt, x, y)
                    diloco.step(tokens=x.numel())
                diloco.finish()
            out[name] = {"history": diloco.history, "final": params_hash(model_params(model)),
                         "global": params_hash(diloco.global_params)}
        except BaseException as e:  # noqa: BLE001 - re-raised by the main thread
            errors.append(e)

    store = RunStore(url)
    for name in specs:  # both are known to be alive before either finishes a round
        store.alive(name, "starting")
    threads = [threading.Thread(target=site, args=(n, *spec)) for n, spec in specs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)  # the module's pytest timeout is the real limit
    assert not errors, errors[0]
    assert not any(t.is_alive() for t in threads), "a site thread is still running"
    return out


def publish(store, r, site, delta, tokens=16.0):
    RoundExchange(store, site).publish(r, delta, tokens=tokens, steps=1, base_round=r - 1)


def one_site_store(recipe, tmp_path) -> RunStore:
    """A file:// run store for site 'a' alone, with the recipe's round 0 committed and
    the site beating: what `trainer.train_site` needs to run without a controller."""
    from geotrain.train.trainer import initial_state

    store = RunStore(f"file://{tmp_path}")
    params = initial_state(recipe)
    store.commit_global(0, {"model.safetensors": encode(params)},
                        {"hash": params_hash(params), "members": ["a"]})
    store.alive("a", "running")
    return store
