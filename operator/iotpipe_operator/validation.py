"""Validate an IoTPipeline the way the API server will, before anything is applied.

One function, :func:`validate`, serves ``iotpipe-operator validate`` and ``render`` (which
refuses whatever validate refuses). It checks, in the API server's order:

1. identity (apiVersion, kind, metadata.name);
2. unknown fields (the API server's strict field validation, kubectl's default): reported
   as errors naming the field, since they would be silently pruned otherwise;
3. the structural schema with defaults applied (jsonschema);
4. every CEL rule of the CRD (cel-python), transition rules included when ``old`` is given,
   with the Kubernetes ``quantity()`` library implemented here (cel-python has none);

and then adds warnings for specs the API server accepts but that will crash-loop.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import celpy
import jsonschema

from iotpipe_operator import builders, crd
from iotpipe_operator.quantity import parse_quantity, quantity_bytes

_MISSING = object()


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


class CelQuantity:
    """The Kubernetes CEL quantity type, enough for compareTo."""

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


def root_schema(definition: dict[str, Any] | None = None) -> dict[str, Any]:
    definition = definition or crd.build_crd()
    schema: dict[str, Any] = definition["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def unknown_fields(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Paths of fields the structural schema does not know (they would be pruned)."""
    out: list[str] = []
    if isinstance(value, dict) and "properties" in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        for key, sub_value in value.items():
            sub_path = f"{path}.{key}" if path else key
            if key not in schema["properties"]:
                out.append(sub_path)
            else:
                out += unknown_fields(schema["properties"][key], sub_value, sub_path)
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            out += unknown_fields(schema["items"], item, f"{path}[{index}]")
    return out


def _path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def schema_errors(obj: dict[str, Any], schema: dict[str, Any] | None = None) -> list[str]:
    schema = schema or root_schema()
    errors = [f"{path}: unknown field" for path in unknown_fields(schema, obj)
              if not path.startswith(("metadata.", "status"))]
    defaulted = crd.apply_defaults(schema, obj)
    errors += [f"{_path(e.absolute_path)}: {e.message}"
               for e in jsonschema.Draft202012Validator(schema).iter_errors(defaulted)]
    return errors


def cel_errors(obj: dict[str, Any], old: dict[str, Any] | None = None,
               schema: dict[str, Any] | None = None) -> list[str]:
    schema = schema or root_schema()
    new = crd.apply_defaults(schema, obj)
    old_value = crd.apply_defaults(schema, old) if old is not None else _MISSING
    errors: list[str] = []
    _check_rules(celpy.Environment(), schema, new, old_value, "", errors)
    return errors


def _check_rules(env: celpy.Environment, schema: dict[str, Any], value: Any, old: Any,
                 path: str, errors: list[str]) -> None:
    for rule in schema.get("x-kubernetes-validations", []):
        transition = "oldSelf" in rule["rule"]
        if transition and old is _MISSING:
            continue  # transition rules apply to updates of an existing value only
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
                _check_rules(env, sub, value[name], old_sub, f"{path}.{name}".lstrip("."),
                             errors)
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            # atomic lists: items have no correlated old value
            _check_rules(env, schema["items"], item, _MISSING, f"{path}[{index}]", errors)


def crash_loop_warnings(obj: dict[str, Any]) -> list[str]:
    """Specs the API server accepts that will not run."""
    spec = crd.defaulted_spec(obj.get("spec"))
    out: list[str] = []
    for index, url in enumerate(spec["storage"]["sinks"]):
        for scheme in ("sqlite://", "parquet://"):
            if url.startswith(scheme):
                target = url[len(scheme):]
                if not target.startswith(builders.STORAGE_DATA_DIR + "/"):
                    out.append(
                        f"spec.storage.sinks[{index}]: {url} is outside the storage volume "
                        f"({builders.STORAGE_DATA_DIR}); the root filesystem is read-only, "
                        "so storage will crash-loop")
    ingest = spec["ingest"]
    frame = ingest.get("maxFrameBytes")
    per_process = quantity_bytes(ingest["queue"]["size"]) // ingest["processes"]
    if frame is not None and frame > per_process:
        out.append(f"spec.ingest.maxFrameBytes: {frame} exceeds the queue of one ingest "
                   f"process ({per_process} bytes = queue.size / processes)")
    if ingest["auth"]["insecureNoAuth"]:
        out.append("spec.ingest.auth.insecureNoAuth: devices and clients connect without "
                   "tokens")
    if not spec["security"]["curve"]["enabled"]:
        out.append("spec.security.curve.enabled: the ZeroMQ links are plain; any pod that "
                   "reaches the middle's ports can inject or read readings"
                   + ("" if spec["networkPolicy"]["enabled"]
                      else " (and networkPolicy is off: any pod in the cluster)"))
    return out


def validate(obj: Any, old: Any = None) -> Report:
    """Every error the API server would report for creating ``obj`` (or updating ``old``
    to it), and warnings for what will crash-loop."""
    report = Report()
    if not isinstance(obj, dict):
        report.errors.append("<root>: not an object")
        return report
    if obj.get("apiVersion") != crd.API_VERSION:
        report.errors.append(f"apiVersion: must be {crd.API_VERSION}, "
                             f"not {obj.get('apiVersion')!r}")
    if obj.get("kind") != crd.KIND:
        report.errors.append(f"kind: must be {crd.KIND}, not {obj.get('kind')!r}")
    if not (obj.get("metadata") or {}).get("name"):
        report.errors.append("metadata.name: required")
    if report.errors:
        return report
    obj = copy.deepcopy(obj)
    obj.setdefault("spec", {})
    report.errors += schema_errors(obj)
    if report.errors:
        return report  # the API server stops before CEL on schema errors
    report.errors += cel_errors(obj, old if isinstance(old, dict) else None)
    if not report.errors:
        report.warnings += crash_loop_warnings(obj)
    return report
