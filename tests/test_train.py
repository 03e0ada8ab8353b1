"""Unit tests for the built-in trainer's model and data (geotrain/train/).

    python -m pytest tests/test_train.py -q -s     # -s shows the timings printed
"""

import math
import time
from pathlib import Path

import pytest
import torch

from geotrain.train import data as D
from geotrain.train import model as M

pytestmark = pytest.mark.timeout(60)


def expected_params(cfg: M.GPTConfig) -> int:
    d = cfg.d_model
    per_block = 12 * d * d + 13 * d  # qkv, proj, fc, fc-proj with biases; two LayerNorms
    return cfg.n_layer * per_block + (cfg.vocab + cfg.context) * d + 2 * d


# ---- model ----------------------------------------------------------------

@pytest.mark.parametrize("preset", list(M.PRESETS))
def test_presets_have_expected_param_counts(preset):
    cfg = M.config_for(preset, context=256)
    with torch.device("meta"):  # shapes only: xl would be 2.5 GB of real memory
        model = M.GPT(cfg)
    assert model.num_params() == expected_params(cfg)


def test_tiny_is_under_a_million_params():
    n = M.build(M.config_for("tiny", context=256), seed=0).num_params()
    assert 0.8e6 <= n <= 0.9e6


def test_config_overrides_and_errors():
    cfg = M.config_for("small", context=128, n_layer=2, dropout=0.1)
    assert (cfg.n_layer, cfg.n_head, cfg.d_model, cfg.context, cfg.dropout) == (2, 8, 256, 128, 0.1)
    with pytest.raises(ValueError, match="tiny"):
        M.config_for("huge", context=128)
    with pytest.raises(ValueError, match="multiple of n_head"):
        M.config_for("tiny", context=128, n_head=3)


def test_forward_shapes_and_initial_loss():
    cfg = M.config_for("tiny", context=64)
    model = M.build(cfg, seed=0)
    idx = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    logits, loss = model(idx)
    assert logits.shape == (3, 40, 256) and loss is None
    _, loss = model(idx, torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1)))
    assert loss.shape == ()
    assert abs(loss.item() - math.log(256)) < 0.1


def test_build_is_deterministic_and_leaves_global_rng_alone():
    cfg = M.config_for("tiny", context=64)
    before = torch.random.get_rng_state()
    a, b, c = (M.build(cfg, seed=s).state_dict() for s in (7, 7, 8))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["tok.weight"], c["tok.weight"])


def test_head_is_tied_and_residual_projections_are_scaled():
    cfg = M.config_for("tiny", context=64)
    model = M.build(cfg, seed=0)
    assert model.head.weight is model.tok.weight
    block = model.blocks[0]
    assert block.attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * cfg.n_layer), rel=0.1)
    assert block.mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.count_nonzero(block.mlp.fc.bias) == 0


def test_optimizer_decays_matrices_only():
    model = M.build(M.config_for("tiny", context=64), seed=0)
    opt = M.configure_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert any(p is model.tok.weight for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert decay["base_lr"] == no_decay["base_lr"] == 1e-3    # the peak apply_lr_schedule uses


def test_lr_schedule():
    lr = lambda step: M.lr_at(step, base_lr=1.0, warmup=10, total=110, min_ratio=0.1)
    assert lr(0) == pytest.approx(0.1)
    assert lr(4) == pytest.approx(0.5)
    assert lr(9) == lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.55)  # halfway down the cosine
    assert lr(110) == lr(500) == pytest.approx(0.1)
    after_warmup = [lr(s) for s in range(10, 111)]
    assert all(x >= y for x, y in zip(after_warmup, after_warmup[1:]))
    assert M.lr_at(0, base_lr=3.0, warmup=0, total=10, min_ratio=0.0) == pytest.approx(3.0)


# ---- data -----------------------------------------------------------------

def test_stdlib_files_are_sorted_sources_without_tests():
    files = D.stdlib_files()
    assert len(files) > 300
    assert files == sorted(files) and all(f.suffix == ".py" for f in files)
    names = {f.as_posix() for f in files}
    assert any(n.endswith("/json/decoder.py") for n in names)
    for part in ("site-packages", "dist-packages", "test", "tests", "idle_test"):
        assert not any(part in f.parts for f in files), part


def test_glob_files(tmp_path):
    for name in ("b.txt", "a.txt", "sub/c.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    files = D.glob_files([f"{tmp_path}/**/*.txt", f"{tmp_path}/a.txt"])
    assert files == [tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "sub/c.txt"]
    with pytest.raises(ValueError, match="nothing.md"):
        D.glob_files([f"{tmp_path}/*.txt", f"{tmp_path}/nothing.md"])


def test_split_is_deterministic_disjoint_and_root_independent():
    files = [Path(f"/data/corpus/part{i:02d}.txt") for i in range(20)]
    train, held_out = D.split(files, eval_fraction=0.2, seed=0)
    # Pinned so a change of hash (or a use of Python's salted hash()) is caught.
    assert [f.name for f in held_out] == ["part02.txt", "part05.txt", "part09.txt", "part12.txt", "part15.txt"]
    assert set(train).isdisjoint(held_out) and sorted(train + held_out) == files
    moved = [Path("/elsewhere/x") / f.name for f in files]
    assert [f.name for f in D.split(moved, 0.2, seed=0)[1]] == [f.name for f in held_out]
    assert D.split(files, 0.2, seed=1)[1] != held_out


def test_split_eval_is_never_empty():
    files = [Path(f"/d/{i}.txt") for i in range(5)]
    train, held_out = D.split(files, eval_fraction=0.0, seed=3)
    assert len(held_out) == 1 and len(train) == 4
    assert D.split([Path("/d/only.txt")], 0.0, seed=0) == ([], [Path("/d/only.txt")])


def test_shards_partition_the_files():
    files = [Path(f"/d/{i:03d}") for i in range(17)]
    shards = [D.shard(files[::-1], i, 3) for i in range(3)]
    assert sorted(f for s in shards for f in s) == files
    assert sum(len(s) for s in shards) == len(files)
    assert [len(s) for s in shards] == [6, 6, 5]
    with pytest.raises(ValueError):
        D.shard(files, 3, 3)


def test_load_bytes(tmp_path):
    (tmp_path / "a").write_bytes(b"abc")
    (tmp_path / "b").write_bytes(b"\xffde")
    files = [tmp_path / "a", tmp_path / "b"]
    data = D.load_bytes(files)
    assert data.dtype == torch.uint8
    assert bytes(data.tolist()) == b"abc\n\xffde\n"
    assert bytes(D.load_bytes(files, max_bytes=5).tolist()) == b"abc\n\xff"
    assert D.load_bytes([]).numel() == 0


def test_batches_are_reproducible_and_resumable():
    data = torch.arange(1000, dtype=torch.int64).to(torch.uint8)
    a = D.Batches(data, batch_size=4, seq_len=16, seed=5)
    first = [a.next() for _ in range(3)]
    x, y = first[0]
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])

    b = D.Batches(data, batch_size=4, seq_len=16, seed=5)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(first, (b.next() for _ in range(3))))

    saved = a.state_dict()
    expected = [a.next() for _ in range(2)]
    resumed = D.Batches(data, batch_size=4, seq_len=16, seed=0)
    resumed.load_state_dict(saved)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(expected, (resumed.next() for _ in range(2))))
    assert not torch.equal(D.Batches(data, 4, 16, seed=6).next()[0], first[0][0])


def test_batches_reach_the_last_byte():
    data = torch.arange(10, dtype=torch.uint8)
    batches = D.Batches(data, batch_size=64, seq_len=8, seed=0)
    starts = {batches.next()[0][i, 0].item() for _ in range(4) for i in range(64)}
    assert starts == {0, 1}


def test_eval_batches_are_fixed_and_evenly_spaced():
    data = torch.arange(200, dtype=torch.uint8)
    batches = D.eval_batches(data, batch_size=2, seq_len=10, n=3)
    assert len(batches) == 3
    starts = [x[i, 0].item() for x, _ in batches for i in range(2)]
    assert starts[0] == 0 and starts[-1] == 200 - 11
    assert starts == sorted(starts)
    again = D.eval_batches(data, batch_size=2, seq_len=10, n=3)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(batches, again))


# ---- the two together -----------------------------------------------------

def test_startup_loads_a_site_shard_of_the_stdlib():
    """What a site does before its first step: list, split, and load its shard.
    (How long that takes is printed, not asserted: speed is benchmarks/' question.)"""
    t0 = time.perf_counter()
    train, held_out = D.split(D.stdlib_files(), eval_fraction=0.02, seed=0)
    shard = D.shard(train, 0, 3)
    data = D.load_bytes(shard)
    elapsed = time.perf_counter() - t0
    print(f"\nstdlib_files + split + load 1/3 shard: {elapsed:.3f} s, {data.numel() / 1e6:.1f} MB")
    assert held_out and set(held_out).isdisjoint(train)
    assert data.numel() > 1e6
    # The shard's files and nothing else, each followed by a newline (load_bytes' format).
    assert data.numel() == sum(f.stat().st_size + 1 for f in shard)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_model_learns_stdlib_bytes(one_thread):
    train, held_out = D.split(D.stdlib_files(), eval_fraction=0.02, seed=0)
    batches = D.Batches(D.load_bytes(D.shard(train, 0, 3)), batch_size=8, seq_len=64, seed=0)
    evals = D.eval_batches(D.load_bytes(held_out, max_bytes=200_000), batch_size=16, seq_len=64, n=4)

    model = M.build(M.config_for("tiny", context=64), seed=0)
    opt = M.configure_optimizer(model, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = sum(model(x, y)[1].item() for x, y in evals) / len(evals)
        model.train()
        return loss

    before = held_out_loss()
    steps = 60
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = M.lr_at(step, 3e-3, warmup=5, total=steps, min_ratio=0.1)
        x, y = batches.next()
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    elapsed = time.perf_counter() - t0
    after = held_out_loss()
    print(f"\ntiny, 1 thread: {steps * 8 * 64 / elapsed:,.0f} tok/s; held-out loss {before:.3f} -> {after:.3f}")
    # A bit under ln 256 even at init: the tied head favours repeating the
    # input byte, and source code repeats bytes (indentation) a lot.
    assert before == pytest.approx(math.log(256), abs=0.3)
    assert after < before - 1.5
