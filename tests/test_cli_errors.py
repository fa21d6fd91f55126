"""A verb that fails on its input says so in one line (exit 2); output piped into ``head`` ends quietly."""
import os
import subprocess
import sys

import pytest

from cli.main import main
from conftest import clustered
from memory import write_memory

VISMEM = os.path.join(os.path.dirname(sys.executable), "vismem")


def test_stdout_closed_early_ends_without_a_traceback(tmp_path):
    x, labels = clustered(40, 8, 2, seed=9)
    write_memory(str(tmp_path / "m"), x, labels, [f"m{i}" for i in range(40)], num_shards=2, class_names=["a", "b"])
    # The reader is gone before vismem writes a byte, as with `vismem info M | head -1` on a long output.
    proc = subprocess.Popen([VISMEM, "info", str(tmp_path / "m")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) in (0, 141), err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    res = subprocess.run(f"'{VISMEM}' info '{tmp_path / 'm'}' | head -1", shell=True, capture_output=True, text=True,
                         timeout=300)
    assert res.stdout == "{\n" and "Traceback" not in res.stderr, res.stderr


@pytest.mark.parametrize("error", [ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError])
def test_input_errors_are_one_line_and_exit_2(error, monkeypatch, capsys):
    def fails(path, version=None):
        raise error(f"cannot use {path}")

    monkeypatch.setattr("memory.info.memory_info", fails)
    assert main(["info", "somewhere"]) == 2
    assert capsys.readouterr().err == "vismem info: error: cannot use somewhere\n"


def test_a_folder_where_a_file_belongs_is_one_line(tmp_path, capsys):
    x, labels = clustered(20, 8, 2, seed=10)
    write_memory(str(tmp_path / "m"), x, labels, [f"m{i}" for i in range(20)], class_names=["a", "b"])
    (tmp_path / "ids").mkdir()
    assert main(["remove", str(tmp_path / "m"), "--ids", str(tmp_path / "ids")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vismem remove: error: ") and err.count("\n") == 1 and "Is a directory" in err, err
