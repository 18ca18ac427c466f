"""Command-line misuse: typo'd keys added with `+`, and a --help a person can read."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_config
from omegaconf import OmegaConf

from archbench.config import ConfigError
from archbench.config_keys import check_known_keys

ARCHBENCH = str(Path(sys.executable).with_name("archbench"))


@pytest.mark.parametrize(("override", "message"), [
    ("+train.lrr=1e-3", "train.lrr is not a key of the configuration.*did you mean train.lr?"),
    ("+arch.attention.head_dimm=8", "did you mean arch.attention.head_dim?"),
    ("+colour=red", "colour is not a key.*the keys of the root are"),
])
def test_a_key_added_with_plus_must_exist(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_known_keys(make_config(override))


def test_free_form_maps_take_new_keys() -> None:
    cfg = make_config("+eval.grid.passkey.depth=[0,1]", "+eval.task_params.n_keys=4",
                      "+data.task.params.n_pairs=8",
                      "+compare.arch_overrides.mamba=['arch.mamba.d_state=8']")
    check_known_keys(cfg)
    assert list(cfg.eval.grid.passkey.depth) == [0, 1]


@pytest.mark.parametrize("experiment", ["compare", "compare_gpu", "mqar", "mad"])
def test_shipped_experiments_hold_only_known_keys(experiment: str) -> None:
    check_known_keys(make_config(f"+experiment={experiment}"))


def test_help_lists_groups_and_common_keys_that_all_exist() -> None:
    out = subprocess.run([ARCHBENCH, "train", "--help"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) < 60  # was a 245-line dump of the resolved config
    assert any(re.match(r"arch: .*mamba.*transformer", line) for line in lines)
    assert any(line.startswith("size: ") and "micro" in line for line in lines)
    keys = re.findall(r"^([a-z_]+(?:\.[a-z_0-9]+)*)\s{2,}\S", out.stdout, flags=re.M)
    assert len(keys) >= 20
    cfg = make_config()
    for key in keys:
        assert OmegaConf.select(cfg, key, default="<absent>") != "<absent>", key
