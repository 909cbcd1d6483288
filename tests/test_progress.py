"""Progress in logs: a job whose output is not a terminal prints a line with its rate and ETA
every interval (instead of nothing), through the one progress helper every long job uses."""

from __future__ import annotations

import io
import re

import pytest
import torch

import fma_fast
from fma_fast.cli import main
from fma_fast.core import progress

LINE = re.compile(r"^(?P<desc>[\w ]+): (?P<done>[\d,]+)/(?P<total>[\d,]+) (?P<unit>\w+) "
                  r"\((?P<pct>\d+)%\), [\d,.]+ \w+/s, elapsed \d+:\d\d:\d\d, ETA \d+:\d\d:\d\d")


def test_log_lines_count_what_was_done_with_a_rate_and_eta(monkeypatch):
    monkeypatch.setenv("FMA_FAST_PROGRESS_SECONDS", "0")
    stream = io.StringIO()  # not a terminal
    bar = progress.progress(total=10, desc="score", unit="rows", stream=stream)
    for _ in range(4):
        bar.update(2)
    bar.set_postfix(loss="0.5000")
    bar.update(2)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 6, lines  # one per update at interval 0, and the closing line
    matched = [LINE.match(line) for line in lines]
    assert all(matched), lines
    assert [int(m["done"]) for m in matched] == [2, 4, 6, 8, 10, 10]
    assert {m["total"] for m in matched} == {"10"} and matched[-1]["pct"] == "100"
    assert lines[-1].endswith("loss=0.5000")


def test_nothing_is_printed_when_disabled_or_before_the_first_interval(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setenv("FMA_FAST_PROGRESS_SECONDS", "0")
    for _ in progress.progress(range(3), desc="fit", unit="epoch", enabled=False,
                               stream=stream):
        pass
    monkeypatch.setenv("FMA_FAST_PROGRESS_SECONDS", "3600")
    for _ in progress.progress(range(3), desc="fit", unit="epoch", stream=stream):
        pass
    assert stream.getvalue() == ""


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_interval_is_refused_by_name(monkeypatch, value):
    monkeypatch.setenv("FMA_FAST_PROGRESS_SECONDS", value)
    with pytest.raises(ValueError, match="FMA_FAST_PROGRESS_SECONDS"):
        progress.progress(total=1, desc="x", unit="y", stream=io.StringIO())


def test_fit_and_score_log_progress_when_not_on_a_terminal(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("FMA_FAST_PROGRESS_SECONDS", "0")
    task = tmp_path / "task"
    assert main(["synth", "--out", str(task), "--classes", "3", "--dim", "8",
                 "--shots", "2"]) == 0
    assert main(["train", str(task / "train.safetensors"), "--out", str(tmp_path / "m"),
                 "--blocks", "1", "--epochs", "3", "--max-steps", "2"]) == 0
    fit_lines = [line for line in capsys.readouterr().err.splitlines()
                 if line.startswith("fit: ")]
    assert [LINE.match(line)["done"] for line in fit_lines] == ["1", "2", "3", "3"], fit_lines
    assert main(["score", str(tmp_path / "m"), str(task / "test.safetensors"), "--classes",
                 str(task / "test.safetensors"), "--steps", "1", "--out",
                 str(tmp_path / "s")]) == 0
    score_lines = [line for line in capsys.readouterr().err.splitlines()
                   if line.startswith("score: ")]
    assert score_lines and LINE.match(score_lines[-1])["pct"] == "100", score_lines


def test_fit_progress_off_prints_nothing(monkeypatch, capsys):
    monkeypatch.setenv("FMA_FAST_PROGRESS_SECONDS", "0")
    x, labels, z = torch.randn(12, 8), torch.arange(12) % 3, torch.randn(3, 8)
    fma_fast.fit(x, labels, z, blocks=1, epochs=2, progress=False)
    assert capsys.readouterr().err == ""
