"""``vismem embed`` / ``vismem probe`` on the command line: help that teaches, errors that name the problem."""
import pytest

from cli.main import main


def test_embed_help_teaches_with_examples(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["embed", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for needle in ("vismem embed fashion-mnist out/fm-train --limit 2000", "--teacher probe:out/probe.npz",
                   "--label-map", "--ray-address", "--min-confidence", "WebDataset", "resumes",
                   "OUT/errors/*.parquet"):
        assert needle in text, needle
    with pytest.raises(SystemExit):
        main(["probe", "--help"])
    assert "vismem probe out/fm-train --out out/probe.npz" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["embed", "/no/such/dir", "OUT"], "source not found: /no/such/dir"),
    (["embed", "fashion-mnist", "OUT", "--encoder", "vgg"], "unknown encoder 'vgg'"),
    (["embed", "fashion-mnist", "OUT", "--encoder", "dinov2-vits14"], "weights for dinov2-vits14 not found"),
    (["embed", "fashion-mnist", "OUT", "--teacher", "probe:/no/probe.npz"], "probe not found: /no/probe.npz"),
    (["embed", "fashion-mnist", "OUT", "--label-map", "m.json"], "--label-map maps a teacher's classes"),
    (["embed", "fashion-mnist", "OUT", "--min-confidence", "2"], "--min-confidence: must be a number in [0, 1]"),
    (["embed", "fashion-mnist", "OUT", "--shard-size", "0"], "--shard-size: must be an integer >= 1, got 0"),
    (["probe", "/no/run", "--out", "p.npz"], "no embedding run or shard at /no/run"),
])
def test_bad_input_exits_2_with_a_clear_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VISMEM_MODEL_DIR", str(tmp_path / "models"))
    try:
        status = main(argv)
    except SystemExit as exc:  # refused by the argument parser itself
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "OUT").exists()
