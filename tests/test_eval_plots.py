"""The plot check the eval tests use: a blank plot, or one drawn from no data, must fail it."""
import matplotlib
import matplotlib.image
import numpy as np
import pytest
from matplotlib.colors import to_rgb

from eval import plots
from eval.evaluate import SWEEPS

SERIES_COLOURS = [to_rgb(c) for c in matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]]
EVAL_PLOT_SERIES = {"accuracy_by_k.png": 4, "hit_rate.png": 1, "reliability.png": 1, "calibration.png": 1,
                    "distances.png": 1, "sweeps.png": 2}  # lines in matplotlib's colour cycle per figure
CONFIDENCE_PLOT_SERIES = {"reliability_diagram.png": 4, "risk_coverage.png": 4}  # one line per voting rule


def assert_plotted(path, empty, series: int = 1, min_pixels: int = 100):
    """Fail unless the PNG at ``path`` shows data.

    It must hold more than one colour and an axes frame, and inside the frame each of the first
    ``series`` colours of matplotlib's cycle must cover ``min_pixels`` more pixels than in ``empty``,
    the same figure drawn from no data (legend handles are coloured even then).
    """
    rgb = _rgb(path)
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 1, f"{path} is a single colour"
    drawn, blank = _axes_area(rgb, path), _axes_area(_rgb(empty), empty)
    for colour in SERIES_COLOURS[:series]:
        n, n_empty = _pixels_of(drawn, colour), _pixels_of(blank, colour)
        assert n >= n_empty + min_pixels, (f"{path}: series colour {colour} covers {n} pixels inside the axes, "
                                           f"{n_empty} when drawn from no data")


def _rgb(path) -> np.ndarray:
    return matplotlib.image.imread(path)[..., :3]


def _axes_area(rgb, path) -> np.ndarray:
    """The pixels inside the bounding box of the axes frames (rows and columns of long dark lines)."""
    dark = rgb.mean(axis=2) < 0.35
    rows, cols = np.flatnonzero(dark.mean(axis=1) > 0.3), np.flatnonzero(dark.mean(axis=0) > 0.3)
    assert len(rows) and len(cols), f"{path} has no axes frame"
    return rgb[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def _pixels_of(rgb, colour) -> int:
    return int((np.abs(rgb - np.asarray(colour)).max(axis=2) < 0.08).sum())


def empty_eval_plots(out_dir, k_max: int) -> str:
    """The evaluation's figures drawn from no data (every series NaN), as references for :func:`assert_plotted`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    nan = np.full(k_max, np.nan)
    plots.write_eval_plots(str(out_dir), acc={m: nan for m in ("plurality", "rank", "softmax", "distance")},
                           hit=nan, rel=nan, rel_fit=(np.nan, np.nan), cal={"count": {}}, dist_in=nan,
                           dist_ood=None, sweeps={m: {v: nan for v in values} for m, (_, values) in SWEEPS.items()})
    return str(out_dir)


def empty_confidence_plots(out_dir) -> str:
    """The confidence figures (``eval.calibration``) drawn from no data, every rule with empty bins and curve."""
    out_dir.mkdir(parents=True, exist_ok=True)
    nan = np.full(10, np.nan)
    empty = {"k": 1, "reliability": {"count": np.zeros(10, int), "confidence": nan, "accuracy": nan, "ece": np.nan},
             "risk_coverage": {"coverage": np.array([]), "accuracy": np.array([])}}
    plots.write_confidence_plots(str(out_dir), {m: empty for m in ("plurality", "rank", "softmax", "distance")})
    return str(out_dir)


def test_the_confidence_plots_show_each_rule(tmp_path):
    empty = empty_confidence_plots(tmp_path / "empty")
    for name, series in CONFIDENCE_PLOT_SERIES.items():
        with pytest.raises(AssertionError, match="when drawn from no data"):
            assert_plotted(f"{empty}/{name}", f"{empty}/{name}", series)
    (tmp_path / "one").mkdir()
    drawn = {"k": 5, "reliability": {"count": np.array([0] * 5 + [3, 4, 5, 6, 9]),
                                     "confidence": np.r_[[np.nan] * 5, np.linspace(0.55, 0.95, 5)],
                                     "accuracy": np.r_[[np.nan] * 5, np.linspace(0.4, 1.0, 5)], "ece": 0.05},
             "risk_coverage": {"coverage": np.linspace(0.1, 1.0, 10), "accuracy": np.linspace(1.0, 0.8, 10)}}
    plots.write_confidence_plots(str(tmp_path / "one"), {"rank": drawn})
    for name in CONFIDENCE_PLOT_SERIES:
        assert_plotted(tmp_path / "one" / name, f"{empty}/{name}", series=1)
        with pytest.raises(AssertionError, match="covers"):
            assert_plotted(tmp_path / "one" / name, f"{empty}/{name}", series=2)


def test_the_check_fails_blank_and_empty_plots_and_passes_drawn_ones(tmp_path):
    from PIL import Image

    empty = empty_eval_plots(tmp_path / "empty", 40)
    Image.new("RGB", (660, 440), "white").save(tmp_path / "blank.png")
    with pytest.raises(AssertionError, match="single colour"):
        assert_plotted(tmp_path / "blank.png", tmp_path / "empty" / "hit_rate.png")
    for name, series in EVAL_PLOT_SERIES.items():
        with pytest.raises(AssertionError, match="when drawn from no data"):
            assert_plotted(f"{empty}/{name}", f"{empty}/{name}", series)
    # One drawn series passes; a second series that was never drawn fails.
    hit = np.linspace(0.5, 1.0, 40)
    (tmp_path / "one").mkdir()
    plots.write_eval_plots(str(tmp_path / "one"), acc={"rank": hit}, hit=hit, rel=hit, rel_fit=(0.1, 0.5),
                           cal={"count": {1: (0.5, 3), 2: (0.9, 7)}}, dist_in=hit, dist_ood=None,
                           sweeps={m: {v: hit for v in values} for m, (_, values) in SWEEPS.items()})
    assert_plotted(tmp_path / "one" / "accuracy_by_k.png", f"{empty}/accuracy_by_k.png", series=1)
    with pytest.raises(AssertionError, match="covers"):
        assert_plotted(tmp_path / "one" / "accuracy_by_k.png", f"{empty}/accuracy_by_k.png", series=2)
