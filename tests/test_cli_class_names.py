"""``--class-names`` means one thing for build, add and experiment: ``a,b,c`` or a file (text or JSON)."""
import json
import os
import subprocess
import sys

import pytest

from cli.common import class_names
from cli.main import main
from conftest import clustered
from memory import manifest as mf
from memory import schema

VISMEM = os.path.join(os.path.dirname(sys.executable), "vismem")
NAMES = ["T-shirt/top", "Trouser", "Pullover"]


@pytest.fixture
def files(tmp_path):
    """Every accepted spelling of the same three names, and the things that must be refused."""
    (tmp_path / "names.txt").write_text("\n".join(NAMES) + "\n")
    (tmp_path / "names.json").write_text(json.dumps(NAMES))
    (tmp_path / "summary.json").write_text(json.dumps({"source": {"class_names": NAMES}, "counts": {}}))
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "a-folder").mkdir()
    return tmp_path


def test_every_spelling_gives_the_same_names(files):
    for value in (",".join(NAMES), " T-shirt/top , Trouser,Pullover ", str(files / "names.txt"),
                  str(files / "names.json"), str(files / "summary.json")):
        assert class_names(value) == NAMES, value
    assert class_names("Sandal") == ["Sandal"] and class_names(None) is None


def _bad_values(folder):
    return [
        ("a,,c", "empty name (entry 2)"),
        ("a,b,", "empty name (entry 3)"),
        ("a,b,a", "'a' more than once"),
        ("classes.txt", "no such file: classes.txt"),
        (str(folder / "no" / "names"), "no such file"),
        (str(folder / "a-folder"), "is a folder"),
        (str(folder / "empty.txt"), "is empty"),
    ]


def _argv(verb, folder, value):
    emb, mem, out = str(folder / "e.parquet"), str(folder / "mem"), str(folder / "out")
    return {"build": ["build", emb, out, "--num-shards", "1", "--class-names", value],
            "add": ["add", mem, emb, "--class-names", value],
            "experiment": ["experiment", "scaling", emb, emb, "--out", out, "--class-names", value]}[verb]


@pytest.mark.parametrize("verb", ["build", "add", "experiment"])
def test_bad_class_names_exit_2_with_one_line_and_write_nothing(verb, files, capsys):
    x, labels = clustered(30, 8, 3, seed=3)
    schema.write_embeddings(str(files / "e.parquet"), schema.embedding_table([f"i{i}" for i in range(30)], x, labels))
    for value, message in _bad_values(files):
        assert main(_argv(verb, files, value)) == 2, value
        err = capsys.readouterr().err
        assert err.startswith(f"vismem {verb}: error: --class-names") and err.count("\n") == 1, err
        assert message in err, (value, err)
        assert not (files / "out").exists() and not (files / "mem").exists()


def test_build_and_add_read_the_same_formats(tmp_path, files):
    """A summary.json for build, a text file for add: the memory's names are the names given."""
    x, labels = clustered(80, 8, 4, seed=4)
    first, more = tmp_path / "first.parquet", tmp_path / "more.parquet"
    schema.write_embeddings(str(first), schema.embedding_table([f"i{i}" for i in range(60)], x[:60], labels[:60] % 3))
    schema.write_embeddings(str(more), schema.embedding_table([f"j{i}" for i in range(20)], x[60:], labels[60:]))
    mem = str(tmp_path / "mem")
    pipe = ["--runner", "DirectRunner"]
    res = subprocess.run([VISMEM, "build", str(first), mem, "--num-shards", "1", "--backend", "exact",
                          "--class-names", str(files / "summary.json"), *pipe], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    assert mf.read_manifest(mem).class_names == NAMES
    (tmp_path / "more.txt").write_text("\n".join(NAMES + ["Dress"]))
    res = subprocess.run([VISMEM, "add", mem, str(more), "--class-names", str(tmp_path / "more.txt"), "--", *pipe],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert mf.read_manifest(mem).class_names == NAMES + ["Dress"]


def test_experiment_reads_a_text_file_too(tmp_path, files, capsys):
    x, labels = clustered(90, 8, 3, seed=5)
    schema.write_embeddings(str(tmp_path / "m.parquet"),
                            schema.embedding_table([f"m{i}" for i in range(60)], x[:60], labels[:60]))
    schema.write_embeddings(str(tmp_path / "q.parquet"),
                            schema.embedding_table([f"q{i}" for i in range(30)], x[60:], labels[60:]))
    out = tmp_path / "report"
    # --new names a class of the file: it is only found if the file was read as names.
    assert main(["experiment", "new-classes", str(tmp_path / "m.parquet"), str(tmp_path / "q.parquet"), "--out",
                 str(out), "--class-names", str(files / "names.txt"), "--new", "Trouser"]) == 0
    assert json.loads(capsys.readouterr().out)["experiment"] == "new-classes"
    assert "Trouser" in (out / "report-new-classes.md").read_text()
