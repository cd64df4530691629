"""SD3 / SD3.5: one concept owns CLIP-L, CLIP-G and T5 parts, encoded exactly as diffusers' SD3 pipeline does,
trained by flow matching, and written as `clip_l` + `clip_g` + `t5xxl` files the other tools load."""

import pytest
import torch

from lit_ti.models import TinySD3
from lit_ti.modules.embedding_bank import EmbeddingBank
from lit_ti.modules.text_conditioning import PromptEncoder

NAME = "toy-concept"
PARTS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}


@pytest.fixture(scope="module")
def sd3():
    return TinySD3().load()


@pytest.fixture(scope="module")
def sd3_no_t5():
    return TinySD3(t5=False).load()


def random_concept(backbone, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(n, enc.get_input_embeddings().weight.shape[1], generator=g)
        for key, (_, enc) in backbone.text_encoders.items()
    }


def diffusers_with_tokens(spec, vectors: dict[str, torch.Tensor]):
    """A diffusers SD3 pipeline of a fresh copy of the model with the concept added as diffusers users do it by
    hand: a token per vector (`name`, `name_1`, ...) in each encoder's tokenizer, its embedding row set to the
    vector. Returns the pipeline and how the name is spelled in its prompts."""
    pipe = spec.load().pipeline()
    n = next(iter(vectors.values())).shape[0]
    tokens = [NAME] + [f"{NAME}_{i}" for i in range(1, n)]
    for key, v in vectors.items():
        tokenizer, encoder = getattr(pipe, PARTS[key]), getattr(pipe, key)
        tokenizer.add_tokens(tokens)
        encoder.resize_token_embeddings(len(tokenizer))
        with torch.no_grad():
            encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(tokens)] = v
    return pipe, " ".join(tokens)


PROMPTS = [f"a photo of {NAME} in a room", f"{NAME}, painting by an artist", "a plain background"]


@pytest.mark.parametrize("clip_skip", [1, 2])
@pytest.mark.parametrize("t5", [True, False])
def test_sd3_conditioning_equals_diffusers_encode_prompt(sd3, sd3_no_t5, t5, clip_skip):
    backbone = sd3 if t5 else sd3_no_t5
    vectors = random_concept(backbone, n=2)
    pipe, spelled = diffusers_with_tokens(TinySD3(t5=t5), vectors)
    bank = EmbeddingBank()
    bank.add(NAME, vectors)
    with torch.no_grad():
        ours = PromptEncoder(backbone, bank, clip_skip=clip_skip)(PROMPTS)
        theirs, _, pooled, _ = pipe.encode_prompt(
            [p.replace(NAME, spelled) for p in PROMPTS],
            None,
            None,
            device="cpu",
            do_classifier_free_guidance=False,
            clip_skip=None if clip_skip == 1 else clip_skip - 1,  # diffusers counts the layers skipped past -2
        )
    assert ours.states.shape == theirs.shape == (3, 77 + 256, 96)
    assert ours.pooled.shape == pooled.shape == (3, 32 + 48)
    torch.testing.assert_close(ours.states, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.pooled, pooled, atol=1e-5, rtol=0)
    # the vectors do reach every part: other vectors give other states in the CLIP and in the T5 rows
    other = EmbeddingBank()
    other.add(NAME, random_concept(backbone, n=2, seed=1))
    with torch.no_grad():
        moved = PromptEncoder(backbone, other, clip_skip=clip_skip)(PROMPTS[:1]).states[0] - ours.states[0]
    assert moved[:77, :32].abs().max() > 1e-3 and moved[:77, 32:80].abs().max() > 1e-3
    assert (moved[77:].abs().max() > 1e-3) == t5


# ---------------------------------------------------------------- the flow-matching objective
def test_flow_objective_is_sd3s_rectified_flow():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    from lit_ti.objectives import FlowMatching

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    objective = FlowMatching(scheduler)
    # timestep t is the (T-1-t)-th of the scheduler's descending table: higher t, noisier latents
    torch.testing.assert_close(objective.sigmas, scheduler.sigmas[:1000].flip(0))
    t = torch.tensor([0, 250, 500, 999])
    torch.testing.assert_close(objective.model_time(t), scheduler.timesteps.flip(0)[t])
    x0, noise = torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8)
    sigma = objective.sigmas[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(objective.noisy(x0, noise, t), (1 - sigma) * x0 + sigma * noise)
    torch.testing.assert_close(objective.target(x0, noise, t), noise - x0)
    noisy = objective.noisy(x0, noise, t)  # the exact velocity gives back the clean latents
    torch.testing.assert_close(objective.x0(noisy, objective.target(x0, noise, t), t), x0, atol=1e-5, rtol=0)
    assert objective.weights(t) is None
    for kind in ("sigma_sqrt", "cosmap"):
        want = compute_loss_weighting_for_sd3(kind, objective.sigmas[t])
        torch.testing.assert_close(FlowMatching(scheduler, kind).weights(t), want.float())


def test_shared_step_is_the_flow_matching_loss(fit, tmp_path, concept_dir):
    """The method's step on SD3 is the rectified-flow MSE of diffusers' SD3 training, computed here by hand."""
    method, _ = fit(tmp_path, concept_dir, max_steps=1, backbone=TinySD3(), flow_weighting="cosmap")
    batch = next(iter(method.trainer.datamodule.train_dataloader()))
    with torch.no_grad():
        out = method.shared_step(batch)
        x0 = batch["latents"]
        noise, t = method.draw_noise(batch)
        sigma = method.objective.sigmas[t].view(-1, 1, 1, 1)
        cond = method.encode_prompts(batch["prompt"])
        pred = method.backbone.unet(
            hidden_states=(1 - sigma) * x0 + sigma * noise,
            timestep=method.objective.sigmas[t] * 1000,
            encoder_hidden_states=cond.states,
            pooled_projections=cond.pooled,
        ).sample
        weight = 2 / (torch.pi * (1 - 2 * sigma.flatten() + 2 * sigma.flatten() ** 2))
        want = (((pred - (noise - x0)) ** 2).mean(dim=(1, 2, 3)) * weight).mean()
    assert x0.shape[1] == 16
    torch.testing.assert_close(out["loss"], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("backbone", "kw", "key"),
    [
        ("sd3", {"min_snr_gamma": 5.0}, "method.min_snr_gamma"),
        ("sd1", {"flow_weighting": "cosmap"}, "method.flow_weighting"),
        ("sd1", {"encoders": ["t5"]}, "method.encoders"),
        ("sdxl", {"encoders": ["clip_l"]}, "method.encoders"),
        ("sd3-no-t5", {"encoders": ["clip_l", "t5"]}, "method.encoders"),
    ],
)
def test_settings_for_another_model_family_are_refused_in_one_line(backbone, kw, key):
    from lit_ti.errors import UserError
    from lit_ti.methods import TextualInversion
    from lit_ti.models import TinyBackbone

    spec = {
        "sd3": TinySD3(),
        "sd3-no-t5": TinySD3(t5=False),
        "sd1": TinyBackbone(),
        "sdxl": TinyBackbone(size="sdxl_tiny"),
    }[backbone]
    method = TextualInversion(spec, name=NAME, **kw)
    with pytest.raises(UserError, match=key):
        method.configure_model()


def test_t5_vectors_train_and_every_file_holds_each_part(fit, tmp_path, concept_dir):
    from safetensors.torch import load_file

    from lit_ti import io

    method, _ = fit(
        tmp_path, concept_dir, max_steps=3, backbone=TinySD3(), encoders=["clip_l", "clip_g", "t5"], every=3
    )
    start = TinySD3().load()
    widths = {"clip_l": 32, "clip_g": 48, "t5xxl": 96}
    tensors = load_file(tmp_path / f"{FIT}.safetensors")
    pt = torch.load(tmp_path / f"{FIT}.pt", weights_only=True)
    assert type(pt) is dict and set(pt) == set(tensors) == {"clip_l", "clip_g", "t5xxl", "t5"}
    assert torch.equal(tensors["t5"], tensors["t5xxl"])  # OneTrainer's key, the same vectors
    initial = {
        key: start.text_encoders[enc][1].get_input_embeddings().weight[:1].detach()
        for key, enc in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"), ("t5xxl", "text_encoder_3"))
    }
    for key, width in widths.items():
        assert tensors[key].shape == (2, width) and torch.equal(pt[key], tensors[key])
        assert tensors[key].isfinite().all() and initial[key].shape[1] == width
    moved = {k: (tensors[k] - v).abs().max() for k, v in method_start_vectors(method).items()}
    assert all(m > 1e-4 for m in moved.values()), moved  # every part trained, T5's too
    back = io.read_embedding(tmp_path / f"{FIT}.safetensors")[0].vectors
    assert set(back) == set(widths) and all(torch.equal(back[k], tensors[k]) for k in widths)


FIT = "zz-thing"  # the concept the `fit` fixture trains


def method_start_vectors(method) -> dict[str, torch.Tensor]:
    """The vectors a fit of `method` started from (its init text, through the same initialisation)."""
    from lit_ti.io.embeddings import to_file

    fresh = type(method)(TinySD3(), name=FIT, num_vectors=2, init_text="square thing", encoders=method.encoders)
    return to_file(fresh.initial_vectors(TinySD3().load(), fresh.init_text, fresh.num_vectors))


# ---------------------------------------------------------------- SD3 diffusers folders
def test_sd3_folder_loads_with_and_without_t5(tmp_path, sd3):
    from lit_ti.errors import UserError
    from lit_ti.models import DiffusersFolder, SD3Folder

    sd3.pipeline().save_pretrained(tmp_path / "sd3")
    vectors = random_concept(sd3, n=2)
    bank = EmbeddingBank()
    bank.add(NAME, vectors)
    with torch.no_grad():
        want = PromptEncoder(sd3, bank)(PROMPTS)
        loaded = SD3Folder(str(tmp_path / "sd3")).load()
        assert loaded.is_sd3 and not loaded.is_sdxl and set(loaded.text_encoders) == set(PARTS)
        got = PromptEncoder(loaded, bank)(PROMPTS)  # the saved tokenizers split prompts as the built ones
        torch.testing.assert_close(got.states, want.states, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.pooled, want.pooled, atol=1e-6, rtol=0)
        without = SD3Folder(str(tmp_path / "sd3"), t5=False).load()
        assert without.text_encoder_3 is None
        states = PromptEncoder(without, bank)(PROMPTS).states
    assert torch.equal(states[:, 77:], torch.zeros_like(states[:, 77:]))  # T5's rows: zeros, as SD3 allows
    torch.testing.assert_close(states[:, :77], want.states[:, :77], atol=1e-6, rtol=0)
    with pytest.raises(UserError, match="model=sd3"):
        DiffusersFolder(str(tmp_path / "sd3")).load()


# ---------------------------------------------------------------- end to end
@pytest.mark.slow
def test_sd3_resume_is_exact(fit, tmp_path, concept_dir):
    kw = dict(backbone=TinySD3(), encoders=["clip_l", "clip_g", "t5"], timestep_sampling="logit_normal", every=3)
    whole, _ = fit(tmp_path / "whole", concept_dir, max_steps=6, **kw)
    fit(tmp_path / "cut", concept_dir, max_steps=3, **kw)
    resumed, trainer = fit(
        tmp_path / "cut", concept_dir, max_steps=6, ckpt_path=tmp_path / "cut" / "checkpoints" / "last.ckpt", **kw
    )
    assert trainer.global_step == 6
    for key, value in whole.bank.vectors.items():
        assert torch.equal(resumed.bank.vectors[key], value), key


@pytest.mark.slow
def test_sd3_ti_from_the_cli_trains_writes_and_generates(tmp_path, cli, generate, pixels):
    cli.train_ok(
        tmp_path / "run",
        "model=tiny_sd3",
        "trainer.max_steps=4",
        "method.encoders=[clip_l,clip_g,t5]",
        "method.timestep_sampling=logit_normal",
        "callbacks.toy_eval=null",
        "callbacks.preview.every_n_steps=4",
        "callbacks.preview.num_inference_steps=2",
    )
    run = tmp_path / "run"
    assert list((run / "previews").glob("*.png"))  # sampled through diffusers' SD3 pipeline
    from lit_ti import io

    vectors = io.read_embedding(run / "toy-concept.safetensors")[0].vectors
    assert {k: v.shape[1] for k, v in vectors.items()} == {"clip_l": 32, "clip_g": 48, "t5xxl": 96}
    common = ("model=tiny_sd3", "steps=2", f"embeddings_dir={run}")
    used = generate(*common, "prompt=a toy-concept")
    plain = generate(*common, "prompt=a")
    assert abs(pixels(used) - pixels(plain)).max() > 0


# ---------------------------------------------------------------- DreamArtist and hypernetworks
@pytest.mark.slow
def test_dreamartist_on_sd3_trains_every_part_of_both_embeddings(fit, tmp_path, concept_dir):
    from safetensors.torch import load_file

    from lit_ti.methods import DreamArtist

    method, _ = fit(
        tmp_path,
        concept_dir,
        max_steps=2,
        every=2,
        backbone=TinySD3(),
        method_cls=DreamArtist,
        encoders=["clip_l", "clip_g", "t5"],
        neg_num_vectors=2,
        neg_init_text="ugly blurry",
        reconstruction=True,  # x̂0 from the flow velocity, decoded through the 16-channel VAE
    )
    start = TinySD3().load()
    for stem in (FIT, f"{FIT}-neg"):
        tensors = load_file(tmp_path / f"{stem}.safetensors")
        assert {k: v.shape[1] for k, v in tensors.items()} == {"clip_l": 32, "clip_g": 48, "t5xxl": 96, "t5": 96}
        text = "square thing" if stem == FIT else "ugly blurry"
        for key, enc in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"), ("t5xxl", "text_encoder_3")):
            tok, te = start.text_encoders[enc]
            first = te.get_input_embeddings().weight[tok(text, add_special_tokens=False).input_ids[0]]
            assert (tensors[key][0] - first).abs().max() > 1e-4, (stem, key)  # moved from its init text
    assert method.trainer.callback_metrics["train/loss_reconstruction"].isfinite()


def test_sd3_hypernetwork_acts_on_the_joint_attentions_context_keys_and_values(sd3):
    from lit_ti.modules.hypernetwork import Hypernetwork, attach, detach

    block = sd3.unet.transformer_blocks[0].attn
    seen: dict[str, list[torch.Tensor]] = {"to_k": [], "add_k_proj": [], "add_v_proj": []}
    hooks = [
        getattr(block, name).register_forward_hook(lambda _m, args, _out, name=name: seen[name].append(args[0]))
        for name in seen
    ]
    hn = Hypernetwork([32], layer_structure=[1, 2, 1], weight_init="Normal")
    with torch.no_grad():
        for module in hn.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.5)  # a trained-looking network: its output is not ~0
        inputs = dict(
            hidden_states=torch.randn(1, 16, 8, 8),
            encoder_hidden_states=torch.randn(1, 333, 96),
            pooled_projections=torch.randn(1, 80),
            timestep=torch.tensor([500.0]),
        )
        plain = sd3.unet(**inputs).sample
        original = attach(sd3.unet, hn, self_attention=False)
        try:
            hn.eval()
            shaped = sd3.unet(**inputs).sample
        finally:
            detach(sd3.unet, original)
        for hook in hooks:
            hook.remove()
        pair = hn.pair(32)
        assert torch.equal(seen["to_k"][1], seen["to_k"][0])  # the image stream's K input: untouched
        torch.testing.assert_close(seen["add_k_proj"][1], pair[0](seen["add_k_proj"][0]))
        torch.testing.assert_close(seen["add_v_proj"][1], pair[1](seen["add_v_proj"][0]))
        assert (shaped - plain).abs().max() > 1e-4
        assert torch.equal(sd3.unet(**inputs).sample, plain)  # detached: the model is as it was


def test_sd3_hypernetwork_trains_and_is_written(fit, tmp_path, concept_dir):
    import lightning as L

    from lit_ti import io
    from lit_ti.methods import HypernetworkMethod

    class Start(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            self.state = {k: v.detach().clone() for k, v in pl_module.hypernetwork.state_dict().items()}

    start = Start()
    fit(
        tmp_path,
        concept_dir,
        max_steps=2,
        every=2,
        backbone=TinySD3(),
        method_cls=HypernetworkMethod,
        base_kw={"name": FIT},
        extra_callbacks=[start],
    )
    hn, _ = io.load_hypernetwork(tmp_path / f"{FIT}.safetensors")
    assert hn.sizes == [32]  # the joint attention's width
    moved = {k: (v - start.state[k]).abs().max() for k, v in hn.state_dict().items()}
    assert max(moved.values()) > 1e-5, moved
