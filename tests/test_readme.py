"""Every code block of README.md is run or checked here, so the README cannot drift from the
code: the Python tour runs verbatim (the image one on a tiny open_clip model placed where
open_clip looks for "ViT-B-16"/"openai", no network), each ``fma-fast`` line parses with the
real argparse parser, and the install and fresh-machine commands name extras, scripts and
commands that exist (the CI script runs the same install and test command)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fma_fast.cli.main import build_parser

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(text: str | None = None) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order."""
    return FENCE.findall(README.read_text() if text is None else text)


def python_blocks() -> list[str]:
    return [body for lang, body in blocks() if lang == "python"]


def shell_commands(body: str) -> list[str]:
    """The commands of a shell block: comments dropped, continuation lines joined."""
    commands = []
    for line in body.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            commands.append(line)
    return commands


def kind(lang: str, body: str) -> str:
    """Which test covers a block; a block no test knows fails test_every_block_is_covered."""
    commands = shell_commands(body) if lang == "bash" else []
    if lang == "python":
        return "clip-tour" if "fma_fast.clip" in body else "tour"
    if commands and all(c.startswith("fma-fast ") for c in commands):
        return "cli"
    if commands and all(c.startswith("python3 -m venv") for c in commands):
        return "fresh-machine"
    if commands and all(c.startswith("pip install") for c in commands):
        return "install"
    return "unknown"


def test_every_block_is_covered():
    kinds = [kind(lang, body) for lang, body in blocks()]
    assert "unknown" not in kinds, [b for b, k in zip(blocks(), kinds) if k == "unknown"]
    for needed in ("tour", "clip-tour", "cli", "fresh-machine", "install"):
        assert needed in kinds, f"the README has no {needed} block"


def test_the_block_parser_sees_every_fence():
    """A planted block of each kind is found and classified (guards the regex above)."""
    text = ("x\n```python\nimport fma_fast\n```\n```bash\nfma-fast demo  # c\n"
            "fma-fast eval a \\\n  --model b\n```\n```bash\nrm -rf /\n```\n")
    found = blocks(text)
    assert [kind(lang, body) for lang, body in found] == ["tour", "cli", "unknown"]
    assert shell_commands(found[1][1]) == ["fma-fast demo", "fma-fast eval a    --model b"]


def extras(command: str) -> set[str]:
    found = re.search(r'pip install[^"]*"\.\[([a-z,]+)\]"', command)
    assert found, f"no `pip install -e \".[...]\"` in {command!r}"
    return set(found.group(1).split(","))


def declared_extras() -> set[str]:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return set(project["optional-dependencies"])


def fresh_machine_commands() -> tuple[str, str]:
    found = [body.strip() for lang, body in blocks() if kind(lang, body) == "fresh-machine"]
    assert len(found) == 2, f"expected the two fresh-machine commands, found {len(found)}"
    main_job = next(c for c in found if c.endswith("fma-fast demo"))
    tests = next(c for c in found if "pytest" in c)
    return main_job, tests


def test_install_commands_name_extras_that_exist():
    commands = [c for lang, body in blocks() if kind(lang, body) in ("install", "fresh-machine")
                for c in shell_commands(body)]
    for command in commands:
        unknown = extras(command) - declared_extras()
        assert not unknown, f"{command!r} names extras pyproject.toml lacks: {sorted(unknown)}"


def test_the_fresh_machine_commands_run_what_exists_and_match_ci():
    import tomllib

    main_job, tests = fresh_machine_commands()
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts.get("fma-fast") == "fma_fast.cli:main"
    build_parser().parse_args(["demo"])  # the main job's command line parses
    assert (REPO / "setup.py").is_file() and (REPO / "tests").is_dir()
    assert tests.endswith("TRITON_INTERPRET=1 python -m pytest"), tests
    ci = (REPO / ".ci" / "run").read_text()
    ci_install = re.search(r'pip install -q -e "\.\[([a-z,]+)\]"', ci)
    assert ci_install and set(ci_install.group(1).split(",")) == extras(tests), (
        "the CI installs other extras than the README's test command")
    assert re.search(r"^export TRITON_INTERPRET=1$", ci, re.M)
    assert re.search(r"^python -m pytest -q --durations=\d+$", ci, re.M), (
        "the CI no longer runs the README's whole test command")


def cli_lines() -> list[str]:
    return [c for lang, body in blocks() if kind(lang, body) == "cli"
            for c in shell_commands(body)]


@pytest.mark.parametrize("line", cli_lines())
def test_cli_lines_parse(line, capsys):
    argv = shlex.split(line)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as error:
        pytest.fail(f"README line {line!r} does not parse: {capsys.readouterr().err.strip()}"
                    f" (exit {error.code})")
    assert args.command == argv[0]


def test_the_feature_tour_runs_as_written(tmp_path, monkeypatch, capsys, one_thread):
    """Verbatim, in a temporary folder, on one thread (tiny tensors: a second thread only adds
    synchronisation on a busy machine)."""
    (tour,) = [b for b in python_blocks() if kind("python", b) == "tour"]
    monkeypatch.chdir(tmp_path)
    exec(compile(tour, str(README), "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "<- best" in out and "folded-fp32" in out
    assert (tmp_path / "runs" / "demo" / "model.safetensors").is_file()


TINY = "fma-fast-readme-tiny"
CLIP_TOUR_RUNNER = """
import sys
from fma_fast.clip import register_model_config

register_model_config(sys.argv[1])  # a tiny architecture under the name "ViT-B-16"
block = open(sys.argv[2]).read()
exec(compile(block, "README.md", "exec"), {"__name__": "__readme__"})
"""


def test_the_image_tour_runs_as_written(tmp_path):
    """In a child process (it replaces open_clip's "ViT-B-16" with a tiny architecture):
    the "openai" tag's weights file in a Hugging Face cache with the hub offline, five
    classes of coloured PNGs in photos/ (17 training images per class for its 16 shots) and
    unlabeled images in new_photos/."""
    open_clip = pytest.importorskip("open_clip", reason="SKIPPED, not passed: no open_clip")
    pytest.importorskip("PIL")
    import numpy as np
    from clip_support import (
        colour_image,
        hf_cache_file,
        save_random_weights,
        tiny_architecture,
        write_architecture,
        write_class_folders,
    )

    from fma_fast.clip import register_model_config

    (tour,) = [b for b in python_blocks() if kind("python", b) == "clip-tour"]
    assert 'load_encoder("ViT-B-16", pretrained="openai")' in tour
    hub = open_clip.pretrained.get_pretrained_cfg("ViT-B-16", "openai")["hf_hub"].rstrip("/")
    staging = tmp_path / "staging"
    staging.mkdir()
    # Weights saved under another name in this process (same architecture, same keys), so
    # open_clip's own "ViT-B-16" is replaced in the child only.
    register_model_config(write_architecture(staging, TINY, tiny_architecture()))
    weights = save_random_weights(open_clip, TINY, staging / "weights.safetensors")
    architecture = write_architecture(staging, "ViT-B-16", tiny_architecture())
    hf_cache_file(tmp_path / "hub", hub, "open_clip_model.safetensors", weights.read_bytes())
    work = tmp_path / "work"
    write_class_folders(work / "photos", ["ant", "bee", "cat", "dog", "elk"], per_class=34)
    (work / "new_photos").mkdir()
    rng = np.random.default_rng(7)
    for i in range(8):
        colour_image(i % 5, i, rng).save(work / "new_photos" / f"image_{i}.png")
    (staging / "tour.py").write_text(tour)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CLIP_TOUR_RUNNER, str(architecture),
                           str(staging / "tour.py")], cwd=work, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    # The first image's path as given, its five class names best first, their cosines.
    printed = done.stdout.strip().splitlines()[-1]
    found = re.fullmatch(r"new_photos/image_\d\.png \[(.*)\] tensor\(\[(.*)\]\)", printed)
    assert found, printed
    assert sorted(found.group(1).replace("'", "").split(", ")) == ["ant", "bee", "cat", "dog",
                                                                    "elk"], printed
    cosines = [float(value) for value in found.group(2).split(",")]
    assert cosines == sorted(cosines, reverse=True) and all(-1 <= c <= 1 for c in cosines)
    assert (work / "classifier" / "classifier.json").is_file()
