"""Validate IoTPipeline objects the way an API server would: defaults, the structural
schema (jsonschema) and every CEL rule (cel-python), including transition rules."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

from iotpipe_operator import crd
from iotpipe_operator.quantity import parse_quantity

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "iotpipelines.yaml"
_MISSING = object()


class CelQuantity:
    """The Kubernetes CEL quantity type, enough for compareTo and comparisons."""

    def __init__(self, value: Fraction) -> None:
        self.value = value


def _quantity(text: Any) -> CelQuantity:
    return CelQuantity(parse_quantity(str(text)))


def _compare_to(left: CelQuantity, right: CelQuantity) -> celpy.celtypes.IntType:
    return celpy.celtypes.IntType((left.value > right.value) - (left.value < right.value))


def _is_quantity(text: Any) -> celpy.celtypes.BoolType:
    try:
        parse_quantity(str(text))
    except ValueError:
        return celpy.celtypes.BoolType(False)
    return celpy.celtypes.BoolType(True)


CEL_FUNCTIONS = {"quantity": _quantity, "compareTo": _compare_to, "isQuantity": _is_quantity}


def load_crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def root_schema(definition: dict[str, Any] | None = None) -> dict[str, Any]:
    definition = definition or load_crd()
    return definition["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def validate(obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """Every error an API server would report for creating ``obj`` (or updating ``old``)."""
    schema = root_schema()
    new = crd.apply_defaults(schema, obj)
    errors = [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
              for e in jsonschema.Draft202012Validator(schema).iter_errors(new)]
    if errors:
        return errors  # the API server stops before CEL on schema errors
    old_value = crd.apply_defaults(schema, old) if old is not None else _MISSING
    _check_rules(schema, new, old_value, "", errors)
    return errors


def _check_rules(schema: dict[str, Any], value: Any, old: Any, path: str,
                 errors: list[str]) -> None:
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        transition = "oldSelf" in rule["rule"]
        if transition and old is _MISSING:
            continue  # transition rules apply to updates only
        activation = {"self": celpy.json_to_cel(value)}
        if transition:
            activation["oldSelf"] = celpy.json_to_cel(old)
        program = env.program(env.compile(rule["rule"]), functions=CEL_FUNCTIONS)
        try:
            outcome = program.evaluate(activation)
        except celpy.CELEvalError as exc:
            errors.append(f"{path or '<root>'}: rule {rule['rule']!r} failed: {exc}")
            continue
        if isinstance(outcome, Exception) or not bool(outcome):
            errors.append(f"{path or '<root>'}: {rule['message']}")
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                old_sub = old.get(name, _MISSING) if isinstance(old, dict) else _MISSING
                _check_rules(sub, value[name], old_sub, f"{path}.{name}".lstrip("."), errors)
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            # atomic lists: items have no correlated old value
            _check_rules(schema["items"], item, _MISSING, f"{path}[{index}]", errors)
