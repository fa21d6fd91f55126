"""The contracts of .importlinter (layers, no cycles): kept by the tree, broken, with the import named, by a violation."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("memory", "pipelines", "eval", "deploy", "demo", "cli")
LINT = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def lint(cwd):
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def tree_copy(tmp_path):
    """The packages and the contract file, copied: a violation is planted in the copy, never in the tree."""
    for pkg in PACKAGES:
        shutil.copytree(os.path.join(ROOT, pkg), tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, ".importlinter"), tmp_path / ".importlinter")
    return tmp_path


def test_the_tree_keeps_its_layers(tree_copy):
    res = lint(tree_copy)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 kept, 0 broken" in res.stdout


@pytest.mark.parametrize("where, planted, named", [
    # memory is the bottom layer: importing pipelines, even inside a function, is upward.
    ("memory/storage.py", "def _planted():\n    from pipelines import embed\n", "memory.storage -> pipelines.embed"),
    # pipelines and eval are siblings: neither may know the other.
    ("eval/metrics.py", "from pipelines import sources\n", "eval.metrics -> pipelines.sources"),
    # an application never imports the command line.
    ("deploy/submit.py", "def _planted():\n    import cli.main\n", "deploy.submit -> cli.main"),
])
def test_an_upward_import_breaks_the_contract_and_is_named(tree_copy, where, planted, named):
    with open(tree_copy / where, "a") as f:
        f.write("\n\n" + planted)
    res = lint(tree_copy)
    assert res.returncode != 0
    assert "1 broken" in res.stdout
    assert named in res.stdout, res.stdout


def test_a_cycle_between_modules_breaks_the_contract(tree_copy):
    # cli.main imports every verb module; a verb module importing cli.main back closes a cycle.
    with open(tree_copy / "cli/deploy.py", "a") as f:
        f.write("\n\ndef _planted():\n    from cli.main import build_parser\n")
    res = lint(tree_copy)
    assert res.returncode != 0
    assert "No import cycles between the modules of any package BROKEN" in res.stdout, res.stdout
    assert "No cycles are allowed in cli" in res.stdout and ".main -> .deploy" in res.stdout
