"""The inner optimizers (geotrain/train/muon.py, geotrain/train/model.py): Muon's
orthogonalisation and steps against a reference, its AdamW half against
torch's AdamW, checkpoints, the lr schedule per group, the AdamW path kept
bit-for-bit, and the tiny GPT trained with Muon through the real trainer."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from geotrain.recipe import loads
from geotrain.train import model as M
from geotrain.train.entry import SiteContext
from geotrain.train.muon import Muon, configure_muon, orthogonalize, split_params
from tests.sync_helpers import one_site_store

SITES = "sites: [{name: a}]\n"


@pytest.fixture(autouse=True)
def one_thread():
    """Small matmuls on one thread: two threads on a loaded machine wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(**fields) -> M.TrainSpec:
    body = ", ".join(f"{k}: {v}" for k, v in fields.items())
    return loads(f"name: x\ntrain: {{{body}}}\n" + SITES).train


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (384, 128), (128, 512), (100, 37),
                                   (7, 300)])
def test_newton_schulz_singular_values_land_near_one(shape):
    g = torch.randn(*shape, generator=_gen(sum(shape)))
    o = orthogonalize(g)
    assert o.shape == g.shape and o.dtype == g.dtype
    s = torch.linalg.svdvals(o)
    assert 0.5 < s.min() and s.max() < 1.5, s
    # the same singular vectors as g: close to its polar factor U V^T
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    assert torch.sum(o * polar) / (o.norm() * polar.norm()) > 0.97
    # scale-free: the input's size does not matter
    assert torch.allclose(orthogonalize(g * 1e-4), o, atol=1e-4)


@pytest.mark.timeout(30)
def test_newton_schulz_on_square_and_low_rank_matrices():
    """A square random matrix has singular values near 0 that five steps cannot
    lift; the bulk lands in the band. Directions g lacks stay absent."""
    s = torch.linalg.svdvals(orthogonalize(torch.randn(256, 256, generator=_gen(1))))
    assert s.max() < 1.5 and (s > 0.5).float().mean() > 0.9
    low = torch.randn(128, 8, generator=_gen(2)) @ torch.randn(8, 128, generator=_gen(3))
    s = torch.linalg.svdvals(orthogonalize(low))
    assert bool(((s[:8] > 0.5) & (s[:8] < 1.5)).all()) and s[8:].max() < 1e-3
    assert orthogonalize(torch.randn(8, 8).to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.timeout(30)
def test_muon_step_matches_the_reference_update():
    """Two steps by hand: Nesterov momentum 0.95 as an EMA, orthogonalised, scaled
    by max(1, rows/cols)^0.5, decoupled weight decay."""
    w = nn.Parameter(torch.randn(96, 32, generator=_gen(0)))
    opt = Muon([{"params": [w], "kind": "muon", "lr": 0.02, "weight_decay": 0.1}])
    ref, buf = w.detach().clone(), torch.zeros_like(w)
    for step in range(2):
        grad = torch.randn(96, 32, generator=_gen(10 + step))
        w.grad = grad.clone()
        opt.step()
        buf = 0.95 * buf + 0.05 * grad
        update = orthogonalize(0.05 * grad + 0.95 * buf) * math.sqrt(96 / 32)
        ref = ref * (1 - 0.02 * 0.1) - 0.02 * update
        assert torch.allclose(w.detach(), ref, atol=1e-6)
    assert opt.param_groups[0]["base_lr"] == 0.02


@pytest.mark.timeout(30)
def test_muon_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    a = nn.Linear(20, 30)
    b = copy.deepcopy(a)
    mine = Muon([{"params": list(a.parameters()), "kind": "adamw", "lr": 1e-2,
                  "weight_decay": 0.1}], betas=(0.9, 0.95))
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for step in range(20):
        x = torch.randn(8, 20, generator=_gen(step))
        for model, opt in ((a, mine), (b, ref)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5)


def _regression_mlp():
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    with torch.no_grad():
        y = teacher(x)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    return x, y, model


@pytest.mark.timeout(30)
def test_muon_fits_a_small_regression():
    x, y, model = _regression_mlp()
    opt = configure_muon(model, muon_lr=0.02, adamw_lr=3e-3, weight_decay=0.0,
                         betas=(0.9, 0.95), adamw_params=[model[4].weight])
    kinds = {id(p): g["kind"] for g in opt.param_groups for p in g["params"]}
    assert kinds[id(model[0].weight)] == kinds[id(model[2].weight)] == "muon"
    assert kinds[id(model[4].weight)] == kinds[id(model[0].bias)] == "adamw"
    start = nn.functional.mse_loss(model(x), y).item()
    for _ in range(100):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * start


def test_split_params_of_the_gpt():
    model = M.build(M.config_for("tiny", context=64), seed=0)
    hidden, decay, flat = split_params(model)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay) == {id(model.tok.weight), id(model.pos.weight)}   # the head is tok's
    assert all(p.ndim == 2 for p in hidden) and all(p.ndim == 1 for p in flat)
    assert id(model.blocks[0].attn.qkv.weight) in ids(hidden)
    assert len(hidden) + len(decay) + len(flat) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="2-D"):
        Muon([{"params": [model.ln_f.weight], "kind": "muon"}])
    with pytest.raises(ValueError, match="kind"):
        Muon([{"params": [model.ln_f.weight], "kind": "sgd"}])


def _no_host_reads(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("a host read of a tensor inside scaler.step")
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("clip", [False, True])
def test_fused_muon_takes_the_scalers_scale_and_overflow_on_the_device(monkeypatch, clip):
    """`fused` (the default where every parameter is on CUDA; forced here, the CPU has
    a fused AdamW too): under an fp16 GradScaler the steps are the unscaled ones, an
    overflowing step changes no parameter and no state, and `scaler.step` reads
    nothing on the host (with `clip` the scaler has unscaled the gradients first)."""
    x, y, model = _regression_mlp()
    ref_model = copy.deepcopy(model)
    make = lambda m, fused: configure_muon(m, muon_lr=0.02, adamw_lr=3e-3,  # noqa: E731
                                           weight_decay=0.1, betas=(0.9, 0.95),
                                           adamw_params=[m[4].weight], fused=fused)
    opt, ref = make(model, True), make(ref_model, False)
    assert opt._step_supports_amp_scaling and not ref._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)

    def scaled_step(poison: bool = False) -> None:
        loss = nn.functional.mse_loss(model(x), y) * (math.inf if poison else 1.0)
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(opt)
        with monkeypatch.context() as m:
            _no_host_reads(m)
            scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    for _ in range(4):
        scaled_step()
        nn.functional.mse_loss(ref_model(x), y).backward()
        ref.step()
        ref.zero_grad()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5)
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    scale = scaler.get_scale()
    scaled_step(poison=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    after = opt.state_dict()["state"]
    assert all(torch.equal(after[i][k], state[i][k]) for i in state for k in state[i])
    assert scaler.get_scale() == scale / 2  # the scaler saw the overflow
    scaled_step()
    assert not torch.equal(next(model.parameters()), params[0])  # and the next one steps


@pytest.mark.timeout(30)
def test_unfused_muon_under_a_scaler_is_read_on_the_host(monkeypatch):
    """The check above can fail: without `fused`, GradScaler reads the overflow flag
    on the host before it calls the step (what the CPU default still does)."""
    x, y, model = _regression_mlp()
    opt = configure_muon(model, muon_lr=0.02, adamw_lr=3e-3, weight_decay=0.1,
                         betas=(0.9, 0.95), adamw_params=[model[4].weight])
    assert not opt.fused  # CPU parameters
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    _no_host_reads(monkeypatch)
    with pytest.raises(AssertionError, match="host read"):
        scaler.step(opt)


@pytest.mark.timeout(30)
def test_state_dict_round_trip():
    x, y, model = _regression_mlp()
    make = lambda m: configure_muon(m, muon_lr=0.02, adamw_lr=3e-3, weight_decay=0.1,  # noqa: E731
                                    betas=(0.9, 0.95), adamw_params=[m[4].weight])

    def steps(m, opt, n):
        for _ in range(n):
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()

    opt = make(model)
    steps(model, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    steps(model, opt, 2)
    buf.seek(0)
    saved = torch.load(buf)
    other = _regression_mlp()[2]
    other.load_state_dict(saved["model"])
    resumed = make(other)
    resumed.load_state_dict(saved["opt"])
    assert [g["kind"] for g in resumed.param_groups] == ["muon", "adamw", "adamw"]
    steps(other, resumed, 2)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)
    fresh = _regression_mlp()[2]
    fresh.load_state_dict(saved["model"])
    restart = make(fresh)                     # without the state: a different path
    steps(fresh, restart, 2)
    assert not torch.equal(fresh[2].weight, model[2].weight)


def _old_adamw_steps(t: M.TrainSpec, steps: int) -> nn.Module:
    """The trainer's inner loop as it was before per-group base lrs."""
    model = M.build(M.config_for("tiny", context=32, n_layer=1), seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=t.lr, betas=t.betas)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = M.lr_at(step, t.lr, t.warmup_steps, steps, t.min_lr_ratio)
        _gpt_step(model, opt, step)
    return model


def _gpt_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> float:
    x = torch.randint(0, 256, (2, 33), generator=_gen(step))
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


@pytest.mark.timeout(30)
def test_adamw_path_is_unchanged_bit_for_bit():
    t = _train(lr=0.003, warmup_steps=3)
    assert t.optimizer == "adamw"
    before = _old_adamw_steps(t, 8)
    model = M.build(M.config_for("tiny", context=32, n_layer=1), seed=0)
    opt = M.build_optimizer(model, t)
    assert type(opt) is torch.optim.AdamW and [g["base_lr"] for g in opt.param_groups] == [t.lr] * 2
    for step in range(8):
        M.apply_lr_schedule(opt, step, t, 8)
        _gpt_step(model, opt, step)
    after = dict(model.named_parameters())
    for name, p in before.named_parameters():
        assert torch.equal(p, after[name]), name


def test_schedule_follows_each_groups_base_lr():
    t = _train(optimizer="muon", lr=0.001, muon_lr=0.05, warmup_steps=4, min_lr_ratio=0.1)
    model = M.build(M.config_for("tiny", context=32, n_layer=1), seed=0)
    opt = M.build_optimizer(model, t)
    assert isinstance(opt, Muon)
    assert {g["kind"]: g["base_lr"] for g in opt.param_groups} == {"muon": 0.05, "adamw": 0.001}
    for step in (0, 3, 10, 100):
        M.apply_lr_schedule(opt, step, t, 100)
        ratio = M.lr_at(step, 1.0, 4, 100, 0.1)
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(g["base_lr"] * ratio)
    own = torch.optim.SGD(model.parameters(), lr=0.5)    # a user's optimizer: its lr is the peak
    M.apply_lr_schedule(own, 0, t, 100)
    M.apply_lr_schedule(own, 50, t, 100)
    assert own.param_groups[0]["base_lr"] == 0.5
    assert own.param_groups[0]["lr"] == pytest.approx(M.lr_at(50, 0.5, 4, 100, 0.1))


def test_site_context_builds_the_recipes_optimizer():
    recipe = loads("name: x\ntrain: {optimizer: muon, muon_lr: 0.03}\n" + SITES)
    ctx = SiteContext(recipe, store=None, site="a", site_index=0, n_sites=1, rank=0, world=1)
    _, _, model = _regression_mlp()
    opt = ctx.optimizer(model, adamw_params=[model[4].weight])
    assert isinstance(opt, Muon) and opt.param_groups[0]["lr"] == 0.03
    assert id(model[4].weight) not in {id(p) for p in opt.param_groups[0]["params"]}
    ctx.set_lr(opt, 0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.03 / recipe.train.warmup_steps)
    plain = SiteContext(loads("name: x\n" + SITES), None, "a", 0, 1, 0, 1).optimizer(model)
    assert type(plain) is torch.optim.AdamW


MUON_RUN = """\
name: muon
model: {preset: tiny, n_layer: 1, d_model: 32, n_head: 2}
train: {rounds: 2, inner_steps: 4, batch_size: 4, seq_len: 32, eval_batches: 1,
        warmup_steps: 2, optimizer: muon}
sites: [{name: a}]
"""


@pytest.mark.timeout(60)
def test_the_trainer_trains_the_tiny_gpt_with_muon(tmp_path, monkeypatch):
    """One site, two rounds of four steps through train_site: the trainer builds
    Muon from the recipe, schedules it, and the committed model has learned."""
    from geotrain.train import trainer

    built = []

    def spy(model, train, *args):
        built.append(M.build_optimizer(model, train, *args))
        return built[-1]

    monkeypatch.setattr(trainer, "build_optimizer", spy)
    recipe = loads(MUON_RUN)
    store = one_site_store(recipe, tmp_path)
    out = trainer.train_site(recipe, store, trainer.WorkerPlace("a", 0, 1, 0, 1))
    assert out["round"] == 2 and store.committed_rounds() == [0, 1, 2]
    (opt,) = built
    assert isinstance(opt, Muon)
    muon = next(g for g in opt.param_groups if g["kind"] == "muon")
    assert muon["lr"] == pytest.approx(M.lr_at(7, 0.02, 2, 8, 0.1))        # the last step's
    assert all(len(opt.state[p]) for p in muon["params"])                   # it stepped
    assert out["eval_loss"] < math.log(256) - 0.5
