"""The `shapes` task: synthetic images of one or two coloured shapes, a question, a short exact answer.

Torch-free (numpy + Pillow only) and Python 3.10 compatible: `mmexport verify --task shapes` imports it
on a runtime-only install. The tiny trained checkpoint `checkpoints/qwen2-vl-shapes` (built by
`scripts/train_shapes.py`) learned this task; export precisions are judged by how many of the held-out
examples they still answer.

Images
    56..168 px per side (not necessarily square; two-shape images are at least 84 px wide), a light
    or dark grey background (slightly tinted) that is plain, a linear gradient, or mildly noisy; one or
    two shapes from SHAPES in one of the COLOURS (jittered a little), antialiased, at random positions
    and sizes (squares and triangles slightly rotated, stars at any angle). Two shapes never overlap
    horizontally: there is a clear gap between them, so "left of" is unambiguous.

Questions (QUESTIONS) and answers
    kind "shape"     one shape        "What shape is shown?"                      -> "a red circle"
    kind "count"     one or two       "How many shapes are there?"                -> "one" / "two"
    kind "colour"    one shape        "What colour is the circle?"                -> "red"
    kind "position"  two, two kinds   "Is the star left or right of the square?"  -> "left" / "right"
    ("position" answers where the first-named shape is relative to the second.)

    The task the trained checkpoint is judged on is KINDS = shape, count, colour. "position" (in
    ALL_KINDS) asks the model to find a shape by its name among two and is not part of it yet: the tiny
    model trained on this CPU in minutes does not learn that lookup (measured: chance after 1000 steps,
    see scripts/train_shapes.py). `make_example(rng, "position")` and `stream(seed, ALL_KINDS)` still
    make such examples.

Data
    `examples(seed, n)` is deterministic: a numpy PCG64 generator seeded with `seed`, one example after
    another, the kinds cycling through KINDS (so 200 examples hold 67, 67 and 66 of the kinds, and
    `examples(seed, k)` is a prefix of `examples(seed, n)` for k <= n). The held-out set is
    `examples(EVAL_SEED, 200)`; training draws from `stream(TRAIN_SEED)`. Different seeds give
    independent streams (numpy's SeedSequence hashes the seed), and as every image has continuous
    random parameters (position, size, angle, colours, background) an exact repeat is practically
    impossible; the training script also skips any training image whose `image_digest` is that of a
    held-out image, so no held-out image (let alone image + question) is ever trained on.

Scoring
    `normalize` strips, lowercases, collapses whitespace and drops a trailing period; `is_correct`
    compares normalized strings exactly.
"""
from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPES",
    "COLOURS",
    "KINDS",
    "ALL_KINDS",
    "QUESTIONS",
    "TRAIN_SEED",
    "EVAL_SEED",
    "EVAL_EXAMPLES",
    "Shape",
    "Example",
    "make_example",
    "stream",
    "examples",
    "all_questions",
    "user_messages",
    "image_digest",
    "coverage",
    "fingerprint",
    "normalize",
    "is_correct",
]

SHAPES = ("circle", "square", "triangle", "star")

# Well separated hues, all strongly saturated (the backgrounds are near-grey). Each drawn colour is
# jittered by up to COLOUR_JITTER per channel.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (235, 205, 30),
    "purple": (150, 60, 200),
}
COLOUR_JITTER = 15

KINDS = ("shape", "count", "colour")  # the task: what `examples` and the default `stream` ask
ALL_KINDS = KINDS + ("position",)  # + finding a shape by its name among two (not learned yet)

# kind -> phrasings; "{a}" / "{b}" are shape names. The first phrasing of each kind is the canonical one.
QUESTIONS: dict[str, tuple[str, ...]] = {
    "shape": ("What shape is shown?", "What is in the picture?"),
    "count": ("How many shapes are there?",),
    "position": ("Is the {a} left or right of the {b}?",),
    "colour": ("What colour is the {a}?",),
}

NUMBERS = {1: "one", 2: "two"}

TRAIN_SEED = 0
EVAL_SEED = 20_240_601  # held-out: examples(EVAL_SEED, EVAL_EXAMPLES)
EVAL_EXAMPLES = 200

MIN_SIDE, MAX_SIDE = 56, 168
MIN_TWO_WIDTH = 84  # two shapes side by side need room for a clear gap
_MARGIN = 2  # px between a shape and the image border
_SUPERSAMPLE = 4  # shapes are rasterized at 4x and box-filtered down (antialiasing)


@dataclass(frozen=True)
class Shape:
    """One drawn shape: its kind, colour name, the RGB actually used, centre and size in pixels.

    `size` is the nominal radius (a circle's radius; the other shapes are scaled to a similar area);
    `angle` is the rotation in degrees; `box` the polygon's bounding box (x0, y0, x1, y1).
    """

    kind: str
    colour: str
    rgb: tuple[int, int, int]
    cx: float
    cy: float
    size: float
    angle: float
    box: tuple[float, float, float, float]


@dataclass
class Example:
    """One task example: the image, the question as asked, the exact short answer, the question kind.

    `shapes` describes what was drawn (left to right), for tests and debugging; the model never sees it.
    """

    image: Image.Image
    question: str
    answer: str
    kind: str
    shapes: tuple[Shape, ...] = field(default=(), repr=False)


# ------------------------------------------------------------------------------------------------
# geometry and drawing
# ------------------------------------------------------------------------------------------------
def _outline(kind: str, size: float, angle: float) -> np.ndarray | None:
    """Polygon vertices [N, 2] around (0, 0), y down; None for a circle."""
    a = math.radians(angle)
    if kind == "circle":
        return None
    if kind == "square":
        half = 0.85 * size  # area 2.9 r^2, close to the circle's 3.14 r^2
        t = a + np.pi / 4 + np.arange(4) * np.pi / 2
        rad = np.full(4, half * math.sqrt(2))
    elif kind == "triangle":
        circ = 1.2 * size  # equilateral, apex up (before rotation)
        t = a - np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        rad = np.full(3, circ)
    elif kind == "star":
        outer = 1.2 * size  # five points, inner radius 0.45 of the outer
        t = a - np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, outer, 0.45 * outer)
    else:
        raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPES}")
    return np.stack([rad * np.cos(t), rad * np.sin(t)], axis=1)


def _extent(kind: str, size: float, angle: float) -> tuple[float, float, float, float]:
    """Bounding box (x0, y0, x1, y1) of the shape around (0, 0)."""
    pts = _outline(kind, size, angle)
    if pts is None:
        return (-size, -size, size, size)
    return (float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max()))


def _alpha(kind: str, size: float, angle: float, cx: float, cy: float, width: int, height: int) -> np.ndarray:
    """Coverage [H, W] in 0..1 of one shape, rasterized at _SUPERSAMPLE x and box-filtered down."""
    s = _SUPERSAMPLE
    m = Image.new("L", (width * s, height * s), 0)
    d = ImageDraw.Draw(m)
    pts = _outline(kind, size, angle)
    if pts is None:
        d.ellipse([(cx - size) * s, (cy - size) * s, (cx + size) * s, (cy + size) * s], fill=255)
    else:
        d.polygon([((cx + x) * s, (cy + y) * s) for x, y in pts], fill=255)
    m = m.resize((width, height), Image.Resampling.BOX)
    return np.asarray(m, dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, bool]:
    """A near-grey background [H, W, 3] float32 (light or dark; plain, gradient or noisy), and 'noisy'."""
    light = rng.random() < 0.5
    grey = rng.uniform(175, 250) if light else rng.uniform(10, 80)
    base = grey + rng.uniform(-12, 12, size=3)
    img = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    style = rng.integers(3)  # 0 plain, 1 gradient, 2 noisy
    if style == 1:
        t = rng.uniform(0, 2 * np.pi)
        amp = rng.uniform(20, 45) * (-1 if light else 1)  # towards mid-grey, never across it
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        proj = (xx - width / 2) * math.cos(t) + (yy - height / 2) * math.sin(t)
        proj = proj / max(float(np.abs(proj).max()), 1.0)  # -1..1
        img = img + (amp * (proj + 1) / 2)[..., None]
    return img, bool(style == 2)


def _render(rng: np.random.Generator, width: int, height: int, shapes: list[Shape]) -> Image.Image:
    img, noisy = _background(rng, width, height)
    for sh in shapes:
        a = _alpha(sh.kind, sh.size, sh.angle, sh.cx, sh.cy, width, height)[..., None]
        img = img * (1 - a) + np.asarray(sh.rgb, dtype=np.float32) * a
    if noisy:
        img = img + rng.normal(0.0, rng.uniform(3, 8), size=img.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def _colour(rng: np.random.Generator, name: str) -> tuple[int, int, int]:
    base = np.asarray(COLOURS[name])
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(base + jitter, 0, 255))  # type: ignore[return-value]


def _angle(rng: np.random.Generator, kind: str) -> float:
    if kind == "star":
        return float(rng.uniform(0, 72))
    if kind in ("square", "triangle"):
        return float(rng.uniform(-12, 12))
    return 0.0


def _one_shape(rng: np.random.Generator, width: int, height: int, kind: str, colour: str) -> list[Shape]:
    m = min(width, height)
    size = float(rng.uniform(max(10.0, 0.18 * m), 0.38 * m))
    angle = _angle(rng, kind)
    x0, y0, x1, y1 = _extent(kind, size, angle)
    cx = float(rng.uniform(_MARGIN - x0, width - _MARGIN - x1))
    cy = float(rng.uniform(_MARGIN - y0, height - _MARGIN - y1))
    return [Shape(kind, colour, _colour(rng, colour), cx, cy, size, angle, (cx + x0, cy + y0, cx + x1, cy + y1))]


def _two_shapes(rng: np.random.Generator, width: int, height: int, kinds: tuple[str, str], colours: tuple[str, str]) -> list[Shape]:
    """Two shapes, kinds[0] on the left, with a horizontal gap of at least max(5, 8% of the width)."""
    m = min(width, height)
    gap = max(5.0, 0.08 * width)
    hi = min(0.3 * m, (width - 2 * _MARGIN - gap) / 4.8)  # two extents of <= 2.4 * size each, plus the gap
    lo = min(max(10.0, 0.14 * m), hi)
    sizes = [float(rng.uniform(lo, hi)) for _ in range(2)]
    angles = [_angle(rng, k) for k in kinds]
    ext = [_extent(k, s, a) for k, s, a in zip(kinds, sizes, angles)]
    widths = [e[2] - e[0] for e in ext]
    slack = max(0.0, width - 2 * _MARGIN - gap - widths[0] - widths[1])
    s1, s2 = sorted(rng.uniform(0, slack, size=2))
    lefts = [_MARGIN + s1, _MARGIN + widths[0] + gap + s2]
    out = []
    for k, c, s, a, e, left in zip(kinds, colours, sizes, angles, ext, lefts):
        cx = left - e[0]
        cy = float(rng.uniform(_MARGIN - e[1], height - _MARGIN - e[3]))
        out.append(Shape(k, c, _colour(rng, c), float(cx), cy, s, a, (cx + e[0], cy + e[1], cx + e[2], cy + e[3])))
    return out


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


# ------------------------------------------------------------------------------------------------
# examples
# ------------------------------------------------------------------------------------------------
def make_example(rng: np.random.Generator, kind: str | None = None, max_side: int = MAX_SIDE) -> Example:
    """One random example of `kind` (one of KINDS; None picks one uniformly), drawn from `rng`.

    `max_side` (84..168) caps the image sides: smaller images only, the same layout rules otherwise
    (the training script starts on small images; evaluation always uses the default).
    """
    if not MIN_TWO_WIDTH <= max_side <= MAX_SIDE:
        raise ValueError(f"max_side must be in {MIN_TWO_WIDTH}..{MAX_SIDE}, got {max_side}")
    if kind is None:
        kind = _pick(rng, KINDS)
    if kind not in ALL_KINDS:
        raise ValueError(f"unknown question kind {kind!r}; expected one of {ALL_KINDS}")
    colour_names = tuple(COLOURS)
    if kind in ("shape", "colour"):
        two = False
    elif kind == "position":
        two = True
    else:
        two = bool(rng.random() < 0.5)
    height = int(rng.integers(MIN_SIDE, max_side + 1))
    width = int(rng.integers(MIN_TWO_WIDTH if two else MIN_SIDE, max_side + 1))
    if two:
        if kind == "count":  # any two shapes, the same kind or colour allowed
            kinds = (_pick(rng, SHAPES), _pick(rng, SHAPES))
        else:  # the question names a shape: the two must differ in kind
            i, j = rng.choice(len(SHAPES), size=2, replace=False)
            kinds = (SHAPES[int(i)], SHAPES[int(j)])
        colours = (_pick(rng, colour_names), _pick(rng, colour_names))
        shapes = _two_shapes(rng, width, height, kinds, colours)
    else:
        shapes = _one_shape(rng, width, height, _pick(rng, SHAPES), _pick(rng, colour_names))
    phrasing = _pick(rng, QUESTIONS[kind])
    if kind == "shape":
        question, answer = phrasing, f"a {shapes[0].colour} {shapes[0].kind}"
    elif kind == "count":
        question, answer = phrasing, NUMBERS[len(shapes)]
    elif kind == "position":
        first = int(rng.integers(2))  # which of the two is named first
        a, b = shapes[first], shapes[1 - first]
        question, answer = phrasing.format(a=a.kind, b=b.kind), ("left" if first == 0 else "right")
    else:  # colour
        target = shapes[int(rng.integers(len(shapes)))]
        question, answer = phrasing.format(a=target.kind), target.colour
    image = _render(rng, width, height, shapes)
    return Example(image=image, question=question, answer=answer, kind=kind, shapes=tuple(shapes))


def stream(seed: int | Sequence[int], kinds: tuple[str, ...] = KINDS, max_side: int = MAX_SIDE) -> Iterator[Example]:
    """An endless deterministic sequence of examples, the question kinds cycling through `kinds`.

    `seed` is anything numpy.random.default_rng takes (an int, or a sequence of ints for sub-streams).
    """
    rng = np.random.default_rng(seed)
    for kind in itertools.cycle(kinds):
        yield make_example(rng, kind, max_side)


def examples(seed: int, n: int) -> list[Example]:
    """The first `n` examples of `stream(seed)`: deterministic, kinds in KINDS order, round robin.

    The held-out evaluation set is `examples(EVAL_SEED, EVAL_EXAMPLES)` (or a prefix of it).
    """
    return list(itertools.islice(stream(seed), n))


def all_questions(example: Example, kinds: Sequence[str] = KINDS) -> list[tuple[str, str, str]]:
    """Every (kind, question, answer) of `kinds` this example's image answers unambiguously, all phrasings.

    One shape: "shape" (each phrasing), "count", "colour". Two shapes: "count"; when their kinds differ,
    also "position" (both orders). The example's own question is among them when its kind is in `kinds`.
    """
    sh = example.shapes
    out = [("count", q, NUMBERS[len(sh)]) for q in QUESTIONS["count"]]
    if len(sh) == 1:
        out += [("shape", q, f"a {sh[0].colour} {sh[0].kind}") for q in QUESTIONS["shape"]]
        out += [("colour", q.format(a=sh[0].kind), sh[0].colour) for q in QUESTIONS["colour"]]
    if len(sh) == 2 and sh[0].kind != sh[1].kind:
        for q in QUESTIONS["position"]:
            out += [("position", q.format(a=sh[0].kind, b=sh[1].kind), "left"), ("position", q.format(a=sh[1].kind, b=sh[0].kind), "right")]
    return [x for x in out if x[0] in kinds]


def user_messages(question: str) -> list[dict]:
    """The chat the model is asked with: one user turn, the image first, then the question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def coverage(example: Example) -> np.ndarray:
    """[len(example.shapes), H, W] float32: how much of each pixel (0..1) each drawn shape covers, the
    shapes in `example.shapes` order (left to right). For training signals and tests; not a model input."""
    w, h = example.image.size
    return np.stack([_alpha(s.kind, s.size, s.angle, s.cx, s.cy, w, h) for s in example.shapes])


def image_digest(image: Image.Image) -> str:
    """A digest of an image's size and RGB pixels."""
    h = hashlib.sha256(f"{image.size}|".encode())
    h.update(np.asarray(image.convert("RGB")).tobytes())
    return h.hexdigest()


def fingerprint(example: Example) -> str:
    """A digest of the image pixels, size and question (the answer follows from these)."""
    return hashlib.sha256(f"{image_digest(example.image)}|{example.question}".encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------
def normalize(answer: str) -> str:
    """Strip, lowercase, collapse inner whitespace, drop one trailing period."""
    s = " ".join(answer.strip().lower().split())
    if s.endswith("."):
        s = s[:-1].rstrip()
    return s


def is_correct(prediction: str, answer: str) -> bool:
    """Whether a model's answer matches the expected one exactly after `normalize`."""
    return normalize(prediction) == normalize(answer)
