"""Per-row class tables (CoCoOp): solve, accuracy_by_steps, select_steps and fit against a
brute-force computation, and the row batches that bound the (rows, C, D) block."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import quantized

import fma_fast
from fma_fast import reference, synthetic
from fma_fast.ops import class_tables


def _field(dim: int, seed: int = 0) -> fma_fast.VelocityNet:
    torch.manual_seed(seed)
    model = fma_fast.VelocityNet(dim, blocks=1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.1)
    return model


def _brute_topk(state: torch.Tensor, tables: torch.Tensor, k: int):
    """Per row: cosines with its own table, best first, the lower class first on ties."""
    values, indices = [], []
    for row in range(state.shape[0]):
        cos = F.normalize(tables[row].double(), dim=-1) @ F.normalize(state[row].double(), dim=0)
        order = sorted(range(cos.shape[0]), key=lambda c: (-float(cos[c]), c))[:k]
        indices.append(order)
        values.append([float(cos[c]) for c in order])
    return torch.tensor(values), torch.tensor(indices)


@pytest.mark.parametrize("rows,classes,dim,k", [(37, 13, 9, 1), (5, 4, 6, 4), (64, 31, 16, 7)])
def test_solve_against_per_row_tables_equals_brute_force(rows, classes, dim, k, monkeypatch):
    """Guards scoring a row against another row's table (batch offsets) and wrong ties: odd
    shapes, k up to C, tiny batches (a budget of 3 rows), tables given or built."""
    generator = torch.Generator().manual_seed(rows)
    x = F.normalize(torch.randn(rows, dim, generator=generator), dim=-1)
    tables = torch.randn(rows, classes, dim, generator=generator)
    tables[:, 1] = tables[:, 0]  # exact ties: class 0 must win over class 1
    model = _field(dim)
    monkeypatch.setattr(class_tables, "PER_ROW_TABLE_BYTES", 3 * 4 * classes * dim)
    built_for = []

    def build(x0):
        built_for.append(x0.shape[0])
        index = torch.cdist(x0, x).argmin(dim=1)  # which rows these are
        return tables[index]

    given = fma_fast.solve(x, model, 3, class_features=fma_fast.PerRowClasses(tables), topk=k,
                           zero_shot=True)
    built = fma_fast.solve(x, model, 3, topk=k, class_features=fma_fast.PerRowClasses(
        build=build, num_classes=classes, dim=dim))
    assert max(built_for) == 3 and sum(built_for) == rows
    with torch.no_grad():
        final = reference.euler_solve(model, x, 3, 0.1)
    values, indices = _brute_topk(final, tables, k)
    assert torch.equal(given.topk_indices, indices), (given.topk_indices, indices)
    torch.testing.assert_close(given.topk_values.double(), values.double(), rtol=1e-5, atol=1e-6)
    assert torch.equal(built.topk_indices, given.topk_indices)
    assert torch.equal(given.zero_shot_pred, _brute_topk(x, tables, 1)[1][:, 0])
    assert "+per-row-tables" in given.path, given.path


def test_a_table_repeated_per_row_gives_the_shared_table_results():
    """Per-row tables that are all the same table reproduce every shared-table result: solve,
    the accuracy and cross-entropy per M, the chosen M, and a whole fit."""
    task = synthetic.make_task(num_classes=5, dim=12, shots=4, difficulty=0.6, seed=3)
    x, y, z = task.train.features, task.train.labels, task.class_features
    repeated = fma_fast.PerRowClasses(z.expand(x.shape[0], -1, -1))
    shared = fma_fast.fit(x, y, z, blocks=1, epochs=3, batch_size=8, gamma=0.1, progress=False)
    per_row = fma_fast.fit(x, y, repeated, blocks=1, epochs=3, batch_size=8, gamma=0.1,
                           progress=False)
    assert per_row.history == pytest.approx(shared.history, rel=1e-6)
    model = shared.model
    vx, vy = task.val.features, task.val.labels
    per_val = fma_fast.PerRowClasses(z.expand(vx.shape[0], -1, -1))
    a, b = fma_fast.select_steps(model, vx, vy, z), fma_fast.select_steps(model, vx, vy, per_val)
    assert a.best_steps == b.best_steps and a.accuracy == b.accuracy
    assert b.cross_entropy == pytest.approx(a.cross_entropy, rel=1e-5)
    first = fma_fast.solve(vx, model, 4, class_features=z, topk=3)
    second = fma_fast.solve(vx, model, 4, class_features=per_val, topk=3)
    assert torch.equal(first.topk_indices, second.topk_indices)


def test_fit_moves_each_row_toward_its_own_tables_class():
    """Guards fit taking the class row of another row's table: with tables that differ per row,
    the training targets are table[row, label[row]] (spied on the pair op)."""
    from fma_fast.ops import dispatch
    from fma_fast.train import fit

    generator = torch.Generator().manual_seed(4)
    x = F.normalize(torch.randn(10, 6, generator=generator), dim=-1)
    y = torch.randint(3, (10,), generator=generator)
    tables = F.normalize(torch.randn(10, 3, 6, generator=generator), dim=-1)
    seen = []
    real = dispatch.fused_pair

    def spy(x0, labels, targets, *args, **kwargs):
        seen.append((x0.clone(), targets[labels].clone()))
        return real(x0, labels, targets, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fit.dispatch, "fused_pair", spy)
        fma_fast.fit(x, y, fma_fast.PerRowClasses(tables), blocks=1, epochs=2, batch_size=4,
                     progress=False)
    for x0, targets in seen:
        rows = torch.cdist(x0, x).argmin(dim=1)
        torch.testing.assert_close(targets, tables[rows, y[rows]])


def test_per_row_tables_are_checked():
    x = F.normalize(torch.randn(6, 4), dim=-1)
    model = _field(4)
    with pytest.raises(ValueError, match="have 5 rows but the features have 6"):
        fma_fast.solve(x, model, 1, class_features=fma_fast.PerRowClasses(torch.randn(5, 3, 4)))
    with pytest.raises(ValueError, match="must have shape"):
        fma_fast.solve(x, model, 1, class_features=fma_fast.PerRowClasses(
            build=lambda rows: torch.randn(rows.shape[0], 2, 4), num_classes=3, dim=4))
    bad = torch.randn(6, 3, 4)
    bad[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fma_fast.solve(x, model, 1, class_features=fma_fast.PerRowClasses(bad))
    with pytest.raises(ValueError, match="ensemble_steps is not available"):
        fma_fast.solve(x, model, 2, class_features=fma_fast.PerRowClasses(torch.randn(6, 3, 4)),
                       ensemble_steps=(0, 2))
    with pytest.raises(TypeError, match="either tables"):
        fma_fast.PerRowClasses()


BAD_TABLES = {  # name -> (make from real tables, message)
    "complex": (lambda t: t.to(torch.complex64) + 1j, "has complex dtype torch.complex64"),
    "complex-numpy": (lambda t: t.numpy() + 1j * np.ones(t.shape, dtype=np.float32),
                      "has complex dtype torch.complex64"),
    "meta": (lambda t: torch.empty(t.shape, device="meta"), "is a meta tensor"),
    "sparse": (lambda t: t.to_sparse(), "has layout sparse_coo"),
    "quantized": (quantized, r"is a quantized tensor \(torch.qint8\)"),
    "integer": (lambda t: (4 * t).long(), "has dtype torch.int64; expected a floating dtype"),
    "nested": (lambda t: torch.nested.nested_tensor(list(t)), "is a nested tensor"),
}


def _bad_tables(name):
    x = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(5)), dim=-1)
    make, message = BAD_TABLES[name]
    return x, make(torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(6))), message


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch: nested tensors are a prototype
@pytest.mark.parametrize("name", BAD_TABLES)
def test_tables_without_real_dense_values_are_refused(name):
    """tables= that are meta or sparse used to be accepted and fail deep inside solve
    (NotImplementedError); complex, quantized and integer ones were refused already. Each is
    a ValueError naming tables and what is wrong, when PerRowClasses is built."""
    _, bad, message = _bad_tables(name)
    with pytest.raises(ValueError, match=f"tables {message}"):
        fma_fast.PerRowClasses(bad)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's complex-to-real cast warning
@pytest.mark.parametrize("name", BAD_TABLES)
def test_tables_from_build_without_real_dense_values_are_refused(name):
    """Complex tables from build used to lose their imaginary part silently and integer ones
    were scored as given; meta, sparse and quantized ones raised inside solve. Each is a
    ValueError naming build's tables."""
    x, bad, message = _bad_tables(name)
    if isinstance(bad, np.ndarray):
        bad = torch.from_numpy(bad)
    built = fma_fast.PerRowClasses(build=lambda rows: bad, num_classes=3, dim=4)  # one batch
    with pytest.raises(ValueError, match=f"tables from build {message}"):
        fma_fast.solve(x, _field(4), 1, class_features=built)


def test_fit_and_select_steps_see_unit_class_rows_whatever_the_tables_scale():
    """Guards per-row tables used unnormalised outside solve: tables given or built at
    class-dependent scales (0.25 to 4.25) must train, and choose M, exactly as the same tables
    normalised by hand (fit's targets are each row's own class row, made unit)."""
    generator = torch.Generator().manual_seed(6)
    x = F.normalize(torch.randn(12, 6, generator=generator), dim=-1)
    y = torch.randint(3, (12,), generator=generator)
    unit = F.normalize(torch.randn(12, 3, 6, generator=generator), dim=-1)
    raw = unit * (4 * torch.rand(12, 3, 1, generator=generator) + 0.25)

    def build(x0):
        return raw[torch.cdist(x0, x).argmin(dim=1)]

    tables = {"unit": fma_fast.PerRowClasses(unit), "given": fma_fast.PerRowClasses(raw),
              "built": fma_fast.PerRowClasses(build=build, num_classes=3, dim=6)}
    runs = {name: fma_fast.fit(x, y, table, blocks=1, epochs=2, batch_size=4, gamma=0.1,
                               seed=3, progress=False) for name, table in tables.items()}
    model = runs["unit"].model
    chosen = {name: fma_fast.select_steps(model, x, y, table, max_steps=4)
              for name, table in tables.items()}
    for name in ("given", "built"):
        assert runs[name].history == pytest.approx(runs["unit"].history, rel=1e-5), name
        for (key, got), wanted in zip(runs[name].model.named_parameters(), model.parameters()):
            torch.testing.assert_close(got, wanted, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=name, k=key: f"{n} tables, {k}: {m}")
        assert chosen[name].accuracy == chosen["unit"].accuracy, name
        assert chosen[name].cross_entropy == pytest.approx(chosen["unit"].cross_entropy,
                                                           rel=1e-5), name
