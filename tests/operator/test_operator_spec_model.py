"""The typed spec model and the CRD schema describe the same spec (fields, types, bounds,
enums, defaults): neither can drift from the other."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types
import pydantic
import pytest
import yaml

from iotpipe_operator import crd, spec

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted((REPO / "samples").glob("*.yaml"))
JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean",
              list: "array", dict: "object"}


def _strip_optional(annotation: Any) -> Any:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and \
            type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner
    return annotation


def _constraints(info: pydantic.fields.FieldInfo) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in info.metadata:
        if isinstance(item, annotated_types.Ge):
            out["minimum"] = item.ge
        elif isinstance(item, annotated_types.Le):
            out["maximum"] = item.le
        elif isinstance(item, annotated_types.MaxLen):
            out["max"] = item.max_length
        elif isinstance(item, annotated_types.MinLen):
            out["min"] = item.min_length
        elif getattr(item, "pattern", None):
            out["pattern"] = item.pattern
    return out


def _compare(schema: dict[str, Any], model: type[pydantic.BaseModel], path: str) -> list[str]:
    diffs: list[str] = []
    fields = {info.alias or name: info for name, info in model.model_fields.items()}
    properties = schema.get("properties", {})
    for missing in sorted(set(properties) - set(fields)):
        diffs.append(f"{path}.{missing}: in the CRD, not in the model")
    for extra in sorted(set(fields) - set(properties)):
        diffs.append(f"{path}.{extra}: in the model, not in the CRD")
    for key in sorted(set(properties) & set(fields)):
        node, info, where = properties[key], fields[key], f"{path}.{key}"
        annotation = _strip_optional(info.annotation)
        origin = typing.get_origin(annotation) or annotation
        if origin is Literal:
            if list(typing.get_args(annotation)) != node.get("enum"):
                diffs.append(f"{where}: enum {node.get('enum')} != "
                             f"{list(typing.get_args(annotation))}")
            kind = "string"
        elif isinstance(origin, type) and issubclass(origin, pydantic.BaseModel):
            diffs += _compare(node, origin, where)
            kind = "object"
        else:
            kind = JSON_TYPES.get(origin, "?")
        if node.get("type", "object") != kind:
            diffs.append(f"{where}: type {node.get('type')} != {kind}")
        limits = _constraints(info)
        wanted = {"minimum": node.get("minimum"), "maximum": node.get("maximum"),
                  "max": node.get("maxLength", node.get("maxItems")),
                  "min": node.get("minItems"), "pattern": node.get("pattern")}
        wanted = {k: v for k, v in wanted.items() if v is not None}
        if limits != wanted:
            diffs.append(f"{where}: bounds {wanted} != model {limits}")
        if kind not in ("object",) and "default" in node and node["default"] != info.default:
            diffs.append(f"{where}: default {node['default']!r} != model {info.default!r}")
        if kind == "object" and "default" in node and isinstance(origin, type) \
                and issubclass(origin, pydantic.BaseModel):
            defaulted = crd.apply_defaults(node, node["default"])
            if origin().model_dump(by_alias=True, exclude_none=True) != defaulted:
                diffs.append(f"{where}: default object differs from the schema's")
        required = key in schema.get("required", [])
        if required != info.is_required():
            diffs.append(f"{where}: required {required} != model {info.is_required()}")
    return diffs


def test_model_and_crd_schema_agree_field_by_field() -> None:
    assert _compare(crd.spec_schema(), spec.PipelineSpec, "spec") == []


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_model_defaults_equal_the_schema_defaults(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())["spec"]
    typed = spec.parse(raw).model_dump(by_alias=True, exclude_none=True)
    assert typed == crd.defaulted_spec(raw)


def test_empty_spec_defaults_agree() -> None:
    assert spec.parse({}).model_dump(by_alias=True, exclude_none=True) == \
        crd.defaulted_spec({})


def test_model_errors_name_the_field() -> None:
    with pytest.raises(pydantic.ValidationError, match=r"middle\.replicas"):
        spec.parse({"middle": {"replicas": 0}})
    with pytest.raises(pydantic.ValidationError, match=r"ingest\.replica\b"):
        spec.parse({"ingest": {"replica": 3}})
