"""Running the report: the feature pools, one K-shot draw through every method, the training
budget check, and writing the files."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ...core.environment import environment
from ...core.protocol import draw_split, val_shots
from ...core.reference import flow_matching_loss
from ...io.features import check_feature_files, load_features
from ...io.files import atomic_write, read_json
from .. import synthetic
from ..adaptive import adaptive_predict, select_rule, trajectory_stats
from ..baselines import (
    FMA,
    Baseline,
    ClipAdapter,
    LinearProbe,
    Pipeline,
    TipAdapter,
    TipAdapterF,
    ZeroShot,
)
from .aggregate import aggregate
from .plots import write_plots
from .render import render_markdown
from .settings import ReportSettings


@dataclass
class Pool:
    """A labelled split to draw shots from (or score on)."""

    features: torch.Tensor
    labels: torch.Tensor


@dataclass
class FeatureSetPools:
    name: str
    train: Pool
    val: Pool
    test: Pool
    class_features: torch.Tensor


def synthetic_pools(settings: ReportSettings, difficulty: float) -> FeatureSetPools:
    """One fixed synthetic data set per difficulty (from ``data_seed``); seeds vary the shots
    drawn from it and the methods' initialisations, as seeds do in the literature."""
    task = synthetic.make_task(
        num_classes=settings.classes,
        dim=settings.dim,
        shots=max(settings.shots),
        val_shots=val_shots(max(settings.shots)),
        test_per_class=settings.test_per_class,
        difficulty=difficulty,
        seed=settings.data_seed,
    )
    return FeatureSetPools(
        name=f"synthetic d={difficulty:g}",
        train=Pool(task.train.features, task.train.labels),
        val=Pool(task.val.features, task.val.labels),
        test=Pool(task.test.features, task.test.labels),
        class_features=task.class_features,
    )


def file_pools(train: str, val: str, test: str) -> FeatureSetPools:
    """Pools from three feature files (``fma-fast synth`` or the CLIP pipeline) sharing one
    class table."""
    sets = {
        name: load_features(path, require_labels=True)
        for name, path in (("train", train), ("val", val), ("test", test))
    }
    check_feature_files(sets)
    table = sets["train"].class_features.float()
    pools = {name: Pool(s.features.float(), s.labels) for name, s in sets.items()}
    return FeatureSetPools(
        name=Path(train).resolve().parent.name or "features",
        class_features=table,
        **pools,
    )


@torch.no_grad()
def straight_line_loss(model, features, labels, class_features, points: int = 10) -> float:
    """Noise-free flow-matching loss on a fixed grid of t in (0, 1): a deterministic measure of
    how well the field fits the straight lines, comparable between fits (the training loss is
    a noisy single-sample estimate)."""
    z = class_features[labels]
    total = 0.0
    for t in torch.linspace(0.05, 0.95, points).tolist():
        x_t = (1 - t) * features + t * z
        time_column = torch.full((features.shape[0], 1), t)
        total += float(flow_matching_loss(model(x_t, time_column), z - features))
    return total / points


def _fma(settings: ReportSettings, seed: int, rows: int, epoch_factor: int = 1) -> FMA:
    return FMA(
        blocks=settings.blocks,
        epochs=epoch_factor * settings.fma_epochs(rows),
        gamma=settings.gamma,
        max_steps=settings.max_steps,
        step_size=settings.step_size,
        seed=seed,
        lr=settings.lr,
        batch_size=settings.batch_size,
    )


def draw(pools: FeatureSetPools, shots: int, seed: int) -> tuple[torch.Tensor, ...]:
    """The K-shot train split and min(K, 4)-shot val split of ``seed`` (the protocol's
    :func:`~fma_fast.core.protocol.draw_split`): (x, y, val_x, val_y)."""
    train_rows, val_rows, _ = draw_split(pools.train.labels, pools.val.labels, shots, seed)
    return (
        pools.train.features[train_rows],
        pools.train.labels[train_rows],
        pools.val.features[val_rows],
        pools.val.labels[val_rows],
    )


def _fit_diagnostics(fma: FMA, x, y, vx, vy, test_curve: list[float]) -> dict:
    """How well one FMA fit fits (noise-free line losses) and scores (test at M chosen, M=max)."""
    z = fma.class_features
    return {
        "epochs": fma.fit_result.config["epochs"],
        "updates": fma.fit_result.config["epochs"]
        * math.ceil(len(y) / fma.fit_options["batch_size"]),
        "steps": fma.steps,
        "train_line_loss": straight_line_loss(fma.model, x, y, z),
        "val_line_loss": straight_line_loss(fma.model, vx, vy, z),
        "test_accuracy_chosen_m": test_curve[fma.steps],
        "test_accuracy_max_m": test_curve[-1],
    }


def peft_pools(settings: ReportSettings, pools: FeatureSetPools) -> dict[str, FeatureSetPools]:
    """The PEFT sources' pools, each checked to list the same images as ``pools`` (the same
    labels in the same order in every split), so the same draw picks the same images."""
    sources = {}
    for name, train, val, test in settings.peft:
        other = file_pools(train, val, test)
        for split in ("train", "val", "test"):
            ours, theirs = getattr(pools, split).labels, getattr(other, split).labels
            if ours.shape != theirs.shape or not bool((ours == theirs).all()):
                raise ValueError(f"--peft-features {name}: its {split} file does not list the "
                                 f"images of --{split} (labels differ in count or order)")
        sources[name] = other
    return sources


class _Draw:
    """One K-shot draw's splits, and what each method run on it scored, chose and took."""

    def __init__(self, pools: FeatureSetPools, shots: int, seed: int):
        self.x, self.y, self.vx, self.vy = draw(pools, shots, seed)
        self.tx, self.ty, self.z = pools.test.features, pools.test.labels, pools.class_features
        self.accuracy: dict[str, float] = {}
        self.chosen: dict[str, dict] = {}
        self.seconds: dict[str, float] = {}

    def run(self, name: str, method: Baseline) -> Baseline:
        """Fit ``method`` on the draw (val chooses its settings) and score the test split."""
        start = time.perf_counter()
        method.fit(self.x, self.y, self.z, self.vx, self.vy)
        self.accuracy[name] = method.accuracy(self.tx, self.ty)
        self.seconds[name] = time.perf_counter() - start
        self.chosen[name] = dict(method.selection)
        return method


def _run_fma(done: _Draw, settings: ReportSettings, seed: int, adapter: ClipAdapter) -> dict:
    """FMA with M on val, adaptive stopping, the methods stacked on FMA's features and FMA on
    CLIP-Adapter's; the curves per M for the "fma" entry of the run."""
    start = time.perf_counter()
    fma = _fma(settings, seed, len(done.y)).fit(done.x, done.y, done.z, done.vx, done.vy)
    done.seconds["FMA"] = time.perf_counter() - start
    options = {"max_steps": settings.max_steps, "step_size": settings.step_size}
    val_stats = fma.val_stats  # the one pass over the val states that chose M
    test_stats = trajectory_stats(fma.model, done.tx, done.z, **options)
    test_curve = test_stats.fixed_accuracy(done.ty)
    done.accuracy["FMA"] = test_curve[fma.steps]
    done.chosen["FMA"] = dict(fma.selection)
    rule = select_rule(val_stats, done.vy)
    pred, stop = adaptive_predict(test_stats, rule.rule)
    done.accuracy["FMA adaptive"] = float((pred == done.ty).double().mean())
    done.chosen["FMA adaptive"] = {
        "rule": str(rule.rule),
        "test_mean_steps": float(stop.double().mean()),
    }
    done.run("linear probe on FMA", Pipeline(fma, LinearProbe(), fit_first=False))
    done.run("Tip-Adapter on FMA", Pipeline(fma, TipAdapter(), fit_first=False))

    start = time.perf_counter()
    adapted_fma = _fma(settings, seed, len(done.y))
    stacked = Pipeline(adapter, adapted_fma, fit_first=False).fit(done.x, done.y, done.z,
                                                                  done.vx, done.vy)
    done.accuracy["CLIP-Adapter + FMA"] = stacked.accuracy(done.tx, done.ty)
    done.seconds["CLIP-Adapter + FMA"] = time.perf_counter() - start
    done.chosen["CLIP-Adapter + FMA"] = dict(stacked.selection)
    adapted_curve = trajectory_stats(
        adapted_fma.model, adapter.transform(done.tx), done.z, **options
    ).fixed_accuracy(done.ty)
    history = fma.fit_result.history
    return {
        "fit": _fit_diagnostics(fma, done.x, done.y, done.vx, done.vy, test_curve),
        "val_by_steps": fma.steps_selection.accuracy,
        "test_by_steps": test_curve,
        "adapter_test_by_steps": adapted_curve,
        "adaptive_val_accuracy": rule.accuracy,
        "loss_first_epoch": history[0],
        "loss_last_epoch": history[-1],
    }


def _run_peft_sources(done: _Draw, settings: ReportSettings, shots: int, seed: int,
                      sources: dict[str, FeatureSetPools]) -> None:
    """Each PEFT source's own prediction and FMA on its features, on the same draw."""
    for name, source in sources.items():
        px, py, pvx, pvy = draw(source, shots, seed)
        pz = source.class_features
        start = time.perf_counter()
        own = ZeroShot().fit(px, py, pz, pvx, pvy)
        done.accuracy[name] = own.accuracy(source.test.features, source.test.labels)
        done.seconds[name] = time.perf_counter() - start
        start = time.perf_counter()
        on_source = _fma(settings, seed, len(py)).fit(px, py, pz, pvx, pvy)
        done.accuracy[f"{name} + FMA"] = on_source.accuracy(source.test.features,
                                                            source.test.labels)
        done.seconds[f"{name} + FMA"] = time.perf_counter() - start
        done.chosen[f"{name} + FMA"] = dict(on_source.selection)


def run_one(pools: FeatureSetPools, shots: int, seed: int, settings: ReportSettings,
            sources: dict[str, FeatureSetPools] | None = None) -> dict:
    """Every method on one K-shot draw: test accuracies, choices made on val, seconds; and for
    each PEFT source (same images, its own features) its own prediction and FMA on it."""
    done = _Draw(pools, shots, seed)
    done.run("zero-shot", ZeroShot())
    done.run("linear probe", LinearProbe())
    adapter = done.run("CLIP-Adapter", ClipAdapter(seed=seed))
    done.run("Tip-Adapter", TipAdapter())
    done.run("Tip-Adapter-F", TipAdapterF())
    fma = _run_fma(done, settings, seed, adapter)
    _run_peft_sources(done, settings, shots, seed, sources or {})
    return {
        "dataset": pools.name,
        "shots": shots,
        "seed": seed,
        "accuracy": done.accuracy,
        "chosen": done.chosen,
        "seconds": done.seconds,
        "fma": fma,
    }


def convergence_check(pools: FeatureSetPools, settings: ReportSettings, base: dict) -> dict:
    """Refit the FMA of run ``base`` with twice the epochs: if the noise-free losses and the
    test accuracy barely move, the report's training budget has plateaued."""
    shots, seed = base["shots"], base["seed"]
    x, y, vx, vy = draw(pools, shots, seed)
    fma = _fma(settings, seed, len(y), epoch_factor=2).fit(x, y, pools.class_features, vx, vy)
    curve = trajectory_stats(
        fma.model,
        pools.test.features,
        pools.class_features,
        max_steps=settings.max_steps,
        step_size=settings.step_size,
    ).fixed_accuracy(pools.test.labels)
    fits = [
        base["fma"]["fit"],
        _fit_diagnostics(fma, x, y, vx, vy, curve),
    ]
    return {"dataset": pools.name, "shots": shots, "seed": seed, "fits": fits}


def run_report(
    settings: ReportSettings, out: str | os.PathLike, *, name: str = "report", progress: bool = True
) -> dict:
    """Run the whole grid and write ``out/name.md``, ``out/name.json`` and the PNGs.

    Returns the result dict that the JSON holds.
    """
    _check_name(name)
    out = Path(out)
    start = time.perf_counter()
    if settings.features is not None:
        pool_sets = [file_pools(*settings.features)]
    else:
        pool_sets = [synthetic_pools(settings, d) for d in settings.difficulties]
    runs, convergence = [], []
    planned = len(pool_sets) * len(settings.shots) * len(settings.seeds)
    for pools in pool_sets:
        sources = peft_pools(settings, pools)
        for shots in settings.shots:
            for seed in settings.seeds:
                run = run_one(pools, shots, seed, settings, sources)
                runs.append(run)
                if progress:
                    accs = " ".join(f"{m}={100 * a:.1f}%" for m, a in run["accuracy"].items())
                    elapsed = time.perf_counter() - start
                    left = elapsed / len(runs) * (planned - len(runs))
                    print(f"[{elapsed:6.0f}s, run {len(runs)}/{planned}, ETA {left:.0f}s] "
                          f"{pools.name} K={shots} seed={seed}: {accs}", flush=True)
        if settings.convergence_check:
            for shots in sorted({min(settings.shots), max(settings.shots)}):
                base = next(
                    r
                    for r in runs
                    if r["dataset"] == pools.name
                    and r["shots"] == shots
                    and r["seed"] == settings.seeds[0]
                )
                convergence.append(convergence_check(pools, settings, base))
    settings_dict = asdict(settings)
    aggregated = aggregate(runs)
    result = {
        "name": name,
        "command": settings.command(str(out), name),
        "environment": environment(),
        "settings": settings_dict,
        "runs": runs,
        "convergence": convergence,
        # JSON keys are strings: K is stored as a string key throughout.
        "aggregate": json.loads(json.dumps(aggregated)),
    }
    result["seconds"] = time.perf_counter() - start
    write_report(result, out, name, progress=progress)
    return result


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ValueError(f"name must be a plain file stem, got {name!r}")
    return name


def write_report(result: dict, out: str | os.PathLike, name: str, *, progress: bool = True) -> None:
    """Write ``name.json``, the PNGs and ``name.md`` for a result, each atomically."""
    out, name = Path(out), _check_name(name)
    result["plots"], result["plot_note"] = write_plots(result, out, name)
    if progress and result["plot_note"]:
        print(result["plot_note"])
    markdown = render_markdown(result)
    atomic_write(out / f"{name}.json", lambda temp: temp.write_text(json.dumps(result, indent=1)))
    atomic_write(out / f"{name}.md", lambda temp: temp.write_text(markdown))
    if progress:
        print(
            f"wrote {out / (name + '.md')} and {out / (name + '.json')}"
            + "".join(f", {p}" for p in result["plots"])
        )


def rerender(out: str | os.PathLike, name: str = "report", *, progress: bool = True) -> dict:
    """Rewrite the markdown and PNGs from an existing ``out/name.json`` without rerunning:
    the numbers (and the recorded command, machine and date) stay those of the run."""
    path = Path(out) / f"{_check_name(name)}.json"
    if not path.exists():
        raise FileNotFoundError(f"no report results at {path}: run the report first")
    result = read_json(path, "report results")
    write_report(result, out, name, progress=progress)
    return result
