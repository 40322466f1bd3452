"""Load a JSON spec, validate it completely, and resolve its defaults.

Validation is jsonschema (draft 2020-12) against harness/schemas/spec.schema.json plus, for every plugin the
spec names, that plugin's own `options_schema`. Every problem is collected and reported at once, each with its
JSON path (`$.defense.strengths[2]: -4 is less than the minimum of 0`); only the plugins the spec names are
imported.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
import math
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from harness import registry
from harness.errors import BadInput
from harness.paths import REPORT_MAX_BYTES, SPEC_MAX_BYTES, read_regular

# Where each plugin sits in a spec: (kind, path to the plugin's object, as a list of keys / indices).
PluginSite = tuple[str, list[Any]]


def load_schema(name: str) -> dict:
    return json.loads(resources.files("harness").joinpath("schemas", name).read_text())


SPEC_SCHEMA = load_schema("spec.schema.json")


def json_path(parts: Iterable[Any]) -> str:
    out = "$"
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def read_json(path: str | Path, what: str = "spec") -> Any:
    """Parse a JSON file; any problem (missing, unreadable, not JSON) is a BadInput naming the file."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{what} file not found: {path}", fix="check the path (the shipped specs are in specs/)")
    if path.is_dir():
        raise BadInput(f"{what} path is a folder, not a file: {path}", fix="give the path of a .json file")
    # regular files only, size-capped: a FIFO or a device file (/dev/zero) given as a spec would hang or never end
    data = read_regular(path, what, SPEC_MAX_BYTES if what == "spec" else REPORT_MAX_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"{what} file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                       fix="save it as UTF-8 JSON") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"{what} file {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}",
                       fix="correct the JSON syntax at that position") from exc


def _closest_branch(error: ValidationError) -> list[ValidationError]:
    """For a failed oneOf/anyOf, the errors of the branch the instance meant: not one whose `type` const failed,
    and of those the one with fewest errors (jsonschema's best_match alone picks by depth, often the wrong one)."""
    branches: dict[Any, list[ValidationError]] = {}
    for sub in error.context:
        branches.setdefault(sub.relative_schema_path[0], []).append(sub)
    meant = [errs for errs in branches.values() if not any(e.validator in ("const", "enum") for e in errs)]
    return min(meant, key=len) if meant else [best_match(error.context)]


def _describe(error: ValidationError, prefix: str = "$") -> str:
    if error.context:  # oneOf / anyOf: point into the branch that was meant, not at the whole alternative
        return "\n  ".join(_describe(sub, prefix) for sub in _closest_branch(error))
    path = prefix + error.json_path[1:]
    message = error.message
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = list(error.schema.get("properties", {}))
        extras = [k for k in error.instance if k not in allowed]
        hints = []
        for key in extras:
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hints.append(f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        message = "; ".join(hints) + (f". Allowed keys: {', '.join(allowed)}" if allowed else ". No keys are allowed here")
    return f"{path}: {message}"


def schema_errors(instance: Any, schema: dict, prefix: str = "$") -> list[str]:
    validator = Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    return [_describe(e, prefix) for e in errors]


def non_finite_numbers(instance: Any, parts: tuple = ()) -> list[str]:
    """NaN and +-Infinity: Python's json module reads them, and JSON Schema's bounds let NaN through every one."""
    if isinstance(instance, float) and not math.isfinite(instance):
        return [f"{json_path(parts)}: {instance} is not a finite number (JSON has no NaN or Infinity)"]
    if isinstance(instance, dict):
        return [e for k, v in instance.items() for e in non_finite_numbers(v, parts + (k,))]
    if isinstance(instance, list):
        return [e for i, v in enumerate(instance) for e in non_finite_numbers(v, parts + (i,))]
    return []


def plugin_sites(spec: dict) -> list[PluginSite]:
    sites: list[PluginSite] = [("dataset", ["dataset"])]
    sites += [("model", ["models", i]) for i in range(len(_list_at(spec, ["models"])))]
    if _get(spec, ["defense"]) is not None:  # an evaluation spec has none
        sites.append(("defense", ["defense"]))
    sites += [("attack", ["evaluation", "attacks", i]) for i in range(len(_list_at(spec, ["evaluation", "attacks"])))]
    checks = _get(spec, ["evaluation", "checks"])
    if isinstance(checks, dict) and isinstance(checks.get("gradient_free"), dict):
        sites.append(("attack", ["evaluation", "checks", "gradient_free"]))
    return sites


def _list_at(spec: Any, keys: list[Any]) -> list:
    """The list at `keys`, or [] when the spec has something else there (the schema reports that)."""
    value = _get(spec, keys)
    return value if isinstance(value, list) else []


def _get(spec: Any, keys: list[Any]) -> Any:
    for key in keys:
        try:
            spec = spec[key]
        except (KeyError, IndexError, TypeError):
            return None
    return spec


def fill_defaults(instance: Any, schema: dict) -> Any:
    """Fill the `default` of every absent property, recursively through objects and arrays."""
    if isinstance(instance, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in instance and "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
            if key in instance:
                fill_defaults(instance[key], sub)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            fill_defaults(item, schema["items"])
    return instance


# The spec of an in-memory model (harness.api.evaluate): the model is given, so the spec names no model plugin.
SPEC_SCHEMA_WITHOUT_MODELS = {**SPEC_SCHEMA, "required": [k for k in SPEC_SCHEMA["required"] if k != "models"]}


EVALUATION_ONLY = ("defense", "training")  # what `harness eval` does not need


class EvaluationSpec(BadInput):
    """A spec without `defense` and `training` checked for `harness run`: it is an evaluation spec (exit 2)."""


def is_evaluation_spec(spec: Any) -> bool:
    """A spec that leaves out both `defense` and `training`: something to evaluate given weights with, not to run."""
    return isinstance(spec, dict) and not any(key in spec for key in EVALUATION_ONLY)


def validate(spec: Any, *, models: bool = True, evaluation_only: bool = False) -> dict:
    """Validate a parsed spec completely; return it resolved (defaults filled) or raise one BadInput listing all errors.
    `models=False`: the spec may leave `models` out (an in-memory model is evaluated instead).
    `evaluation_only=True` (`harness eval`, `harness validate` of an evaluation spec): `defense` and `training` may
    be left out; they are then null in the resolved spec. Without it a spec that leaves out both is refused with
    EvaluationSpec, which points to `harness eval`."""
    if not evaluation_only and is_evaluation_spec(spec):
        raise EvaluationSpec("the spec has no `defense` and no `training`: it is an evaluation spec, for existing "
                             "weights, and `harness run` has nothing to train",
                             fix="evaluate weights with `harness eval SPEC --weights FILE`, or add `defense` and "
                                 "`training` to train (`harness validate SPEC` checks either kind)")
    schema = SPEC_SCHEMA if models else SPEC_SCHEMA_WITHOUT_MODELS
    if evaluation_only:
        schema = {**schema, "required": [k for k in schema["required"] if k not in EVALUATION_ONLY]}
    errors = schema_errors(spec, schema) + non_finite_numbers(spec)
    if not isinstance(spec, dict):
        raise BadInput("spec is not valid:\n  " + "\n  ".join(errors), fix="the spec must be a JSON object")
    for kind, keys in plugin_sites(spec):
        site = _get(spec, keys)
        name = site.get("name") if isinstance(site, dict) else None
        if not isinstance(name, str):
            continue  # the core schema already reported it
        where = json_path(keys)
        try:
            plugin = registry.load(kind, name)
        except BadInput as exc:
            errors.append(f"{where}.name: {exc.message}")
            continue
        schema = getattr(plugin, "options_schema", None)
        if not isinstance(schema, dict):
            errors.append(f"{where}: {kind} plugin {name!r} declares no options_schema (a JSON Schema object)")
            continue
        options = site.get("options", {})
        if isinstance(options, dict):
            problems = schema_errors(options, schema, prefix=f"{where}.options")
            errors += problems
            check = getattr(plugin, "check_options", None)
            if not problems and callable(check):  # what the schema cannot say (harness.plugin.Plugin)
                filled = fill_defaults(copy.deepcopy(options), schema)
                with registry.plugin_boundary(kind, name, "check_options"):
                    errors += [f"{where}.options: {problem}" for problem in check(filled)]
    for label_errors in (_duplicate_labels(spec.get("models"), "models"),
                         _duplicate_labels(_get(spec, ["evaluation", "attacks"]), "evaluation.attacks"),
                         colliding_cells(spec), _smoke_strengths(spec)):
        errors += label_errors
    if errors:
        raise BadInput(
            f"spec is not valid ({len(errors)} problem{'s' if len(errors) > 1 else ''}):\n  " + "\n  ".join(errors),
            fix="correct each value at the JSON path shown; `harness validate SPEC` re-checks without running",
        )
    resolved = fill_defaults(copy.deepcopy(spec), SPEC_SCHEMA)
    for kind, keys in plugin_sites(resolved):
        site = _get(resolved, keys)
        fill_defaults(site["options"], registry.load(kind, site["name"]).options_schema)
    for model in resolved.get("models", []):
        model["label"] = default_label(model)
    if evaluation_only:
        for key in EVALUATION_ONLY:
            resolved.setdefault(key, None)  # recorded as null: an evaluation of given weights trained nothing
    for attack in resolved["evaluation"]["attacks"]:
        attack["label"] = default_label(attack)
    return resolved


def default_label(item: dict) -> str:
    """A model is labelled by its name, an attack by name@eps, unless the spec gives a label. Labels name cells and
    files, so characters a file name cannot safely hold (the ':' of `timm:<arch>`) become '-'."""
    if item.get("label"):
        return item["label"]
    label = f"{item['name']}@{item['eps']:g}" if "eps" in item else item["name"]
    return re.sub(r"[^A-Za-z0-9_.+@-]", "-", label)


def _duplicate_labels(items: Any, where: str) -> list[str]:
    if not isinstance(items, list):
        return []
    seen: dict[str, int] = {}
    errors = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            continue
        if "eps" in item and not isinstance(item["eps"], (int, float)):
            continue
        if "label" in item and not isinstance(item["label"], str):
            continue  # the schema reports it
        label = default_label(item)
        if label in seen:
            errors.append(f"$.{where}[{i}]: label {label!r} repeats $.{where}[{seen[label]}]; "
                          "give each entry a distinct \"label\"")
        else:
            seen[label] = i
    return errors


def cell_id(label: str, strength: float) -> str:
    """A cell's id, which names its files (cells/<id>.json, checkpoints/<id>.pt): the model's label and the
    strength to 6 significant digits (`lenet__s8`, `lenet__s0.5`)."""
    return f"{label}__s{float(strength):g}"


def colliding_cells(spec: Any) -> list[str]:
    """Cells whose ids would be equal, or equal but for case (their files would overwrite each other, on a
    case-insensitive file system like macOS's or Windows' default): strengths equal to 6 significant digits
    (8 and 8.0000001), model labels equal but for case (`LeNet`, `lenet`), also once a name is made a label
    (`timm:resnet18` is labelled `timm-resnet18`). Labels equal exactly are reported by _duplicate_labels."""
    models, strengths = _get(spec, ["models"]), _get(spec, ["defense", "strengths"])
    if not isinstance(models, list) or not isinstance(strengths, list):
        return []  # the schema reports it
    labels = [(i, default_label(m)) for i, m in enumerate(models) if isinstance(m, dict)
              and isinstance(m.get("name"), str) and isinstance(m.get("label", ""), str)]
    numbers = [(j, s) for j, s in enumerate(strengths) if isinstance(s, (int, float)) and not isinstance(s, bool)
               and math.isfinite(s)]
    errors = []
    first_label: dict[str, tuple[int, str]] = {}
    for i, label in labels:
        seen = first_label.setdefault(label.casefold(), (i, label))
        if seen[0] != i and seen[1] != label:
            errors.append(f"$.models[{i}].label: {label!r} and $.models[{seen[0]}]'s label {seen[1]!r} differ only "
                          f"in case; their cells' files ({cell_id(label, 0)}.json, {cell_id(seen[1], 0)}.json) "
                          "would overwrite each other on a case-insensitive file system: give the models labels "
                          "that differ in more than case")
    first_strength: dict[str, tuple[int, float]] = {}
    for j, s in numbers:
        key = cell_id("", s)
        seen_s = first_strength.setdefault(key, (j, s))
        if seen_s[0] != j and s != seen_s[1]:  # equal ones: the schema's uniqueItems reports them
            example = cell_id(labels[0][1], s) if labels else key
            errors.append(f"$.defense.strengths[{j}]: {s!r} names the same cells as $.defense.strengths[{seen_s[0]}] "
                          f"({seen_s[1]!r}), e.g. {example!r} (cell ids show a strength to 6 significant digits): "
                          "make them differ within 6 significant digits, or drop one")
    return errors


def _smoke_strengths(spec: dict) -> list[str]:
    """`smoke.strengths` picks cells of the full run, so it must be a subset of `defense.strengths`."""
    picked, strengths = _get(spec, ["smoke", "strengths"]), _get(spec, ["defense", "strengths"])
    if not isinstance(picked, list) or not isinstance(strengths, list):
        return []  # absent, or the schema reports it
    extra = [s for s in picked if isinstance(s, (int, float)) and s not in strengths]
    if not extra:
        return []
    return [f"$.smoke.strengths: {extra} are not among $.defense.strengths {strengths}; "
            "list a subset of the defense's strengths"]


def load(source: str | Path | dict, overrides: Iterable[str] = ()) -> dict:
    """Read (a path) or take (an already parsed dict, copied) a spec; apply `--set` overrides; validate, resolve."""
    raw = copy.deepcopy(source) if isinstance(source, dict) else read_json(source, "spec")
    return validate_overridden(apply_overrides(raw, overrides), overrides)


def validate_overridden(raw: Any, overrides: Iterable[str], **options) -> dict:
    """validate(raw), its error naming the `--set` overrides the spec was validated with (a bad value may be one)."""
    overrides = list(overrides)
    try:
        return validate(raw, **options)
    except BadInput as exc:
        if overrides:
            exc.message += "\n  (the spec as changed by the overrides " + "; ".join(overrides) + ")"
        raise


_INDEX = re.compile(r"\[(\d+)\]")


def apply_overrides(spec: Any, overrides: Iterable[str]) -> Any:
    """Apply `--set PATH=VALUE` overrides to a parsed spec, before it is validated; return the changed copy.

    PATH is dotted keys into objects with list indices as numbers (`training.lr`, `models.0.options.spectral_norm`);
    the JSON paths of error messages are accepted too (`$.models[0].options.spectral_norm`). VALUE is parsed as
    JSON (`0.05`, `[0,8]`, `false`, `{"type": "constant"}`, `null`) and, when it is not JSON, taken as a string
    (`--set dataset.name=mnist`; a string that reads as JSON needs quotes: `--set 'name="123"'`). Missing objects
    on the way are created, so an unknown key is then refused by the schema with its JSON path, as in a file.
    A malformed override, an index past a list's end or a path through a number or string is BadInput."""
    overrides = list(overrides)
    if not overrides or not isinstance(spec, dict):
        return spec  # a spec that is not an object: validate() says so
    spec = copy.deepcopy(spec)
    for text in overrides:
        path, sep, value_text = str(text).partition("=")
        parts = [p for p in _INDEX.sub(r".\1", path.strip().removeprefix("$")).split(".")]
        if parts and parts[0] == "":
            parts = parts[1:]  # "$.a" or ".a"
        if not sep or not parts or any(p == "" for p in parts):
            raise BadInput(f"--set {text!r}: expected PATH=VALUE with a dotted PATH, e.g. training.lr=0.05 or "
                           "models.0.options.spectral_norm=false",
                           fix="write the key path, '=', then the value (JSON, or a plain string)")
        try:
            value = json.loads(value_text)
        except json.JSONDecodeError:
            value = value_text  # a plain string: --set dataset.name=mnist
        node: Any = spec
        keys: list[Any] = []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    size = f"{len(node)} entr{'y' if len(node) == 1 else 'ies'}"
                    what = "not a list index" if not part.isdigit() else f"past its end ({size})"
                    raise BadInput(f"--set {text}: {json_path(keys)} is a list and {part!r} is {what}",
                                   fix=f"index it with 0..{len(node) - 1}: {'.'.join(parts[:i])}.0")
                key: Any = int(part)
            elif isinstance(node, dict):
                key = part
            else:
                raise BadInput(f"--set {text}: {json_path(keys)} is {json.dumps(node)}, not an object or a list, so "
                               f"it has no {part!r}", fix=f"set {json_path(keys)} itself, or correct the path")
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and key not in node:
                    node[key] = {}  # an absent object (analysis, training.schedule): the schema checks what is in it
                node = node[key]
            keys.append(key)
    return spec
