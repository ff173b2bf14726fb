"""YAML merge recipes: a merge written down so it can be reviewed, shared and rerun with `peft-merge-ext run`.

One step:

```yaml
base: org/base-model            # Hub id (already in the HF cache) or local folder
adapters:
  - path: org/adapter-a         # Hub id or local folder
    weight: 0.6
  - path: adapter-b
    weight: 0.4
method: slerp                   # any registered type or one of PEFT's; omit for a single adapter
options: {t: [0.2, 0.8]}        # the method's own options, nothing else
svd_rank: null
dtype: bfloat16                 # optional
merge_into_base: true           # false: write the combined adapter
format: gguf                    # optional: safetensors (default) or gguf (one llama.cpp file)
gguf_type: q8_0                 # with format gguf: f32, f16 (default), bf16 or q8_0
output: merged
push: {repo_id: user/name, private: false}   # optional
```

Several steps (a combined adapter of combined adapters), each reading earlier steps' outputs by their paths:

```yaml
base: org/base-model
steps:
  - {adapters: [{path: x1, weight: 0.6}, {path: x2, weight: 0.4}], method: slerp, merge_into_base: false,
     output: steps/m}
  - {adapters: [{path: steps/m, weight: 1.0}], output: merged}
```

Path rule: every relative local path in a recipe (base, adapters, `output`) is relative to the folder of the recipe
file, wherever the command runs from; absolute paths are used as they are; a name of the form `owner/name` that is
not a local path is a Hub id. Security switches (`allow_pickle`, tokens, `device`) are never read from a recipe: they
come from the command line or the API only. This module only holds and checks recipes; `peft-merge-ext run`
(`cli.recipe_runner`) runs them. The model card of every merge embeds the recipe that reproduces it
(`recipe_from_merge_info`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MergeInputError

__all__ = [
    "AdapterEntry",
    "PushTarget",
    "Recipe",
    "RecipeError",
    "RecipeStep",
    "load_recipe",
    "read_recipe_yaml",
    "recipe_from_merge_info",
]

STEP_FIELDS = (
    "adapters",
    "method",
    "options",
    "svd_rank",
    "dtype",
    "merge_into_base",
    "output",
    "format",
    "gguf_type",
)
_FIELDS = ("base", *STEP_FIELDS, "push")
UNKNOWN_BASE = "PATH/TO/BASE-MODEL"
MAX_RECIPE_BYTES = 1_000_000
MAX_RECIPE_NODES = 100_000  # YAML values a recipe may hold once its aliases are expanded
# Arguments of the merge functions that a recipe's `options` could otherwise reach: refused there.
NOT_OPTIONS = frozenset(
    {
        "allow_pickle",
        "token",
        "device",
        "max_shard_size",
        "overwrite",
        "out",
        "push_to",
        "private",
        "quiet",
        "inputs",
        "base",
        "adapters",
        "weights",
        "dtype",
        "svd_rank",
        "combination_type",
        "merge_into_base",
        "format",
        "gguf_type",
    }
)


class RecipeError(MergeInputError):
    """A recipe field is missing or invalid; the message names the field."""


@dataclass
class AdapterEntry:
    """One adapter of a recipe step: a Hub id or local folder and its weight."""

    path: str
    weight: float = 1.0


@dataclass
class PushTarget:
    """Where to upload the result of the last step."""

    repo_id: str
    private: bool = False


@dataclass
class RecipeStep:
    """One merge of a recipe (see the module docstring for the fields)."""

    adapters: list[AdapterEntry]
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    svd_rank: int | None = None
    dtype: str | None = None
    merge_into_base: bool = True
    output: str = "merged"
    format: str = "safetensors"
    gguf_type: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The step as plain data, in the documented field order (`format` / `gguf_type` only for GGUF)."""
        gguf = {"format": self.format, "gguf_type": self.gguf_type} if self.format != "safetensors" else {}
        return {
            "adapters": [{"path": a.path, "weight": a.weight} for a in self.adapters],
            "method": self.method,
            "options": dict(self.options),
            "svd_rank": self.svd_rank,
            "dtype": self.dtype,
            "merge_into_base": self.merge_into_base,
            "output": self.output,
            **gguf,
        }


@dataclass
class Recipe:
    """A merge recipe: a base, one or more steps, and where to upload the last step's result.

    Args:
        base (`str`): The base model: Hub id or local folder.
        steps (`list[RecipeStep]`): The merges, in order.
        push (`PushTarget`, *optional*): Upload target of the last step's output.
        source_dir (`Path`, *optional*): The folder of the recipe file: relative paths are relative to it.
        fill_in (`list[str]`): Paths a person must provide before running (sources without a Hub id).
    """

    base: str
    steps: list[RecipeStep]
    push: PushTarget | None = None
    source_dir: Path | None = field(default=None, repr=False, compare=False)
    fill_in: list[str] = field(default_factory=list, compare=False)

    @property
    def final(self) -> RecipeStep:
        """The last step."""
        return self.steps[-1]

    @property
    def adapters(self) -> list[AdapterEntry]:
        """The adapters of the last step."""
        return self.final.adapters

    @property
    def method(self) -> str | None:
        """The method of the last step."""
        return self.final.method

    @property
    def output(self) -> str:
        """The output of the last step."""
        return self.final.output

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data: the one-step form when it has one step, else `base` + `steps`."""
        data: dict[str, Any] = {"base": self.base}
        if len(self.steps) == 1:
            data.update(self.final.to_dict())
        else:
            data["steps"] = [step.to_dict() for step in self.steps]
        if self.push is not None:
            data["push"] = {"repo_id": self.push.repo_id, "private": self.push.private}
        return data

    def to_yaml(self) -> str:
        """The recipe as YAML that `load_recipe` reads back to an equal `Recipe`."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def resolve_path(self, path: str) -> str:
        """Where a recipe path points: a Hub id as is, an absolute path as is, a relative path under `source_dir`."""
        from .checkpoint.side_files import hub_id_of

        candidate = Path(path).expanduser()
        if candidate.is_absolute():
            return str(candidate)
        local = (self.source_dir / candidate) if self.source_dir is not None else candidate
        if not local.exists() and hub_id_of(path) is not None:
            return path
        return str(local)


def _quote(value: Any) -> str:
    from .engine.request import short_repr

    return short_repr(value, 80)


def _fail(field_name: str, problem: str) -> RecipeError:
    return RecipeError(f"Recipe field {field_name!r} {problem}")


def _string(value: Any, field_name: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _fail(field_name, f"must be a non-empty string, got {_quote(value)}.")
    return value


def _number(value: Any, field_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(field_name, f"must be a finite number, got {_quote(value)}.")
    return float(value)


def _parse_step(data: Any, where: str) -> RecipeStep:
    if not isinstance(data, dict):
        raise _fail(where, f"must be a mapping with the fields {', '.join(STEP_FIELDS)}; got {_quote(data)}.")
    unknown = sorted(str(key) for key in set(data) - set(STEP_FIELDS))
    if unknown:
        raise _fail(f"{where}{unknown[0]}", f"is not a step field; the fields are: {', '.join(STEP_FIELDS)}.")
    adapters_data = data.get("adapters")
    if not isinstance(adapters_data, list) or not adapters_data:
        raise _fail(f"{where}adapters", f"must be a non-empty list of {{path, weight}}, got {_quote(adapters_data)}.")
    adapters = []
    for position, entry in enumerate(adapters_data):
        name = f"{where}adapters[{position}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise _fail(name, f"must be a mapping with 'path' and 'weight', got {_quote(entry)}.")
        extra = sorted(str(key) for key in set(entry) - {"path", "weight"})
        if extra:
            raise _fail(f"{name}.{extra[0]}", "is not an adapter field; use 'path' and 'weight'.")
        path = _string(entry.get("path"), f"{name}.path")
        adapters.append(AdapterEntry(path, _number(entry.get("weight", 1.0), f"{name}.weight")))
    paths = [a.path for a in adapters]
    if len(set(paths)) != len(paths):
        raise _fail(f"{where}adapters", "lists an adapter more than once; give each adapter once with its weight.")
    method = _string(data.get("method"), f"{where}method", optional=True)
    options = data.get("options") or {}
    if not isinstance(options, dict) or not all(isinstance(key, str) for key in options):
        raise _fail(f"{where}options", f"must be a mapping of the method's options, got {_quote(options)}.")
    smuggled = sorted(set(options) & NOT_OPTIONS)
    if smuggled:
        raise _fail(
            f"{where}options.{smuggled[0]}",
            "is not an option of a combination type. Switches such as allow_pickle, token and device are given on "
            "the command line (or to the API) only, never by a recipe.",
        )
    if options and method is None:
        raise _fail(f"{where}options", "needs a 'method' to apply to.")
    svd_rank = data.get("svd_rank")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise _fail(f"{where}svd_rank", f"must be a positive integer or null, got {_quote(svd_rank)}.")
    dtype = _string(data.get("dtype"), f"{where}dtype", optional=True)
    if dtype is not None:
        from .checkpoint.side_files import parse_dtype

        try:
            parse_dtype(dtype)
        except MergeInputError as error:
            raise _fail(f"{where}dtype", str(error)) from None
    merge_into_base = data.get("merge_into_base", True)
    if not isinstance(merge_into_base, bool):
        raise _fail(f"{where}merge_into_base", f"must be true or false, got {_quote(merge_into_base)}.")
    output = _string(data.get("output", "merged"), f"{where}output")
    if len(adapters) > 1 and method is None:
        raise _fail(f"{where}method", f"is required to combine {len(adapters)} adapters (e.g. weighted, slerp).")
    output_format = _string(data.get("format"), f"{where}format", optional=True)
    gguf_type = _string(data.get("gguf_type"), f"{where}gguf_type", optional=True)
    from .gguf_output.options import parse_output_format

    try:
        chosen = parse_output_format(output_format, gguf_type)
    except MergeInputError as error:
        raise _fail(f"{where}format" if gguf_type is None else f"{where}gguf_type", str(error)) from None
    return RecipeStep(
        adapters, method, dict(options), svd_rank, dtype, merge_into_base, output, chosen.name, chosen.gguf_type
    )


def _parse(data: Any, source_dir: Path | None) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"A recipe must be a YAML mapping with the fields {', '.join(_FIELDS)}; got {_quote(data)}.")
    if "base" not in data:
        raise _fail("base", "is required (a Hub id or a local folder).")
    base = _string(data["base"], "base")
    if "steps" in data:
        unknown = sorted(str(key) for key in set(data) - {"base", "steps", "push"})
        if unknown:
            raise _fail(unknown[0], "goes inside a step when a recipe has 'steps' (top level: base, steps, push).")
        if not isinstance(data["steps"], list) or not data["steps"]:
            raise _fail("steps", f"must be a non-empty list of steps, got {_quote(data['steps'])}.")
        steps = [_parse_step(step, f"steps[{index}].") for index, step in enumerate(data["steps"])]
    else:
        unknown = sorted(str(key) for key in set(data) - set(_FIELDS))
        if unknown:
            raise _fail(unknown[0], f"is not a recipe field; the fields are: {', '.join(_FIELDS)} (or steps).")
        steps = [_parse_step({key: value for key, value in data.items() if key in STEP_FIELDS}, "")]
    outputs = [step.output for step in steps]
    if len(set(outputs)) != len(outputs):
        raise _fail("output", "is the same for two steps; give each step its own output folder.")
    for index, step in enumerate(steps[:-1]):
        if step.format == "gguf":
            raise _fail(
                f"steps[{index}].format",
                "is gguf, which later steps cannot read; only the last step may write GGUF (the others write the "
                "safetensors folders the next steps read).",
            )
    push = data.get("push")
    if push is not None:
        if isinstance(push, str):
            push = {"repo_id": push}
        if not isinstance(push, dict):
            raise _fail("push", f"must be a mapping {{repo_id, private}}, got {_quote(push)}.")
        extra = sorted(str(key) for key in set(push) - {"repo_id", "private"})
        if extra:
            raise _fail(f"push.{extra[0]}", "is not a push field; use 'repo_id' and 'private'.")
        private = push.get("private", False)
        if not isinstance(private, bool):
            raise _fail("push.private", f"must be true or false, got {_quote(private)}.")
        push = PushTarget(_string(push.get("repo_id"), "push.repo_id"), private)
    return Recipe(base, steps, push, source_dir)


def _check_yaml(text: str, where: str = "The recipe") -> None:
    """Refuse recipes that are too large or whose aliases expand without bound (a few hundred bytes of nested
    aliases describe billions of values), before anything is built from them."""
    import yaml

    if len(text.encode("utf-8", "replace")) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{where} is over {MAX_RECIPE_BYTES} bytes; a recipe is a few lines of YAML.")
    sizes: dict[str, int] = {}  # anchor -> values it expands to
    open_nodes: list[list[Any]] = []  # [anchor, values so far] of each collection being read
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.CollectionStartEvent):
                open_nodes.append([event.anchor, 1])
                continue
            if isinstance(event, yaml.CollectionEndEvent):
                anchor, size = open_nodes.pop()
            elif isinstance(event, yaml.AliasEvent):
                anchor, size = None, sizes.get(event.anchor, 1)
            elif isinstance(event, yaml.ScalarEvent):
                anchor, size = event.anchor, 1
            else:
                continue
            if anchor:
                sizes[anchor] = size
            if open_nodes:
                open_nodes[-1][1] += size
                size = open_nodes[-1][1]
            if size > MAX_RECIPE_NODES:
                raise RecipeError(
                    f"{where} expands to more than {MAX_RECIPE_NODES} values through YAML aliases (*name); a recipe "
                    "is a few lines: write the values out instead."
                )
    except yaml.YAMLError as error:
        raise RecipeError(f"The recipe is not valid YAML: {' '.join(str(error).split())[:300]}") from None


def load_recipe(path_or_text: str | Path) -> Recipe:
    """Read a recipe from a YAML file or from YAML text.

    Raises:
        `RecipeError` (a `MergeInputError`): For invalid YAML or any invalid field; the message names the field.
    """
    return _parse(*read_recipe_yaml(path_or_text))


def read_recipe_yaml(path_or_text: str | Path) -> tuple[Any, Path | None]:
    """The YAML data of a recipe file (or text), checked for size and alias expansion, and the file's folder (`None`
    for text). Shared by `load_recipe` and the mergekit configuration reader.

    Raises:
        `RecipeError`: For a missing, oversized, non-UTF-8 or invalid YAML file.
    """
    import yaml

    source_dir = None
    text = str(path_or_text)
    path = Path(text).expanduser()
    is_file = isinstance(path_or_text, Path) or ("\n" not in text and text.endswith((".yaml", ".yml")))
    if is_file:
        if not path.is_file():
            raise RecipeError(f"Recipe file {text} does not exist.")
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"Recipe file {path.name} is over {MAX_RECIPE_BYTES} bytes; a recipe is a few lines.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RecipeError(f"Recipe file {path.name} is not UTF-8 text.") from None
        source_dir = path.absolute().parent
    _check_yaml(text, f"Recipe file {path.name}" if is_file else "The recipe")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RecipeError(f"The recipe is not valid YAML: {' '.join(str(error).split())[:300]}") from None
    return data, source_dir


def recipe_from_merge_info(info: Any, output: str = "merged") -> Recipe:
    """The recipe that reproduces a merge described by a `MergeInfo`, with one step per combined adapter in its
    lineage that has no Hub id (rebuilt into `steps/<name>`), then the merge itself.

    Sources are named by their Hub id when known; others by their name, a path relative to the recipe file that a
    person fills in (listed in `Recipe.fill_in`). A base known only as a local folder is written as
    `PATH/TO/BASE-MODEL`.
    """
    steps: list[RecipeStep] = []
    fill_in: list[str] = []
    used_outputs: set[str] = {output}

    from .checkpoint.side_files import hub_id_of, public_name

    def path_of(adapter: Any) -> str:
        hub_id = adapter.hub_id or hub_id_of(adapter.source)
        if hub_id:
            return hub_id
        if adapter.lineage is not None:
            name = f"steps/{adapter.name}"
            while name in used_outputs:
                name += "_"
            used_outputs.add(name)
            add_step(adapter.lineage.sources, adapter.lineage, name, merge_into_base=False, dtype=None)
            return name
        name = public_name(adapter.source) or adapter.name
        if name not in fill_in:
            fill_in.append(name)
        return name

    def add_step(
        sources: Any, how: Any, out: str, merge_into_base: bool, dtype: str | None, written: Any = None
    ) -> None:
        entries = [AdapterEntry(path_of(source), float(source.weight)) for source in sources]
        method = how.method if getattr(how, "method", None) not in ("none", "") else None
        step = RecipeStep(entries, method, dict(how.options or {}), how.svd_rank, dtype, merge_into_base, out)
        if getattr(written, "output_format", "safetensors") != "safetensors":
            step.format, step.gguf_type = written.output_format, written.gguf_type
        steps.append(step)

    class _Final:
        method = info.combination_type
        options = info.options
        svd_rank = info.svd_rank

    add_step(
        info.adapters, _Final, output, bool(info.merge_into_base), info.dtype if info.merge_into_base else None, info
    )
    return Recipe(base=info.base_model or UNKNOWN_BASE, steps=steps, fill_in=fill_in)
