"""``fma-fast demo``: a synthetic few-shot task, fit, M chosen on val, test accuracy."""

from __future__ import annotations

from ..experiments import synthetic
from ..experiments.demo import run_demo
from . import options

DEFAULTS = {"classes": 20, "dim": 512, "shots": 16, "difficulty": 0.75, "blocks": 2,
            "epochs": 60, "gamma": 0.05}
DEMO_WHY = "demo: a small field trained in about a minute on a synthetic task"


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
    run_demo(task, options.fit_settings(args), max_steps=args.max_steps,
             step_size=args.step_size, device=args.device)


def register(commands) -> None:
    parser = commands.add_parser(
        "demo", help="synthetic few-shot task -> fit -> choose M on val -> test accuracy",
        formatter_class=options.Formatter)
    add_task_options(parser, seed=False)
    options.add_training_options(parser, DEFAULTS, why=DEMO_WHY)
    options.add_device(parser)
    options.add_quiet(parser)
    parser.set_defaults(run=run)
