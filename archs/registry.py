"""The registry of layer components: every mixer and every MLP kind declares itself here, once.

A component is a `Sublayer` class plus what the rest of archbench must know about it without
naming it: the name written in `arch.pattern.mixers` / `arch.pattern.mlps`, the config dataclass
that becomes `arch.<config_key>` in the Hydra schema, the allowed `kernels=` choices, its value
checks, the width step it needs from the size solver, whether the shell must add learned absolute
positions for it, and how to export it to Hugging Face where that exists. Decoding state and FLOP
accounting are methods of the class itself (`archs/base.py`).

Declaring a mixer (the whole of it; nothing else in the code names it):

    @dataclass
    class FooConfig:
        d_state: int = 16
        kernels: str = "auto"

    def _check(arch) -> None:                 # runs before any work, when the pattern uses foo
        require_positive("arch.foo.d_state", arch.foo.d_state)

    @register_mixer("foo", config=FooConfig, kernels=("auto", "torch"), validate=_check,
                    width_divisor=lambda arch: arch.foo.head_dim)
    class Foo(Sublayer):
        def __init__(self, arch, layer_idx): ...

Every module of the `archbench.archs` package is imported once, the first time the registry is
read (`discover`), so a new file is found without editing a list. A module must therefore import
its optional dependencies inside functions, and must not read the registry while it is imported.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any

ROLES = ("mixer", "mlp")
NO_MLP = "none"  # the pattern's name for a block without an MLP half; never a component


@dataclass(frozen=True)
class Component:
    """What one registered mixer or MLP kind declares. See the module docstring for an example.

    `learned_positions(arch)` returns how many rows of learned absolute positions the shell must
    add to the embedding for this component (0: none), and `position_key` names the setting that
    fixes that number, for error messages. `hf` maps a Hugging Face family name ("llama",
    "mamba", "jamba", ...; archs/hf_layout.py) to this component's `HFPart` in that class: the
    sub-module it lives under and how its tensors convert, both ways.
    """

    name: str
    role: str
    cls: type
    config: type | None = None
    config_key: str = ""
    kernels: tuple[str, ...] = ()
    validate: Callable[[Any], None] | None = None
    width_divisor: Callable[[Any], int] | None = None
    learned_positions: Callable[[Any], int] | None = None
    position_key: str = ""
    hf: dict[str, Any] = field(default_factory=dict)

    def build(self, arch: Any, layer_idx: int) -> Any:
        return self.cls(arch, layer_idx)


_COMPONENTS: dict[str, dict[str, Component]] = {role: {} for role in ROLES}
_EMBED_INITS: dict[str, EmbedInit] = {}
_discovered = False


def _register(role: str, name: str, cls: type, **declared: Any) -> type:
    if name == NO_MLP or not name.isidentifier():
        raise ValueError(f"cannot register a {role} named {name!r}: names are identifiers, "
                         f"and {NO_MLP!r} is reserved")
    taken = _COMPONENTS[role].get(name)
    if taken is not None and taken.cls is not cls:
        raise ValueError(f"{role} {name!r} is registered twice ({taken.cls.__module__}."
                         f"{taken.cls.__qualname__} and {cls.__module__}.{cls.__qualname__})")
    config_key = declared.pop("config_key", None) or name
    kernels = tuple(declared.pop("kernels", ()))
    if kernels and (declared.get("config") is None or "kernels" not in
                    {f.name for f in fields(declared["config"])}):
        raise ValueError(f"{role} {name!r} declares kernels {kernels} but its config has no "
                         "`kernels` field")
    _COMPONENTS[role][name] = Component(name=name, role=role, cls=cls, config_key=config_key,
                                        kernels=kernels, **declared)
    return cls


def register_mixer(name: str, **declared: Any) -> Callable[[type], type]:
    """Class decorator declaring a mixer; keyword arguments are `Component` fields."""
    return lambda cls: _register("mixer", name, cls, **declared)


def register_mlp(name: str, **declared: Any) -> Callable[[type], type]:
    """Class decorator declaring an MLP kind (the second half of a block)."""
    return lambda cls: _register("mlp", name, cls, **declared)


@dataclass(frozen=True)
class EmbedInit:
    """An `arch.embed_init` scheme: `embed(weight, arch)` initialises the token embedding,
    `head(weight, arch)` the LM head when it is not tied to the embedding."""

    embed: Callable[[Any, Any], None]
    head: Callable[[Any, Any], None]


def register_embed_init(name: str, embed: Callable[[Any, Any], None],
                        head: Callable[[Any, Any], None]) -> None:
    """Declare an `arch.embed_init` scheme (the shell calls embed, then head if untied)."""
    _EMBED_INITS[name] = EmbedInit(embed, head)


def discover() -> None:
    """Import every module of archbench.archs once, so each one's declarations have run.

    A module that fails to import is an error here, not a backbone silently missing from the
    schema (which would surface later as a confusing unknown-key error)."""
    global _discovered
    if _discovered:
        return
    import archbench.archs as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.ispkg or info.name.startswith("_"):
            continue
        importlib.import_module(f"{package.__name__}.{info.name}")
    _discovered = True


def components(role: str) -> dict[str, Component]:
    """The registered components of `role` ('mixer' or 'mlp'), by name, in discovery order."""
    discover()
    return dict(_COMPONENTS[role])


def mixer_names() -> tuple[str, ...]:
    return tuple(components("mixer"))


def mlp_names() -> tuple[str, ...]:
    """Names allowed in arch.pattern.mlps: every registered MLP kind, and 'none'."""
    return (NO_MLP, *components("mlp"))


def get(role: str, name: str) -> Component:
    found = components(role).get(name)
    if found is None:
        allowed = mixer_names() if role == "mixer" else mlp_names()
        raise KeyError(f"no {role} named {name!r}; registered: {list(allowed)}")
    return found


def embed_inits() -> dict[str, EmbedInit]:
    discover()
    return dict(_EMBED_INITS)


def all_components() -> list[Component]:
    return [c for role in ROLES for c in components(role).values()]


_SCHEMA: dict[str, type] = {}


def arch_schema(shell: type) -> type:
    """`shell` (the shell's own settings) plus one field per component config, as one dataclass.

    This is the `arch` node of the Hydra schema: `arch.mamba.d_state=8` is typed, and a typo in a
    key fails at compose time, for a mixer added as one new file exactly as for the others."""
    if "arch" not in _SCHEMA:
        owned: list[tuple[str, type, Any]] = []
        for comp in all_components():
            if comp.config is None or comp.config_key in {name for name, _, _ in owned}:
                continue
            owned.append((comp.config_key, comp.config, field(default_factory=comp.config)))
        clash = {name for name, _, _ in owned} & {f.name for f in fields(shell)}
        if clash:
            raise ValueError(f"component config keys {sorted(clash)} clash with shell settings")
        _SCHEMA["arch"] = make_dataclass("ArchConfig", owned, bases=(shell,),
                                         namespace={"__module__": "archbench.config"})
    return _SCHEMA["arch"]
