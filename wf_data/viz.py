"""Plots of corpora, mixtures and packed rows, shared by the notebook, tools and `wf-data inspect`.

Every function takes plain arrays and returns a `matplotlib.figure.Figure` built without pyplot,
so nothing here opens a window, touches a global figure registry or depends on the backend:
safe in tests, worker processes and headless CLIs. Axes are labelled, domains are named in a
legend, and a domain keeps its colour across figures (its index in `names`). `save_figure`
writes a PNG atomically; `render_packed_rows` returns HTML for notebooks.
"""

from __future__ import annotations

import html
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from wf_data import atomic
from wf_data.data import IGNORE_INDEX
from wf_data.extras import requires

with requires("plot", feature="wf_data.viz"):
    import matplotlib.colors as mcolors
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

# Domain colours: tab10 first (distinct, colour-blind friendlier than the default cycle).
_PALETTE = tuple(
    mcolors.to_hex(c)
    for c in (
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
        "#d62728",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
        "#bcbd22",
        "#17becf",
    )
)
# Segment backgrounds in rendered rows: light, so the decoded text stays readable.
_SEGMENT_COLORS = (
    "#cfe2f3",
    "#fce5cd",
    "#d9ead3",
    "#f4cccc",
    "#d9d2e9",
    "#fff2cc",
    "#d0e0e3",
    "#ead1dc",
)
_PAD_COLOR = "#ffffff"
_METHOD_COLORS = ("#333333", "#d62728", "#9467bd", "#8c564b", "#17becf")
_NO_LOSS_COLOR = "#9e9e9e"

__all__ = [
    "domain_colors",
    "plot_dataset_summary",
    "plot_fill",
    "plot_length_histograms",
    "plot_packed_rows",
    "plot_policy",
    "plot_policy_comparison",
    "plot_token_share",
    "render_packed_rows",
    "save_figure",
]


def domain_colors(num_domains: int) -> list[str]:
    """One hex colour per domain index, the same in every figure of this module."""
    return [_PALETTE[i % len(_PALETTE)] for i in range(num_domains)]


def _steps_and_matrix(steps: Any, matrix: Any, names: Sequence[str], what: str):
    """Validates `steps` (T,) against `matrix` (T, K) and `names` (K); returns float arrays."""
    steps = np.asarray(steps)
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"{what} must be a (T, K) array, got shape {matrix.shape}")
    if steps.shape != (matrix.shape[0],):
        raise ValueError(
            f"steps must have shape ({matrix.shape[0]},) to match {what} "
            f"{matrix.shape}, got {steps.shape}"
        )
    if len(names) != matrix.shape[1]:
        raise ValueError(
            f"{what} has {matrix.shape[1]} domains but names has {len(names)}: {list(names)}"
        )
    return steps, matrix


def _new_figure(width: float = 7.0, height: float = 4.0) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


# ----------------------------------------------------------------------------- corpora


def _log_bins(arrays: Sequence[np.ndarray], bins: int) -> np.ndarray:
    values = np.concatenate([a for a in arrays if a.size] or [np.ones(1)])
    low, high = max(int(values.min()), 1), max(int(values.max()), 2)
    return np.unique(np.geomspace(low, high * 1.001, bins + 1))


def plot_length_histograms(
    lengths_by_domain: Mapping[str, Any],
    *,
    bins: int = 40,
    seq_len: int | None = None,
    title: str = "Document lengths per domain",
) -> Figure:
    """Histograms of document lengths (tokens), one panel per domain on shared log-spaced bins.

    `lengths_by_domain` maps domain name -> (N_d,) int token counts. Panels share the x axis
    but not the y axis, so a domain with few documents stays readable beside one with
    thousands. Each legend names the domain with its document count and median length;
    `seq_len` draws the row length for reference.
    """
    if not lengths_by_domain:
        raise ValueError("lengths_by_domain is empty: expected {domain name: (N,) lengths}")
    arrays = [np.asarray(v, dtype=np.int64).ravel() for v in lengths_by_domain.values()]
    edges = _log_bins(arrays, bins)
    fig = _new_figure(7.0, 1.2 + 1.7 * len(arrays))
    axes = fig.subplots(len(arrays), 1, sharex=True, squeeze=False)[:, 0]
    colors = domain_colors(len(arrays))
    for ax, name, lengths, color in zip(axes, lengths_by_domain, arrays, colors, strict=True):
        median = int(np.median(lengths)) if lengths.size else 0
        ax.hist(
            lengths,
            bins=edges,
            color=color,
            alpha=0.85,
            label=f"{name}: {lengths.size:,} docs, median {median:,}",
        )
        if seq_len is not None:
            ax.axvline(
                seq_len, color="black", linestyle="--", linewidth=1, label=f"seq_len = {seq_len}"
            )
        ax.set_ylabel("documents")
        ax.legend(loc="upper right", fontsize="small")
    axes[0].set_xscale("log")
    axes[-1].set_xlabel("document length (tokens, log scale)")
    fig.suptitle(title)
    return fig


def plot_dataset_summary(
    lengths: Any, title: str | None = None, *, seq_len: int | None = None, bins: int = 50
) -> Figure:
    """One dataset at a glance (for `wf-data inspect --plot`): length histogram and totals.

    `lengths` is the (N,) int64 per-document token count (`DocumentSource.lengths`). The legend
    reports documents, total tokens and the mean / median / p99 / max length.
    """
    lengths = np.asarray(lengths, dtype=np.int64).ravel()
    if lengths.size == 0:
        raise ValueError("plot_dataset_summary: lengths is empty (a dataset with no documents)")
    p50, p99 = np.percentile(lengths, [50, 99])
    label = (
        f"{lengths.size:,} documents, {int(lengths.sum()):,} tokens\n"
        f"mean {lengths.mean():,.0f}, median {p50:,.0f}, p99 {p99:,.0f}, "
        f"max {int(lengths.max()):,}"
    )
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.hist(lengths, bins=_log_bins([lengths], bins), color=_PALETTE[0], alpha=0.8, label=label)
    if seq_len is not None:
        ax.axvline(
            seq_len, color="black", linestyle="--", linewidth=1, label=f"seq_len = {seq_len}"
        )
    ax.set_xscale("log")
    ax.set_xlabel("document length (tokens, log scale)")
    ax.set_ylabel("documents")
    ax.set_title(title or "Dataset summary")
    ax.legend(loc="upper right")
    return fig


# ----------------------------------------------------------------------------- mixtures


def _draw_policy(ax, steps, policy, names, kind: str) -> None:
    colors = domain_colors(len(names))
    if kind == "area":
        ax.stackplot(steps, policy.T, labels=list(names), colors=colors, alpha=0.85)
        ax.set_ylim(0.0, 1.0)
    elif kind == "lines":
        for k, name in enumerate(names):
            ax.plot(steps, policy[:, k], color=colors[k], linewidth=1.8, label=name)
        ax.set_ylim(0.0, min(1.0, max(float(policy.max()) * 1.1, 0.05)))
    else:
        raise ValueError(f"kind must be 'area' or 'lines', got {kind!r}")
    if len(steps) > 1:
        ax.set_xlim(steps[0], steps[-1])
    ax.set_xlabel("training step")
    ax.set_ylabel("sampling weight" + (" (stacked)" if kind == "area" else ""))


def plot_policy(
    steps: Any,
    policy: Any,
    names: Sequence[str],
    title: str = "Mixture weights over steps",
    *,
    kind: str = "area",
) -> Figure:
    """The mixture policy over training: `policy` (T, K) weights per step, `steps` (T,).

    `kind="area"` stacks the weights (each vertical slice sums to 1); `"lines"` draws one line
    per domain, easier to read when a weight is small.
    """
    steps, policy = _steps_and_matrix(steps, policy, names, "policy")
    fig = _new_figure()
    ax = fig.add_subplot()
    _draw_policy(ax, steps, policy, names, kind)
    ax.set_title(title)
    ax.legend(title="domain", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _draw_shares(ax, steps, shares, names, reference, reference_label="sampling weight") -> None:
    colors = domain_colors(len(names))
    for k, name in enumerate(names):
        ax.plot(steps, shares[:, k], color=colors[k], linewidth=1.8, label=name)
    if reference is not None:
        reference = np.asarray(reference, dtype=np.float64)
        for k in range(len(names)):
            target = reference[..., k]
            if target.ndim == 0:
                ax.axhline(float(target), color=colors[k], linestyle=":", linewidth=1.2)
            else:
                ax.plot(steps, target, color=colors[k], linestyle=":", linewidth=1.2)
        ax.plot([], [], color="black", linestyle=":", label=reference_label)
    top = (
        float(np.nanmax(shares))
        if reference is None
        else float(max(np.nanmax(shares), np.nanmax(reference)))
    )
    ax.set_ylim(0.0, min(1.0, max(top * 1.15, 0.05)))
    ax.set_xlabel("training step")
    ax.set_ylabel("share of real tokens")


def plot_token_share(
    steps: Any,
    shares: Any,
    names: Sequence[str],
    title: str = "Realised token share per domain",
    *,
    reference: Any = None,
    reference_label: str = "sampling weight",
) -> Figure:
    """Realised share of (non-padding) tokens per domain: `shares` (T, K), rows summing to 1.

    `reference` (K,) or (T, K), optional, draws the sampling weights dotted in the same colours
    (named `reference_label` in the legend): the gap shows how row-level mixing of unevenly
    filled rows skews the token mixture.
    """
    steps, shares = _steps_and_matrix(steps, shares, names, "shares")
    if reference is not None:
        reference = np.asarray(reference, dtype=np.float64)
        if reference.shape not in {(len(names),), shares.shape}:
            raise ValueError(
                f"reference must have shape ({len(names)},) or {shares.shape}, "
                f"got {reference.shape}"
            )
    fig = _new_figure()
    ax = fig.add_subplot()
    _draw_shares(ax, steps, shares, names, reference, reference_label)
    ax.set_title(title)
    ax.legend(title="domain", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def plot_policy_comparison(
    steps: Any,
    policies: Mapping[str, Any],
    names: Sequence[str],
    *,
    token_shares: Mapping[str, Any] | None = None,
    title: str = "Static mixture vs EXP3",
    kind: str = "area",
) -> Figure:
    """Runs side by side: one column per run (e.g. "static", "EXP3"), sharing the y axis.

    `policies` maps run name -> (T, K) weights over the same `steps` (T,). With `token_shares`
    (run name -> (T, K) realised token share) a second row shows what the runs actually served.
    """
    if not policies:
        raise ValueError("policies is empty: expected {run name: (T, K) weights}")
    if token_shares is not None and set(token_shares) != set(policies):
        raise ValueError(
            f"token_shares runs {sorted(token_shares)} differ from policies runs {sorted(policies)}"
        )
    runs = list(policies)
    num_rows = 1 if token_shares is None else 2
    fig = _new_figure(4.2 * len(runs) + 1.6, 3.3 * num_rows)
    axes = fig.subplots(num_rows, len(runs), sharey="row", squeeze=False)
    for column, run in enumerate(runs):
        run_steps, policy = _steps_and_matrix(steps, policies[run], names, f"policies[{run!r}]")
        _draw_policy(axes[0, column], run_steps, policy, names, kind)
        axes[0, column].set_title(f"{run}: sampling weights")
        if token_shares is not None:
            _, shares = _steps_and_matrix(steps, token_shares[run], names, f"token_shares[{run!r}]")
            _draw_shares(axes[1, column], run_steps, shares, names, None)
            axes[1, column].set_title(f"{run}: realised token share")
        if column:
            for row in range(num_rows):
                axes[row, column].set_ylabel("")
    handles = [
        Patch(color=c, label=n) for c, n in zip(domain_colors(len(names)), names, strict=True)
    ]
    fig.legend(handles=handles, title="domain", loc="outside right upper")
    fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- packing


def _fill_series(values: Any) -> tuple[np.ndarray, np.ndarray] | float:
    if isinstance(values, Mapping):
        windows = [w for w in values if w is not None]
        if not windows:  # {None: fill}: a method without windows
            return float(values[None])
        windows.sort()
        return np.asarray(windows, dtype=np.float64), np.asarray(
            [values[w] for w in windows], dtype=np.float64
        )
    return float(values)


def _draw_fill(ax, fill_by_method: Mapping[str, Any]) -> None:
    for index, (method, values) in enumerate(fill_by_method.items()):
        series = _fill_series(values)
        color = _METHOD_COLORS[index % len(_METHOD_COLORS)]
        if isinstance(series, float):
            ax.axhline(
                100 * series,
                color=color,
                linestyle="--",
                linewidth=1.6,
                label=f"{method} ({100 * series:.1f}%)",
            )
        else:
            windows, fills = series
            ax.plot(windows, 100 * fills, marker="o", color=color, linewidth=1.8, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("best-fit window (documents, log scale)")
    ax.set_ylabel("fill (% of row slots holding tokens)")


def plot_fill(
    fill_by_method_and_window: Mapping[str, Any], *, title: str = "Packing fill"
) -> Figure:
    """Packing fill (real tokens / row slots) against the best-fit window size.

    `fill_by_method_and_window` is `{method: {window_size: fill}}` with fill in [0, 1]; a method
    without windows (`concat`) is `{method: fill}` or `{method: {None: fill}}` and is drawn as a
    dashed line. One level deeper, `{panel: {method: {window_size: fill}}}` (e.g. per domain),
    draws one panel per key with a shared y axis.
    """
    if not fill_by_method_and_window:
        raise ValueError("fill_by_method_and_window is empty")
    first = next(iter(fill_by_method_and_window.values()))
    nested = isinstance(first, Mapping) and any(isinstance(v, Mapping) for v in first.values())
    panels = dict(fill_by_method_and_window) if nested else {None: fill_by_method_and_window}
    fig = _new_figure(3.6 * len(panels) + 1.0, 3.8)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (panel, fill_by_method) in zip(axes, panels.items(), strict=True):
        _draw_fill(ax, fill_by_method)
        if panel is not None:
            ax.set_title(str(panel))
        if ax is not axes[0]:
            ax.set_ylabel("")
        ax.legend(title="method", fontsize="small")
    fig.suptitle(title)
    return fig


def _as_batch(rows: Any) -> dict[str, np.ndarray]:
    """A batch dict of (B, L) arrays from a batch dict, one row dict or a list of row dicts."""
    if isinstance(rows, Mapping):
        batch = {key: np.asarray(value) for key, value in rows.items()}
        if np.asarray(batch["input_ids"]).ndim == 1:
            batch = {
                key: value[None] if key != "domain_ids" else np.atleast_1d(value)
                for key, value in batch.items()
            }
    else:
        rows = list(rows)
        if not rows:
            raise ValueError("rows is empty: expected a batch dict or a list of row dicts")
        batch = {key: np.stack([np.asarray(row[key]) for row in rows]) for key in rows[0]}
    missing = {"input_ids", "labels", "segment_ids"} - set(batch)
    if missing:
        raise ValueError(
            f"rows lack {sorted(missing)}; a packed row has input_ids, labels, "
            "position_ids, segment_ids (and domain_ids in mixed batches)"
        )
    return batch


def plot_packed_rows(
    rows: Any,
    *,
    n_rows: int = 8,
    names: Sequence[str] | None = None,
    title: str = "Packed rows: segments and loss mask",
) -> Figure:
    """Map of packed rows: one horizontal strip per row, a colour per segment (document).

    Tokens without loss (`labels == -100`: each segment's first token, padding, non-assistant
    SFT tokens) are hatched grey, padding is white. `rows` is a batch dict of (B, L) arrays or a
    list of row dicts; `names` labels rows by `domain_ids` when the batch has them.
    """
    batch = _as_batch(rows)
    segment_ids = batch["segment_ids"][:n_rows]
    labels = batch["labels"][:n_rows]
    num_rows, seq_len = segment_ids.shape
    colors = [mcolors.to_rgb(c) for c in _SEGMENT_COLORS]
    image = np.ones((num_rows, seq_len, 3))
    real = segment_ids > 0
    palette = np.asarray(colors)[(segment_ids - 1) % len(colors)]
    image[real] = palette[real]
    no_loss = real & (labels == IGNORE_INDEX)
    image[no_loss] = mcolors.to_rgb(_NO_LOSS_COLOR)
    fig = _new_figure(9.0, 0.45 * num_rows + 1.6)
    ax = fig.add_subplot()
    ax.imshow(image, aspect="auto", interpolation="nearest", extent=(0, seq_len, num_rows, 0))
    starts = real & np.diff(segment_ids, axis=1, prepend=0).astype(bool)
    start_rows, start_cols = np.nonzero(starts)
    ax.vlines(start_cols, start_rows + 0.05, start_rows + 0.95, color="black", linewidth=1.2)
    fills = real.mean(axis=1)
    tick_labels = []
    for r in range(num_rows):
        domain = ""
        if names is not None and "domain_ids" in batch:
            domain = f"{names[int(batch['domain_ids'][r])]}, "
        tick_labels.append(f"row {r} ({domain}{100 * fills[r]:.0f}% full)")
    ax.set_yticks(np.arange(num_rows) + 0.5, tick_labels)
    ax.set_xlabel("token position in row")
    ax.set_ylabel("packed row")
    ax.set_title(title)
    handles = [
        Patch(facecolor=_SEGMENT_COLORS[i], edgecolor="grey", label=f"segment {i + 1}")
        for i in range(min(len(colors), int(segment_ids.max(initial=0))))
    ]
    handles += [
        Patch(facecolor=_NO_LOSS_COLOR, label="no loss (labels = -100)"),
        Patch(facecolor=_PAD_COLOR, edgecolor="grey", label="padding"),
        Line2D([], [], color="black", label="segment start"),
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return fig


def _decode_tokens(tokenizer: Any, ids: np.ndarray) -> list[str]:
    return [tokenizer.decode([int(i)]) for i in ids]


def render_packed_rows(
    rows: Any,
    tokenizer: Any,
    n_rows: int = 3,
    *,
    names: Sequence[str] | None = None,
    max_tokens: int | None = None,
) -> str:
    """HTML showing decoded packed rows: segment colours, boundaries and the loss mask.

    Each token is a span on its segment's colour with a bar at every segment start; tokens with
    `labels == -100` are grey and struck through, padding is a faint dot. `rows` is a batch dict
    of (B, L) arrays or a list of row dicts; `tokenizer` has `decode(ids)` (a TokenizerWrapper).
    Display with `IPython.display.HTML`; the string is self-contained (inline styles).
    """
    batch = _as_batch(rows)
    legend = (
        f'<span style="background:{_SEGMENT_COLORS[0]}">segment 1</span> '
        f'<span style="background:{_SEGMENT_COLORS[1]}">segment 2</span> ... '
        f'<span style="color:{_NO_LOSS_COLOR};text-decoration:line-through">no loss '
        f"(labels = -100)</span> "
        '<span style="border-left:3px solid #000;padding-left:2px">segment start</span> '
        '<span style="color:#bbb">· padding</span>'
    )
    parts = [
        '<div style="font-family:monospace;font-size:12px;line-height:1.7">',
        f"<div>{legend}</div>",
    ]
    for r in range(min(n_rows, batch["input_ids"].shape[0])):
        input_ids = batch["input_ids"][r]
        labels = batch["labels"][r]
        segment_ids = batch["segment_ids"][r]
        stop = len(input_ids) if max_tokens is None else min(max_tokens, len(input_ids))
        real = segment_ids > 0
        num_segments = int(segment_ids.max(initial=0))
        header = f"row {r}: {num_segments} segment{'' if num_segments == 1 else 's'}, "
        header += f"{int(real.sum())}/{len(input_ids)} tokens, "
        header += f"{int((labels != IGNORE_INDEX).sum())} with loss"
        if names is not None and "domain_ids" in batch:
            header = f"{header}, domain {html.escape(names[int(batch['domain_ids'][r])])}"
        texts = _decode_tokens(tokenizer, input_ids[:stop])
        spans = []
        for t in range(stop):
            if not real[t]:
                spans.append('<span style="color:#bbb">·</span>')
                continue
            style = f"background:{_SEGMENT_COLORS[(segment_ids[t] - 1) % len(_SEGMENT_COLORS)]}"
            if t == 0 or segment_ids[t] != segment_ids[t - 1]:
                style += ";border-left:3px solid #000;padding-left:1px"
            if labels[t] == IGNORE_INDEX:
                style += f";color:{_NO_LOSS_COLOR};text-decoration:line-through"
            text = html.escape(texts[t]).replace("\n", "↵\n")
            spans.append(
                f'<span style="{style}" title="id {int(input_ids[t])}, '
                f'segment {int(segment_ids[t])}">{text}</span>'
            )
        if stop < len(input_ids):
            spans.append(f" … ({len(input_ids) - stop} more)")
        parts.append(f'<div style="margin-top:8px"><b>{header}</b></div>')
        parts.append(
            f'<div style="white-space:pre-wrap;border:1px solid #ddd;padding:4px">'
            f"{''.join(spans)}</div>"
        )
    parts.append("</div>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- output


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = 120) -> pathlib.Path:
    """Writes `fig` as a PNG at `path` atomically (`wf_data.atomic`), creating the directory.

    Returns the path. Only `.png` paths are accepted, so the bytes always match the suffix.
    """
    path = pathlib.Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_figure writes PNG files; {str(path)!r} does not end in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.AtomicWriter(path) as file:
        fig.savefig(file, format="png", dpi=dpi)
    return path
