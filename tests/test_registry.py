"""The component registry and the schema composed from it: each registered config is an `arch`
section with typo detection, kernel choices are per component, and checks run before any work."""

from __future__ import annotations

from dataclasses import dataclass, fields

import pytest
from conftest import make_config
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from archbench.archs import registry
from archbench.archs.base import Sublayer
from archbench.archs.model import LanguageModel, arch_config
from archbench.config import ConfigError, arch_schema, validate


def test_every_component_config_is_an_arch_section_with_its_defaults() -> None:
    schema = OmegaConf.structured(arch_schema())
    for comp in registry.all_components():
        if comp.config is None:
            continue
        section = schema[comp.config_key]
        for f in fields(comp.config):
            assert f.name in section, f"arch.{comp.config_key}.{f.name} missing from the schema"
    assert "rwkv_cmix" in registry.mlp_names() and registry.NO_MLP in registry.mlp_names()


def test_a_typo_in_a_component_section_fails_at_compose() -> None:
    with pytest.raises(ConfigCompositionException, match=r"override 'arch.mamba.d_staet'"):
        make_config("arch=mamba", "arch.mamba.d_staet=8")
    assert make_config("arch=mamba", "arch.mamba.d_state=8").arch.mamba.d_state == 8


@pytest.mark.parametrize("override,message", [
    ("arch.attention.kernels=triton", "arch.attention.kernels='triton' is not allowed"),
    ("arch.rwkv7.kernels=cuda", "arch.rwkv7.kernels='cuda' is not allowed"),
    ("arch.moe.kernels=cuda", "arch.moe.kernels='cuda' is not allowed"),
])
def test_kernel_choices_are_per_component_and_checked_even_when_unused(
        override: str, message: str) -> None:
    cfg = make_config("arch=transformer", override)  # none of these but attention is used
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_a_components_checks_run_when_the_pattern_uses_it() -> None:
    arch = {"d_model": 48, "n_layers": 1, "pattern": {"mixers": ["attention"], "mlps": ["dense"]},
            "attention": {"head_dim": 16}, "rwkv7": {"head_size": 32}}
    arch_config(arch)  # rwkv7's head size does not divide 48, but no layer is RWKV-7
    with pytest.raises(ConfigError, match=r"arch.d_model=48 .* arch.rwkv7.head_size=32"):
        arch_config({**arch, "pattern": {"mixers": ["rwkv7"], "mlps": ["rwkv_cmix"]}})
    with pytest.raises(ConfigError, match="arch.mlp.kind='rwkv_cmix' is not allowed"):
        arch_config({**arch, "mlp": {"kind": "rwkv_cmix"}})  # a pattern name, not a dense kind


def test_unknown_names_list_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match=r"arch.pattern.mixers='mambo'.*'mamba'"):
        arch_config({"pattern": {"mixers": ["mambo"]}})
    with pytest.raises(ConfigError, match=r"arch.embed_init='rwkv8'.*'normal'"):
        arch_config({"embed_init": "rwkv8"})


def test_a_name_is_registered_once() -> None:
    @dataclass
    class Other:
        kernels: str = "auto"

    class Impostor(Sublayer):
        pass

    with pytest.raises(ValueError, match="registered twice"):
        registry.register_mixer("attention", config=Other, kernels=("auto", "torch"))(Impostor)
    with pytest.raises(ValueError, match="reserved"):
        registry.register_mlp("none")(Impostor)
    assert registry.get("mixer", "attention").cls is not Impostor


def test_learned_positions_are_asked_for_by_the_mixer() -> None:
    arch = {"d_model": 32, "n_layers": 1, "attention": {"head_dim": 16, "position": "learned",
                                                         "max_position": 40}}
    model = LanguageModel(arch, 11)
    assert model.pos_embed is not None and model.pos_embed.num_embeddings == 40
    assert model.position_key == "arch.attention.max_position"
    rope = LanguageModel({**arch, "attention": {"head_dim": 16}}, 11)
    assert rope.pos_embed is None
