"""The run config: one YAML file, validated here before any model is loaded.

The schema is composed, not written out: the run-level sections of :mod:`kdistill.settings`, plus
the section of every registered method (``on_policy:``, ``zephyr:``, ...; see
:mod:`kdistill.methods`). What a method needs and which defaults it changes are asked of the
method registry, so a new method adds its section and its rules by registering itself.

Load with :func:`load_config` (YAML file + ``--set a.b=c`` overrides). Every problem is one
:class:`~kdistill.errors.ConfigError` line that names the key and what was expected.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from kdistill.errors import ConfigError
from kdistill.methods import method_class, method_names, method_sections, registry_version
from kdistill.teachers import kind_names
from kdistill.settings import (  # noqa: F401  (re-exported: the sections users and tests name)
    CacheConfig,
    CurriculumConfig,
    DataConfig,
    EvalConfig,
    FeaturesConfig,
    FiltersConfig,
    GenerateConfig,
    JudgeConfig,
    LossConfig,
    RunConfig,
    Section,
    StudentConfig,
    TeacherApiConfig,
    TeacherConfig,
    TrainConfig,
    VllmConfig,
)


class _MethodRules(RunConfig):
    """Run-level checks that depend on the chosen method, answered by the method's class."""

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        names = method_names()
        if v not in names:
            hint = difflib.get_close_matches(v, names, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(f"unknown method {v!r}{extra}; expected one of {', '.join(names)}")
        return v

    @model_validator(mode="after")
    def _method_rules(self) -> "_MethodRules":
        m = method_class(self.method)
        for key, value in m.loss_defaults.items():  # e.g. GKD's jsd for on_policy, unless set in loss:
            if key not in self.loss.model_fields_set:
                setattr(self.loss, key, value)
        single = ", ".join(n for n in method_names() if method_class(n).single_pass)
        if self.curriculum.by != "none" and not m.single_pass:
            raise ValueError(f"curriculum: applies to the single-pass methods ({single}); method "
                             f"{self.method} builds its own training data per stage")
        if self.eval.every is not None and not m.single_pass:
            raise ValueError(f"eval.every: applies to the single-pass methods ({single}); method "
                             f"{self.method} trains in several passes and reports each pass's figures itself")
        if self.features.weight > 0 and not m.uses_features:
            users = ", ".join(n for n in method_names() if method_class(n).uses_features)
            raise ValueError(f"features: feature distillation is a term of the logit loss (methods {users}); "
                             f"method {self.method} does not use it")
        for i, t in enumerate(self.teachers or [self.teacher]):
            if t.kind is not None and t.kind not in kind_names():
                key = f"teachers[{i}]" if self.teachers else "teacher"
                hint = difflib.get_close_matches(t.kind, kind_names(), n=1)
                raise ValueError(f"{key}.kind: unknown teacher kind {t.kind!r}" + (f" (did you mean {hint[0]!r}?)" if hint
                                 else "") + f"; registered: {', '.join(kind_names())}")
        m.check_config(self)
        return self


_SCHEMA: dict = {}


def schema() -> type[RunConfig]:
    """The config model: the run-level sections plus every registered method's section."""
    version = registry_version()
    if _SCHEMA.get("version") != version:
        fields = {name: (cls, Field(default_factory=cls)) for name, cls in method_sections().items()}
        _SCHEMA["model"] = create_model("Config", __base__=_MethodRules, **fields)
        _SCHEMA["version"] = version
    return _SCHEMA["model"]


Config = RunConfig  # the type to annotate with; instances come from schema()


# ---------------------------------------------------------------------------------------------
# loading


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML where a key given twice in one mapping is an error, not "the last one wins"."""


def _mapping(loader: _StrictLoader, node, deep: bool = False):
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"{{where}}:{key_node.start_mark.line + 1}: key {key!r} is given twice in one mapping "
                              f"(first at line {seen[key]}); keep one")
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _self_reference(value, path: str = "", stack: Optional[set] = None) -> Optional[str]:
    """The key path where a YAML anchor contains itself (``a: &x [*x]``), or None."""
    stack = stack or set()
    if isinstance(value, (dict, list)):
        if id(value) in stack:
            return path or "(top level)"
        stack = stack | {id(value)}
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in items:
            found = _self_reference(v, f"{path}.{k}" if path else str(k), stack)
            if found:
                return found
    return None


def read_yaml(path: Path):
    """A YAML file as Python values; every problem is one ConfigError line naming the file (and line).

    A UTF-8 byte-order mark is dropped; invalid UTF-8, a key given twice and an anchor that contains
    itself are errors.
    """
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (byte {raw[exc.start]:#04x}); save the file as UTF-8") from None
    try:
        loaded = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("{where}", str(path))) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    loop = _self_reference(loaded)
    if loop is not None:
        raise ConfigError(f"{path}: {loop}: a YAML anchor refers to itself (a loop); write the value out")
    return loaded


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=c`` overrides (values parsed as YAML scalars) to a nested dict, in place."""
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {} if node.get(part) is None else node[part]
                if not isinstance(node[part], dict):
                    raise ConfigError(f"--set {item!r}: {part!r} is not a section")
            node = node[part]
        node[path[-1]] = value
    return data


def _allowed_keys(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    """Walk the schema along ``loc`` (minus its last part) and list the keys allowed there."""
    cls: Any = model_cls
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        for cand in getattr(ann, "__args__", (ann,)):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                cls = cand
                break
            for inner in getattr(cand, "__args__", ()):  # Optional[list[Section]]
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    cls = inner
                    break
            else:
                continue
            break
        else:
            return []
    return [f.alias or name for name, f in getattr(cls, "model_fields", {}).items()]


def format_validation_error(err: ValidationError, source: str, model: Optional[type[BaseModel]] = None) -> str:
    """One line naming the key and what was expected."""
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    # Union/Literal validators append the branch type to loc ("list[int]", "literal[...]"); drop those.
    loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "bool"))))
    key = ".".join(str(p) for p in loc)
    msg = e["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if e["type"] == "extra_forbidden":
        allowed = _allowed_keys(model or schema(), loc)
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        did = f"did you mean {hint[0]!r}? " if hint else ""
        msg = f"unknown key; {did}allowed here: {', '.join(allowed)}"
    elif e["type"] == "missing":
        msg = "required key is missing"
    elif "input" in e and e["type"] not in ("value_error", "assertion_error"):
        msg = f"{msg} (got {e['input']!r})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {key}: {msg}{more}" if key else f"{source}: {msg}{more}"  # a whole-config rule names its keys


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None, base: Optional[dict] = None):
    """Read a YAML config (or start from ``base``), apply overrides, validate against :func:`schema`.

    Raises :class:`ConfigError` with a one-line message on any problem.
    """
    data: dict = dict(base or {})
    source = "config"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: config file not found")
        loaded = read_yaml(p)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
        data.update(loaded)
    apply_overrides(data, overrides or [])
    model = schema()
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, model)) from None


def check_paths(cfg, need_train: bool = True) -> None:
    """Fail early, before any model loads, on files that do not exist."""
    checks = []
    if cfg.data.tasks is not None:
        for i, t in enumerate(cfg.data.tasks):
            checks.append((f"data.tasks[{i}].train", t.train))
            if t.eval is not None:
                checks.append((f"data.tasks[{i}].eval", t.eval))
    elif cfg.data.train is not None:
        checks.append(("data.train", cfg.data.train))
    elif need_train:
        raise ConfigError("data.train: required key is missing (a JSONL file of prompt/response rows)")
    if cfg.data.eval is not None:
        checks.append(("data.eval", cfg.data.eval))
    for key, value in checks:
        if not Path(value).is_file():
            raise ConfigError(f"{key}: file not found: {value}")
    for key, value in (("teacher.model", cfg.teacher.model), ("student.model", cfg.student.model if cfg.student else None)):
        if value is None or value == "demo":
            continue
        if _looks_local(value) and not Path(value).exists():
            raise ConfigError(f"{key}: not found: {value}")


def _looks_local(value: str) -> bool:
    return (
        value.startswith((".", "/", "~"))
        or value.endswith(".gguf")
        or os.sep in value.strip("/") and value.count("/") != 1
    )


def dump_config(cfg) -> str:
    """The resolved config (every default filled in) as YAML."""
    return yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)
