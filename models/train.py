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
- vq (var-digits' tokenizer): |dec(f_hat) - x|^2 plus the VQ terms |sg(f) - f_hat|^2 + beta |f - sg(f_hat)|^2
  averaged over scales, straight-through to the encoder; codes no scale uses are restarted on the
  batch's latents every ``save_every`` steps. No EMA (the codebook moves by restarts).
- var (var-digits): cross-entropy of the teacher-forced logits against the tokenizer's codes of the
  image at every scale, labels replaced by the null class with probability class_dropout; plus, as
  VARiant trains its subnets with the full model (shared weights), the cross-entropy of one subnet's
  logits for the scales after the bridge zone, the subnet's depth drawn per step from ``subnets``
  and its layers chosen equidistantly (the subnet pass's rule). Needs the trained tokenizer
  (``var-digits-vq``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
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
    subnets: tuple[int, ...] = ()  # var: subnet depths trained jointly with the full model (VARiant)


DEFAULTS = {
    "unet": TrainConfig(steps=1600, batch=64, lr=1e-3),
    "dit": TrainConfig(steps=1600, batch=64, lr=1e-3),
    "classifier": TrainConfig(steps=1000, batch=64, lr=1e-3, ema=0.0),
    "vq": TrainConfig(steps=1500, batch=64, lr=1e-3, ema=0.0),
    "var": TrainConfig(steps=1600, batch=32, lr=1e-3, subnets=(6, 3, 2)),
}


def _edm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    sd = model.config.sigma_data
    sigma = (torch.randn(x.shape[0], generator=g) * 1.2 - 1.2).exp()
    noisy = x + sigma[:, None, None, None] * torch.randn(x.shape, generator=g)
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    return (weight[:, None, None, None] * (model(noisy, sigma) - x) ** 2).mean()


def _dropped_labels(model: nn.Module, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``y`` with each label replaced by the null class with probability ``class_dropout`` (for guidance)."""
    drop = torch.rand(y.shape[0], generator=g) < model.config.class_dropout
    return torch.where(drop, torch.full_like(y, model.null_class), y)


def _flow_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    t = torch.rand(x.shape[0], generator=g)
    eps = torch.randn(x.shape, generator=g)
    xt = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * eps
    return F.mse_loss(model(xt, t, _dropped_labels(model, y, g)), eps - x)


def _classifier_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    shifts = torch.randint(-1, 2, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=shifts, dims=(2, 3))
    return F.cross_entropy(model(x), y)


def _vq_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    reconstruction, vq_loss = model(x)
    return F.mse_loss(reconstruction, x) + vq_loss


def _var_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, y: torch.Tensor,
              g: torch.Generator, subnets: tuple[int, ...] = ()) -> torch.Tensor:
    y = _dropped_labels(model, y, g)
    if not subnets:
        logits = model.teacher_forced(inputs, y)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    from graphopt.passes.subnet import BRIDGE_FRACTION, equidistant

    scales = model.config.patch_nums
    bridge = sum(p * p for p in scales[:round(BRIDGE_FRACTION * len(scales))])
    keep = subnets[int(torch.randint(0, len(subnets), (1,), generator=g))]
    logits, late = model.teacher_forced(inputs, y, equidistant(model.config.depth, keep), bridge)
    return (F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            + F.cross_entropy(late.flatten(0, 1), targets[:, bridge:].flatten()))


def _fields(family: str, data: Any) -> tuple[torch.Tensor, ...]:
    """The training tensors a family's loss takes, one row per training image: (images, labels), or
    for var the tokenizer's teacher-forcing inputs and codes, encoded once, and the labels."""
    if family != "var":
        return data.train_images, data.train_labels
    from . import load

    tokenizer = load("var-digits-vq").model
    with torch.no_grad():
        indices = tokenizer.encode(data.train_images)
        inputs = tokenizer.teacher_inputs(indices)
    return inputs, torch.cat(indices, dim=1), data.train_labels


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "unet": _edm_loss, "dit": _flow_loss, "classifier": _classifier_loss, "vq": _vq_loss, "var": _var_loss}


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
    loss_fn = functools.partial(_var_loss, subnets=tc.subnets) if family == "var" else LOSSES[family]
    fields = _fields(family, data)
    smoothed = None
    start = time.perf_counter()
    record: dict[str, Any] = {}
    model.train()
    bar = tqdm(range(1, tc.steps + 1), f"train {family}", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(data.train_labels), (tc.batch,), generator=g)
        loss = loss_fn(model, *(f[idx] for f in fields), g)
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
        if family == "vq" and step % tc.save_every == 0 and step < tc.steps:
            model.restart_codes(data.train_images[torch.randint(0, len(data.train_labels), (256,), generator=g)], g)
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
    if family == "vq":
        held = load_digits(model.config.resolution).heldout_images
        with torch.no_grad():
            indices = model.encode(held)
            record["heldout_mse"] = float(F.mse_loss(model.decode_indices(indices), held))
        record["codes_used"] = int(torch.cat([i.flatten() for i in indices]).unique().numel())
    if family == "var":
        record["tokenizer"] = "var-digits-vq"
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
