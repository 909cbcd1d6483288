"""The project's policies, each defined once: the dtype of each precision, row and class chunk
sizes, the tolerance table, the logit scale, and the rule that picks the best candidate on a
validation split.

Internal module: the names the public functions take are in :mod:`fma_fast.core.names`; the
numbers behind the sizes are in ``benchmarks/results/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

PRECISION_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
}
"""The dtype of each solve precision (:data:`fma_fast.core.names.PRECISIONS`): of the folded
weights and GEMM inputs (accumulation, residual stream and LayerNorm statistics stay fp32)."""

DEFAULT_STEP_SIZE = 0.1
"""The Euler step size h when neither the call nor the model says (the released code's)."""

SOLVE_BATCH_ROWS = {"cpu": 4096, "cuda": 65536}
"""Rows moved to the compute device and solved at once (``solve``'s default ``batch_size``)."""

CPU_CHUNK_ROWS = 1024
"""Most rows one CPU worker advances through a step at a time (the work buffers' size); the
rows of a solve batch are split into such chunks, at least one per worker."""

MIN_WORKER_ROWS = 128
"""Smallest chunk a CPU solve batch is split into for workers: smaller GEMMs run poorly."""

SCORE_PART_ROWS = 262144
"""Most rows of one output part of ``fma_fast.score``: the unit written atomically, skipped
when a job resumes, and the most outputs held in memory at once."""

SCORE_LABEL_ROWS = 1 << 20
"""Labels read at once when ``fma_fast.score`` checks an input's label range before any
work (8 MiB of int64): a column of 2^26 labels read whole took 512 MiB."""

SCORE_PART_BYTES = 256 * 2**20
"""Most bytes of top-k outputs (an int64 class and an fp32 cosine per entry) one part of
``fma_fast.score`` holds, and one solve batch: with a large top-k, parts and batches get fewer
than ``SCORE_PART_ROWS`` rows instead of asking for gigabytes at once."""

SCORE_TEXT_ENTRIES = 1_000_000
"""Largest rows × topk written as CSV or JSON lines (with class names): beyond that, text is
too big to read and slow to write; use safetensors or .npy."""

PREDICT_PART_IMAGES = 512
"""Images of one output part of ``fma-fast predict`` (the unit decoded, encoded, written
atomically and skipped when a job resumes): a few seconds to minutes of encoding."""

DECODE_THREADS = 8
"""Most image decoding threads ``fma-fast predict`` starts by default (fewer on fewer cores)."""

PROGRESS_SECONDS = 30.0
"""Seconds between the one-line progress reports of a long job whose output is not a
terminal (a log file): often enough to see it move, rarely enough to keep logs short."""

PER_ROW_TABLE_BYTES = 256 * 2**20
"""Largest fp32 (rows, C, D) block of per-row class tables held at once: it sets the row batch
of a solve against per-row tables (CoCoOp)."""

CLASS_TILE = 4096
"""Classes scored at once in torch: a chunk's logits stay rows × 4096, whatever C is."""

class Tolerance(NamedTuple):
    """How far a fast path may be from its reference in one I/O or GEMM dtype."""

    rtol: float
    """Element-wise, with ``atol``: ``|a − e| ≤ atol + rtol·|e|`` (one kernel's output)."""
    atol: float
    chain: float
    """A chain of GEMMs (a folded step, a whole solve): the error relative to the result's
    size (its norm, or how far the reference moved the rows from x_0)."""


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(rtol=1e-5, atol=1e-6, chain=1e-5),
    torch.float16: Tolerance(rtol=2e-3, atol=2e-3, chain=5e-3),
    torch.bfloat16: Tolerance(rtol=1.6e-2, atol=1.6e-2, chain=2e-2),
}
"""The one tolerance table, per dtype: the kernel tests, the solve and plan tests, the golden
fixtures, the compiled path's self-check and ``fma-fast doctor``. Element-wise, fp32 1e-5
relative (atol for values near 0) and halves about two units of their last place (2⁻¹⁰, 2⁻⁷);
a GEMM chain: reassociated fp32 GEMMs (about 1e-6 measured; fp32 rounding is 6e-8 per op), or
weights and GEMM inputs rounded to 11 (fp16) or 8 (bf16, about 5e-3 measured) mantissa bits."""

DOT_ERROR: dict[str, float] = {"ieee": 2.0**-24, "tf32x3": 2.0**-21, "tf32": 2.0**-11}
"""Unit error of an fp32 ``tl.dot`` on a GPU by input precision, relative to ‖a‖·‖b‖ (so, the
error of a cosine): "tf32x3" drops each product's lo·lo term and reads the lo parts as tf32
(≤ 2.5·2⁻²¹ per |a_k·b_k|), "tf32" reads 10 of 23 mantissa bits. Half and bf16 operands
multiply exactly, like "ieee" (their rounding on input is the I/O dtype's, in TOLERANCES). The
Triton interpreter reproduces these with ``FMA_FAST_INTERPRET_TF32=1``."""


def logit_tolerance(dtype: torch.dtype, logit_scale: float, precision: str) -> float:
    """Tolerance, relative to the output's natural size, of a kernel output computed through
    ``logit_scale``·cos (logits, log-sum-exp, cross-entropy, softmax probabilities and their
    gradients): the I/O dtype's own rtol, plus the dot's cosine error (``DOT_ERROR`` of
    ``precision`` for fp32 operands, exact products for halves) amplified 1 + logit_scale times
    (the logits' error, which the softmax passes on to first order).

    The natural size is the output's prefactor, not its value: e.g. the cosine cross-entropy's
    gradient is g·scale/(N·‖x‖) times O(1) terms, and it is 0 for a single class."""
    unit = DOT_ERROR[precision if dtype == torch.float32 else "ieee"]
    return TOLERANCES[dtype].rtol + (1.0 + logit_scale) * unit

CLASS_TABLE_TOLERANCE = 1e-5
"""Two class tables are one table when every row differs by at most this fraction of its L2
norm (in L2): train/val/test files, a model and the tables it is used with, PEFT sources.
A table computed twice in fp32 differs by rounding only: n ulps per element move a row by at
most n·2⁻²³ ≈ n·1.2e-7 of its norm, and a K-term fp32 dot product summed in another order or
memory alignment (another BLAS kernel or CPU) moves by about √K·2⁻²⁴ of its terms' scale
(3.8e-6 at K = 4096, the widest CLIP text width). 1e-5 holds both; the nearest real difference
stays far above it (a bf16 copy of a table ≈ 1e-3, other templates or checkpoints ≥ 1e-2,
swapped or other classes ≈ 1), and within it no cosine moves by more than 2e-5."""

UNIT_ROW_TOLERANCE = 1e-6
"""Rows whose L2 norm is within this of 1 are left as they are (bit for bit) when rows are
normalised: by ``eval``, ``train`` and ``score`` (``io.features.unit_rows``) and by ``solve``
for class tables, so data written normalised keeps its values and class-table digest."""

UNIT_NORM_TOLERANCE = 1e-3
"""Rows whose L2 norm is further than this from 1 are "not unit-norm": every released CLIP
extractor L2-normalises its features, and the field is trained and solved on such rows."""

LOGIT_SCALE = 100.0
"""CLIP's logit scale: softmax(100·cos) turns cosines into class probabilities (the
validation cross-entropy, the step ensemble, the baselines' logits, adaptive stopping)."""


def best_on_val(
    accuracy: Sequence[float],
    cross_entropy: Sequence[float],
    steps: Sequence[float] | None = None,
) -> int:
    """The index of the best candidate on a validation split: the highest accuracy, then the
    lowest cross-entropy, then the fewest (mean) solver steps, then the earliest candidate.

    Small validation splits tie often (4 shots per class); the cross-entropy keeps a saturated
    split from settling on the first perfect candidate.
    """
    if not accuracy or len(accuracy) != len(cross_entropy):
        raise ValueError(
            f"need one cross-entropy per accuracy, got {len(accuracy)} and {len(cross_entropy)}"
        )
    steps = [0.0] * len(accuracy) if steps is None else list(steps)
    return max(
        range(len(accuracy)), key=lambda i: (accuracy[i], -cross_entropy[i], -steps[i], -i)
    )
