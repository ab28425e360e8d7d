"""Procedural text-to-image data: coloured shapes on a black background, described by a tiny grammar.

A *scene* holds one or two objects. Each object has a size, a colour, a shape and a cell of a 3x3 grid::

    caption := object | object "," object
    object  := size colour shape row col
    size    := small | large
    colour  := red | green | blue | yellow | cyan | magenta
    shape   := circle | square | triangle | stripes
    row     := top | middle | bottom
    col     := left | center | right

e.g. ``"large red circle top left, small blue stripes bottom right"``. Two objects never share a cell,
and an object never leaves its cell (radius + jitter < half a cell), so every cell holds at most one
object; the detector (``detector.py``) relies on that.

Everything is generated with torch ops on the requested device from a seeded ``torch.Generator``
(``ShapesData.next_batch``), so training never waits on a data loader. A scene is an int64 tensor
``[B, 2, 5]`` of ``(present, size, colour, shape, cell)`` per object slot plus a jitter tensor
``[B, 2, 2]`` (pixels, ``dy, dx``). Tokens are built from the scene tensor directly and equal
``Tokenizer.encode`` of the scene's caption string (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

SIZES = ("small", "large")
COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta")
SHAPES = ("circle", "square", "triangle", "stripes")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
PALETTE = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
}
# Radius (half the side of the bounding square) at 64x64; scaled with the image size.
RADIUS_64 = {"small": 6.0, "large": 9.0}
MAX_OBJECTS = 2
JITTER = 1  # pixels at 64x64 (scaled down, rounding down, for smaller images): centre offset per axis

PAD, CLS, COMMA = "<pad>", "<cls>", ","
VOCAB = (PAD, CLS, COMMA) + SIZES + COLOURS + SHAPES + ROWS + COLS
MAX_LEN = 1 + 5 * MAX_OBJECTS + (MAX_OBJECTS - 1)  # <cls> obj , obj  -> 12


@dataclass(frozen=True)
class Obj:
    """One object of a scene; ``cell = 3 * row + col``."""

    size: str
    colour: str
    shape: str
    row: str
    col: str

    @property
    def cell(self) -> int:
        return 3 * ROWS.index(self.row) + COLS.index(self.col)

    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape} {self.row} {self.col}"


# ----------------------------------------------------------------------------------------------- text


class Tokenizer:
    """Word-level tokenizer over ``VOCAB``: ``<cls>`` + words (the comma is its own token) + ``<pad>`` up
    to ``MAX_LEN``. The empty caption (classifier-free guidance's unconditional input) is ``<cls>`` and
    pads."""

    def __init__(self, max_len: int = MAX_LEN):
        self.vocab = VOCAB
        self.max_len = max_len
        self.index = {w: i for i, w in enumerate(VOCAB)}
        self.pad_id = self.index[PAD]
        self.cls_id = self.index[CLS]

    def __len__(self) -> int:
        return len(self.vocab)

    def words(self, caption: str) -> List[str]:
        return caption.replace(",", " , ").split()

    def encode(self, caption: str) -> List[int]:
        words = self.words(caption)
        unknown = [w for w in words if w not in self.index]
        if unknown:
            raise ValueError(f"unknown words {unknown} in caption {caption!r}; vocabulary: {list(VOCAB[2:])}")
        ids = [self.cls_id] + [self.index[w] for w in words]
        if len(ids) > self.max_len:
            raise ValueError(f"caption {caption!r} has {len(ids)} tokens with <cls>, more than {self.max_len}")
        return ids + [self.pad_id] * (self.max_len - len(ids))

    def __call__(self, captions: Sequence[str], device=None) -> torch.Tensor:
        return torch.tensor([self.encode(c) for c in captions], dtype=torch.long, device=device)

    def decode(self, ids: Sequence[int]) -> str:
        words = [self.vocab[int(i)] for i in ids if int(i) not in (self.pad_id, self.cls_id)]
        return " ".join(words).replace(" ,", ",")


def parse_caption(caption: str) -> List[Obj]:
    """Caption -> objects (raises ``ValueError`` on anything outside the grammar)."""
    objs = []
    for part in [p.strip() for p in caption.split(",")] if caption.strip() else []:
        w = part.split()
        if len(w) != 5 or w[0] not in SIZES or w[1] not in COLOURS or w[2] not in SHAPES or w[3] not in ROWS or w[4] not in COLS:
            raise ValueError(f"{part!r} is not 'size colour shape row col' (caption {caption!r})")
        objs.append(Obj(*w))
    if len(objs) > MAX_OBJECTS:
        raise ValueError(f"at most {MAX_OBJECTS} objects, got {len(objs)} in {caption!r}")
    if len({o.cell for o in objs}) != len(objs):
        raise ValueError(f"two objects share a cell in {caption!r}")
    return objs


# --------------------------------------------------------------------------------------------- scenes


def scene_objects(scenes: torch.Tensor) -> List[List[Obj]]:
    """``[B, 2, 5]`` scene tensor -> objects per item."""
    out = []
    for item in scenes.tolist():
        objs = []
        for present, size, colour, shape, cell in item:
            if present:
                objs.append(Obj(SIZES[size], COLOURS[colour], SHAPES[shape], ROWS[cell // 3], COLS[cell % 3]))
        out.append(objs)
    return out


def scene_captions(scenes: torch.Tensor) -> List[str]:
    return [", ".join(o.phrase() for o in objs) for objs in scene_objects(scenes)]


def scenes_from_captions(captions: Sequence[str], device=None) -> torch.Tensor:
    rows = []
    for c in captions:
        slots = [[1, SIZES.index(o.size), COLOURS.index(o.colour), SHAPES.index(o.shape), o.cell] for o in parse_caption(c)]
        slots += [[0, 0, 0, 0, 0]] * (MAX_OBJECTS - len(slots))
        rows.append(slots)
    return torch.tensor(rows, dtype=torch.long, device=device)


def sample_scenes(n: int, generator: torch.Generator, device=None, p_two: float = 0.5, jitter: int = JITTER):
    """``n`` random scenes ``[n, 2, 5]`` and jitters ``[n, 2, 2]`` (uniform in ``[-jitter, jitter]``
    pixels) on ``device`` (the generator's)."""
    device = generator.device if device is None else torch.device(device)
    kw = dict(generator=generator, device=device)
    size = torch.randint(0, len(SIZES), (n, MAX_OBJECTS), **kw)
    colour = torch.randint(0, len(COLOURS), (n, MAX_OBJECTS), **kw)
    shape = torch.randint(0, len(SHAPES), (n, MAX_OBJECTS), **kw)
    cell0 = torch.randint(0, 9, (n,), **kw)
    cell1 = (cell0 + torch.randint(1, 9, (n,), **kw)) % 9  # a different cell
    two = torch.rand(n, **kw) < p_two
    present = torch.stack([torch.ones_like(two), two], 1).long()
    cell = torch.stack([cell0, cell1], 1)
    scenes = torch.stack([present, size, colour, shape, cell], -1) * present[..., None]
    offsets = torch.randint(-jitter, jitter + 1, (n, MAX_OBJECTS, 2), **kw)
    return scenes, offsets


def _token_tables(device) -> dict:
    t = Tokenizer()
    idx = lambda words: torch.tensor([t.index[w] for w in words], dtype=torch.long, device=device)  # noqa: E731
    return dict(size=idx(SIZES), colour=idx(COLOURS), shape=idx(SHAPES), row=idx(ROWS), col=idx(COLS),
                pad=t.pad_id, cls=t.cls_id, comma=t.index[COMMA])


def scene_tokens(scenes: torch.Tensor) -> torch.Tensor:
    """``[B, 2, 5]`` scenes -> ``[B, MAX_LEN]`` token ids (equal to ``Tokenizer()(scene_captions(scenes))``)."""
    tb = _token_tables(scenes.device)
    present, size, colour, shape, cell = scenes.unbind(-1)
    obj = torch.stack([tb["size"][size], tb["colour"][colour], tb["shape"][shape], tb["row"][cell // 3], tb["col"][cell % 3]], -1)
    obj = torch.where(present[..., None].bool(), obj, torch.full_like(obj, tb["pad"]))  # [B, 2, 5]
    B = scenes.shape[0]
    cls = torch.full((B, 1), tb["cls"], dtype=torch.long, device=scenes.device)
    comma = torch.where(present[:, 1:2].bool(), torch.full_like(cls, tb["comma"]), torch.full_like(cls, tb["pad"]))
    return torch.cat([cls, obj[:, 0], comma, obj[:, 1]], 1)


def empty_tokens(n: int, device=None) -> torch.Tensor:
    """Tokens of the empty caption (the unconditional input)."""
    t = Tokenizer()
    out = torch.full((n, t.max_len), t.pad_id, dtype=torch.long, device=device)
    out[:, 0] = t.cls_id
    return out


# ------------------------------------------------------------------------------------------- drawing


def shape_mask(shape: str, dy, dx, r: float):
    """Boolean mask of ``shape`` for pixel offsets ``dy, dx`` from its centre (torch or numpy arrays).

    All shapes fit the square ``|dx|, |dy| <= r``: circle of radius ``r``; square of side ``2r``;
    upward triangle (apex at the top, base ``2r`` at the bottom); stripes = three horizontal bars of
    height ``2r/5`` filling the square's bands 0, 2, 4."""
    in_box = (abs(dx) <= r) & (abs(dy) <= r)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return in_box
    if shape == "triangle":
        return in_box & (2 * abs(dx) <= dy + r)
    if shape == "stripes":
        band = (dy + r) // (2 * r / 5)
        return in_box & (band % 2 == 0)
    raise ValueError(f"unknown shape {shape!r}")


def cell_centre(cell: int, image_size: int):
    """``(cy, cx)`` in pixel units (pixel ``i`` covers ``[i, i+1)``)."""
    step = image_size / 3
    return (cell // 3 + 0.5) * step, (cell % 3 + 0.5) * step


def radius(size: str, image_size: int) -> float:
    return RADIUS_64[size] * image_size / 64


def render(scenes: torch.Tensor, jitter: Optional[torch.Tensor] = None, image_size: int = 64) -> torch.Tensor:
    """Scenes -> images ``[B, 3, S, S]`` float32 in [0, 1] (black background), on the scenes' device."""
    dev = scenes.device
    B = scenes.shape[0]
    if jitter is None:
        jitter = torch.zeros(B, MAX_OBJECTS, 2, dtype=torch.long, device=dev)
    coords = torch.arange(image_size, device=dev, dtype=torch.float32) + 0.5
    yy, xx = coords[None, :, None], coords[None, None, :]
    palette = torch.tensor([PALETTE[c] for c in COLOURS], device=dev)
    radii = torch.tensor([radius(s, image_size) for s in SIZES], device=dev)
    img = torch.zeros(B, 3, image_size, image_size, device=dev)
    step = image_size / 3
    for j in range(MAX_OBJECTS):
        present, size, colour, shape, cell = scenes[:, j].unbind(-1)
        cy = ((cell // 3).float() + 0.5) * step + jitter[:, j, 0].float()
        cx = ((cell % 3).float() + 0.5) * step + jitter[:, j, 1].float()
        dy, dx = yy - cy[:, None, None], xx - cx[:, None, None]
        r = radii[size][:, None, None]
        mask = torch.zeros(B, image_size, image_size, dtype=torch.bool, device=dev)
        for k, name in enumerate(SHAPES):
            mask |= (shape == k)[:, None, None] & shape_mask(name, dy, dx, r)
        mask &= present.bool()[:, None, None]
        m = mask[:, None].float()
        img = img * (1 - m) + palette[colour][:, :, None, None] * m
    return img


class ShapesData:
    """Seeded stream of training batches generated on ``device``.

    ``next_batch(n)`` -> ``(images [n, 3, S, S] in [-1, 1], tokens [n, MAX_LEN], scenes [n, 2, 5])``."""

    def __init__(self, image_size: int = 64, seed: int = 0, device="cpu", p_two: float = 0.5):
        self.image_size = image_size
        self.device = torch.device(device)
        self.p_two = p_two
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def next_batch(self, n: int):
        scenes, jitter = sample_scenes(n, self.generator, self.device, self.p_two, JITTER * self.image_size // 64)
        images = render(scenes, jitter, self.image_size) * 2 - 1
        return images, scene_tokens(scenes), scenes


def eval_captions(n: int = 64, seed: int = 1234) -> List[str]:
    """The fixed evaluation captions (CPU generator: the same on every machine), about half with one
    object and half with two; ``eval_captions(n)`` is a prefix of ``eval_captions(m)`` for ``n < m``."""
    g = torch.Generator().manual_seed(seed)
    scenes, _ = sample_scenes(max(1024, 4 * n), g, "cpu", p_two=0.5)
    caps = list(dict.fromkeys(scene_captions(scenes)))  # unique, in order
    return caps[:n]


def n_tokens(image_size: int, patch: int = 2) -> int:
    return (image_size // patch) ** 2


__all__ = [
    "SIZES", "COLOURS", "SHAPES", "ROWS", "COLS", "PALETTE", "VOCAB", "MAX_LEN", "Obj", "Tokenizer",
    "parse_caption", "scene_objects", "scene_captions", "scenes_from_captions", "sample_scenes", "scene_tokens",
    "empty_tokens", "shape_mask", "cell_centre", "radius", "render", "ShapesData", "eval_captions", "n_tokens",
]
