"""Time to quality: initialisations, norm keeping, timestep densities, min-SNR-γ, early stopping and the
not-learning guard (each checked against its definition, on the tiny backbone where a model is needed)."""

import math
import warnings
from functools import partial

import lightning as L
import pytest
import torch
from diffusers import DDPMScheduler

from lit_ti import io, losses
from lit_ti.callbacks import EarlyStop, ExportEmbeddings, LearningGuard, ValidationLoss
from lit_ti.callbacks.early_stop import drift, learned, plateau
from lit_ti.data import ConceptDataModule
from lit_ti.errors import UserError
from lit_ti.io.embeddings import from_file
from lit_ti.methods import DreamArtist, TextualInversion
from lit_ti.models import TinyBackbone
from lit_ti.modules.embedding_bank import swapped
from lit_ti.modules.vector_init import cross_vectors, rescale, start_vectors, vocabulary_norm
from tests.conftest import compose

NAME = "zz-thing"


def fit(concept_dir, max_steps: int, lr: float = 0.05, callbacks=(), method_cls=TextualInversion, optimizer=None, **kw):
    L.seed_everything(0, verbose=False)
    optimizer = partial(optimizer or torch.optim.AdamW, lr=lr, weight_decay=0.0)
    method = method_cls(TinyBackbone(), name=NAME, num_vectors=2, init_text="square thing", optimizer=optimizer, **kw)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(method, datamodule=ConceptDataModule(dir=str(concept_dir), name=NAME, template="subject"))
    return method, trainer


# ----------------------------------------------------------------- initialisation and norms
def test_cross_init_equals_the_text_encoders_output_for_the_init_text(backbone):
    tok, te = backbone.tokenizer, backbone.text_encoder
    ids = tok("square thing", add_special_tokens=False).input_ids
    states = te(torch.tensor([[tok.bos_token_id, *ids, tok.eos_token_id]])).last_hidden_state[0]
    got = cross_vectors(tok, te, "square thing", 2 * len(ids))
    want = states[1 : 1 + len(ids)].repeat_interleave(2, dim=0)  # spread over the vectors as A1111 does
    torch.testing.assert_close(got, want.detach())
    copy = start_vectors("copy", tok, te, "square thing", 2)
    assert not torch.allclose(got[:2], copy), "cross init must differ from the token copy"


def test_median_norm_start_has_the_vocabularys_median_norm(backbone):
    tok, te = backbone.tokenizer, backbone.text_encoder
    median = vocabulary_norm(te)
    assert median == pytest.approx(float(te.get_input_embeddings().weight.norm(dim=-1).median()))
    vectors = start_vectors("median_norm", tok, te, "square thing", 3)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.full((3,), median))
    assert torch.equal(rescale(torch.zeros(2, 4), 1.0), torch.zeros(2, 4))  # nothing divides by zero


def test_unknown_init_mode_is_refused():
    with pytest.raises(UserError, match="method.init_mode"):
        TextualInversion(TinyBackbone(), name=NAME, init_mode="magic")


def test_keep_norm_holds_the_vocabulary_norm_after_every_step(concept_dir):
    kept, _ = fit(concept_dir, max_steps=2, lr=0.5, keep_norm=True)
    free, _ = fit(concept_dir, max_steps=2, lr=0.5)
    target = vocabulary_norm(kept.backbone.text_encoder)
    norms = kept.bank.get(NAME)["text_encoder"].detach().norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, target))
    free_norms = free.bank.get(NAME)["text_encoder"].detach().norm(dim=-1)
    assert (free_norms - target).abs().max() > 0.05, "a large rate must move a free vector off that norm"


# ----------------------------------------------------------------- timesteps and min-SNR-γ
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_formula(prediction):
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction)
    t = torch.tensor([0, 10, 200, 500, 999])
    a = scheduler.alphas_cumprod[t].double()
    snr = a / (1 - a)
    want = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + (prediction == "v_prediction"))
    torch.testing.assert_close(losses.min_snr_weights(scheduler, t, 5.0), want.float())
    weights = losses.min_snr_weights(scheduler, t, 5.0)
    assert weights[0] < 0.1 and weights[-1] == pytest.approx(
        1.0 if prediction == "epsilon" else float(snr[-1] / (snr[-1] + 1))
    )


def test_sample_weight_scales_each_samples_loss():
    pred, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    assert float(losses.diffusion_mse(pred, target, sample_weight=torch.tensor([1.0, 0.0]))) == pytest.approx(0.5)


@pytest.mark.parametrize("kind", losses.TIMESTEP_SAMPLING)
def test_timestep_densities_stay_in_range_and_have_their_shape(kind):
    u = (torch.arange(10_000) + 0.5) / 10_000  # the quantiles of a uniform draw
    t = losses.map_timesteps(u, 200, 1000, kind)
    assert int(t.min()) >= 200 and int(t.max()) <= 999
    middle = float(((t >= 400) & (t < 800)).float().mean())
    if kind == "uniform":
        assert middle == pytest.approx(0.5, abs=0.01)
    else:  # mid-heavy: more than uniform's half lands in the middle half of the range
        assert middle > 0.55
    if kind == "logit_normal":  # the median of sigmoid(N(0, 1)) is the middle of the range
        assert float(t.median()) == pytest.approx(600, abs=2)


def test_unknown_timestep_sampling_is_refused():
    with pytest.raises(UserError, match="method.timestep_sampling"):
        TextualInversion(TinyBackbone(), name=NAME, timestep_sampling="beta")


def test_options_train_end_to_end(concept_dir):
    method, trainer = fit(
        concept_dir, max_steps=3, init_mode="cross", timestep_sampling="logit_normal", min_snr_gamma=1.0
    )
    assert trainer.global_step == 3 and method.bank.get(NAME)["text_encoder"].isfinite().all()


# ----------------------------------------------------------------- early stopping
def test_plateau_fires_on_a_flat_noisy_loss_and_not_on_a_falling_one():
    g = torch.Generator().manual_seed(0)
    decay = [0.02 + 0.01 * math.exp(-i / 5) for i in range(40)]
    noisy_plateau = [v + 1e-5 * float(torch.randn((), generator=g)) for v in decay]
    assert plateau(noisy_plateau, window=6, ratio=0.15)
    line = [0.03 - 1e-4 * i + 1e-6 * float(torch.randn((), generator=g)) for i in range(40)]
    assert not plateau(line, window=6, ratio=0.15), "a loss still falling steadily must not stop"
    assert not plateau(noisy_plateau[:8], window=6, ratio=0.15), "too few measurements to judge"
    steep = [0.02 + 0.01 * math.exp(-i / 30) for i in range(20)]
    assert not plateau(steep, window=6, ratio=0.15)


def paths(kind: str, n: int = 7, dim: int = 256, seed: int = 0) -> list[torch.Tensor]:
    """`n` flat snapshots of a tensor that travels straight, random-walks, jitters around a point or stands."""
    g = torch.Generator().manual_seed(seed)
    start, noise = torch.randn(dim, generator=g), torch.randn(n, dim, generator=g)
    if kind == "straight":
        return [start + 0.1 * i * torch.ones(dim) for i in range(n)]
    if kind == "walk":
        return list(start + 0.1 * noise.cumsum(dim=0))
    if kind == "jitter":
        return list(start + 0.1 * noise)
    return [start] * n


def test_drift_tells_a_travelling_tensor_from_a_jittering_one():
    assert drift(paths("straight")) == pytest.approx(math.sqrt(6))
    walks = [drift(paths("walk", seed=s)) for s in range(20)]
    assert 0.8 < sum(walks) / len(walks) < 1.2, "a random walk drifts about 1, whatever its step size"
    assert max(drift(paths("jitter", seed=s)) for s in range(20)) < 0.7  # about 1/sqrt(6): it keeps coming back
    assert drift(paths("still")) == 0.0
    scaled = [100 * v for v in paths("walk")]
    assert drift(scaled) == pytest.approx(drift(paths("walk"))), "no unit: the rate and the model do not matter"


def test_a_flat_loss_stops_only_once_the_tensors_have_settled():
    g = torch.Generator().manual_seed(0)
    flat = [0.02 + 0.01 * math.exp(-i / 5) + 1e-5 * float(torch.randn((), generator=g)) for i in range(40)]
    falling = [0.03 - 1e-4 * i for i in range(40)]
    wandering, settled = paths("straight"), paths("jitter")
    assert learned(flat, [], window=6, ratio=0.15, max_drift=None), "off: the loss alone decides"
    assert not learned(flat, wandering, window=6, ratio=0.15, max_drift=1.3), "a flat loss, a token still moving"
    assert learned(flat, settled, window=6, ratio=0.15, max_drift=1.3)
    assert not learned(flat, settled[:6], window=6, ratio=0.15, max_drift=1.3), "the window is not full yet"
    assert not learned(falling, settled, window=6, ratio=0.15, max_drift=1.3), "settled tensors, a falling loss"
    # only the last window + 1 snapshots count: a token that travelled and then settled may stop
    assert learned(flat, wandering + settled, window=6, ratio=0.15, max_drift=1.3)
    long_walk, long_jitter = paths("straight", n=13), paths("jitter", n=13)
    assert not learned(flat, long_walk, window=6, ratio=0.15, max_drift=1.3, drift_window=12)
    assert learned(flat, long_jitter, window=6, ratio=0.15, max_drift=1.3, drift_window=12)
    assert not learned(flat, long_jitter[:12], window=6, ratio=0.15, max_drift=1.3, drift_window=12), "not full"


@pytest.mark.parametrize("max_drift", [None, 1.0], ids=["loss", "loss+drift"])
@pytest.mark.parametrize("method_cls", [TextualInversion, DreamArtist])
def test_early_stop_ends_a_run_that_cannot_learn_and_says_why(concept_dir, method_cls, max_drift):
    stop = EarlyStop(every_n_steps=1, window=3, ratio=0.5, min_steps=0, draws=1, max_drift=max_drift)
    # lr 0: val/loss is flat from the start and the tensors stand still (drift 0)
    _, trainer = fit(concept_dir, max_steps=40, lr=0.0, callbacks=[stop], method_cls=method_cls)
    assert trainer.global_step == 6, "a constant loss is a plateau as soon as the window is full twice"
    assert stop.reason and "early stop at step 6" in stop.reason
    assert ("drift 0.00" in stop.reason) == (max_drift is not None)
    if max_drift is not None:
        assert len(stop.snapshots) == 4 and all(torch.equal(s, stop.snapshots[0]) for s in stop.snapshots)


class RateLog(L.Callback):
    """The learning rate of every param group at each optimizer step, as the optimizer saw it."""

    def __init__(self):
        self.rates: list[list[float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.rates.append([g["lr"] for g in optimizer.param_groups])


class StopAtSix(EarlyStop):
    """The verdict at the 6th measurement whatever the loss, so the rates can be real ones."""

    def stops(self, snapshots):
        return len(self.values) >= 6


@pytest.mark.parametrize("schedule", [None, "0.02:8, 0.01"], ids=["constant", "a1111-schedule"])
@pytest.mark.parametrize("method_cls", [TextualInversion, DreamArtist])
def test_cooldown_trains_its_steps_at_the_lowered_rate_then_ends(concept_dir, method_cls, schedule):
    """After the verdict the run goes on `cooldown_steps` more steps at `cooldown_factor` x the rate it would
    have had, in every param group (DreamArtist's negative has its own rate), without compounding the factor
    step after step, and through a scheduler that sets the rate each step (the schedule changes mid-cooldown)."""
    stop = StopAtSix(every_n_steps=1, min_steps=0, draws=1, cooldown_steps=4, cooldown_factor=0.25)
    rates, plain = RateLog(), RateLog()
    fit(concept_dir, max_steps=40, callbacks=[plain], method_cls=method_cls, lr_schedule=schedule)
    _, trainer = fit(concept_dir, 40, callbacks=[stop, rates], method_cls=method_cls, lr_schedule=schedule)
    k = stop.cooldown_from
    assert k is not None and trainer.global_step == k + 4 and len(rates.rates) == k + 4
    assert f"early stop at step {k}" in stop.reason and "4 steps at 0.25 x" in stop.reason
    assert rates.rates[:k] == plain.rates[:k]
    assert rates.rates[k:] == [[r * 0.25 for r in rs] for rs in plain.rates[k : k + 4]]
    assert len({tuple(rs) for rs in plain.rates[k : k + 4]}) == (2 if schedule else 1)
    restored = EarlyStop(cooldown_steps=4)
    restored.load_state_dict(stop.state_dict())
    assert restored.cooldown_from == k and restored.lowered == stop.lowered, "a resumed cooldown must not lower twice"
    assert f"step {k + 4}'s tensors" in restored.reason and f"step {k + 4}'s tensors" in stop.reason


def test_early_stop_waits_while_the_tensors_travel(concept_dir):
    """The first steps of Adam at a large rate go one way: the window sees a straight path and the run goes on,
    however the loss looks (ratio 1 accepts any flat window)."""
    stop = EarlyStop(every_n_steps=1, window=3, ratio=1.0, min_steps=0, draws=1, max_drift=1.3)
    method, trainer = fit(concept_dir, max_steps=8, lr=0.05, callbacks=[stop])
    assert trainer.global_step == 8 and stop.reason is None
    assert drift(list(stop.snapshots)) > 1.3
    vectors = method.bank.get(NAME)["text_encoder"].detach().flatten()
    torch.testing.assert_close(stop.snapshots[-1], vectors)  # the snapshots are the trained tensors


EXPORTS = [(TextualInversion, {}), *((DreamArtist, {"export_vectors": e}) for e in ("ema", "live", "both"))]


@pytest.mark.parametrize(("method_cls", "kw"), EXPORTS, ids=["ti", "da-ema", "da-live", "da-both"])
def test_measures_score_the_vectors_the_files_hold(concept_dir, method_cls, kw):
    """val/loss (and so early stopping) and the toy evaluation run inside `as_exported`: whatever a method
    writes, they must see it, and leave the live vectors as they were."""
    ema = dict(ema_decay=0.5, ema_reset_every=0, neg_ema_decay=0.5, neg_ema_reset_every=0)  # live != average
    method, trainer = fit(concept_dir, max_steps=3, lr=0.5, method_cls=method_cls, **kw, **(ema if kw else {}))
    bank, files = method.bank, method.concepts()
    live = {k: v.detach().clone() for k, v in bank.vectors.items()}
    written = {
        bank.key(name, enc): v
        for name in bank.names
        for enc, v in from_file(files[name], {"text_encoder": live[bank.key(name, "text_encoder")].shape[1]}).items()
    }
    with method.as_exported():
        for key, v in written.items():
            torch.testing.assert_close(bank.vectors[key].detach(), v)
    for key, v in live.items():
        assert torch.equal(bank.vectors[key].detach(), v), "as_exported must give the live vectors back"
    measured = ValidationLoss(draws=2).measure(trainer, method)
    with swapped(bank, written):
        assert ValidationLoss(draws=2).measure(trainer, method) == pytest.approx(measured, rel=1e-6)
    if kw.get("export_vectors", "live") != "live":  # the EMA pair: the files are not the live vectors
        assert any(not torch.allclose(live[k], v) for k, v in written.items())
        with swapped(bank, {k: 2 * v for k, v in written.items()}):  # vectors no file holds change nothing
            assert ValidationLoss(draws=2).measure(trainer, method) == pytest.approx(measured, rel=1e-6)


def test_schedule_free_adamw_trains_and_writes_its_average(concept_dir, tmp_path):
    schedulefree = pytest.importorskip("schedulefree")
    export = ExportEmbeddings(str(tmp_path), every_n_steps=2)  # a copy mid-run: the steps after it must go on
    method, trainer = fit(
        concept_dir, max_steps=4, lr=0.1, optimizer=schedulefree.AdamWScheduleFree, callbacks=[export]
    )
    (opt,) = trainer.optimizers
    assert trainer.global_step == 4 and opt.param_groups[0]["train_mode"], "training mode must be given back"
    y = method.bank.get(NAME)["text_encoder"].detach().clone()
    opt.eval()  # x, the average the optimizer returns
    x = method.bank.get(NAME)["text_encoder"].detach().clone()
    written = io.read_embedding(tmp_path / f"{NAME}.safetensors")[0].vectors
    torch.testing.assert_close(written, x)
    assert not torch.allclose(x, y), "the training iterate y is not what the files should hold"


# ----------------------------------------------------------------- not learning
def run_guard(concept_dir, lr: float) -> list[str]:
    guard = LearningGuard(every_n_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(concept_dir, max_steps=4, lr=lr, callbacks=[guard])
    return [str(w.message) for w in caught if "not learning" in str(w.message)]


def test_learning_guard_warns_on_a_zero_rate_and_not_on_a_normal_run(concept_dir):
    stalled = run_guard(concept_dir, lr=0.0)
    assert len(stalled) == 2 and "method.optimizer.lr" in stalled[0]  # at steps 2 and 4
    assert run_guard(concept_dir, lr=0.05) == []


# ----------------------------------------------------------------- configs
def test_toy_ti_stops_when_learned_and_real_runs_are_left_alone():
    toy = compose()
    assert toy.callbacks.early_stop._target_ == "lit_ti.callbacks.EarlyStop" and toy.trainer.max_steps == 600
    assert toy.callbacks.early_stop.cooldown_steps == 30
    real = compose("model=diffusers", "model.path=/m", "data=concept", "data.dir=/d", "name=zz")
    assert real.callbacks.get("early_stop") is None, "early stopping was chosen on the toy world only"
    asked = compose(
        "model=diffusers", "model.path=/m", "data=concept", "data.dir=/d", "name=zz", "callbacks=[default,early_stop]"
    )
    assert asked.callbacks.early_stop.cooldown_steps == 0, "the toy's cooldown must not leak into a real run"
    assert real.callbacks.learning_guard._target_ == "lit_ti.callbacks.LearningGuard"  # a warning, everywhere


def test_early_stop_errors_name_its_own_keys():
    with pytest.raises(UserError, match=r"^callbacks\.early_stop\.draws=0"):
        EarlyStop(draws=0)
    with pytest.raises(UserError, match=r"^callbacks\.early_stop\.ratio"):
        EarlyStop(ratio=2)
    with pytest.raises(UserError, match=r"^callbacks\.early_stop\.max_drift"):
        EarlyStop(max_drift=0)
    with pytest.raises(UserError, match=r"^callbacks\.early_stop\.drift_window"):
        EarlyStop(drift_window=1)
    with pytest.raises(UserError, match=r"^callbacks\.early_stop\.cooldown_steps"):
        EarlyStop(cooldown_steps=-1)
    with pytest.raises(UserError, match=r"^callbacks\.early_stop\.cooldown_factor"):
        EarlyStop(cooldown_factor=1.5)
