"""Precision, devices and the no-sync hot path of the built-in trainer
(geotrain/train/precision.py, geotrain/train/trainer.py `inner_step`, `Meter`).

Everything but the last test runs on the CPU: bf16 and fp16 through CPU
autocast, so the paths a GPU takes are exercised here; what only CUDA does
(pinned copies, fused AdamW, TF32, a side stream) is checked on a GPU machine.
The last test runs there only: the trainer's step under CUDA's sync debug mode.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from geotrain.recipe import loads
from geotrain.train import model as M
from geotrain.train import precision as P
from geotrain.train import trainer
from geotrain.train.entry import SiteContext
from tests.sync_helpers import one_site_store

pytestmark = pytest.mark.timeout(60)

SITES = "sites: [{name: a}]\n"


def _tiny() -> nn.Module:
    return M.build(M.config_for("tiny", context=32, n_layer=1, d_model=32, n_head=2), seed=0)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(step % 4))
    return x[:, :-1], x[:, 1:]


def _train(precision: str, steps: int) -> tuple[nn.Module, torch.optim.Optimizer, list[float]]:
    """`steps` inner steps of the trainer's own step function on the CPU."""
    model = _tiny()
    opt = M.configure_optimizer(model, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    scaler = P.grad_scaler(precision, "cpu")
    losses = [trainer.inner_step(model, model, opt, scaler, precision, *_batch(s), 1.0).item()
              for s in range(steps)]
    return model, opt, losses


def test_fp32_step_is_the_plain_loop_bit_for_bit():
    """The trainer's step in fp32 is what it was before precision existed:
    forward, backward, clip, AdamW, with the same bits."""
    ref = _tiny()
    opt = M.configure_optimizer(ref, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    before = []
    for s in range(3):
        _, loss = ref(*_batch(s))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        before.append(loss.item())
    model, _, after = _train("fp32", 3)
    assert after == before
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name
    batches = [_batch(s) for s in range(3)]
    old_eval = sum(model(x, y)[1].item() for x, y in batches) / len(batches)
    assert trainer.evaluate(model, batches) == old_eval


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_on_the_cpu_trains_with_fp32_weights(precision):
    model, opt, losses = _train(precision, 30)
    _, _, fp32 = _train("fp32", 30)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) / 4 < losses[0] - 0.5, losses
    assert sum(losses[-4:]) / 4 == pytest.approx(sum(fp32[-4:]) / 4, abs=0.2)  # about as well
    # Autocast ran the matmuls in the low precision; weights and AdamW state stayed fp32.
    with P.autocast(precision, "cpu"):
        logits, _ = model(*_batch(0))
    assert logits.dtype == P.DTYPES[precision]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(t.dtype == torch.float32 for s in opt.state.values() for t in s.values() if t.ndim)


class _Scaled(nn.Module):
    """loss = sum(w * x): a huge x gives a finite loss whose scaled gradient overflows."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return None, (self.w * x).sum()


def test_fp16_scaler_skips_an_overflowing_step_without_raising():
    model = _Scaled()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = P.grad_scaler("fp16", "cpu")
    meter = trainer.Meter(torch.device("cpu"), tokens_per_step=1)
    scale = scaler.get_scale()
    huge = torch.tensor([1e38, 1.0, 1.0])  # times the scale (65536): an inf gradient
    meter.add(trainer.inner_step(model, model, opt, scaler, "fp16", huge, huge, grad_clip=1.0))
    assert torch.equal(model.w.detach(), torch.ones(3))          # the step was skipped
    assert scaler.get_scale() == scale / 2                       # and the scale lowered
    assert meter.read() and meter.loss == pytest.approx(1e38)    # not a non-finite failure
    small = torch.tensor([1.0, 2.0, 3.0])
    trainer.inner_step(model, model, opt, scaler, "fp16", small, small, grad_clip=1.0)
    assert (model.w.detach() < 1).all()                          # the next one steps


def test_precision_resolution_per_device(monkeypatch):
    assert P.resolve("auto", "cpu") == "fp32"
    for p in ("bf16", "fp16", "fp32"):
        assert P.resolve(p, "cpu") == P.resolve(p, "cuda:0") == p
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert P.resolve("auto", "cuda:0") == "bf16" and P.resolve("auto", "cpu") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert P.resolve("auto", "cuda") == "fp32"
    with pytest.raises(ValueError, match="train.precision: 'fp8' is not one of auto, bf16, fp16, fp32"):
        P.resolve("fp8", "cpu")
    assert isinstance(P.autocast("fp32", "cpu"), type(P.autocast("auto", "cpu")))
    assert not isinstance(P.autocast("fp32", "cpu"), torch.autocast)
    assert [P.grad_scaler(p, "cpu").is_enabled() for p in ("fp32", "bf16", "fp16")] == [False, False, True]


def test_recipe_precision_and_compile_fields():
    t = loads("name: x\n" + SITES).train
    assert (t.precision, t.compile) == ("auto", False)
    t = loads("name: x\ntrain: {precision: fp16, compile: true}\n" + SITES).train
    assert (t.precision, t.compile) == ("fp16", True)
    from geotrain.errors import RecipeError
    with pytest.raises(RecipeError, match=r"train\.precision: expected one of 'auto', 'bf16'"):
        loads("name: x\ntrain: {precision: half}\n" + SITES)


def test_fused_adamw_only_for_cuda_parameters():
    cuda, cpu = torch.device("cuda:0"), torch.device("cpu")
    assert M.fused_for([cuda, cuda]) is True
    assert M.fused_for([cuda, cpu]) is None and M.fused_for([cpu]) is None and M.fused_for([]) is None
    assert M.configure_optimizer(_tiny(), 1e-3, 0.1, (0.9, 0.95)).defaults["fused"] is None


def test_site_context_gives_the_recipes_precision():
    recipe = loads("name: x\ntrain: {precision: bf16}\n" + SITES)
    ctx = SiteContext(recipe, store=None, site="a", site_index=0, n_sites=1, rank=0, world=1)
    assert ctx.group is None and ctx.precision == "bf16"
    with ctx.autocast():
        assert nn.Linear(4, 4)(torch.ones(2, 4)).dtype == torch.bfloat16
    assert ctx.scaler is ctx.scaler and not ctx.scaler.is_enabled()
    fp16 = SiteContext(loads("name: x\ntrain: {precision: fp16}\n" + SITES), None, "a", 0, 1, 0, 1)
    assert fp16.scaler.is_enabled()
    plain = SiteContext(loads("name: x\n" + SITES), None, "a", 0, 1, 0, 1)
    with plain.autocast():
        assert nn.Linear(4, 4)(torch.ones(2, 4)).dtype == torch.float32


def test_meter_reads_once_and_catches_a_non_finite_loss():
    meter = trainer.Meter(torch.device("cpu"), tokens_per_step=10)
    for v in (2.0, 4.0):
        meter.add(torch.tensor(v))
    assert meter.read() and meter.loss == 3.0 and meter.tokens_per_s > 0
    assert meter.read() and meter.loss == 3.0           # nothing new: unchanged
    for v in (1.0, float("nan"), 1.0):
        meter.add(torch.tensor(v))
    assert not meter.read()
    meter.add(torch.tensor(1.0))
    assert meter.read() and meter.loss == pytest.approx(0.9 * 3.0 + 0.1 * 1.0)


RUN = """\
name: prec
model: {preset: tiny, n_layer: 1, d_model: 16, n_head: 2}
train: {rounds: ROUNDS, inner_steps: STEPS, batch_size: 2, seq_len: 16, eval_batches: 1,
        warmup_steps: 1, lr: LR, EXTRA}
sites: [{name: a}]
"""


def _site(tmp_path, rounds: int, steps: int, lr: float, extra: str = "precision: fp32"):
    recipe = loads(RUN.replace("ROUNDS", str(rounds)).replace("STEPS", str(steps))
                   .replace("LR", str(lr)).replace("EXTRA", extra))
    store = one_site_store(recipe, tmp_path)
    return recipe, store


def test_a_nan_loss_is_caught_at_a_beat(tmp_path):
    """lr 1e6 makes the loss non-finite within a few steps; the round never ends
    (a million steps), so only the read at a beat can find it. Without that read
    this test trains until its timeout."""
    recipe, store = _site(tmp_path, rounds=1, steps=1_000_000, lr=1e6)
    with pytest.raises(FloatingPointError, match="a: non-finite loss by step"):
        trainer.train_site(recipe, store, trainer.WorkerPlace("a", 0, 1, 0, 1), beat_every_s=0.05)
    assert store.contributions(1) == []


def test_a_nan_loss_is_caught_before_its_round_is_published(tmp_path):
    """With beats never due, the read before each round's publication finds it:
    a FloatingPointError, not the codec refusing a non-finite pseudo-gradient."""
    recipe, store = _site(tmp_path, rounds=1000, steps=3, lr=1e6)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        trainer.train_site(recipe, store, trainer.WorkerPlace("a", 0, 1, 0, 1), beat_every_s=1e9)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_trainer_trains_in_low_precision(tmp_path, precision):
    recipe, store = _site(tmp_path, rounds=2, steps=4, lr=3e-3, extra=f"precision: {precision}")
    out = trainer.train_site(recipe, store, trainer.WorkerPlace("a", 0, 1, 0, 1))
    assert out["round"] == 2 and store.committed_rounds() == [0, 1, 2]
    assert math.isfinite(out["eval_loss"]) and store.heartbeat("a")["state"] == "done"
    assert math.isfinite(store.heartbeat("a")["loss"]) and store.heartbeat("a")["tokens_per_s"] > 0


@pytest.mark.timeout(400)
def test_compile_runs_the_model_through_torch_compile(tmp_path, monkeypatch):
    """`train.compile` hands the model to torch.compile (inductor, here on the
    CPU: tens of seconds to compile the first step) and trains with it."""
    compiled = []
    real = torch.compile

    def spy(model, *args, **kwargs):
        compiled.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    recipe, store = _site(tmp_path, rounds=1, steps=2, lr=3e-3, extra="compile: true")
    out = trainer.train_site(recipe, store, trainer.WorkerPlace("a", 0, 1, 0, 1))
    assert len(compiled) == 1 and isinstance(compiled[0], M.GPT)
    assert out["round"] == 1 and math.isfinite(out["eval_loss"])


def _agreeing_rank(rank: int, rendezvous: str, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(rendezvous, 2), rank=rank, world_size=2)
    asked = []

    def ask() -> bool:  # a drain requested at rank 0's third question
        asked.append(1)
        return len(asked) >= 3

    agree, step = trainer.Agreement(trainer.WorkerPlace("a", 0, 1, rank, 2), ask), 0
    while not agree(step := step + 1):
        pass
    out.put((rank, step, len(asked)))
    dist.destroy_process_group()


def test_ranks_agree_on_a_drain_at_the_same_step_without_asking_every_step(tmp_path):
    """Two ranks of a gloo group, as a two-worker site: they see rank 0's answer
    at the same step, and rank 0 was asked 3 times over more steps than that."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_agreeing_rank, args=(r, str(tmp_path / "rdv"), out)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=50) for _ in procs)
    for p in procs:
        p.join(10)
    (_, step0, asked0), (_, step1, asked1) = results
    assert step0 == step1 and asked0 == 3 and asked1 == 0
    assert step0 > 3  # the questions were spaced by the steps rank 0 counts in a second


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason=f"needs CUDA: torch {torch.__version__} sees no CUDA device here")
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_on_cuda_the_inner_step_never_waits_for_the_device(optimizer, precision):
    """The trainer's step on CUDA (autocast, the scaler, clipping, fused AdamW or
    Muon taking the scaler's flags) under `torch.cuda.set_sync_debug_mode("error")`,
    which raises at any operation that makes the host wait for the GPU."""
    device = P.prepare_device("cuda:0")
    model = _tiny().to(device)
    train = loads("name: x\ntrain: {optimizer: %s}\n" % optimizer + SITES).train
    opt = M.build_optimizer(model, train)
    scaler = P.grad_scaler(precision, device)
    batches = [tuple(t.to(device) for t in _batch(s)) for s in range(4)]
    trainer.inner_step(model, model, opt, scaler, precision, *batches[0], 1.0)  # first-use setup
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [trainer.inner_step(model, model, opt, scaler, precision, *batches[s % 4], 1.0)
                  for s in range(1, 6)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(math.isfinite(loss.item()) for loss in losses)
