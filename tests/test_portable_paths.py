"""Recorded errors name files relative to the checkout or to site-packages, so a committed record
or report does not point at the machine that produced it."""

import sysconfig
from pathlib import Path

import archbench
from archbench.provenance import portable_paths
from archbench.train.trainer import error_text


def test_checkout_and_library_paths_become_relative() -> None:
    root = Path(archbench.__file__).resolve().parents[1]
    lib = Path(sysconfig.get_paths()["purelib"])
    text = (f'File "{root}/archs/mlp.py", line 3\n'
            f'File "{lib}/torch/nn/functional.py", line 7\n'
            'File "/elsewhere/x.py", line 1')
    assert portable_paths(text) == ('File "archs/mlp.py", line 3\n'
                                    'File "site-packages/torch/nn/functional.py", line 7\n'
                                    'File "/elsewhere/x.py", line 1')


def test_error_text_of_a_failed_run_is_portable() -> None:
    root = Path(archbench.__file__).resolve().parents[1]
    text = error_text(FileNotFoundError(f"{root}/conf/arch/nope.yaml"))
    assert text == "FileNotFoundError: conf/arch/nope.yaml"
