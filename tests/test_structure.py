import dataclasses
import json
from typing import NamedTuple

import torch

from graphopt import structure


@dataclasses.dataclass
class Out:
    sample: torch.Tensor
    extra: dict
    steps: int = 3


class Pair(NamedTuple):
    a: torch.Tensor
    b: float


def test_round_trip_keeps_types_and_order():
    x, y, z = torch.zeros(1), torch.ones(2), torch.full((3,), 2.0)
    value = {"out": Out(x, {"aux": [y, None, "s"]}), "pair": Pair(z, 0.5), "dtype": torch.float16,
             "inf": float("inf")}
    spec, tensors, objects = structure.flatten(value)
    assert [t.shape[0] for t in tensors] == [1, 2, 3]
    assert objects == []
    json.dumps(spec)  # the spec alone must be JSON
    rebuilt = structure.unflatten(json.loads(json.dumps(spec)), tensors)
    assert isinstance(rebuilt["out"], Out) and rebuilt["out"].extra["aux"][1:] == [None, "s"]
    assert isinstance(rebuilt["pair"], Pair) and rebuilt["pair"].b == 0.5
    assert rebuilt["dtype"] is torch.float16 and rebuilt["inf"] == float("inf")
    assert structure.count_tensors(spec) == 3 and not structure.has_objects(spec)


def test_objects_are_kept_aside_and_marked_unsaveable():
    thing = object()
    spec, tensors, objects = structure.flatten((torch.zeros(1), thing))
    assert objects == [thing] and structure.has_objects(spec)
    assert structure.unflatten(spec, tensors, objects)[1] is thing


def test_unimportable_dataclass_comes_back_as_dict():
    spec = {"kind": "dataclass", "type": "no_such_module:Gone", "fields": ["a"],
            "items": [{"kind": "tensor", "index": 0}]}
    t = torch.zeros(1)
    assert structure.unflatten(spec, [t]) == {"a": t}
    assert structure.describe(spec) == "Gone(a=Tensor)"


def test_map_tensors_keeps_the_containers():
    import collections

    Pair = collections.namedtuple("Pair", "a b")
    value = (Pair(torch.ones(1), 3), [torch.zeros(2)], {"k": torch.ones(2), "s": "x"})
    out = structure.map_tensors(value, lambda t: t + 1)
    assert isinstance(out[0], Pair) and out[0].b == 3 and float(out[0].a) == 2.0
    assert isinstance(out[1], list) and out[1][0].tolist() == [1.0, 1.0] and out[2]["s"] == "x"
