"""Sampling plans: what a search returns and what users keep.

A :class:`SamplingPlan` says how to sample with one model: the sampler (family, method, guidance),
the noise levels (sigmas for EDM, times for flow matching; strictly decreasing to 0), and per step
the residual blocks to skip and the scales of the encoder-decoder skips. Blocks are named twice: by
the structural block id (their position among the residual blocks graphopt's analysis finds) and
by module path, so a plan reads well and is checked against the model it is used with. The plan
also names that model (class and an architecture fingerprint) and carries what it was measured to
cost: FLOPs per image and the quality cost (metric, samples, seeds, spread).

On disk it is JSON with a schema version (``plan.json``, next to a saved module or an ONNX file).
Loading validates it: a malformed file, levels that do not decrease to 0, a block the plan's model
does not have, or a plan made for another model each raise one :class:`PlanError` that says which.
:meth:`SamplingPlan.sampler` turns it into a drop-in sampler (``sample(model, noise, labels)``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from .errors import PlanError, no_folder
from .quality import QualityCost

SCHEMA = "graphopt.sampling-plan"
SCHEMA_VERSION = 1
FILENAME = "plan.json"


def fingerprint(model: nn.Module) -> str:
    """An architecture fingerprint: the class and every parameter and buffer's name and shape (not the
    dtype: a plan found in float32 serves the same model in bfloat16)."""
    from .emit import OptimizedModule

    if isinstance(model, OptimizedModule):
        return model.report.fingerprint
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"|{name}:{tuple(tensor.shape)}".encode())
    return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """The model a plan was made for: class name, fingerprint, its skippable blocks, its scaled skips."""

    name: str
    fingerprint: str
    blocks: tuple[tuple[int, str, str], ...]  # (id, module path, kind)
    skips: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "fingerprint": self.fingerprint, "skips": self.skips,
                "blocks": [{"id": i, "module": m, "kind": k} for i, m, k in self.blocks]}

    @staticmethod
    def from_json(data: dict[str, Any]) -> "ModelIdentity":
        blocks = tuple((int(b["id"]), str(b["module"]), str(b.get("kind", "residual"))) for b in data["blocks"])
        return ModelIdentity(str(data["name"]), str(data["fingerprint"]), blocks, int(data["skips"]))


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    """Levels, per-step skipped blocks and per-step skip scales for one model and sampler family.

    ``skipped[i]`` are the block ids step ``i`` skips, ``skip_scales[i]`` the scale of each
    encoder-decoder skip at step ``i`` (None: the model's own, unscaled skips). ``cost`` holds
    ``gflops_per_image`` and how it was counted, ``quality`` the measured quality cost, ``search``
    how the plan was found (settings, evaluations, time).
    """

    model: ModelIdentity
    family: str
    method: str
    levels: tuple[float, ...]
    shape: tuple[int, ...]
    skipped: tuple[tuple[int, ...], ...] = ()
    skip_scales: tuple[tuple[float, ...], ...] | None = None
    cfg_scale: float = 1.0
    null_class: int | None = None
    cost: dict[str, Any] = dataclasses.field(default_factory=dict)
    quality: QualityCost | None = None
    search: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        from graphopt.models.samplers import FAMILIES, METHODS

        if self.family not in FAMILIES:
            raise PlanError(f"plan: unknown sampler family {self.family!r} (expected one of {', '.join(FAMILIES)})")
        if self.method not in METHODS:
            raise PlanError(f"plan: unknown sampler method {self.method!r} (expected one of {', '.join(METHODS)})")
        levels = [float(v) for v in self.levels]
        if len(levels) < 2 or any(not math.isfinite(v) for v in levels):
            raise PlanError(f"plan: levels must be at least two finite numbers, got {list(self.levels)}")
        if levels[-1] != 0 or any(a <= b for a, b in zip(levels, levels[1:])):
            raise PlanError(f"plan: levels must strictly decrease to 0, got {levels}")
        object.__setattr__(self, "levels", tuple(levels))
        steps = len(levels) - 1
        skipped = self.skipped or tuple(() for _ in range(steps))
        if len(skipped) != steps:
            raise PlanError(f"plan: {steps} steps but {len(skipped)} skip sets")
        known = {b[0]: b[1] for b in self.model.blocks}
        for step, ids in enumerate(skipped):
            if len(set(ids)) != len(ids):
                raise PlanError(f"plan: step {step} lists a block twice: {list(ids)}")
            for block in ids:
                if block not in known:
                    raise PlanError(f"plan: step {step} skips unknown block {block}; {self.model.name} has "
                                    f"blocks 0..{len(known) - 1}")
        object.__setattr__(self, "skipped", tuple(tuple(sorted(int(b) for b in ids)) for ids in skipped))
        if self.skip_scales is not None:
            if len(self.skip_scales) != steps:
                raise PlanError(f"plan: {steps} steps but {len(self.skip_scales)} sets of skip scales")
            for step, scales in enumerate(self.skip_scales):
                if len(scales) != self.model.skips:
                    raise PlanError(f"plan: step {step} has {len(scales)} skip scales, {self.model.name} has "
                                    f"{self.model.skips} encoder-decoder skips")
                if any(not math.isfinite(float(s)) for s in scales):
                    raise PlanError(f"plan: step {step} has a non-finite skip scale: {list(scales)}")
            object.__setattr__(self, "skip_scales", tuple(tuple(float(s) for s in sc) for sc in self.skip_scales))
        if self.cfg_scale != 1.0 and self.null_class is None:
            raise PlanError("plan: classifier-free guidance needs a null class")

    # ------------------------------------------------------------------------------ what it says

    @property
    def steps(self) -> int:
        return len(self.levels) - 1

    def calls(self, step: int) -> int:
        """Denoiser evaluations at ``step``: Heun's second one is skipped on a final step to 0."""
        return 2 if self.method == "heun" and self.levels[step + 1] > 0 else 1

    @property
    def nfe(self) -> int:
        """Denoiser calls per sample (guidance batches both halves into one call)."""
        return sum(self.calls(i) for i in range(self.steps))

    @property
    def scales_skips(self) -> bool:
        """True when some skip scale differs from 1 (the plan needs the skip-scale graph input)."""
        return self.skip_scales is not None and any(s != 1.0 for sc in self.skip_scales for s in sc)

    @property
    def skips_blocks(self) -> bool:
        return any(self.skipped)

    def base_sampler(self) -> Any:
        """The plain :class:`~graphopt.models.samplers.Sampler` with this plan's levels."""
        from graphopt.models.samplers import Sampler

        return Sampler(self.family, self.method, self.levels, tuple(self.shape), self.cfg_scale, self.null_class)

    def sampler(self) -> Any:
        """A drop-in sampler following this plan: ``plan.sampler().sample(model, noise, labels)``."""
        from .planned import PlanSampler

        return PlanSampler(self)

    def describe(self) -> str:
        """A few readable lines: levels, NFE, per step what is skipped and scaled."""
        names = {b[0]: b[1] or "(root)" for b in self.model.blocks}
        lines = [f"{self.model.name}: {self.family}/{self.method}, {self.steps} steps, NFE {self.nfe}"
                 + (f", {self.cost['gflops_per_image']:.3f} GFLOPs/image" if "gflops_per_image" in self.cost else "")]
        for i in range(self.steps):
            text = f"  step {i}: {self.levels[i]:.4g} -> {self.levels[i + 1]:.4g}"
            if self.skipped[i]:
                text += "; skip " + ", ".join(f"{b} ({names[b]})" for b in self.skipped[i])
            if self.skip_scales is not None:
                text += "; skip scales " + ",".join(f"{s:.3g}" for s in self.skip_scales[i])
            lines.append(text)
        if self.quality is not None:
            lines.append(f"  quality: {self.quality.line()}")
        return "\n".join(lines)

    # ---------------------------------------------------------------------------- model checks

    def check(self, model: nn.Module, blocks: Sequence[Any] | None = None, skips: int | None = None) -> None:
        """Raise :class:`PlanError` unless this plan was made for ``model`` (architecture fingerprint)
        and, when given, the model's blocks and number of encoder-decoder skips are the plan's."""
        found = fingerprint(model)
        if found and self.model.fingerprint and found != self.model.fingerprint:
            raise PlanError(f"this plan was made for another model ({self.model.name}, fingerprint "
                            f"{self.model.fingerprint}); this one is {type(model).__name__}, fingerprint {found}")
        if blocks is not None:
            have = tuple((b.id, b.module, b.kind) for b in blocks)
            if have != self.model.blocks:
                raise PlanError(f"this plan names {len(self.model.blocks)} blocks of {self.model.name} that this "
                                f"model's graph does not have (it has {len(have)}); optimize and search again")
        if skips is not None and self.skip_scales is not None and skips != self.model.skips:
            raise PlanError(f"this plan scales {self.model.skips} encoder-decoder skips; the model has {skips}")

    # ------------------------------------------------------------------------------- JSON I/O

    def to_json(self) -> dict[str, Any]:
        names = {b[0]: b[1] for b in self.model.blocks}
        steps = []
        for i in range(self.steps):
            step: dict[str, Any] = {"level": self.levels[i], "next": self.levels[i + 1],
                                    "skip_blocks": [{"id": b, "module": names[b]} for b in self.skipped[i]]}
            if self.skip_scales is not None:
                step["skip_scales"] = list(self.skip_scales[i])
            steps.append(step)
        return {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "model": self.model.to_json(),
            "sampler": {"family": self.family, "method": self.method, "cfg_scale": self.cfg_scale,
                        "null_class": self.null_class, "shape": list(self.shape)},
            "levels": list(self.levels), "nfe": self.nfe, "steps": steps, "cost": self.cost,
            "quality": None if self.quality is None else self.quality.to_json(), "search": self.search,
        }

    @staticmethod
    def from_json(data: Any, source: str = "plan") -> "SamplingPlan":
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise PlanError(f"{source} is not a graphopt sampling plan (no '{SCHEMA}' schema field)")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise PlanError(f"{source} has schema version {data.get('schema_version')}; this graphopt reads "
                            f"version {SCHEMA_VERSION}")
        try:
            model = ModelIdentity.from_json(data["model"])
            sampler = data["sampler"]
            steps = data["steps"]
            levels = tuple(float(v) for v in data["levels"])
            if not isinstance(steps, list) or len(steps) != len(levels) - 1:
                raise PlanError(f"{source}: {len(levels)} levels need {len(levels) - 1} steps, "
                                f"found {len(steps) if isinstance(steps, list) else steps!r}")
            names = {b[0]: b[1] for b in model.blocks}
            skipped = []
            for i, step in enumerate(steps):
                ids = []
                for ref in step.get("skip_blocks", []):
                    block = int(ref["id"])
                    if block in names and "module" in ref and ref["module"] != names[block]:
                        raise PlanError(f"{source}: step {i} skips block {block} as {ref['module']!r}, but block "
                                        f"{block} of {model.name} is {names[block]!r}")
                    ids.append(block)
                skipped.append(tuple(ids))
            has_scales = [("skip_scales" in step) for step in steps]
            if any(has_scales) and not all(has_scales):
                raise PlanError(f"{source}: some steps have skip scales and some do not")
            scales = tuple(tuple(float(s) for s in step["skip_scales"]) for step in steps) if all(has_scales) \
                and steps else None
            quality = data.get("quality")
            return SamplingPlan(
                model=model, family=str(sampler["family"]), method=str(sampler["method"]), levels=levels,
                shape=tuple(int(s) for s in sampler["shape"]), skipped=tuple(skipped), skip_scales=scales,
                cfg_scale=float(sampler.get("cfg_scale", 1.0)), null_class=sampler.get("null_class"),
                cost=dict(data.get("cost") or {}), quality=None if quality is None else QualityCost.from_json(quality),
                search=dict(data.get("search") or {}))
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanError(f"{source} is malformed ({type(e).__name__}: {e})") from e

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON (atomically); a directory gets ``plan.json`` inside it."""
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        if not path.parent.is_dir():
            raise no_folder(path, path.parent)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @staticmethod
    def load(path: str | os.PathLike, model: nn.Module | None = None) -> "SamplingPlan":
        """Read and validate a plan (a ``plan.json`` or a directory holding one); with ``model``, also
        check that the plan was made for it."""
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise PlanError(f"no sampling plan at {path}") from None
        except OSError as e:
            raise PlanError(f"cannot read {path}: {e}") from e
        try:
            data = json.loads(text)
        except ValueError as e:
            raise PlanError(f"{path} is not valid JSON ({e})") from e
        plan = SamplingPlan.from_json(data, str(path))
        if model is not None:
            plan.check(model)
        return plan
