"""DreamArtist: the guided loss, its gradients, reconstruction, EMA, accumulation, masks and its files."""

from functools import partial

import pytest
import torch
from PIL import Image

from lit_ti import io, losses
from lit_ti.data import ConceptDataModule
from lit_ti.errors import UserError
from lit_ti.methods import DreamArtist
from lit_ti.modules.ema import BankEMA
from lit_ti.modules.embedding_bank import EmbeddingBank
from tests.conftest import NAME

NEG = f"{NAME}-neg"
DA = dict(method_cls=DreamArtist, num_vectors=2, neg_num_vectors=3, neg_init_text="ugly blurry")


# --- pure functions -------------------------------------------------------------------------------------------
def test_guided_loss_against_a_hand_computed_case():
    neg = torch.tensor([[1.0, 2.0]]).view(1, 2, 1, 1)
    pos = torch.tensor([[2.0, 0.0]]).view(1, 2, 1, 1)
    guided = losses.guided(neg, pos, torch.tensor([3.0]))
    # 1 + 3·(2 − 1) = 4 and 2 + 3·(0 − 2) = −4
    assert guided.flatten().tolist() == [4.0, -4.0]
    target = torch.tensor([[1.0, -2.0]]).view(1, 2, 1, 1)
    assert float(losses.diffusion_mse(guided, target)) == pytest.approx((3**2 + 2**2) / 2)


def test_gradient_split_is_w_and_one_minus_w():
    neg = torch.randn(2, 4, 3, 3, requires_grad=True)
    pos = torch.randn(2, 4, 3, 3, requires_grad=True)
    w = torch.tensor([3.0, 1.5])  # per sample, as the dynamic schedule gives
    g = torch.randn(2, 4, 3, 3)  # dL/dε̂
    losses.guided(neg, pos, w).backward(g)
    assert torch.allclose(pos.grad, w.view(-1, 1, 1, 1) * g)
    assert torch.allclose(neg.grad, (1 - w).view(-1, 1, 1, 1) * g)


def test_cfg_strings_and_per_sample_weights():
    assert losses.parse_cfg(3.0) == (3.0, 3.0, "ln")
    assert losses.parse_cfg("1.5-3.0:cos") == (1.5, 3.0, "cos")
    t = torch.tensor([0, 999, 499])
    assert torch.allclose(losses.cfg_weights(1.5, 3.0, "ln", t, 1000), torch.tensor([1.5, 3.0, 1.5 + 1.5 * 499 / 999]))
    u = torch.tensor(499 / 999)
    assert float(losses.cfg_weights(1.0, 2.0, "cos", t, 1000)[2]) == pytest.approx(
        1 + float(torch.sin(u * torch.pi / 2))
    )
    assert float(losses.cfg_weights(1.0, 2.0, "cos2", t, 1000)[2]) == pytest.approx(
        2 - float(torch.cos(u * torch.pi / 2))
    )
    for bad in ("abc", "1-2-3", "1.5-3:torch.sqrt(rate)"):
        with pytest.raises(UserError, match="method.cfg_scale"):
            losses.parse_cfg(bad)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_predicted_x0_inverts_the_noising(kind):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=kind)
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 990])
    noisy = sched.add_noise(x0, noise, t)
    pred = losses.diffusion_target(sched, x0, noise, t)  # a perfect prediction
    assert torch.allclose(losses.predicted_x0(sched, noisy, pred, t), x0, atol=1e-3)


# --- EMA ------------------------------------------------------------------------------------------------------
def test_ema_update_and_reset():
    bank = EmbeddingBank()
    bank.add("a", {"text_encoder": torch.zeros(2, 4)})
    bank.add("b", {"text_encoder": torch.zeros(1, 4)})
    ema = BankEMA(bank, {"a": (0.9, 3), "b": (1.0, 3)})  # b: EMA off
    assert [k for k, _ in ema.named_buffers()] == ["text_encoder__0"]
    live = bank.vectors["text_encoder__0"]
    with torch.no_grad():
        live.fill_(1.0)
    ema.update(bank, step=1)
    assert torch.allclose(ema.text_encoder__0, torch.full((2, 4), 0.1))  # 0.9·0 + 0.1·1
    ema.update(bank, step=2)
    assert torch.allclose(ema.text_encoder__0, torch.full((2, 4), 0.19)) and torch.equal(live, torch.ones(2, 4))
    ema.update(bank, step=3)  # reset step: the live vectors jump to the average
    assert torch.allclose(live, torch.full((2, 4), 0.271)) and torch.equal(live, ema.text_encoder__0)
    assert torch.equal(ema.averaged(bank, "b")["text_encoder"], bank.get("b")["text_encoder"])


# --- method ---------------------------------------------------------------------------------------------------
def test_negative_prompts(backbone):
    method = DreamArtist(backbone, name=NAME)
    batch = {"prompt": [f"a photo of {NAME}, red", f"{NAME}"], "template_plain": ["a photo of [name]", "[name]"]}
    assert method.negative_prompts(batch) == [f"a photo of {NEG}, red", NEG]
    method.positive_filewords_only = True
    assert method.negative_prompts(batch) == [f"a photo of {NEG}", NEG]


def test_reconstruction_sends_gradient_to_both_embeddings():
    from lit_ti.models import TinyBackbone

    grads = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        method = DreamArtist(TinyBackbone(), name=NAME, reconstruction=True, vae_checkpointing=checkpointing)
        method.configure_model()
        batch = {
            "latents": torch.randn(2, 4, 8, 8),
            "pixels": torch.rand(2, 3, 64, 64) * 2 - 1,
            "prompt": [f"a photo of {NAME}"] * 2,
        }
        method.draw_noise = lambda b: (torch.ones_like(b["latents"]), torch.tensor([100, 800]))
        out = method.shared_step(batch)
        x0 = losses.predicted_x0(method.backbone.scheduler, out["noisy"], out["pred"], out["timesteps"])
        losses.reconstruction_l1(method.decode(x0), batch["pixels"]).backward()  # the reconstruction term only
        grads[checkpointing] = {n: method.bank.get(n)["text_encoder"].grad.clone() for n in (NAME, NEG)}
        assert all(g.abs().sum() > 0 for g in grads[checkpointing].values())
    assert all(torch.allclose(grads[False][n], grads[True][n], atol=1e-6) for n in (NAME, NEG))


def one_line_template(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("a photo of [name]\n", encoding="utf-8")
    return str(path)


class Pinned(DreamArtist):
    """Noise and timestep fixed per image, so micro-batches and whole batches see the same draws."""

    def draw_noise(self, batch):
        noise = torch.stack(
            [
                torch.randn(x.shape, generator=torch.Generator().manual_seed(int(i)))
                for i, x in zip(batch["index"], batch["latents"])
            ]
        )
        return noise, (batch["index"] * 211 + 100) % 1000


def test_accumulation_equals_one_big_batch(tmp_path, concept_dir, fit):
    common = dict(
        DA,
        method_cls=Pinned,
        max_steps=1,
        every=0,
        optimizer=partial(torch.optim.SGD, lr=10.0),  # AdamW would hide gradient differences
        embedding_clip_norm=None,
        cfg_scale="1.0-4.0:cos",  # per-sample guidance in the big batch
        reconstruction=True,
    )
    dm = {"template": one_line_template(tmp_path), "latent_sampling": "deterministic"}
    micro, t1 = fit(tmp_path / "a", concept_dir, accumulate=4, dm_kw=dm, **common)
    whole, t2 = fit(tmp_path / "b", concept_dir, dm_kw={**dm, "batch_size": 4}, **common)
    assert t1.fit_loop.epoch_loop.batch_progress.total.completed == 4 and t2.global_step == 1
    init = micro.initial_vectors(micro.backbone, "square thing", 2)["text_encoder"]
    assert (micro.bank.get(NAME)["text_encoder"] - init).norm() > 1e-2  # a real step was taken
    for name in (NAME, NEG):
        a, b = micro.bank.get(name)["text_encoder"], whole.bank.get(name)["text_encoder"]
        assert torch.allclose(a, b, atol=1e-5), name


def test_fit_writes_pairs_logs_norms_and_keeps_lr_weight(tmp_path, concept_dir, fit):
    method, trainer = fit(
        tmp_path,
        concept_dir,
        max_steps=6,
        every=3,
        ema_decay=0.9,
        neg_ema_decay=0.8,
        ema_reset_every=4,
        export_vectors="both",
        neg_lr_weight=0.5,
        lr_schedule="0.02:2, 0.01",
        reconstruction=True,
        **DA,
    )
    names = {p.name for p in tmp_path.iterdir()}
    for stem in (NAME, NEG, f"{NAME}-live", f"{NAME}-live-neg"):
        assert {f"{stem}.pt", f"{stem}.safetensors"} <= names
    assert {f"{NAME}-3.pt", f"{NAME}-3-neg.pt"} <= {p.name for p in (tmp_path / "embeddings").iterdir()}
    ema_pos = io.load_embedding(tmp_path / f"{NAME}.pt")[NAME]
    assert torch.equal(ema_pos, method.ema.averaged(method.bank, NAME)["text_encoder"])
    assert io.load_embedding(tmp_path / f"{NEG}.safetensors")[NEG].shape == (3, 32)
    live = io.load_embedding(tmp_path / f"{NAME}-live.pt")[f"{NAME}-live"]
    assert torch.equal(live, method.bank.get(NAME)["text_encoder"].detach()) and not torch.equal(live, ema_pos)

    groups = trainer.optimizers[0].param_groups
    assert groups[0]["lr"] == pytest.approx(0.01) and groups[1]["lr"] == pytest.approx(0.005)  # after the boundary

    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert sorted(ckpt["state_dict"]) == [
        "bank.vectors.text_encoder__0",
        "bank.vectors.text_encoder__1",
        "ema.text_encoder__0",
        "ema.text_encoder__1",
    ]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set(EventAccumulator(str(tmp_path / "tb")).Reload().Tags()["scalars"])
    assert {"train/loss", "train/loss_reconstruction", f"train/emb_norm/{NAME}", f"train/emb_norm/{NEG}"} <= tags


def test_embedding_gradients_are_clipped_per_embedding(tmp_path, concept_dir, fit):
    seen = {}

    class Probe(DreamArtist):
        def on_before_optimizer_step(self, optimizer):
            super().on_before_optimizer_step(optimizer)
            seen.update({n: float(self.bank.get(n)["text_encoder"].grad.norm()) for n in (NAME, NEG)})

    fit(tmp_path, concept_dir, max_steps=1, every=0, **{**DA, "method_cls": Probe}, embedding_clip_norm=1e-3)
    assert seen[NAME] == pytest.approx(1e-3, rel=1e-3) and seen[NEG] == pytest.approx(1e-3, rel=1e-3)


def test_resume_restores_ema(tmp_path, concept_dir, fit):
    kw = dict(DA, ema_decay=0.9, neg_ema_decay=0.9, ema_reset_every=3, neg_ema_reset_every=5)
    straight, _ = fit(tmp_path / "a", concept_dir, max_steps=8, every=4, **kw)
    fit(tmp_path / "b", concept_dir, max_steps=4, every=4, **kw)
    resumed, trainer = fit(
        tmp_path / "c", concept_dir, max_steps=8, every=4, ckpt_path=tmp_path / "b/checkpoints/last.ckpt", **kw
    )
    assert trainer.global_step == 8
    for key in ("text_encoder__0", "text_encoder__1"):
        assert torch.allclose(getattr(straight.ema, key), getattr(resumed.ema, key), atol=1e-6)
        assert torch.allclose(straight.bank.vectors[key], resumed.bank.vectors[key], atol=1e-6)


@torch.no_grad()
def test_pair_loads_into_diffusers_and_conditions_as_trained(tmp_path, concept_dir, fit):
    method, _ = fit(tmp_path, concept_dir, max_steps=2, every=0, **DA)
    from lit_ti.models import TinyBackbone

    pipe = TinyBackbone().load().pipeline()
    pipe.load_textual_inversion(str(tmp_path / f"{NAME}.pt"))  # .pt: the token is the file's name
    pipe.load_textual_inversion(str(tmp_path / f"{NEG}.safetensors"), token=NEG)  # safetensors: say it
    prompt, negative = f"a photo of {NAME}", f"{NEG}, blurry"
    pos, neg = pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt=negative)
    assert torch.allclose(pos, method.encode_prompts([prompt]).states, atol=1e-5)
    assert torch.allclose(neg, method.encode_prompts([negative]).states, atol=1e-5)


# --- masks ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [8, 4])  # SD's VAEs, and a 4x one (the toy's): the weights follow the latents
def test_attention_maps_weight_the_loss_aligned_with_the_crop(tmp_path, factor):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(folder / "a.png")  # wide: center crop keeps x 16..80
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (16, 0, 48, 64))  # left half of the kept square: 100% -> 5
    mask.paste(127, (48, 0, 80, 64))  # right half: 50% -> 1
    mask.save(folder / "a_att.png")
    Image.new("RGB", (64, 64), (30, 30, 200)).save(folder / "b.png")  # no map: weight 1

    dm = ConceptDataModule(dir=str(folder), name="zz", flip_p=1.0, latent_sampling="deterministic")
    dm.setup()
    assert [p.name for p in dm.paths] == ["a.png", "b.png"]  # the map is not a training image
    n = 64 // factor  # the latent side

    def encode(x):  # [B, 3, 64, 64] -> moments [B, 4, n, n]
        return torch.zeros(x.shape[0], 4, n, n), torch.ones(x.shape[0], 4, n, n)

    dm.cache_latents(encode, resolution=64)
    w = dm.weights  # [N, views, 1, h, w]
    assert w.shape == (2, 2, 1, n, n)
    assert torch.allclose(w[0, 0, 0, :, : n // 2], torch.full((n, n // 2), 5.0))
    assert torch.allclose(w[0, 0, 0, :, n // 2 :], torch.ones(n, n // 2))
    assert torch.equal(w[0, 1], w[0, 0].flip(-1)) and torch.equal(w[1], torch.ones(2, 1, n, n))
    sample = dm.train_dataloader().dataset[0]
    assert sample["weight"].shape == (1, n, n) and sample["weight"].shape[-2:] == sample["latents"].shape[-2:]


def test_alpha_channel_weighting(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    im = Image.new("RGBA", (64, 64), (200, 30, 30, 0))
    im.paste((200, 30, 30, 255), (0, 0, 32, 64))
    im.save(folder / "a.png")
    dm = ConceptDataModule(dir=str(folder), name="zz", alpha_weight=True, attention_maps=False)
    dm.cache_latents(lambda x: (torch.zeros(x.shape[0], 4, 8, 8), torch.ones(x.shape[0], 4, 8, 8)), resolution=64)
    assert torch.allclose(dm.weights[0, 0, 0, :, :4], torch.ones(8, 4))
    assert torch.allclose(dm.weights[0, 0, 0, :, 4:], torch.zeros(8, 4))
    pred, target = torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)
    target[..., 4:] = 9.0  # errors only where the image is transparent
    assert float(losses.diffusion_mse(pred, target, dm.weights[:, 0])) == 0.0
