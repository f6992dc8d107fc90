"""The synthetic `shapes` task (mmexport/tasks/shapes.py): generator, answers, scoring.

The generator tests check the answers against the pixels, not only against the generator's own
bookkeeping: shapes are strongly saturated colours on near-grey backgrounds, so the saturated pixels'
connected components are the drawn shapes.
"""
from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmexport.tasks import shapes
from mmexport.tasks.shapes import COLOURS, EVAL_SEED, KINDS, QUESTIONS, TRAIN_SEED, examples, is_correct, normalize

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------
# pixel analysis, independent of the generator
# ------------------------------------------------------------------------------------------------
def components(img: Image.Image, min_pixels: int = 30) -> list[dict]:
    """Connected components (4-neighbour) of strongly saturated pixels, largest first."""
    a = np.asarray(img.convert("RGB")).astype(np.int32)
    sat = (a.max(axis=2) - a.min(axis=2)) > 70
    seen = np.zeros_like(sat)
    h, w = sat.shape
    out = []
    for y0, x0 in zip(*np.nonzero(sat)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        q, pix = deque([(y0, x0)]), []
        while q:
            y, x = q.popleft()
            pix.append((y, x))
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and sat[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    q.append((yy, xx))
        if len(pix) >= min_pixels:
            ys, xs = np.array(pix).T
            rgb = np.median(a[ys, xs], axis=0)
            colour = min(COLOURS, key=lambda c: float(np.sum((np.asarray(COLOURS[c]) - rgb) ** 2)))
            fill = len(pix) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
            out.append({"n": len(pix), "cx": float(xs.mean()), "cy": float(ys.mean()), "colour": colour, "fill": fill})
    return sorted(out, key=lambda c: -c["n"])


def test_components_sees_a_drawn_shape():
    img = Image.new("RGB", (80, 60), (200, 200, 200))
    img.paste((40, 90, 230), (10, 10, 30, 30))
    (c,) = components(img)
    assert c["colour"] == "blue" and c["n"] == 400 and c["fill"] == 1.0


# ------------------------------------------------------------------------------------------------
# generator
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def held_out():
    return examples(EVAL_SEED, 200)


def test_deterministic_and_seed_dependent(held_out):
    again = examples(EVAL_SEED, 12)
    for a, b in zip(held_out, again):
        assert (a.question, a.answer, a.kind) == (b.question, b.answer, b.kind)
        assert a.image.size == b.image.size and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    other = examples(EVAL_SEED + 1, 12)
    assert [shapes.fingerprint(e) for e in other] != [shapes.fingerprint(e) for e in again]
    # make_example draws only from the generator it is given
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    e1, e2 = shapes.make_example(r1), shapes.make_example(r2)
    assert shapes.fingerprint(e1) == shapes.fingerprint(e2) and e1.answer == e2.answer


def test_kinds_sizes_and_phrasings(held_out):
    assert [e.kind for e in held_out[:6]] == list(KINDS) * 2
    counts = {k: sum(e.kind == k for e in held_out) for k in KINDS}
    assert counts == {"shape": 67, "count": 67, "colour": 66}
    for e in held_out:
        w, h = e.image.size
        assert e.image.mode == "RGB" and 56 <= w <= 168 and 56 <= h <= 168
        templates = QUESTIONS[e.kind]
        assert any(e.question == t.format(a=s1, b=s2) for t in templates for s1 in shapes.SHAPES for s2 in shapes.SHAPES)
    answers = {e.kind: set() for e in held_out}
    for e in held_out:
        answers[e.kind].add(e.answer)
    assert answers["count"] == {"one", "two"}
    assert answers["colour"] == set(COLOURS)
    assert len(answers["shape"]) >= 15  # of the 20 colour x shape pairs


def _relational(n: int = 60):
    """Examples of the kind outside the task ("position"): still generated, still right."""
    import itertools

    return list(itertools.islice(shapes.stream(EVAL_SEED, kinds=("position",)), n))


def test_position_is_outside_the_task_but_generated():
    assert "position" not in KINDS and set(shapes.ALL_KINDS) == set(KINDS) | {"position"}
    rel = _relational(20)
    assert {e.answer for e in rel} == {"left", "right"} and all(len(e.shapes) == 2 for e in rel)
    one, two = shapes.make_example(np.random.default_rng(1), "shape"), rel[0]
    assert {k for k, _, _ in shapes.all_questions(one)} == set(KINDS)  # a single shape answers every task kind
    assert {k for k, _, _ in shapes.all_questions(two)} == {"count"}
    assert {k for k, _, _ in shapes.all_questions(two, shapes.ALL_KINDS)} == {"count", "position"}


@pytest.mark.parametrize("which", ["held_out", "position"])
def test_answers_match_the_pixels(held_out, which):
    for e in held_out if which == "held_out" else _relational():
        comps = components(e.image)
        where = f"{e.question!r} -> {e.answer!r} ({e.image.size})"
        assert len(comps) == len(e.shapes), where  # what was drawn is what is seen: one blob per shape
        if e.kind == "count":
            assert shapes.NUMBERS[len(comps)] == e.answer, where
        by_x = sorted(comps, key=lambda c: c["cx"])
        for c, s in zip(by_x, e.shapes):  # shapes are listed left to right
            assert c["colour"] == s.colour, where
            assert abs(c["cx"] - s.cx) < 0.35 * s.size + 1.5, where
            # circles and squares fill most of their bounding box; triangles and stars half or less
            assert (c["fill"] > 0.6) == (s.kind in ("circle", "square")), (where, c["fill"], s.kind)
        if e.kind == "shape":
            (c,), (s,) = comps, e.shapes
            assert e.answer == f"a {c['colour']} {s.kind}", where
        if e.kind == "colour":
            named = e.question.split("the ")[1].rstrip("?")
            (s,) = [s for s in e.shapes if s.kind == named]
            assert e.answer == by_x[e.shapes.index(s)]["colour"], where
        if e.kind == "position":
            a, b = e.question[len("Is the "):].rstrip("?").split(" left or right of the ")
            kinds = [s.kind for s in e.shapes]
            assert a != b and sorted(kinds) == sorted([a, b]), where
            xa, xb = by_x[kinds.index(a)]["cx"], by_x[kinds.index(b)]["cx"]
            assert e.answer == ("left" if xa < xb else "right"), where
            # clearly separated: a gap of background columns between the two shapes
            s0, s1 = e.shapes
            assert s1.box[0] - s0.box[2] >= 5, where


def test_held_out_is_disjoint_from_training(held_out):
    keys = {shapes.fingerprint(e) for e in held_out}
    assert len(keys) == len(held_out)  # no repeats inside the held-out set
    stream = shapes.stream(TRAIN_SEED)
    train = {shapes.fingerprint(next(stream)) for _ in range(1500)}
    assert not keys & train


def test_normalize_and_is_correct():
    assert normalize("  A Red  Circle. ") == "a red circle"
    assert normalize("Left.") == "left" and normalize("two") == "two"
    assert is_correct("A red circle.", "a red circle")
    assert is_correct(" RIGHT ", "right")
    assert not is_correct("a red square", "a red circle")
    assert not is_correct("a red", "a red circle")
    assert not is_correct("left or right", "left")
    assert not is_correct("", "one")


def test_user_messages():
    assert shapes.user_messages("How many shapes are there?") == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes are there?"}]}
    ]
