"""``fma-fast demo``: a synthetic few-shot task, fit, M chosen on val, test accuracy."""

from __future__ import annotations

import time

from ..experiments import synthetic
from ..solver.api import accuracy_by_steps, select_steps
from . import options

DEFAULTS = {"classes": 20, "dim": 512, "shots": 16, "difficulty": 0.75, "blocks": 2,
            "epochs": 60, "gamma": 0.05}


def add_task_options(parser, *, seed: bool) -> None:
    """The synthetic task's options (``demo`` and ``synth``; ``demo``'s --seed is fit's too)."""
    group = parser.add_argument_group("synthetic task")
    group.add_argument("--classes", type=int, default=DEFAULTS["classes"], help="classes")
    group.add_argument("--dim", type=int, default=DEFAULTS["dim"], help="feature dim D")
    group.add_argument("--shots", type=int, default=DEFAULTS["shots"],
                       help="training shots per class (val: min(K, 4))")
    group.add_argument("--difficulty", type=float, default=DEFAULTS["difficulty"],
                       help="0 easy .. 1 hard")
    if seed:
        group.add_argument("--seed", type=int, default=1, help="seed of the task")


def make_task(args) -> synthetic.FewShotTask:
    return synthetic.make_task(num_classes=args.classes, dim=args.dim, shots=args.shots,
                               difficulty=args.difficulty, seed=args.seed)


def run(args) -> None:
    options.check_device(args.device)
    task = make_task(args)
    print(
        f"synthetic task: {args.classes} classes, D={args.dim}, {args.shots} shots, "
        f"difficulty {args.difficulty}: {len(task.train.labels)} train / "
        f"{len(task.val.labels)} val / {len(task.test.labels)} test rows"
    )
    print(
        f"network: {args.blocks} residual blocks (the released default is 12; "
        f"the demo uses a small one to finish in about a minute on 2 CPU cores)"
    )
    start = time.perf_counter()
    result = options.fit_from_args(args, task.train.features, task.train.labels,
                                   task.class_features)
    print(
        f"fit: {args.epochs} epochs in {time.perf_counter() - start:.1f} s, "
        f"loss {result.history[0]:.4f} -> {result.history[-1]:.4f}"
    )
    solve_options = {"max_steps": args.max_steps, "step_size": args.step_size,
                     "device": args.device}
    selection = select_steps(result.model, task.val.features, task.val.labels,
                             task.class_features, **solve_options)
    test = accuracy_by_steps(result.model, task.test.features, task.test.labels,
                             task.class_features, **solve_options)
    print(options.accuracy_table(selection.accuracy, test, selection.best_steps))
    chosen = selection.best_steps
    print(
        f"test accuracy: M=0 (zero-shot) {100 * test[0]:.2f}%, "
        f"M={chosen} (chosen on val) {100 * test[chosen]:.2f}%"
    )


def register(commands) -> None:
    parser = commands.add_parser(
        "demo", help="synthetic few-shot task -> fit -> choose M on val -> test accuracy",
        formatter_class=options.Formatter)
    add_task_options(parser, seed=False)
    options.add_training_options(parser, DEFAULTS)
    options.add_device(parser)
    options.add_quiet(parser)
    parser.set_defaults(run=run)
