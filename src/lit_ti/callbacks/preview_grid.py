"""A preview row as a labelled grid for TensorBoard: the prompt and step above, each image numbered, small
images enlarged without blurring (the toy world's 64 px previews are unreadable at their own size)."""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIN_TILE = 256  # pixels: smaller images are enlarged by a whole factor, nearest neighbour
COLUMNS = 4
MARGIN = 6


def _fit(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def labelled_grid(images: np.ndarray, title: str, caption: str) -> np.ndarray:
    """images: [n, H, W, 3] uint8 -> [H', W', 3] uint8: up to COLUMNS per row under a header of `title`
    (the prompt) and `caption` (step, seed), each tile numbered."""
    n, h, w, _ = images.shape
    scale = max(1, -(-MIN_TILE // max(h, w)))  # ceil
    tw, th = w * scale, h * scale
    cols, rows = min(n, COLUMNS), -(-n // COLUMNS)
    size = max(14, th // 9)  # TensorBoard shows the grid scaled to its card: the text grows with the tiles
    font = ImageFont.load_default(size=size)
    header = 2 * (size + MARGIN) + MARGIN
    width = max(cols * tw + (cols + 1) * MARGIN, 2 * MIN_TILE)
    grid = Image.new("RGB", (width, header + rows * (th + MARGIN)), "white")
    draw = ImageDraw.Draw(grid)
    for line, text in enumerate((title, caption)):
        position = (MARGIN, MARGIN + line * (size + MARGIN))
        draw.text(position, _fit(text, font, width - 2 * MARGIN, draw), "black", font)
    for i, image in enumerate(images):
        x, y = MARGIN + (i % COLUMNS) * (tw + MARGIN), header + (i // COLUMNS) * (th + MARGIN)
        grid.paste(Image.fromarray(image).resize((tw, th), Image.Resampling.NEAREST), (x, y))
        if n > 1:
            draw.text((x + 6, y + 4), str(i + 1), "white", font, stroke_width=3, stroke_fill="black")
    return np.asarray(grid)
