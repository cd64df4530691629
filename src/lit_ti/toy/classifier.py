"""A small CNN that reads a toy image's shape and colour: the judge of generated samples.

Trained on freshly rendered images of every (colour, shape) pair, held-out ones included (the judge must
know what the base model does not). A second judge also knows the shapes the base model never saw
(`world.NOVEL_SHAPES`); it judges only concepts of those shapes, so every measure of the five known shapes stays
the shipped judge's:

    python -m lit_ti.toy.classifier src/lit_ti/assets/toy_classifier.safetensors
    python -m lit_ti.toy.classifier src/lit_ti/assets/toy_classifier_novel.safetensors --novel
"""

import argparse
import random
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lit_ti.io.atomic import atomic_path
from lit_ti.toy.world import ALL_SHAPES, COLOURS, NOVEL_SHAPES, SHAPES, concept_parts, random_scene, render

FILES = {SHAPES: "toy_classifier.safetensors", ALL_SHAPES: "toy_classifier_novel.safetensors"}


class ToyClassifier(nn.Module):
    """Images `[B, 3, 64, 64]` in [-1, 1] -> (shape logits `[B, len(shapes)]`, colour logits `[B, 6]`)."""

    def __init__(self, shapes: tuple[str, ...] = SHAPES) -> None:
        super().__init__()
        self.shapes = tuple(shapes)
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 5, stride=2, padding=2),  # 32x32: position matters, so no global pooling
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),  # 16x16
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),  # 8x8
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 8 * 8, 128),
            nn.ReLU(),
        )
        self.shape_head = nn.Linear(128, len(self.shapes))
        self.colour_head = nn.Linear(128, len(COLOURS))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(x)
        return self.shape_head(h), self.colour_head(h)

    @torch.no_grad()
    def read(self, images: Tensor) -> list[str]:
        """The concept (`<colour>_<shape>`) each image shows."""
        shape, colour = self(images.to(next(self.parameters()).device, torch.float32))
        names_c, names_s = list(COLOURS), self.shapes
        return [f"{names_c[c]}_{names_s[s]}" for s, c in zip(shape.argmax(-1).tolist(), colour.argmax(-1).tolist())]


def to_tensor(images) -> Tensor:
    """PIL images -> `[B, 3, H, W]` in [-1, 1]."""
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1).permute(
        0, 3, 1, 2
    )


def batch(rng: random.Random, n: int, shapes: tuple[str, ...] = SHAPES) -> tuple[Tensor, Tensor, Tensor]:
    scenes = [random_scene(rng, concepts=[f"{c}_{s}" for c in COLOURS for s in shapes]) for _ in range(n)]
    x = to_tensor([render(s) for s in scenes])
    shape = torch.tensor([shapes.index(s.shape) for s in scenes])
    colour = torch.tensor([list(COLOURS).index(s.colour) for s in scenes])
    return x, shape, colour


def train(
    steps: int = 2000, batch_size: int = 64, seed: int = 0, n_images: int = 4000, shapes: tuple[str, ...] = SHAPES
) -> ToyClassifier:
    torch.manual_seed(seed)
    data_x, data_shape, data_colour = batch(random.Random(seed), n_images, shapes)  # rendering is the slow part
    model = ToyClassifier(shapes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(n_images, (batch_size,))
        x, shape, colour = data_x[idx], data_shape[idx], data_colour[idx]
        x = x + 0.1 * torch.randn_like(x)  # generated samples are noisier than renders
        s_logits, c_logits = model(x)
        loss = F.cross_entropy(s_logits, shape) + F.cross_entropy(c_logits, colour)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def accuracy(model: ToyClassifier, n: int = 512, seed: int = 1) -> float:
    x, shape, colour = batch(random.Random(seed), n, model.shapes)
    read = model.read(x)
    truth = [f"{list(COLOURS)[c]}_{model.shapes[s]}" for s, c in zip(shape.tolist(), colour.tolist())]
    return sum(a == b for a, b in zip(read, truth)) / n


def save(model: ToyClassifier, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, tmp, metadata={"shapes": ",".join(model.shapes)})


def load(path: str | Path | None = None, shapes: tuple[str, ...] = SHAPES) -> ToyClassifier:
    """The shipped judge of `shapes` (or the classifier at `path`, whose file names the shapes it reads; the
    first judge's file predates that and reads `SHAPES`)."""
    path = str(path or resources.files("lit_ti").joinpath("assets", FILES[tuple(shapes)]))
    with safe_open(path, "pt") as f:
        named = (f.metadata() or {}).get("shapes")
    model = ToyClassifier(tuple(named.split(",")) if named else SHAPES)
    model.load_state_dict(load_file(path))
    return model.eval()


def judge(concept: str) -> ToyClassifier:
    """The classifier that judges `concept`: the shipped one, or for a shape the base model never saw, the one
    that also knows those shapes."""
    return load(shapes=ALL_SHAPES if concept_parts(concept)[1] in NOVEL_SHAPES else SHAPES)


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the toy-world classifier.")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--novel", action="store_true", help="also read the shapes the base model never saw")
    args = parser.parse_args()
    model = train(args.steps, shapes=ALL_SHAPES if args.novel else SHAPES)
    save(model, args.out)
    print(f"accuracy on fresh renders: {accuracy(model):.3f} -> {args.out}")


if __name__ == "__main__":
    main()
