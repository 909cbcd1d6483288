"""``fma-fast run`` as a library function: :func:`run_experiment` runs the protocol of
:mod:`fma_fast.clip.experiment` over every shot count and seed, prints each run and the mean ±
std tables, and writes ``results.json``, the test predictions, an accuracy-per-M plot per shot
count and one classifier folder per (shots, seed).

Apart from :mod:`~fma_fast.clip.experiment` because saving classifiers needs
:mod:`~fma_fast.clip.classifier`, which builds on the protocol.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.distributed import Context
from ..experiments.report import runs as runs_summary
from ..experiments.report.aggregate import mean_std
from ..io.files import save_safetensors, write_text
from .classifier import FewShotClassifier
from .experiment import FitField, Job, RefineField, RunOutcome, SolveSettings, run_jobs
from .inputs import ExtractOptions, Inputs

RESULTS_NAME = "results.json"
PREDICTIONS_NAME = "predictions.safetensors"
CLASSIFIERS_NAME = "classifiers"


def plot_name(shots: int) -> str:
    return f"accuracy_by_steps-k{shots}.png"


def report_line(run: dict[str, Any]) -> str:
    """One run (a shots, seed job) in one line: its fit and its accuracy at M and M=0."""
    best = run["chosen_steps"]
    head = (f"{run['shots']} shots, seed {run['seed']}: {run['train_images']} train images x "
            f"{run['views']} views, {run['optimizer_steps']} steps, fit {run['fit_seconds']:.1f}"
            f" s on rank {run['fitted_on_rank']}, M={best} chosen on val "
            f"({100 * run['val_accuracy'][best]:.2f}%)")
    if "base_test_accuracy" in run:
        base, new, hm = (run[key][best] for key in
                         ("base_test_accuracy", "new_test_accuracy", "hm_by_steps"))
        zero = [run[key][0] for key in ("base_test_accuracy", "new_test_accuracy", "hm_by_steps")]
        untrained = run["classes"].get("base_without_shots")
        note = f"; base classes without training images: {untrained}" if untrained else ""
        return (f"{head}, base {100 * base:.2f}% new {100 * new:.2f}% HM {100 * hm:.2f}% "
                f"(M=0: {100 * zero[0]:.2f} / {100 * zero[1]:.2f} / {100 * zero[2]:.2f}){note}")
    test = run["test_accuracy"]
    return f"{head}, test {100 * test[best]:.2f}% (M=0: {100 * test[0]:.2f}%)"


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± sample std over seeds for one shot count, as fractions like the runs' own
    accuracies (std None for one seed: no spread)."""
    def stat(values):
        mean, std = mean_std(values)
        return {"mean": mean, "std": std if len(values) > 1 else None}

    entry: dict[str, Any] = {"shots": runs[0]["shots"], "seeds": [r["seed"] for r in runs]}
    if "base_test_accuracy" in runs[0]:
        keys = {"base": "base_test_accuracy", "new": "new_test_accuracy", "hm": "hm_by_steps"}
        entry["zero_shot"] = {name: stat([r[key][0] for r in runs]) for name, key in keys.items()}
        entry["fma"] = {name: stat([r[key][r["chosen_steps"]] for r in runs])
                        for name, key in keys.items()}
        entry["hm"] = "2·base·new/(base + new) per seed, then mean ± std"
    else:
        entry["test_at_m0"] = stat([r["test_accuracy"][0] for r in runs])
        entry["test_at_chosen_m"] = stat([r["test_accuracy"][r["chosen_steps"]] for r in runs])
    for key in runs_summary.curves_of(runs).values():
        entry[f"{key.removesuffix('_accuracy')}_by_steps"] = runs_summary.by_steps(runs, key)
    return entry


def summary_lines(dataset: str, entry: dict[str, Any]) -> str:
    """A shot count's summary as printed: base/new/HM table, or test accuracy at M=0 and M."""
    seeds = " ".join(map(str, entry["seeds"]))
    several = len(entry["seeds"]) > 1
    spread = "mean ± sample std, %" if several else "1 seed, %"

    def cell(stat: dict[str, Any], width: int = 6) -> str:
        return runs_summary.percent_text(stat["mean"], stat["std"], width)

    if "fma" in entry:
        width = 15 if several else 8
        rows = [f"{dataset} base-to-new, {entry['shots']} shots, seeds {seeds} ({spread}):",
                f"{'':22}{'base':>{width}}{'new':>{width + 1}}{'HM':>{width + 1}}"]
        for label, key in (("zero-shot (M=0)", "zero_shot"), ("FMA (M on base val)", "fma")):
            cells = "".join(f"  {cell(entry[key][n])}" for n in ("base", "new", "hm"))
            rows.append(f"{label:22}{cells}")
        return "\n".join(rows)
    zero, chosen = entry["test_at_m0"], entry["test_at_chosen_m"]
    return (f"{dataset}, {entry['shots']} shots, seeds {seeds} ({spread}): test accuracy M=0 "
            f"(zero-shot) {cell(zero, 0)}, M chosen on val {cell(chosen, 0)}")


def _printed(line: str) -> None:
    print(line, flush=True)


def run_experiment(
    inputs: Inputs,
    out: Path,
    *,
    shots: list[int],
    seeds: list[int],
    extract: ExtractOptions,
    fit_field: FitField,
    solve: SolveSettings,
    subsample: str = "all",
    save_classifiers: bool = True,
    training: dict[str, Any] | None = None,
    context: Context,
    echo: Callable[[str], None] = _printed,
    refine_field: RefineField | None = None,
) -> RunOutcome | None:
    """Extract -> fit -> choose M on val -> test for every shot count and seed (the jobs dealt
    to the ranks), then on rank 0: the tables, ``results.json`` (with ``training``, the
    settings ``fit_field`` trains with, as recorded), the predictions, the plots and the
    classifiers. ``echo`` gets every line printed. ``refine_field`` refines each fit at its M
    before M is chosen again (each run records it under "refinement"). Returns the outcome on
    rank 0, None on the others."""
    outcome = run_jobs(
        [Job(k, seed) for k in shots for seed in seeds],
        extract_job=lambda job: extract.extract(inputs, out / "cache", shots=job.shots,
                                                seed=job.seed, context=context),
        fit_field=fit_field, encoder=inputs.encoder, solve=solve, subsample=subsample,
        device=inputs.device, context=context, on_run=lambda run: echo(report_line(run)),
        refine_field=refine_field,
    )
    if not context.is_main:
        return None
    summaries = []
    for k in shots:
        group = [run for run in outcome.runs if run["shots"] == k]
        echo(runs_summary.seed_table(group))
        summaries.append(summary(group))
        echo(summary_lines(inputs.dataset.name, summaries[-1]))
    _write_results(inputs, out, outcome, summaries, shots, seeds, extract, subsample,
                   save_classifiers, training)
    echo(f"results: {out / RESULTS_NAME}; test predictions at the chosen M: "
         f"{out / PREDICTIONS_NAME}")
    for k in shots:
        group = [run for run in outcome.runs if run["shots"] == k]
        echo(runs_summary.plot_by_steps(out / plot_name(k), group))
    if save_classifiers:
        _save_classifiers(inputs, out, outcome, solve, extract, subsample)
        echo(f"classifiers (one per shots and seed, FewShotClassifier.load): "
             f"{out / CLASSIFIERS_NAME}/k*-seed*")
    return outcome


def _write_results(inputs: Inputs, out: Path, outcome: RunOutcome, summaries, shots, seeds,
                   extract: ExtractOptions, subsample: str, save_classifiers: bool,
                   training: dict[str, Any] | None) -> None:
    encoder = inputs.encoder
    results = {
        "dataset": inputs.dataset.name,
        "model": inputs.model,
        "checkpoint": encoder.checkpoint,
        "pretrained": encoder.model_id.get("pretrained"),
        "precision": encoder.precision,
        "preprocessing": encoder.preprocessing,
        "peft": encoder.model_id.get("peft"),
        "crop_scale": list(extract.crop_scale),
        "subsample": subsample,
        "shots": shots,
        "views": extract.views,
        "templates": inputs.templates,
        "seeds": seeds,
        "training": training,
        "runs": outcome.runs,
        "summary": summaries,
        "std": "sample (n - 1) over seeds; accuracies are fractions (null std: one seed)",
        "skipped_images": outcome.skipped,
        "classifiers": ([f"{CLASSIFIERS_NAME}/{job.key}" for job in outcome.jobs]
                        if save_classifiers else []),
    }
    write_text(out / RESULTS_NAME, json.dumps(results, indent=2) + "\n")
    save_safetensors(out / PREDICTIONS_NAME, {key: value.contiguous() for key, value in
                                              outcome.predictions.items()})


def _save_classifiers(inputs: Inputs, out: Path, outcome: RunOutcome, solve: SolveSettings,
                      extract: ExtractOptions, subsample: str) -> None:
    """One classifier folder per (shots, seed), scored against every class (base-to-new: the
    field fitted on base, M chosen on base val, applied to the whole table)."""
    for job, run, fitted in zip(outcome.jobs, outcome.runs, outcome.fitted):
        record = {"shots": job.shots, "seed": job.seed, "views": extract.views,
                  "crop_scale": list(extract.crop_scale), "dataset": inputs.dataset.name,
                  "subsample": subsample, "classes": run.get("classes")}
        classifier = FewShotClassifier.from_fitted(inputs.encoder, inputs.templates,
                                                   outcome.test, fitted, solve, record)
        classifier.save(out / CLASSIFIERS_NAME / job.key)
