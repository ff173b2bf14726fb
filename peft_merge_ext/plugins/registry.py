"""Discovery and registry of combination types.

Plugins are modules exposed through the `peft_merge_ext` entry-point group. They load lazily, once, on first use.
The built-in types come through the very same path (the `builtin` entry point, also registered as a default plugin
when the package runs from a source tree without installed metadata).

Loading is isolated, so that no third-party plugin can break the host or the other plugins:

- a plugin whose import, hook validation or hook call raises anything but `KeyboardInterrupt` (`SystemExit` and
  `GeneratorExit` included) is skipped with one `RuntimeWarning` naming it and its distribution;
- the built-in plugin loads first and third-party plugins follow in a deterministic order (sorted by distribution,
  then entry-point name); a combination type name registered by an earlier plugin (the built-in types always come
  first) keeps its first provider, and the later registration alone is skipped with one `RuntimeWarning` naming the
  type and both providers: every other type of both plugins stays available.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import pluggy

from ..errors import (
    MergeInputError,
    PluginError,
    ReservedCombinationTypeError,
)
from . import hookspecs

__all__ = [
    "PEFT_COMBINATION_TYPES",
    "CombinationType",
    "PluginInfo",
    "get_combination_types",
    "get_plugin_manager",
    "get_plugins",
    "is_reserved_name",
    "load_plugins",
    "run_hook",
]

ENTRY_POINT_GROUP = "peft_merge_ext"
LOAD_PLUGINS_ENV = "PEFT_MERGE_EXT_LOAD_PLUGINS"
DEFAULT_PLUGINS = {"builtin": "peft_merge_ext.plugins.builtin_types"}

# The combination types owned by PEFT's own `LoraModel.add_weighted_adapter`.
PEFT_COMBINATION_TYPES = frozenset(
    {
        "svd",
        "linear",
        "cat",
        "ties",
        "ties_svd",
        "dare_ties",
        "dare_linear",
        "dare_ties_svd",
        "dare_linear_svd",
        "magnitude_prune",
        "magnitude_prune_svd",
    }
)
_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
# The parameters of PEFT's `add_weighted_adapter`: an option with one of these names could never reach a plugin
# (`density` and `majority_sign_method` may be declared: the drop-in passes them on, with PEFT's meaning).
RESERVED_OPTION_NAMES = frozenset(
    {
        "self",
        "adapters",
        "weights",
        "adapter_name",
        "combination_type",
        "svd_rank",
        "svd_clamp",
        "svd_full_matrices",
        "svd_driver",
    }
)


def is_reserved_name(name: str) -> bool:
    """Whether `name` belongs to PEFT's own combination types (or their `dare_*` / `*_svd` families)."""
    return name in PEFT_COMBINATION_TYPES or name.startswith("dare_") or name.endswith("_svd")


def _describe_provider(plugin: str, distribution: str | None, version: str | None) -> str:
    if distribution:
        return f"{plugin} ({distribution} {version or ''})".replace(" )", ")")
    return plugin


@dataclass(frozen=True)
class CombinationType:
    """A registered combination type.

    Args:
        name (`str`): The `combination_type` value users pass.
        function (`Callable`): `function(deltas, weights, context, **options)`, see `peft_merge_ext.plugins.contract`.
        description (`str`): One line shown by `peft-merge-ext plugins` and in model cards.
        options (`Mapping[str, Any]`): The options the function accepts, with their defaults (read from the
            function's signature: the parameters after `deltas, weights, context`).
        validate (`Callable`, *optional*): `validate(weights, options)`, called once before any work; raises on bad
            input.
        plugin (`str`): The name of the plugin that registered it.
        distribution (`str`, *optional*): The distribution that ships the plugin.
        version (`str`, *optional*): That distribution's version.
    """

    name: str
    function: Callable[..., Any]
    description: str
    options: Mapping[str, Any] = field(default_factory=dict)
    validate: Callable[[list[float], dict[str, Any]], None] | None = None
    plugin: str = ""
    distribution: str | None = None
    version: str | None = None

    @property
    def provider(self) -> str:
        """`"plugin (distribution version)"`, for messages."""
        return _describe_provider(self.plugin, self.distribution, self.version)

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The options with defaults filled in; an unknown option raises `MergeInputError` naming the accepted ones."""
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            accepted = ", ".join(sorted(self.options)) or "none"
            raise MergeInputError(
                f"Unknown option(s) {', '.join(map(repr, unknown))} for combination_type={self.name!r}; "
                f"it accepts: {accepted}."
            )
        return {**self.options, **given}

    def check_weights(self, weights: list[float], options: Mapping[str, Any]) -> None:
        """Run the type's own validation of `weights` and `options`."""
        if self.validate is not None:
            self.validate(weights, dict(options))


@dataclass(frozen=True)
class PluginInfo:
    """A loaded plugin: its entry-point name, distribution, version, hooks and the types it registered."""

    name: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...]
    types: tuple[str, ...]


class Register:
    """The callback handed to `register_combination_types`.

    A plugin calls `register(name, function, description="...", options={...}, validate=None)`.
    """

    def __init__(self, plugin: str, distribution: str | None, version: str | None) -> None:
        self._plugin, self._distribution, self._version = plugin, distribution, version
        self.registered: list[CombinationType] = []

    def __call__(
        self,
        name: str,
        function: Callable[..., Any],
        description: str = "",
        options: Mapping[str, Any] | None = None,
        validate: Callable[[list[float], dict[str, Any]], None] | None = None,
    ) -> None:
        if not isinstance(name, str) or not _NAME_PATTERN.match(name):
            raise PluginError(f"Combination type name {name!r} must be lowercase snake_case (e.g. 'model_stock').")
        if is_reserved_name(name):
            raise ReservedCombinationTypeError(
                f"Combination type {name!r} is owned by PEFT's add_weighted_adapter; pick another name."
            )
        if not callable(function):
            raise PluginError(f"The function registered for {name!r} is not callable: {function!r}.")
        if validate is not None and not callable(validate):
            raise PluginError(f"validate for {name!r} must be callable or None.")
        options = {**_signature_options(name, function), **dict(options or {})}
        for option in options:
            if not isinstance(option, str) or not option.isidentifier():
                raise PluginError(f"Option {option!r} of {name!r} must be a valid Python identifier.")
            if option in RESERVED_OPTION_NAMES:
                raise PluginError(
                    f"Option {option!r} of {name!r} is an argument of PEFT's add_weighted_adapter and would never "
                    "reach the combination function; rename it."
                )
        if any(existing.name == name for existing in self.registered):
            provider = _describe_provider(self._plugin, self._distribution, self._version)
            raise PluginError(  # a bug of this plugin alone: it is skipped with a warning, like any broken plugin
                f"Combination type {name!r} is registered twice by the same plugin, {provider}; register each name "
                "once."
            )
        description = " ".join(str(description).split())
        self.registered.append(
            CombinationType(
                name=name,
                function=function,
                description=description,
                options=MappingProxyType(options),
                validate=validate,
                plugin=self._plugin,
                distribution=self._distribution,
                version=self._version,
            )
        )


def _signature_options(name: str, function: Callable[..., Any]) -> dict[str, Any]:
    """A combination function's options: its parameters after `(deltas, weights, context)` that have defaults."""
    import inspect

    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return {}
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 3 and not any(p.kind is p.VAR_POSITIONAL for p in parameters):
        raise PluginError(
            f"The function registered for {name!r} must take (deltas, weights, context, **options); its signature is "
            f"{inspect.signature(function)}."
        )
    rest = positional[3:] + [p for p in parameters if p.kind is p.KEYWORD_ONLY]
    required = [p.name for p in rest if p.default is p.empty]
    if required:
        raise PluginError(
            f"Option(s) {required} of {name!r} have no default; give every option a default in the function's "
            "signature."
        )
    return {p.name: p.default for p in rest}


class _Registry:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.manager: pluggy.PluginManager | None = None
        self.types: dict[str, CombinationType] = {}
        self.plugins: dict[str, PluginInfo] = {}


_REGISTRY = _Registry()


def _plugin_filter() -> set[str] | None:
    value = os.environ.get(LOAD_PLUGINS_ENV)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def _entry_points() -> list[Any]:
    from importlib.metadata import entry_points

    return list(entry_points(group=ENTRY_POINT_GROUP))


def _is_builtin(entry_point: Any) -> bool:
    """Whether `entry_point` is peft-merge-ext's own (a third-party one may reuse the name, not the module)."""
    return DEFAULT_PLUGINS.get(entry_point.name) == entry_point.value


def _distribution_of(entry_point: Any) -> tuple[str | None, str | None]:
    """The name and version of the distribution that declares `entry_point` (`None`s when unknown or unreadable)."""
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return None, None
    try:
        return dist.metadata["Name"] or None, dist.version or None
    except Exception:  # malformed metadata of a third-party distribution must not break loading
        return None, None


def _load_order(entry_point: Any, distribution: str | None) -> tuple[str, str, str]:
    """The sort key of third-party entry points: distribution (normalized as in PEP 503), entry-point name, module."""
    normalized = re.sub(r"[-_.]+", "-", distribution).lower() if distribution else ""
    return normalized, entry_point.name, entry_point.value


def _describe_error(error: BaseException) -> str:
    """`"Type: message"` (or `"Type"` when the message is empty), even for an exception whose `str()` raises."""
    try:
        message = str(error)
    except KeyboardInterrupt:
        raise
    except BaseException:  # a plugin's exception class may misbehave too
        message = "<unprintable message>"
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _warn_broken(name: str, distribution: str | None, error: BaseException, stage: str) -> None:
    origin = f" from {distribution}" if distribution else ""
    warnings.warn(
        f"peft-merge-ext plugin {name!r}{origin} failed to {stage} and was skipped: {_describe_error(error)}. Every "
        f"other combination type still works; upgrade or uninstall it, or leave it out with {LOAD_PLUGINS_ENV}.",
        RuntimeWarning,
        stacklevel=4,
    )


def _warn_clash(combination: CombinationType, kept: CombinationType) -> None:
    warnings.warn(
        f"peft-merge-ext plugin {combination.provider} registers combination type {combination.name!r}, which "
        f"{kept.provider} already provides; {combination.name!r} stays {kept.provider}'s and this registration was "
        f"skipped (every other combination type of both plugins still works). Rename it, uninstall one of the two "
        f"plugins, or choose which plugins load with {LOAD_PLUGINS_ENV}.",
        RuntimeWarning,
        stacklevel=4,
    )


def _collect(manager: pluggy.PluginManager, meta: dict[str, tuple[str | None, str | None]]) -> None:
    """Call every plugin's `register_combination_types` and build the registry.

    Plugins are visited in load order with the built-in plugin first, so a name registered twice keeps its built-in
    (or earliest third-party) provider. A plugin whose hook raises is unregistered with a warning; a registration that
    clashes with an earlier one is skipped with a warning and the plugin's other types are kept.
    """
    types: dict[str, CombinationType] = {}
    plugins: dict[str, PluginInfo] = {}
    # `list_name_plugin` is in registration order; the stable sort only makes "built-ins first" explicit.
    ordered = sorted(manager.list_name_plugin(), key=lambda item: item[0] not in DEFAULT_PLUGINS)
    for name, plugin in ordered:
        distribution, version = meta.get(name, (None, None))
        register = Register(name, distribution, version)
        try:
            hooks = tuple(sorted(caller.name for caller in manager.get_hookcallers(plugin) or []))
            impls = [
                impl for impl in manager.hook.register_combination_types.get_hookimpls() if impl.plugin_name == name
            ]
            for impl in impls:
                arguments = {"register": register}
                impl.function(*[arguments[arg] for arg in impl.argnames])
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # SystemExit and GeneratorExit too: a plugin must not end the host
            _warn_broken(name, distribution, error, "register its combination types")
            manager.unregister(plugin)
            continue
        accepted = []
        for combination in register.registered:
            kept = types.get(combination.name)
            if kept is not None:
                _warn_clash(combination, kept)
                continue
            types[combination.name] = combination
            accepted.append(combination.name)
        plugins[name] = PluginInfo(name, distribution, version, hooks, tuple(accepted))
    _REGISTRY.types, _REGISTRY.plugins = types, plugins


def _load_entry_point(
    manager: pluggy.PluginManager,
    entry_point: Any,
    distribution: str | None,
    version: str | None,
    meta: dict[str, tuple[str | None, str | None]],
) -> None:
    """Import the module of `entry_point` and register it under the entry point's name; warn and skip on failure."""
    name = entry_point.name
    if manager.has_plugin(name) or (name in DEFAULT_PLUGINS and not _is_builtin(entry_point)):
        taken_by = meta.get(name, ("peft-merge-ext", None))[0]
        _warn_broken(
            name, distribution, PluginError(f"the plugin name {name!r} is already taken by {taken_by}"), "load"
        )
        return
    try:
        module = entry_point.load()
        manager.register(module, name=name)
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # SystemExit (`sys.exit()` at import) and GeneratorExit too
        if manager.has_plugin(name):  # pluggy validates before registering; never leave a half-registered plugin
            manager.unregister(name=name)
        _warn_broken(name, distribution, error, "load")
        return
    meta[name] = (distribution, version)


def load_plugins(reload: bool = False) -> pluggy.PluginManager:
    """Load the plugins (once) and build the registry of combination types.

    Args:
        reload (`bool`, *optional*, defaults to `False`): Forget what was loaded and discover the plugins again (for
            example after installing one in the running process, or changing `PEFT_MERGE_EXT_LOAD_PLUGINS`).

    Returns:
        `pluggy.PluginManager`: The plugin manager.
    """
    with _REGISTRY.lock:
        if _REGISTRY.manager is not None and not reload:
            return _REGISTRY.manager
        # Forget the previous state first: a load interrupted (KeyboardInterrupt) must not leave a stale registry
        # behind, so that the next call loads again.
        _REGISTRY.manager, _REGISTRY.types, _REGISTRY.plugins = None, {}, {}
        manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        manager.add_hookspecs(hookspecs)
        only = _plugin_filter()
        meta: dict[str, tuple[str | None, str | None]] = {}
        entry_points = _entry_points()
        unknown = sorted((only or set()) - {entry_point.name for entry_point in entry_points})
        if unknown:
            warnings.warn(
                f"{LOAD_PLUGINS_ENV} names plugin(s) that are not installed: {', '.join(unknown)}. Installed: "
                f"{', '.join(sorted({ep.name for ep in entry_points} - set(DEFAULT_PLUGINS))) or 'none'}.",
                RuntimeWarning,
                stacklevel=3,
            )
        # The built-in plugin first (through its entry point, or directly from a source tree without metadata),
        # then the third-party ones in a deterministic order, so that "the earlier registration wins" is stable.
        for entry_point in entry_points:
            if _is_builtin(entry_point):
                _load_entry_point(manager, entry_point, *_distribution_of(entry_point), meta)
        for name, module_name in DEFAULT_PLUGINS.items():
            if not manager.has_plugin(name):
                manager.register(importlib.import_module(module_name), name=name)
                meta[name] = ("peft-merge-ext", _own_version())
        third_party = [
            (entry_point, *_distribution_of(entry_point))
            for entry_point in entry_points
            if not _is_builtin(entry_point) and (only is None or entry_point.name in only)
        ]
        third_party.sort(key=lambda item: _load_order(item[0], item[1]))
        for entry_point, distribution, version in third_party:
            _load_entry_point(manager, entry_point, distribution, version, meta)
        while True:  # check_pending reports one offending plugin at a time
            try:
                manager.check_pending()
                break
            except pluggy.PluginValidationError as error:
                offender = error.plugin
                offender_name = manager.get_name(offender) or repr(offender)
                _warn_broken(offender_name, meta.get(offender_name, (None, None))[0], error, "validate its hooks")
                manager.unregister(offender)
                meta.pop(offender_name, None)
        _collect(manager, meta)
        _REGISTRY.manager = manager
        return manager


def _own_version() -> str:
    from .._version import __version__

    return __version__


def get_plugin_manager() -> pluggy.PluginManager:
    """The plugin manager, loading plugins on first use."""
    return load_plugins()


def get_combination_types() -> Mapping[str, CombinationType]:
    """The registered combination types, name -> `CombinationType` (read-only)."""
    load_plugins()
    return MappingProxyType(dict(_REGISTRY.types))


def get_plugins() -> list[PluginInfo]:
    """The loaded plugins with their distribution, version, hooks and types."""
    load_plugins()
    return list(_REGISTRY.plugins.values())


def run_hook(name: str, **arguments: Any) -> list[Any]:
    """Call every plugin's implementation of hook `name` (in pluggy's order: the last registered first).

    Unlike calling `get_plugin_manager().hook.<name>(...)` directly, a plugin whose implementation raises (anything
    but `KeyboardInterrupt`, `SystemExit` included) does not break the caller: it gets one `RuntimeWarning` naming it
    and the other implementations still run.

    Args:
        name (`str`): The hook, e.g. `"extend_model_card"`.
        **arguments: The hook's arguments by name; each implementation receives the ones it asks for.

    Returns:
        `list`: The results of the implementations that returned something other than `None`.
    """
    manager = load_plugins()
    results = []
    for impl in reversed(getattr(manager.hook, name).get_hookimpls()):
        try:
            result = impl.function(*[arguments[argument] for argument in impl.argnames])
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # SystemExit and GeneratorExit too: a plugin must not end the host
            info = _REGISTRY.plugins.get(impl.plugin_name)
            _warn_broken(impl.plugin_name, info.distribution if info else None, error, f"run its {name} hook")
            continue
        if result is not None:
            results.append(result)
    return results
