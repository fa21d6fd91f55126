"""Unknown options: Beam verbs check theirs against Beam's list; every other verb names the closest valid one."""
import os
import subprocess
import sys

import pytest

from cli.main import main
from conftest import clustered
from memory import schema, write_memory

VISMEM = os.path.join(os.path.dirname(sys.executable), "vismem")


def test_a_typo_in_build_exits_2_before_any_work(tmp_path):
    x, labels = clustered(40, 8, 2, seed=7)
    schema.write_embeddings(str(tmp_path / "e.parquet"), schema.embedding_table([f"i{i}" for i in range(40)], x, labels))
    out = tmp_path / "m"
    res = subprocess.run([VISMEM, "build", str(tmp_path / "e.parquet"), str(out), "--num-shards", "2",
                          "--class-names", "a,b", "--partiton", "kmeans"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        "vismem build: error: unknown option --partiton (did you mean --partition?)")
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["build", "e", "m", "--num-shards", "1", "--class-names", "a", "--", "--runer", "DirectRunner"],
     "unknown option --runer (did you mean --runner?)"),
    (["add", "m", "e", "--norm-tolerence", "0.1"], "unknown option --norm-tolerence (did you mean --norm-tolerance?)"),
    (["compact", "m", "--no_merge"], "unknown option --no_merge (did you mean --no-merge?)"),
])
def test_beam_verbs_check_every_option_after_their_own(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"vismem {argv[0]}: error: {message}"


@pytest.mark.parametrize("argv, message", [
    (["info", "m", "--verison", "2"], "unrecognized arguments: --verison 2 (did you mean --version?)"),
    (["query", "m", "q", "--methd=rank"], "unrecognized arguments: --methd=rank (did you mean --method?)"),
    (["eval", "m", "q", "--out", "o", "--kmax", "5"], "unrecognized arguments: --kmax 5 (did you mean --k-max?)"),
    (["experiment", "scaling", "m", "q", "--out", "o", "--lable", "x"],
     "unrecognized arguments: --lable x (did you mean --label?)"),
    (["serve", "m", "--runner", "DirectRunner"], "unrecognized arguments: --runner DirectRunner"),
    (["info", "m", "extra"], "unrecognized arguments: extra"),
])
def test_other_verbs_reject_unknown_options_and_name_the_closest(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    verb = " ".join(argv[:2]) if argv[0] == "experiment" else argv[0]
    assert err.startswith("usage: vismem " + verb) and err.strip().splitlines()[-1] == f"vismem {verb}: error: {message}"


def test_beam_options_after_the_verbs_own_and_after_a_double_dash_run(tmp_path, capsys):
    x, labels = clustered(60, 8, 3, seed=8)
    write_memory(str(tmp_path / "m"), x[:40], labels[:40], [f"m{i}" for i in range(40)], class_names=list("abc"))
    schema.write_embeddings(str(tmp_path / "e.parquet"),
                            schema.embedding_table([f"e{i}" for i in range(20)], x[40:], labels[40:]))
    assert main(["add", str(tmp_path / "m"), str(tmp_path / "e.parquet"), "--runner", "DirectRunner"]) == 0
    assert main(["compact", str(tmp_path / "m"), "--", "--runner=DirectRunner"]) == 0
    assert main(["info", str(tmp_path / "m")]) == 0
    assert '"count": 60' in capsys.readouterr().out
