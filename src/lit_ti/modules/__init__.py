"""Plain nn.Modules and tensor functions (no Lightning, no Hydra)."""
