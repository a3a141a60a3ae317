"""wf_data.viz: labelled axes, legends naming the domains, PNGs written atomically."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from matplotlib.figure import Figure  # noqa: E402

from wf_data import viz  # noqa: E402

NAMES = ("prose", "code", "math")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def legend_texts(fig: Figure) -> list[str]:
    """Every legend entry (and legend title) of the figure, axes legends and figure legends."""
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    legends += list(fig.legends)
    texts = []
    for legend in legends:
        texts += [text.get_text() for text in legend.get_texts()]
        texts.append(legend.get_title().get_text())
    return texts


def assert_readable(fig: Figure, expected_in_legend=NAMES) -> None:
    """A Figure whose data axes are labelled and whose legends name every expected entry."""
    assert isinstance(fig, Figure)
    assert fig.axes
    assert any(ax.get_xlabel() for ax in fig.axes)
    assert any(ax.get_ylabel() for ax in fig.axes)
    texts = " | ".join(legend_texts(fig))
    for entry in expected_in_legend:
        assert entry in texts, f"{entry!r} missing from legend: {texts}"


def policy_fixture(steps: int = 50) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([0, 1])
    logits = np.cumsum(rng.normal(size=(steps, len(NAMES))), axis=0) * 0.1
    policy = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return np.arange(steps), policy


def packed_batch() -> dict[str, np.ndarray]:
    """Two rows of length 12: row 0 = segments of 5 and 4 tokens + 3 pad, row 1 = one of 12."""
    segment_ids = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12], dtype=np.int32)
    input_ids = np.where(segment_ids > 0, np.arange(12) + 10, 0).astype(np.int32)
    labels = input_ids.copy()
    labels[segment_ids == 0] = -100
    labels[0, [0, 5]] = -100  # first token of each segment
    labels[1, 0] = -100
    labels[1, 1:4] = -100  # a prompt without loss, as in SFT
    position_ids = np.array(
        [list(range(5)) + list(range(4)) + [0] * 3, list(range(12))], dtype=np.int32
    )
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "domain_ids": np.array([2, 0], dtype=np.int32),
    }


class FakeTokenizer:
    """decode([id]) -> "<id>", with one newline token, to check escaping and per-token spans."""

    def decode(self, ids):
        (token,) = ids
        return "\n" if token == 13 else f"<t{token}>"


# ----------------------------------------------------------------------------- figures


def test_length_histograms_name_domains_and_seq_len():
    rng = np.random.default_rng([0, 2])
    lengths = {
        "prose": rng.integers(10, 5000, 80),
        "code": rng.integers(100, 20000, 200),
        "math": rng.integers(40, 80, 3000),
    }
    fig = viz.plot_length_histograms(lengths, seq_len=256)
    assert_readable(fig, expected_in_legend=(*NAMES, "seq_len = 256", "3,000 docs"))
    assert len(fig.axes) == 3
    assert fig.axes[-1].get_xscale() == "log"
    # Each panel's bars count its own domain's documents.
    heights = [sum(patch.get_height() for patch in ax.patches) for ax in fig.axes]
    assert heights == [80, 200, 3000]


def test_length_histograms_rejects_empty():
    with pytest.raises(ValueError, match="empty"):
        viz.plot_length_histograms({})


def test_dataset_summary_reports_totals():
    lengths = np.array([10, 20, 30, 4000])
    fig = viz.plot_dataset_summary(lengths, "demo/prose", seq_len=256)
    assert_readable(fig, expected_in_legend=("4 documents", "4,060 tokens", "max 4,000"))
    assert fig.axes[0].get_title() == "demo/prose"
    with pytest.raises(ValueError, match="empty"):
        viz.plot_dataset_summary(np.array([], dtype=np.int64))


@pytest.mark.parametrize("kind", ["area", "lines"])
def test_policy_plot(kind):
    steps, policy = policy_fixture()
    fig = viz.plot_policy(steps, policy, NAMES, "EXP3", kind=kind)
    assert_readable(fig)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "training step"
    assert "sampling weight" in ax.get_ylabel()
    assert ax.get_title() == "EXP3"
    if kind == "area":
        # Stacked: the top of the last band is 1 at every step.
        top = ax.collections[-1].get_paths()[0].vertices[:, 1].max()
        assert top == pytest.approx(1.0)
    else:
        np.testing.assert_allclose(ax.lines[2].get_ydata(), policy[:, 2])


def test_policy_plot_validates_shapes():
    steps, policy = policy_fixture()
    with pytest.raises(ValueError, match="names has 2"):
        viz.plot_policy(steps, policy, NAMES[:2])
    with pytest.raises(ValueError, match="steps must have shape"):
        viz.plot_policy(steps[:-1], policy, NAMES)
    with pytest.raises(ValueError, match=r"\(T, K\)"):
        viz.plot_policy(steps, policy[:, 0], NAMES)
    with pytest.raises(ValueError, match="kind"):
        viz.plot_policy(steps, policy, NAMES, kind="pie")


def test_token_share_with_reference():
    steps, shares = policy_fixture()
    fig = viz.plot_token_share(
        steps, shares, NAMES, reference=np.full(3, 1 / 3), reference_label="target weight"
    )
    assert_readable(fig, expected_in_legend=(*NAMES, "target weight"))
    assert fig.axes[0].get_ylabel() == "share of real tokens"
    fig = viz.plot_token_share(steps, shares, NAMES, reference=shares)
    assert_readable(fig, expected_in_legend=(*NAMES, "sampling weight"))
    with pytest.raises(ValueError, match="reference must have shape"):
        viz.plot_token_share(steps, shares, NAMES, reference=np.ones(2))


def test_policy_comparison_side_by_side():
    steps, policy = policy_fixture()
    static = np.full_like(policy, 1 / 3)
    policies = {"static": static, "EXP3": policy}
    fig = viz.plot_policy_comparison(steps, policies, NAMES, token_shares=policies)
    assert_readable(fig)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "static: sampling weights",
        "EXP3: sampling weights",
        "static: realised token share",
        "EXP3: realised token share",
    ]
    assert len(viz.plot_policy_comparison(steps, policies, NAMES).axes) == 2
    with pytest.raises(ValueError, match="differ"):
        viz.plot_policy_comparison(steps, policies, NAMES, token_shares={"static": static})
    with pytest.raises(ValueError, match="empty"):
        viz.plot_policy_comparison(steps, {}, NAMES)


def test_fill_flat_and_per_domain():
    flat = {"concat": 0.999, "best_fit": {8: 0.82, 2: 0.44, 128: 0.9}}
    fig = viz.plot_fill(flat)
    assert_readable(fig, expected_in_legend=("concat (99.9%)", "best_fit"))
    ax = fig.axes[0]
    best_fit = [line for line in ax.lines if line.get_label() == "best_fit"][0]
    np.testing.assert_allclose(best_fit.get_xdata(), [2, 8, 128])  # sorted by window
    np.testing.assert_allclose(best_fit.get_ydata(), [44, 82, 90])
    nested = {name: {"concat": {None: 1.0}, "best_fit": {2: 0.5, 8: 0.9}} for name in NAMES}
    fig = viz.plot_fill(nested)
    assert [ax.get_title() for ax in fig.axes] == list(NAMES)  # one panel per domain
    assert "window" in fig.axes[0].get_xlabel()
    with pytest.raises(ValueError, match="empty"):
        viz.plot_fill({})


def test_packed_rows_figure_marks_segments_and_loss_mask():
    batch = packed_batch()
    fig = viz.plot_packed_rows(batch, names=NAMES)
    assert_readable(
        fig,
        expected_in_legend=(
            "segment 1",
            "segment 2",
            "no loss (labels = -100)",
            "padding",
            "segment start",
        ),
    )
    ax = fig.axes[0]
    ticks = [label.get_text() for label in ax.get_yticklabels()]
    assert ticks == ["row 0 (math, 75% full)", "row 1 (prose, 100% full)"]
    image = ax.images[0].get_array()
    grey = np.array(viz.mcolors.to_rgb(viz._NO_LOSS_COLOR))
    is_grey = np.all(np.isclose(image, grey), axis=-1)
    expected = (batch["labels"] == -100) & (batch["segment_ids"] > 0)
    np.testing.assert_array_equal(is_grey, expected)
    assert np.all(image[0, 9:] == 1.0)  # padding is white
    # A list of row dicts gives the same picture.
    rows = [
        {key: value[i] for key, value in batch.items() if key != "domain_ids"} for i in range(2)
    ]
    np.testing.assert_array_equal(viz.plot_packed_rows(rows).axes[0].images[0].get_array(), image)


def test_render_packed_rows_html():
    batch = packed_batch()
    batch["input_ids"][0, 2] = 13  # a newline token
    html = viz.render_packed_rows(batch, FakeTokenizer(), n_rows=2, names=NAMES)
    body = html[html.index("<b>row 0") :]  # skip the legend
    assert body.count("line-through") == int(
        ((batch["labels"] == -100) & (batch["segment_ids"] > 0)).sum()
    )
    assert body.count("border-left:3px") == 3  # segment starts: 2 in row 0, 1 in row 1
    assert body.count(">·<") == 3  # padding
    assert "&lt;t11&gt;" in body  # decoded and escaped
    assert "↵\n" in body
    assert "row 0: 2 segments, 9/12 tokens, 7 with loss, domain math" in body
    assert "row 1: 1 segment, 12/12 tokens, 8 with loss, domain prose" in body
    one_row = viz.render_packed_rows(batch, FakeTokenizer(), n_rows=1, max_tokens=4)
    assert "row 1" not in one_row and "(8 more)" in one_row
    with pytest.raises(ValueError, match="segment_ids"):
        viz.render_packed_rows(
            {"input_ids": batch["input_ids"], "labels": batch["labels"]}, FakeTokenizer()
        )


# ----------------------------------------------------------------------------- saving


def test_save_figure_writes_png_atomically(tmp_path):
    steps, policy = policy_fixture()
    fig = viz.plot_policy(steps, policy, NAMES)
    path = viz.save_figure(fig, tmp_path / "new" / "dir" / "policy.png")
    assert path == tmp_path / "new" / "dir" / "policy.png"
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5_000
    assert os.listdir(path.parent) == ["policy.png"]  # no temp file left behind
    assert path.stat().st_mode & 0o044  # readable by others, unlike a bare mkstemp file


def test_save_figure_failure_keeps_old_file(tmp_path, monkeypatch):
    fig = viz.plot_dataset_summary(np.arange(1, 100))
    path = viz.save_figure(fig, tmp_path / "summary.png")
    before = path.read_bytes()

    def broken_savefig(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        viz.save_figure(fig, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["summary.png"]


def test_save_figure_rejects_other_formats(tmp_path):
    fig = viz.plot_dataset_summary(np.arange(1, 10))
    with pytest.raises(ValueError, match=r"\.png"):
        viz.save_figure(fig, tmp_path / "summary.jpg")
    assert not pathlib.Path(tmp_path / "summary.jpg").exists()
