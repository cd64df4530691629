"""lit_ti: teach a frozen Stable Diffusion model a new concept (TI, DreamArtist, hypernetworks)."""

__version__ = "0.1.0"
