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
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from harness.errors import BadInput

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


def loaded_plugins() -> list[PluginInfo]:
    """The plugins this process has loaded so far, with their distributions (for the report's environment)."""
    return [resolve(kind, name) for kind, name in sorted(_LOADED)]
