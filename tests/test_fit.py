"""Training: the loss falls, runs are reproducible, and on a hard task FMA helps at the chosen M."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_support import SKIP_REASON, kernel_device

import fma_fast
from fma_fast import reference, synthetic
from fma_fast.ops import dispatch
from fma_fast.solver import routing
from fma_fast.train import fit
from fma_fast.train.schedules import learning_rates, lr_factor


@pytest.fixture(scope="module")
def hard_task() -> synthetic.FewShotTask:
    return synthetic.make_task(
        num_classes=10, dim=64, shots=8, difficulty=0.9, test_per_class=40, seed=3
    )


@pytest.fixture(scope="module")
def trained(hard_task) -> fma_fast.FitResult:
    return fma_fast.fit(
        hard_task.train.features,
        hard_task.train.labels,
        hard_task.class_features,
        blocks=2,
        epochs=40,
        gamma=0.05,
        seed=5,
        progress=False,
    )


def test_loss_falls(trained):
    history = trained.history
    assert len(history) == 40
    assert history[-1] < 0.9 * history[0], f"loss went {history[0]:.4f} -> {history[-1]:.4f}"


def test_fma_beats_zero_shot_at_the_m_chosen_on_val(hard_task, trained):
    selection = fma_fast.select_steps(
        trained.model, hard_task.val.features, hard_task.val.labels, hard_task.class_features
    )
    test = fma_fast.accuracy_by_steps(
        trained.model, hard_task.test.features, hard_task.test.labels, hard_task.class_features
    )
    chosen = selection.best_steps
    print(f"test accuracy M=0 {test[0]:.4f}, M={chosen} (val) {test[chosen]:.4f}")
    assert chosen > 0, f"val chose M=0: {selection.accuracy}"
    assert test[chosen] > test[0], f"test accuracy per M: {test}"


def test_same_seed_same_model_other_seed_differs(hard_task):
    def run(seed):
        return fma_fast.fit(
            hard_task.train.features[:40],
            hard_task.train.labels[:40],
            hard_task.class_features,
            blocks=1,
            epochs=2,
            gamma=0.1,
            seed=seed,
            progress=False,
        )

    first, again, other = run(7), run(7), run(8)
    assert first.history == again.history
    for key, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, again.model.state_dict()[key]), key
    assert first.history != other.history


def test_endpoint_noise_form_trains(hard_task):
    result = fma_fast.fit(
        hard_task.train.features,
        hard_task.train.labels,
        hard_task.class_features,
        blocks=1,
        epochs=5,
        gamma=1.0,
        noise="endpoint",
        progress=False,
    )
    assert result.config["noise"] == "endpoint" and all(
        map(torch.isfinite, map(torch.tensor, result.history))
    )


def test_fit_continues_from_a_given_model(hard_task, trained):
    before = {k: v.clone() for k, v in trained.model.state_dict().items()}
    result = fma_fast.fit(
        hard_task.train.features,
        hard_task.train.labels,
        hard_task.class_features,
        model=trained.model,
        epochs=1,
        progress=False,
    )
    assert result.model is trained.model
    assert any(not torch.equal(before[k], v) for k, v in result.model.state_dict().items())


def test_schedule_warms_up_linearly_then_decays_to_zero():
    factors = [lr_factor(step, 10, 110) for step in range(110)]
    assert factors[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(110, 10, 110) == pytest.approx(0.0)


def test_fused_triton_training_matches_the_reference_loss_curve(hard_task):

    if kernel_device() is None:
        pytest.skip(SKIP_REASON)
    # Philox (Triton) and torch.Generator noise differ, so compare at gamma=0 where the
    # target is deterministic: same batches, same t, same model -> same losses.
    runs = [fma_fast.fit(hard_task.train.features[:24], hard_task.train.labels[:24],
                         hard_task.class_features, blocks=1, epochs=2, batch_size=8,
                         gamma=0.0, seed=2, backend=backend, progress=False)
            for backend in ("reference", "triton")]
    assert runs[0].config["path"] == "reference"
    assert runs[1].config["path"].startswith("triton")
    assert runs[1].history == pytest.approx(runs[0].history, rel=1e-5)


@pytest.mark.parametrize("noise", ["bridge", "endpoint"])
def test_fit_leaves_the_callers_tensors_untouched(noise):
    """Features and class table that require grad get no .grad, keep their values, and the
    trained model carries no graph back to them."""
    task = synthetic.make_task(num_classes=3, dim=8, shots=4, difficulty=0.5, seed=2)
    features = task.train.features.clone().requires_grad_(True)
    table = task.class_features.clone().requires_grad_(True)
    labels = task.train.labels.clone()
    copies = [t.detach().clone() for t in (features, table, labels)]
    fma_fast.fit(features, labels, table, blocks=1, epochs=2, gamma=0.1, noise=noise,
                 progress=False)
    for name, tensor, copy in zip(("features", "class table", "labels"),
                                  (features, table, labels), copies):
        assert tensor.grad is None, f"fit wrote .grad into the caller's {name}"
        assert torch.equal(tensor.detach(), copy), f"fit changed the caller's {name}"


def _tiny_task(rows_per_class: int = 8):
    task = synthetic.make_task(num_classes=4, dim=16, shots=rows_per_class, difficulty=0.5,
                               seed=7)
    return task.train.features, task.train.labels, task.class_features


def test_the_learning_rate_follows_warm_up_then_cosine_at_every_step():
    """Guards a scheduler that never steps, or a warm-up of the wrong length: the
    "warmup-cosine" schedule is written out here from its definition, not taken from
    lr_factor."""
    x, y, z = _tiny_task()  # 32 rows, batch 8: 4 steps per epoch
    lr, epochs, per_epoch = 1e-3, 3, 4
    result = fma_fast.fit(x, y, z, blocks=1, epochs=epochs, batch_size=8, lr=lr,
                          warmup_epochs=1, schedule="warmup-cosine", progress=False)
    total, warm = epochs * per_epoch, per_epoch
    expected = [lr * (k + 1) / warm for k in range(warm)]
    expected += [lr * 0.5 * (1 + math.cos(math.pi * (k - warm) / (total - warm)))
                 for k in range(warm, total)]
    assert result.learning_rates == pytest.approx(expected, rel=1e-9), result.learning_rates


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_weight_decay_is_applied_at_the_step_learning_rate(weight_decay):
    """Guards an optimizer that ignores weight_decay. At the released init the output layer is
    zero, so in the first step every earlier weight has a zero gradient: AdamW then only
    decays it, p <- p·(1 - lr_0·wd), with lr_0 the first step's warm-up learning rate."""
    x, y, z = _tiny_task()
    torch.manual_seed(3)
    model = fma_fast.VelocityNet(16, blocks=1)
    before = model.input_proj.weight.detach().clone()
    result = fma_fast.fit(x, y, z, model=model, epochs=1, batch_size=32, lr=0.1,
                          weight_decay=weight_decay, warmup_epochs=1, progress=False)
    lr_0 = 0.1 * 1 / 1  # one step per epoch, warm-up of one step: the full rate
    assert result.learning_rates == [pytest.approx(lr_0)]
    torch.testing.assert_close(model.input_proj.weight.detach(),
                               before * (1 - lr_0 * weight_decay), rtol=1e-6, atol=0)


def test_the_endpoint_noise_scale_is_gamma_times_the_feature_std(monkeypatch):
    """Guards a wrong σ: fit hands the per-dimension std of its rows (ddof 0) to the pair, and
    the endpoint form puts sqrt(t(1-t))·γ·σ·ε around the line (written out here)."""
    x, y, z = _tiny_task()
    seen = {}
    real = dispatch.fused_pair

    def spy(*args, **kwargs):
        seen["feature_std"] = kwargs["feature_std"]
        return real(*args, **kwargs)

    monkeypatch.setattr(fit.dispatch, "fused_pair", spy)
    fma_fast.fit(x, y, z, blocks=1, epochs=1, gamma=0.5, noise="endpoint", progress=False)
    torch.testing.assert_close(seen["feature_std"], torch.tensor(x.numpy().std(axis=0)))

    generator = torch.Generator().manual_seed(2)
    x0, target = torch.randn(5, 6, generator=generator), torch.randn(5, 6, generator=generator)
    t, noise = torch.rand(5, generator=generator), torch.randn(5, 6, generator=generator)
    std = torch.rand(6, generator=generator) + 0.5
    x_t, v = reference.training_pair(x0, target, t, noise, gamma=0.5, form="endpoint",
                                     feature_std=std)
    tc = t.clamp(1e-3, 1 - 1e-3)[:, None]
    line = (1 - tc) * x0 + tc * target
    expected = line + torch.sqrt(tc * (1 - tc)) * 0.5 * std * noise
    torch.testing.assert_close(x_t, expected)
    torch.testing.assert_close(v, (target - expected) / (1 - tc))


def _replay_released_schedule(lr: float, epochs: int, warmup_epochs: int,
                              steps_per_epoch: int) -> list[float]:
    """The released training loop's learning rates, replayed with torch's own classes: AdamW
    and a CosineAnnealingLR over T = total - warm-up steps, the warm-up written by hand into
    the param groups after each step while the step count is below the warm-up's."""
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=lr,
                                  weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup,
                                                           eta_min=0)
    rates = []
    for step in range(1, total + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if step < warmup:
            for group in optimizer.param_groups:
                group["lr"] = lr * (float(step) / float(warmup))
        elif step < total:  # after the last step the released loop steps once more: unused
            scheduler.step()
    return rates


@pytest.mark.parametrize("steps_per_epoch", [1, 2, 5, 100])
@pytest.mark.parametrize("epochs,warmup_epochs", [(3, 1), (6, 2), (4, 0)])
def test_the_released_schedule_equals_a_replay_of_the_released_scheduler_chain(
        steps_per_epoch, epochs, warmup_epochs):
    """Guards the released schedule: its first step at the full rate, the k/W warm-up and a
    cosine chained from the last warm-up rate, bit for bit against torch's schedulers."""
    expected = _replay_released_schedule(2e-4, epochs, warmup_epochs, steps_per_epoch)
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    rates = learning_rates("released", 2e-4, warmup, total)
    assert len(rates) == len(expected) == total
    mismatch = [(k, a, b) for k, (a, b) in enumerate(zip(rates, expected)) if a != b]
    assert not mismatch, f"first differing steps (step, ours, replay): {mismatch[:3]}"


def test_fit_runs_the_released_schedule_at_every_optimizer_step():
    """Guards fit ignoring its schedule: the rates it stepped with are the replay's."""
    x, y, z = _tiny_task()  # 32 rows, batch 8: 4 steps per epoch
    result = fma_fast.fit(x, y, z, blocks=1, epochs=3, batch_size=8, lr=1e-3, progress=False)
    assert result.config["schedule"] == "released"
    assert result.learning_rates == _replay_released_schedule(1e-3, 3, 1, 4)
    assert result.learning_rates[0] == 1e-3  # the released first step runs at the full rate


@pytest.mark.parametrize("views", [1, 3, 10])
def test_an_epoch_is_one_pass_over_the_images_whatever_the_views(views):
    """Guards counting every cached view as a row of the epoch: with V views per image the
    optimizer steps stay epochs·ceil(images / batch), the released number, and every step
    sees each image at most once per epoch."""
    x, y, z = _tiny_task(rows_per_class=5)  # 20 images
    x_views = (x.repeat_interleave(views, dim=0)
               + 0.01 * torch.randn(20 * views, x.shape[1], generator=torch.Generator()
                                    .manual_seed(1)))
    y_views = y.repeat_interleave(views)
    seen = []
    real = dispatch.fused_pair

    def spy(x0, labels, *args, **kwargs):
        seen.append(x0.clone())
        return real(x0, labels, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fit.dispatch, "fused_pair", spy)
        result = fma_fast.fit(x_views, y_views, z, blocks=1, epochs=3, batch_size=8,
                              views=views, progress=False)
    assert result.config["optimizer_steps"] == 3 * math.ceil(20 / 8) == len(seen)
    assert result.config["images"] == 20 and result.config["views"] == views
    for epoch in range(3):
        rows = torch.cat(seen[3 * epoch: 3 * epoch + 3])
        assert rows.shape[0] == 20
        # each batch row is one of its image's views, and every image appears once
        distance = torch.cdist(rows, x)
        images = distance.argmin(dim=1)
        assert sorted(images.tolist()) == list(range(20)), f"epoch {epoch}: images {images}"
        if views > 1:
            which = torch.cdist(rows, x_views).argmin(dim=1)
            assert torch.equal(which // views, images)


def test_views_must_group_rows_of_one_image():
    x, y, z = _tiny_task()
    with pytest.raises(ValueError, match="groups of 3"):
        fma_fast.fit(x, y, z, blocks=1, epochs=1, views=3, progress=False)
    with pytest.raises(ValueError, match="carry different labels"):
        fma_fast.fit(x, y.roll(1), z, blocks=1, epochs=1, views=2, progress=False)
    with pytest.raises(ValueError, match="schedule must be one of"):
        fma_fast.fit(x, y, z, blocks=1, epochs=1, schedule="cosine", progress=False)


def test_rows_that_are_not_unit_norm_get_one_warning_naming_the_argument():
    """Guards raw, unnormalised rows passing silently (every released extractor
    L2-normalises): one warning per call, naming the argument and the worst norm."""
    x, y, z = _tiny_task()
    raw = x.clone()
    raw[5] *= 3.0
    with pytest.warns(fma_fast.NotUnitNormWarning) as caught:
        fma_fast.fit(raw, y, z, blocks=1, epochs=1, progress=False)
    messages = [str(w.message) for w in caught if w.category is fma_fast.NotUnitNormWarning]
    assert len(messages) == 1 and messages[0].startswith("image_features rows are not unit")
    assert "worst norm 3 at row 5" in messages[0], messages[0]
    with pytest.warns(fma_fast.NotUnitNormWarning, match="class_features rows"):
        fma_fast.fit(x, y, 2 * z, blocks=1, epochs=1, progress=False)
    model = fma_fast.VelocityNet(16, blocks=1)
    with pytest.warns(fma_fast.NotUnitNormWarning, match=r"^features rows .* at row 37"):
        fma_fast.solve(torch.cat([x, x]).index_fill(0, torch.tensor([37]), 0.5), model, 2,
                       class_features=z, batch_size=16)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", fma_fast.NotUnitNormWarning)
        nudged = x * (1 + 5e-4)  # within the 1e-3 tolerance
        fma_fast.fit(nudged, y, z, blocks=1, epochs=1, progress=False)
        fma_fast.select_steps(model, nudged, y, z, max_steps=2)


def test_bf16_autocast_on_a_cpu_with_bf16_units():
    """Guards amp being ignored on the CPU: with amp="bf16" the network runs under bf16
    autocast (its output reaches the loss in bf16), the loss still falls; "fp16" is refused."""
    if not routing.cpu_bf16_units():
        pytest.skip("SKIPPED, not passed: this CPU has no BF16 units")
    x, y, z = _tiny_task()
    seen = []
    real = dispatch.fused_loss

    def spy(prediction, *args, **kwargs):
        seen.append(prediction.dtype)
        return real(prediction, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fit.dispatch, "fused_loss", spy)
        result = fma_fast.fit(x, y, z, blocks=1, epochs=30, batch_size=8, lr=2e-3,
                              amp="bf16", device="cpu", progress=False)
    assert set(seen) == {torch.bfloat16} and result.config["amp"] == "bf16"
    assert result.history[-1] < 0.9 * result.history[0], result.history
    default = fma_fast.fit(x, y, z, blocks=1, epochs=1, device="cpu", progress=False)
    assert default.config["amp"] == "fp32"  # the CPU default stays fp32
    with pytest.raises(ValueError, match="amp='fp16' needs a CUDA device"):
        fma_fast.fit(x, y, z, blocks=1, epochs=1, amp="fp16", device="cpu", progress=False)


@pytest.mark.parametrize("noise", ["bridge", "endpoint"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_the_loss_uses_the_pairs_noise_at_every_optimizer_step(backend, noise, monkeypatch):
    """Guards a loss that regenerates other noise than the pair it scores (a seed or offset
    that agrees at the first step only), and noise repeated from step to step. At every step
    the loss's target v is read back from its gradient (v = pred - N/2·∂loss/∂pred) and
    compared with the target written out from the pair's own x̂_t: the bridge form's noise
    term (x̂_t - line) scaled by (1-2t)/(2t(1-t)), the endpoint form's (z - x̂_t)/(1-t)."""
    if backend == "triton" and kernel_device() is None:
        pytest.skip(SKIP_REASON)
    x, y, z = _tiny_task(rows_per_class=6)  # 24 rows, batch 8: 3 steps per epoch, 6 in all
    steps = []
    real_pair, real_loss = dispatch.fused_pair, dispatch.fused_loss

    def pair_spy(x0, labels, table, t, **options):
        pair = real_pair(x0, labels, table, t, **options)
        steps.append({"x0": x0.clone(), "z": table[labels].clone(), "t": pair.t.clone(),
                      "x_t": pair.x_t.detach().clone(), "path": pair.path})
        return pair

    def loss_spy(pred, x0, labels, table, t, **options):
        loss = real_loss(pred, x0, labels, table, t, **options)
        (grad,) = torch.autograd.grad(loss.loss, pred, retain_graph=True)
        steps[-1]["v"] = (pred - grad * pred.shape[0] / 2).detach()
        return loss

    monkeypatch.setattr(fit.dispatch, "fused_pair", pair_spy)
    monkeypatch.setattr(fit.dispatch, "fused_loss", loss_spy)
    gamma = 0.5
    fma_fast.fit(x, y, z, blocks=1, epochs=2, batch_size=8, gamma=gamma, noise=noise, seed=4,
                 backend=backend, progress=False)
    assert len(steps) == 6 and all("v" in step for step in steps)
    noises = []
    for number, step in enumerate(steps):
        assert step["path"].startswith(backend), step["path"]
        t, x0, target = step["t"], step["x0"], step["z"]
        line = (1 - t) * x0 + t * target
        if noise == "bridge":
            expected = target - x0 + (1 - 2 * t) / (2 * t * (1 - t)) * (step["x_t"] - line)
        else:
            expected = (target - step["x_t"]) / (1 - t)
        torch.testing.assert_close(step["v"], expected, rtol=1e-3, atol=1e-3,
                                   msg=lambda m, n=number: f"optimizer step {n + 1}: {m}")
        noises.append((step["x_t"] - line) / torch.sqrt(t * (1 - t)))
    for i in range(len(noises)):
        for j in range(i):
            assert not torch.allclose(noises[i], noises[j], atol=1e-3), (
                f"steps {j + 1} and {i + 1} drew the same noise")


def test_amp_bf16_without_bf16_units_is_refused_with_the_reason(monkeypatch):
    """The one CPU bf16 rule (``routing.cpu_bf16_units``) also decides fit's autocast: without
    BF16 units bf16 GEMMs are emulated, slower than fp32."""
    x, y, z = _tiny_task()
    monkeypatch.setattr(routing, "cpu_bf16_units", lambda: False)
    refusal = r"amp='bf16' needs a CPU with BF16 units .*none in effect here"
    with pytest.raises(ValueError, match=refusal):
        fma_fast.fit(x, y, z, blocks=1, epochs=1, amp="bf16", device="cpu", progress=False)
