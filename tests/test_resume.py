"""--resume refuses an output made with other settings, naming each one, for every field of every family's
request: the comparison walks the request's fields, so a field added later is covered without a change."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from usp_infer.batch import Item, _finished, changes
from usp_infer.config import GenerateRequest, ParallelConfig, Session
from usp_infer.media import sidecar_path
from usp_infer.request import UsageError
from usp_infer.ltx2.request import LTX2Request
from usp_infer.sidecar import config_hash

ROOT = Path(__file__).resolve().parents[1]
# Each family's request with every optional field set, so each has a value to change.
REQUESTS = {
    "ltx-video": (ROOT / "models" / "ltx-tiny", GenerateRequest(prompt="a fox", image="a.png")),
    "ltx-2": (ROOT / "models" / "ltx2-tiny", LTX2Request(prompt="a fox", image="a.png")),
}


def _fields(value: object, path: tuple[str, ...] = ()):
    """(dotted path, JSON value) of every leaf field, nested dataclasses walked field by field."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _fields(getattr(value, f.name), (*path, f.name))
    else:
        yield ".".join(path), json.loads(json.dumps(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value))


def _other(value: object) -> object:
    """A different JSON value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + " else"
    if isinstance(value, list):
        return [*value[:-1], _other(value[-1])] if value else [1]
    return "something"  # None: an unset optional field


def _set(record: dict, dotted: str, value: object) -> dict:
    record = json.loads(json.dumps(record))
    *parents, last = dotted.split(".")
    node = record
    for key in parents:
        node = node[key]
    node[last] = value
    return record


@pytest.mark.parametrize("family", REQUESTS)
def test_every_request_field_changed_is_refused_by_name(family, tmp_path):
    model, request = REQUESTS[family]
    output = tmp_path / "a.mp4"
    output.write_bytes(b"video")
    item = Item(0, request, output, "line 1 of p.jsonl")
    session = Session(model=model, device="cpu", dtype="float32", parallel=ParallelConfig(), resume=True, batch=True)
    recorded = json.loads(json.dumps(dataclasses.asdict(request)))
    leaves = dict(_fields(request))
    assert {name.split(".")[0] for name in leaves} == {f.name for f in dataclasses.fields(request)}
    for name, value in leaves.items():
        side = {"request": _set(recorded, name, _other(value)), "model": {"config_sha256": config_hash(model)},
                "dtype": "float32"}
        sidecar_path(output).write_text(json.dumps(side))
        before = (output.read_bytes(), sidecar_path(output).read_text())
        with pytest.raises(UsageError) as refused:
            _finished(item, session)
        message = str(refused.value)
        assert f"asks for ({name} " in message and "pass --overwrite" in message, (name, message)
        assert (output.read_bytes(), sidecar_path(output).read_text()) == before  # nothing touched


def test_changes_names_each_difference_with_both_values():
    made = {"steps": 30, "guidance": {"video": {"cfg": 3.0}, "stg_blocks": [28]}, "prompt": "x" * 100}
    asked = {"steps": 40, "guidance": {"video": {"cfg": 3.0}, "stg_blocks": [27]}, "prompt": "x" * 100}
    assert changes(made, asked) == ["guidance.stg_blocks [28] -> [27]", "steps 30 -> 40"]
    assert changes(made, made) == []
    assert changes({"a": 1}, {"a": 1, "new": None}) == []  # a field added with its default: the same request
