"""What a lit_ti checkpoint holds besides the trained tensors: the run's identity (a resume must match it) and
every RNG's state (so a resumed run draws what the uninterrupted one would have)."""

import random

import numpy as np
import torch

from lit_ti.errors import UserError


def record(checkpoint: dict, identity: dict) -> None:
    """Store `identity` and the RNG states in a checkpoint being saved."""
    checkpoint["lit_ti"] = identity
    # plain tensors and tuples only: Lightning reads checkpoints with torch.load(weights_only=True)
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    checkpoint["rng"] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }


def restore(checkpoint: dict, identity: dict, ckpt_path) -> None:
    """Refuse another run's checkpoint (one line naming what differs), then restore the RNG states."""
    saved = checkpoint.get("lit_ti")
    differs = [f"{k} {saved.get(k)!r} (this run: {v!r})" for k, v in identity.items() if saved and saved.get(k) != v]
    if differs:
        raise UserError(
            f"ckpt_path={ckpt_path}: a checkpoint of another run: {'; '.join(differs)}; resume "
            "with that run's settings, or start a fresh run without ckpt_path in a new hydra.run.dir"
        )
    rng = checkpoint.get("rng")
    if rng is None:
        return
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(rng["python"])
