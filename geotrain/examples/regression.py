"""A user's own model trained across sites: a small MLP learning a fixed
random teacher function, each site on its own stream of inputs.

Used by recipes/custom.yaml through `train.entrypoint:
"geotrain.examples.regression:train"` — the loop is a plain PyTorch loop; only
the `ctx.diloco(...)` wrapper and the `diloco.step(...)` call are geotrain's.
The model and batches live on `ctx.device` (the worker's GPU, or the CPU);
`ctx.autocast()` and `ctx.scaler` apply the recipe's `train.precision` (on the
CPU that is fp32 unless the recipe says otherwise: nothing changes).
"""

from __future__ import annotations

import torch

from geotrain.train.entry import SiteContext


def teacher(x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    w1, w2 = torch.randn(16, 32, generator=g), torch.randn(32, 1, generator=g)
    return torch.tanh(x @ w1) @ w2


def train(ctx: SiteContext) -> dict:
    t = ctx.recipe.train
    torch.set_num_threads(t.threads)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    model.to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=0.0)
    data = torch.Generator().manual_seed(t.seed * 1000 + ctx.site_index * 10 + ctx.rank)
    held_out = torch.randn(512, 16, generator=torch.Generator().manual_seed(99))
    held_out, held_out_y = held_out.to(ctx.device), teacher(held_out).to(ctx.device)

    def evaluate(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return torch.nn.functional.mse_loss(m(held_out), held_out_y).item()

    with ctx.diloco(model, opt, evaluate=evaluate) as diloco:
        while not ctx.done(diloco):
            x = torch.randn(t.batch_size, 16, generator=data)
            x, y = x.to(ctx.device), teacher(x).to(ctx.device)
            with ctx.autocast():
                loss = torch.nn.functional.mse_loss(model(x), y)
            ctx.scaler.scale(loss).backward()
            ctx.scaler.step(opt)
            ctx.scaler.update()
            opt.zero_grad()
            diloco.step(tokens=t.batch_size)
            ctx.beat(diloco, loss=loss)  # read only when a beat is written
        if not ctx.should_stop():
            diloco.finish()
    return {"round": diloco.round, "bytes_sent": diloco.bytes_sent,
            "bytes_received": diloco.bytes_received}
