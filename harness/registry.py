"""Plugin discovery through Python entry points.

Four groups: harness.models, harness.datasets, harness.defenses, harness.attacks. Built-in plugins register
through the same groups in this project's pyproject.toml as third-party packages do in theirs.

Discovery (`discover`) only reads distribution metadata; nothing is imported. `load` imports exactly one
plugin, the first time it is asked for, and turns any failure into one BadInput naming the plugin, the
distribution that provides it and the cause (the approach of flake8's plugin finder).

Variants: entry-point names are fixed strings, so a family of plugins (every timm architecture) registers once,
as `timm`, and declares a classmethod `variant(suffix)`. A spec may then name `timm:resnet18`: the registry
resolves the part before the first ':' to the registered plugin and loads `plugin.variant("resnet18")`, which
returns the plugin for that member (or raises BadInput). Discovery stays import-free: `timm` is what is listed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Callable, Iterator

from harness.errors import BadInput, HarnessError, PluginFailure

KINDS = ("model", "dataset", "defense", "attack")
GROUPS = {kind: f"harness.{kind}s" for kind in KINDS}


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    target: str  # "module:attr"
    distribution: str
    version: str

    @property
    def provider(self) -> str:
        return f"{self.distribution} {self.version}"


def _info(kind: str, ep: EntryPoint) -> PluginInfo:
    dist = getattr(ep, "dist", None)
    return PluginInfo(
        kind=kind,
        name=ep.name,
        target=ep.value,
        distribution=dist.metadata["Name"] if dist is not None else "unknown",
        version=dist.version if dist is not None else "unknown",
    )


def discover(kind: str) -> dict[str, list[PluginInfo]]:
    """Every plugin of one kind by name, without importing any. A name may be claimed by several distributions."""
    if kind not in GROUPS:
        raise ValueError(f"unknown plugin kind {kind!r}; kinds are {', '.join(KINDS)}")
    found: dict[str, list[PluginInfo]] = {}
    seen: set[tuple[str, str]] = set()
    for ep in entry_points(group=GROUPS[kind]):
        info = _info(kind, ep)
        # The same distribution can be visible twice on sys.path (e.g. an editable install plus a checkout).
        if (info.name, info.distribution) in seen:
            continue
        seen.add((info.name, info.distribution))
        found.setdefault(ep.name, []).append(info)
    return dict(sorted(found.items()))


def _entry_point(kind: str, name: str) -> EntryPoint:
    for ep in entry_points(group=GROUPS[kind]):
        if ep.name == name:
            return ep
    raise KeyError(name)


def unknown_name_message(kind: str, name: str, available: list[str]) -> str:
    close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    listing = ", ".join(available) if available else "(none installed)"
    return f"unknown {kind} {name!r}.{hint} Available {kind}s: {listing}"


def split_variant(name: str) -> tuple[str, str | None]:
    """'timm:resnet18' -> ('timm', 'resnet18'); a plain name -> (name, None)."""
    base, sep, suffix = name.partition(":")
    return (base, suffix) if sep else (name, None)


def resolve(kind: str, name: str) -> PluginInfo:
    """The one plugin registered under `name`, or BadInput (unknown name, or claimed by two distributions)."""
    plugins = discover(kind)
    base, suffix = split_variant(name)
    if name not in plugins and suffix is not None and base in plugins:
        return dataclasses.replace(resolve(kind, base), name=name)  # a variant: provided by its base plugin
    if name not in plugins:
        raise BadInput(
            unknown_name_message(kind, name, list(plugins)),
            fix=f"use one of the listed names, or install the package that provides {kind} {name!r} "
            "(`harness plugins` lists what is installed)",
        )
    claims = plugins[name]
    if len(claims) > 1:
        who = "; ".join(f"{c.provider} ({c.target})" for c in claims)
        raise BadInput(
            f"{kind} {name!r} is registered by several distributions: {who}",
            fix="uninstall all but one of them",
        )
    return claims[0]


_LOADED: dict[tuple[str, str], object] = {}


def load(kind: str, name: str):
    """Import and return the plugin object registered as `name` in `kind`'s group (imported once per process)."""
    key = (kind, name)
    if key in _LOADED:
        return _LOADED[key]
    info = resolve(kind, name)
    base, suffix = split_variant(name)
    if suffix is not None and name not in discover(kind):
        return _load_variant(kind, name, base, suffix)
    try:
        plugin = _entry_point(kind, name).load()
    except Exception as exc:  # any import-time failure of third-party code is the plugin's, not ours
        raise BadInput(
            f"{kind} plugin {name!r} ({info.target}, from {info.provider}) failed to load: "
            f"{type(exc).__name__}: {exc}",
            fix=f"fix or reinstall {info.distribution}, or choose another {kind}",
        ) from exc
    _LOADED[key] = plugin
    return plugin


def _load_variant(kind: str, name: str, base: str, suffix: str):
    plugin = load(kind, base)
    make = getattr(plugin, "variant", None)
    if not callable(make):
        raise BadInput(f"{kind} {base!r} has no variants, so {name!r} names nothing",
                       fix=f"use {base!r} without ':{suffix}' (only plugins with a `variant` classmethod, "
                           "such as the model `timm`, take a ':<suffix>')")
    if not suffix:
        raise BadInput(f"{kind} name {name!r} has an empty variant after ':'", fix=f"write {base}:<variant>")
    plugin = make(suffix)  # may raise BadInput (an unknown variant), which reaches the user as it is
    _LOADED[(kind, name)] = plugin
    return plugin


def owner(obj: object) -> tuple[str, str] | None:
    """(kind, name) of the loaded plugin that `obj` is (a plugin class or function) or is an instance of."""
    for key, plugin in _LOADED.items():
        if obj is plugin or type(obj) is plugin:
            return key
    return None


def describe(kind: str, name: str) -> tuple[str, str]:
    """'<kind> plugin <name> (<target>, from <distribution> <version>)' and the distribution, for messages."""
    try:
        info = resolve(kind, name)
    except (BadInput, ValueError):  # not registered (a caller's own instance): named without a distribution
        return f"{kind} {name!r}", "the package that provides it"
    return f"{kind} plugin {name!r} ({info.target}, from {info.provider})", info.distribution


@contextmanager
def plugin_boundary(kind: str, name: str, action: str,
                    passthrough: Callable[[BaseException], bool] | None = None) -> Iterator[None]:
    """Where the harness calls a plugin's code (build, load, a defense's loss, an attack's perturb): an exception
    from it becomes one PluginFailure (exit 1; a failed cell inside a run) naming the plugin, its distribution,
    the action and the cause with the line that raised it, instead of a bare traceback. A HarnessError (BadInput,
    DatasetNotFound: the plugin's way to say the input is wrong) passes unchanged, as do KeyboardInterrupt and
    exceptions `passthrough` accepts (training's numeric errors, which fail the cell with their own message)."""
    try:
        yield
    except HarnessError:
        raise
    except Exception as exc:
        if passthrough is not None and passthrough(exc):
            raise
        who, distribution = describe(kind, name)
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        cause = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" (raised at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name})" \
            if frames else ""
        raise PluginFailure(f"{who} failed in {action}: {cause}{where}",
                            fix=f"this is an error in {distribution} or in how it is configured: check the "
                                f"{kind}'s options, report it to its authors, or choose another {kind}") from exc


@contextmanager
def blame(obj: object, action: str, passthrough: Callable[[BaseException], bool] | None = None) -> Iterator[None]:
    """plugin_boundary for a plugin instance (an attack, a defense): its kind and name looked up from what was loaded."""
    key = owner(obj)
    kind, name = key if key is not None else ("plugin", type(obj).__name__)
    with plugin_boundary(kind, name, action, passthrough):
        yield


def create(kind: str, name: str, **options):
    """load(kind, name)(**options), the constructor's own exceptions reported as the plugin's (plugin_boundary)."""
    plugin = load(kind, name)
    with plugin_boundary(kind, name, "construction"):
        return plugin(**options)


def loaded_plugins() -> list[PluginInfo]:
    """The plugins this process has loaded so far, with their distributions (for the report's environment)."""
    return [resolve(kind, name) for kind, name in sorted(_LOADED)]


def kinds_named(name: str) -> list[str]:
    """The kinds with a plugin registered as `name` (or as the base of the variant `name`), without importing."""
    base, suffix = split_variant(name)
    return [kind for kind in KINDS
            if name in (found := discover(kind)) or (suffix is not None and base in found)]


def _type_text(schema: dict) -> str:
    """A JSON Schema of one option as a short phrase: 'integer >= 1', 'one of "eval", "train"', 'array of ...'."""
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " or ".join(_type_text(sub) for sub in schema[key])
    kind = schema.get("type", "any")
    text = " or ".join(kind) if isinstance(kind, list) else kind
    if kind == "array" and isinstance(schema.get("items"), dict):
        text = f"array of {_type_text(schema['items'])}"
        if "minItems" in schema and schema.get("minItems") == schema.get("maxItems"):
            text = f"{text} (exactly {schema['minItems']})"
        elif "minItems" in schema or "maxItems" in schema:
            text = f"{text} ({schema.get('minItems', 0)} to {schema.get('maxItems', 'any number')})"
    bounds = [(">=", "minimum"), (">", "exclusiveMinimum"), ("<=", "maximum"), ("<", "exclusiveMaximum")]
    limits = [f"{op} {schema[key]}" for op, key in bounds if key in schema]
    return f"{text} {', '.join(limits)}" if limits else text


def option_rows(schema: dict) -> list[tuple[str, str, str, str]]:
    """(option, type, default, description) for each property of a plugin's options_schema, as `harness plugins
    NAME` prints them. Default: the schema's (JSON), '(required)', or '-' where the plugin's code decides."""
    required = set(schema.get("required", ()))
    rows = []
    for option, sub in (schema.get("properties") or {}).items():
        if "default" in sub:
            default = json.dumps(sub["default"])
        else:
            default = "(required)" if option in required else "-"
        rows.append((option, _type_text(sub), default, " ".join(str(sub.get("description", "")).split())))
    return rows
