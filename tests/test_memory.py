"""Sampling puts one image at a time through the VAE decoder: its fp32 activations, not the UNet's, set the
peak of a several-image preview or `generate.py` batch otherwise (docs/benchmarks.md). The encoder's side, the
latent caching, is tested in test_latent_cache.py."""

import pytest
from diffusers.models.autoencoders.vae import Decoder

from lit_ti.methods import DreamArtist, TextualInversion
from lit_ti.models import TinyBackbone


@pytest.fixture
def decoded(monkeypatch) -> list[int]:
    """The batch size of every call of any VAE decoder."""
    sizes = []
    forward = Decoder.forward

    def spy(self, z, *args, **kwargs):
        sizes.append(z.shape[0])
        return forward(self, z, *args, **kwargs)

    monkeypatch.setattr(Decoder, "forward", spy)
    return sizes


@pytest.mark.parametrize("method", [TextualInversion, DreamArtist])
def test_previews_decode_one_image_at_a_time(decoded, method):
    m = method(TinyBackbone(), name="zz-thing", init_text="thing")
    m.configure_model()
    assert m.sample("a photo of zz-thing", n=3, steps=2).shape[0] == 3
    assert decoded == [1, 1, 1]


def test_generate_decodes_one_image_at_a_time(decoded, generate):
    assert len(generate("prompt='a zz-star'", "batch_size=3")) == 3
    assert decoded == [1, 1, 1]
