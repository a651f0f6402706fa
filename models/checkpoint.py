"""Checkpoints as safetensors: the weights, plus the family, config and training record as metadata.

Nothing is pickled, so loading a checkpoint never runs code. The config dataclass is stored as JSON
and rebuilt field by field; unknown fields are an error rather than silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from graphopt.errors import LoadError


def save_checkpoint(path: str | os.PathLike, model: nn.Module, family: str, config: Any,
                    record: dict[str, Any]) -> Path:
    """Write ``model``'s state dict to ``path`` with its family, config and training ``record``."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"family": family, "config": json.dumps(dataclasses.asdict(config)), "record": json.dumps(record)}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[str, dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(family, config fields, state dict, training record); a damaged file raises LoadError."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"checkpoint {path} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
        family, config, record = meta["family"], json.loads(meta["config"]), json.loads(meta.get("record", "{}"))
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise LoadError(f"checkpoint {path} is corrupted or not a graphopt checkpoint ({type(e).__name__}: {e})") from e
    return family, config, state, record


def build(config_cls: type, fields: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from stored fields (lists back to tuples where the field is a tuple)."""
    known = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = set(fields) - set(known)
    if unknown:
        raise LoadError(f"checkpoint config has fields {sorted(unknown)} that {config_cls.__name__} lacks")
    return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike) -> nn.Module:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise LoadError(f"checkpoint {path} does not fit its config: {str(e).splitlines()[0]}") from e
    return model
