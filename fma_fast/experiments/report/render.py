"""The report as markdown: every number in it comes from the result dict."""

from __future__ import annotations

import statistics
from pathlib import Path

from ...core.protocol import VAL_SHOTS_CAP
from .aggregate import PAIRS
from .settings import peft_pairs


def _pct(mean: float, std: float | None = None) -> str:
    text = f"{100 * mean:.1f}"
    return text if std is None else f"{text} ± {100 * std:.1f}"


def _signed(mean: float, std: float) -> str:
    return f"{100 * mean:+.1f} ± {100 * std:.1f}"


def _verdict(mean: float, std: float) -> str:
    if abs(mean) <= std or abs(mean) < 0.0005:
        return "tie, within seed spread"
    return "ahead" if mean > 0 else "behind"


def _curve_shape(curve: list[tuple[float, float]]) -> str:
    """Read the mean test curve: a fall counts when the peak exceeds the last M by more than
    the seed spread at the last M."""
    means = [m for m, _ in curve]
    last = len(means) - 1
    peak = max(range(len(means)), key=lambda m: (means[m], -m))
    spread = max(curve[-1][1], 0.0005)
    if peak == 0:
        return "no gain from transport (best at M=0)"
    if peak < last and means[peak] - means[-1] > spread:
        return (
            f"rise then fall: peak {_pct(means[peak])} at M={peak}, {_pct(means[-1])} at M={last}"
        )
    if peak < last:
        return f"rise then flat: peak at M={peak}, M={last} within seed spread"
    return f"rises to M={last}"


METHODS_NOTE = (
    "Methods: zero-shot = cosine to class texts (FMA's M=0); FMA = zero-shot features "
    "transported M steps (M on val); FMA adaptive = per-row stopping rule chosen on val; "
    "linear probe = L2-regularised logistic regression; CLIP-Adapter = the released "
    "adapter (two ReLUs, ratio 0.2) trained on the cached features; CLIP-Adapter + FMA = "
    "FMA trained and run on the adapter's features (the "
    "paper's plug-in use); Tip-Adapter(-F) = cache model (-F: keys fine-tuned; without "
    "augmented views of fixed features it barely moves from Tip-Adapter). M on val "
    "(`fma_fast.select_steps`): the best accuracy, ties broken by the lower val "
    "cross-entropy (softmax of 100·cos), then by fewer steps. FMA moves "
    "features, not logits, so it cannot be stacked after the linear probe or Tip-Adapter; "
    'the "on FMA" rows instead fit those methods on FMA-transported features.'
)
FINDINGS = (
    ("FMA", "linear probe"),
    ("FMA", "CLIP-Adapter"),
    ("CLIP-Adapter + FMA", "CLIP-Adapter"),
    ("FMA adaptive", "FMA"),
)
"""The paired comparisons the findings spell out."""
TIMED = ("linear probe", "CLIP-Adapter", "Tip-Adapter", "Tip-Adapter-F", "FMA",
         "CLIP-Adapter + FMA")


def _header(result: dict) -> list[str]:
    """Command, machine, versions, protocol, FMA's settings and the data."""
    settings, env = result["settings"], result["environment"]
    lines = [
        f"# FMA vs few-shot baselines: {result['name']}",
        "",
        f"- command: `{result['command']}`",
        f"- machine: {env['machine']} ({env['platform']})",
        f"- date: {env['date']}; wall time {result['seconds'] / 60:.1f} min"
        + (
            f" (load average over the last 1/5/15 min at the end: "
            f"{' / '.join(f'{v:.1f}' for v in env['load_average'])})"
            if env.get("load_average")
            else ""
        ),
        f"- versions: fma_fast {env['fma_fast']}, Python {env['python']}, torch {env['torch']}, "
        f"numpy {env['numpy']}, matplotlib {env['matplotlib']}",
        f"- protocol: K shots per class from the train pool and min(K, {VAL_SHOTS_CAP}) from the "
        f"val pool per seed; every hyper-parameter (FMA's M, the adaptive rule, regularisation, "
        f"α, β) chosen on val; accuracy on the full test split, mean ± std (n-1) over seeds "
        f"{', '.join(map(str, settings['seeds']))}.",
        f"- FMA: {settings['blocks']} blocks, width = dim, AdamW lr {settings['lr']:g} (released: "
        f"2e-4), batch {settings['batch_size']} (released: 32), "
        f"bridge noise γ={settings['gamma']:g}, "
        f"{settings['epochs']} epochs raised to ≥ {settings['min_updates']} updates for small K, "
        f"M ≤ {settings['max_steps']} steps of h={settings['step_size']:g}.",
    ]
    if settings["features"] is None:
        lines.append(
            f"- data: `fma_fast.synthetic.make_task`, {settings['classes']} classes, "
            f"D={settings['dim']}, {settings['test_per_class']} test rows per class, "
            f"data seed {settings['data_seed']} (one fixed data set per difficulty)."
        )
    else:
        lines.append(f"- data: feature files {', '.join(settings['features'])}")
    return [*lines, "", METHODS_NOTE, ""]


def _table_head(first: str, shots: list[int]) -> list[str]:
    return [f"| {first} | " + " | ".join(f"K={k}" for k in shots) + " |",
            "|---|" + "---:|" * len(shots)]


def _accuracy_tables(by_shots: dict, shots: list[int]) -> list[str]:
    """Test accuracy per method (the best of each K in bold) and the paired differences."""
    lines = ["Test accuracy (%), mean ± std over seeds:", "", *_table_head("method", shots)]
    methods = list(by_shots[str(shots[0])]["methods"])
    for method in methods:
        cells = []
        best = {k: max(by_shots[str(k)]["methods"][m][0] for m in methods) for k in shots}
        for k in shots:
            mean, std = by_shots[str(k)]["methods"][method]
            cell = _pct(mean, std)
            cells.append(f"**{cell}**" if mean == best[k] else cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences (points, same seeds), mean ± std:", "",
              *_table_head("comparison", shots)]
    for a, b in (*PAIRS, *peft_pairs([{"accuracy": dict.fromkeys(methods)}])):
        key = f"{a} - {b}"
        cells = [_signed(*by_shots[str(k)]["paired"][key]) for k in shots]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "Findings (computed):", ""]
    for a, b in FINDINGS:
        parts = []
        for k in shots:
            mean, std = by_shots[str(k)]["paired"][f"{a} - {b}"]
            parts.append(f"K={k} {_signed(mean, std)} ({_verdict(mean, std)})")
        lines.append(f"- {a} vs {b}: " + "; ".join(parts) + ".")
    return lines


def _curve_tables(by_shots: dict, shots: list[int], max_steps: int) -> list[str]:
    """FMA's and CLIP-Adapter + FMA's test accuracy per M, and what choosing M on val costs."""
    steps_header = " | ".join(f"M={m}" for m in range(max_steps + 1))
    steps_rule = "---:|" * (max_steps + 1)
    lines = ["", "FMA test accuracy per M (mean over seeds), M chosen on val, adaptive:", ""]
    lines.append(
        f"| K | epochs (updates) | {steps_header} | M on val (per seed) "
        "| adaptive rule (per seed); mean stop step | shape |"
    )
    lines.append(f"|---:|---:|{steps_rule}---|---|---|")
    for k in shots:
        entry = by_shots[str(k)]
        curve = entry["test_by_steps"]
        lines.append(
            f"| {k} | {entry['fma_epochs']} ({entry['fma_updates']}) | "
            + " | ".join(_pct(m) for m, _ in curve)
            + f" | {', '.join(map(str, entry['chosen_steps']))}"
            + f" | {', '.join(entry['adaptive_rules'])}; "
            + f"{entry['adaptive_mean_steps'][0]:.1f} | {_curve_shape(curve)} |"
        )
    lines += ["", "CLIP-Adapter + FMA test accuracy per M (M=0 is CLIP-Adapter):", ""]
    lines.append(f"| K | {steps_header} | shape |")
    lines.append(f"|---:|{steps_rule}---|")
    for k in shots:
        curve = by_shots[str(k)]["adapter_test_by_steps"]
        lines.append(
            f"| {k} | " + " | ".join(_pct(m) for m, _ in curve) + f" | {_curve_shape(curve)} |"
        )
    lines.append("")
    oracle = [max(m for m, _ in by_shots[str(k)]["test_by_steps"]) for k in shots]
    chosen = [by_shots[str(k)]["methods"]["FMA"][0] for k in shots]
    lines.append(
        "Choosing M on val instead of on test (the released code's leak) costs "
        + ", ".join(f"K={k} {100 * (o - c):.1f}" for k, o, c in zip(shots, oracle, chosen))
        + " points against the best M on the mean test curve."
    )
    return [*lines, ""]


def _convergence(checks: list[dict]) -> list[str]:
    """The training budget check: FMA refit with twice the epochs."""
    lines = [
        "## Training budget check",
        "",
        "FMA refit with twice the epochs at the smallest and largest K, first seed. The "
        "noise-free "
        "straight-line loss (fixed t grid) is the deterministic measure of fit; the training "
        "loss itself is a noisy one-sample estimate.",
        "",
        "| data | K | epochs (updates) | train line loss | val line loss "
        "| test acc at M on val | test acc at M=max |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for check_result in checks:
        for fit_result in check_result["fits"]:
            lines.append(
                f"| {check_result['dataset']} | {check_result['shots']} "
                f"| {fit_result['epochs']} ({fit_result['updates']}) | "
                f"{fit_result['train_line_loss']:.4f} | {fit_result['val_line_loss']:.4f} | "
                f"{_pct(fit_result['test_accuracy_chosen_m'])} (M={fit_result['steps']}) | "
                f"{_pct(fit_result['test_accuracy_max_m'])} |"
            )
    lines += ["", "Doubling the epochs changed (computed):", ""]
    for check_result in checks:
        single, double = check_result["fits"]
        loss_change = double["val_line_loss"] / single["val_line_loss"] - 1
        at_max, at_chosen = (
            100 * (double[key] - single[key])
            for key in ("test_accuracy_max_m", "test_accuracy_chosen_m")
        )
        lines.append(
            f"- {check_result['dataset']} K={check_result['shots']}: val line loss "
            f"{100 * loss_change:+.1f}%, test accuracy at M=max {at_max:+.1f}, "
            f"at the M chosen on val {at_chosen:+.1f} points."
        )
    return [*lines, ""]


def _times(result: dict, shots: list[int]) -> list[str]:
    """Mean seconds per fit of each timed method."""
    lines = ["## Time", "", "Mean seconds per fit (fit + scoring the test split):", "",
             *_table_head("method", shots)]
    for method in TIMED:
        cells = []
        for k in shots:
            times = [r["seconds"][method] for r in result["runs"] if r["shots"] == k]
            cells.append(f"{statistics.fmean(times):.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def render_markdown(result: dict) -> str:
    """The human-readable report; every number in it comes from ``result``."""
    settings, shots = result["settings"], result["settings"]["shots"]
    lines = _header(result)
    for dataset, by_shots in result["aggregate"].items():
        lines += [f"## {dataset}", "", *_accuracy_tables(by_shots, shots),
                  *_curve_tables(by_shots, shots, settings["max_steps"])]
    if result.get("convergence"):
        lines += _convergence(result["convergence"])
    lines += _times(result, shots)
    if result["plots"]:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in result["plots"]]
    else:
        lines.append(f"_{result['plot_note']}_")
    lines.append("")
    return "\n".join(lines)
