"""Train the reference checkpoints: ``python -m graphopt.models.train {unet,dit,classifier}``.

Each run is seeded and reproduces its checkpoint on 2 CPU cores within minutes (steps and batch
sizes below). The weights kept are an exponential moving average (diffusion models sample better
from EMA weights). The checkpoint is written atomically every ``--save-every`` steps and at the
end, so an interrupted run keeps its latest state.

Objectives:
- unet (EDM): sigma = exp(P_mean + P_std n), n ~ N(0, 1); loss = lambda(sigma) |D(x + sigma eps; sigma) - x|^2
  with lambda = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2, P_mean = -1.2, P_std = 1.2.
- dit (flow matching): t ~ U(0, 1), x_t = (1 - t) x + t eps, loss = |v(x_t, t, y) - (eps - x)|^2, labels
  replaced by the null class with probability class_dropout.
- classifier: cross-entropy on the train split with random 1-pixel shifts; held-out accuracy recorded.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import CHECKPOINT_DIR, FAMILIES, REFERENCES, build_model
from .checkpoint import save_checkpoint
from .data import load_digits


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch: int
    lr: float
    seed: int = 0
    ema: float = 0.999
    warmup: int = 100
    save_every: int = 200


DEFAULTS = {
    "unet": TrainConfig(steps=1600, batch=64, lr=1e-3),
    "dit": TrainConfig(steps=1600, batch=64, lr=1e-3),
    "classifier": TrainConfig(steps=1000, batch=64, lr=1e-3, ema=0.0),
}


def _edm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    sd = model.config.sigma_data
    sigma = (torch.randn(x.shape[0], generator=g) * 1.2 - 1.2).exp()
    noisy = x + sigma[:, None, None, None] * torch.randn(x.shape, generator=g)
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    return (weight[:, None, None, None] * (model(noisy, sigma) - x) ** 2).mean()


def _flow_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    t = torch.rand(x.shape[0], generator=g)
    eps = torch.randn(x.shape, generator=g)
    xt = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * eps
    drop = torch.rand(x.shape[0], generator=g) < model.config.class_dropout
    y = torch.where(drop, torch.full_like(y, model.null_class), y)
    return F.mse_loss(model(xt, t, y), eps - x)


def _classifier_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    shifts = torch.randint(-1, 2, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=shifts, dims=(2, 3))
    return F.cross_entropy(model(x), y)


LOSSES: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]] = {
    "unet": _edm_loss, "dit": _flow_loss, "classifier": _classifier_loss}


def heldout_accuracy(model: nn.Module, resolution: int) -> float:
    data = load_digits(resolution)
    with torch.no_grad():
        predictions = model(data.heldout_images).argmax(dim=1)
    return float((predictions == data.heldout_labels).float().mean())


def train(family: str, config: Any = None, train_config: TrainConfig | None = None, *,
          out: str | Path | None = None, progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``family`` from scratch; returns the (EMA) model in eval mode and its training record.

    With ``out`` the checkpoint is saved there every ``save_every`` steps and at the end.
    """
    tc = train_config or DEFAULTS[family]
    torch.manual_seed(tc.seed)
    model = build_model(family, config)
    config = model.config
    data = load_digits(config.resolution)
    ema = copy.deepcopy(model).eval() if tc.ema > 0 else model
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(tc.seed)
    loss_fn = LOSSES[family]
    smoothed = None
    start = time.perf_counter()
    record: dict[str, Any] = {}
    model.train()
    bar = tqdm(range(1, tc.steps + 1), f"train {family}", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(data.train_labels), (tc.batch,), generator=g)
        loss = loss_fn(model, data.train_images[idx], data.train_labels[idx], g)
        for group in opt.param_groups:
            group["lr"] = tc.lr * min(1.0, step / tc.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if ema is not model:
            decay = min(tc.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1 - decay)
        value = float(loss.detach())
        smoothed = value if smoothed is None else 0.98 * smoothed + 0.02 * value
        bar.set_postfix_str(f"loss {smoothed:.4f}", refresh=False)
        if out is not None and (step % tc.save_every == 0 or step == tc.steps):
            record = _record(family, ema, tc, step, smoothed, time.perf_counter() - start)
            save_checkpoint(out, ema, family, config, record)
    ema.eval()
    return ema, record or _record(family, ema, tc, tc.steps, smoothed or 0.0, time.perf_counter() - start)


def _record(family: str, model: nn.Module, tc: TrainConfig, step: int, loss: float, seconds: float) -> dict[str, Any]:
    record = {"steps": step, "train": dataclasses.asdict(tc), "final_loss": loss, "train_time_s": round(seconds, 1),
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    if family == "classifier":
        was_training = model.training
        model.eval()
        record["heldout_accuracy"] = heldout_accuracy(model, model.config.resolution)
        model.train(was_training)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m graphopt.models.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=sorted(FAMILIES), help="which reference model to train")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the checkpoint's)")
    parser.add_argument("--batch", type=int, help="batch size")
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="checkpoint path (default: the shipped checkpoint of this family)")
    ns = parser.parse_args(argv)
    tc = dataclasses.replace(DEFAULTS[ns.family], seed=ns.seed,
                             **{k: v for k, v in (("steps", ns.steps), ("batch", ns.batch), ("lr", ns.lr)) if v})
    name = next(n for n, f in REFERENCES.items() if f == ns.family)
    out = Path(ns.out) if ns.out else CHECKPOINT_DIR / f"{name}.safetensors"
    if not out.parent.is_dir():
        print(f"train: error: folder {out.parent} does not exist", file=sys.stderr)
        return 2
    _, record = train(ns.family, train_config=tc, out=out)
    size = out.stat().st_size / 1e6
    extra = f", held-out accuracy {record['heldout_accuracy']:.4f}" if "heldout_accuracy" in record else ""
    print(f"wrote {out} ({size:.2f} MB) after {record['steps']} steps in {record['train_time_s']:.0f}s, "
          f"loss {record['final_loss']:.4f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
