"""Deterministic synthetic "shapes world": coloured, patterned shapes written as COCO and CZSL data sets."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import multiprocessing as mp
import os
import shutil
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from scipy.ndimage import binary_erosion
from tqdm import tqdm

# name -> RGB. Every colour keeps a channel >= 69 even after jitter (-12) and halving (the shade tone),
# so every object pixel differs from the dark background (all channels <= BG_MAX).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (235, 220, 50),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (245, 245, 245), "gray": (150, 150, 150),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
# Patterns are never named in captions: they are the held-out attribute family of the CZSL split.
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted", "outlined", "checkered")
SPLITS: tuple[str, ...] = ("train", "val", "test")
CZSL_SPLIT_NAME = "compositional-split-natural"  # attributes = the patterns, never named in captions
CZSL_COLOUR_SPLIT = "compositional-split-colour"  # attributes = the colours, which captions name
# split folder -> the object attribute that is the CZSL attribute, and its vocabulary
CZSL_FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    CZSL_SPLIT_NAME: ("pattern", PATTERNS), CZSL_COLOUR_SPLIT: ("color", tuple(COLORS))}
GENERATOR_VERSION = "shapes-v3"  # v2: instances carry each object's centre; v3: the colour CZSL split
BG_MAX = 45
_SHADE = 0.5  # the pattern's second tone, as a fraction of the object's colour
_TILT = 0.35  # max rotation (rad) of polygon shapes: enough variety, a cross stays a "+"
_GAP = 2.0  # min free pixels between two objects' bounding circles, so they never touch
# Radius of each shape's bounding circle, as a multiple of its outer radius r (square corner, cross arm end).
_BOUND = {"circle": 1.0, "ring": 1.0, "triangle": 1.0, "star": 1.0, "square": 0.8 * 2**0.5, "cross": 1.09**0.5}
_STREAM = {"train": 0, "val": 1, "test": 2, "czsl": 3, "czsl-colour": 5}


@dataclass
class ObjectSpec:
    """One drawn object: its labels, its geometry and the exact boolean mask it occupies."""

    shape: str
    color: str
    pattern: str
    cx: float
    cy: float
    r: float
    angle: float
    rgb: tuple[int, int, int]
    pattern_angle: float
    mask: np.ndarray = field(repr=False)


@dataclass
class Scene:
    """A background (base colour + texture) and the non-overlapping objects painted on it."""

    size: int
    base: tuple[int, int, int]
    texture: str
    texture_seed: int
    objects: list[ObjectSpec]


def _window(size: int, cx: float, cy: float, reach: float) -> tuple[int, int, int, int]:
    """Pixel window (y0, y1, x0, x1) covering a disc of radius ``reach``, clipped to the image."""
    return (max(0, int(cy - reach)), min(size, int(np.ceil(cy + reach)) + 1),
            max(0, int(cx - reach)), min(size, int(np.ceil(cx + reach)) + 1))


def _local(win: tuple[int, int, int, int], cx: float, cy: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Object-frame coordinates (u right, v down, rotated by ``angle`` about the centre) of the window's
    pixel centres, as a column and a row that broadcast (cheaper than a meshgrid)."""
    dx, dy = np.arange(win[2], win[3])[None, :] + 0.5 - cx, np.arange(win[0], win[1])[:, None] + 0.5 - cy
    c, s = np.cos(angle), np.sin(angle)
    return c * dx + s * dy, -s * dx + c * dy


def _star(u: np.ndarray, v: np.ndarray, r: float, k: int, inner: float) -> np.ndarray:
    """Regular k-pointed star with tips at radius ``r`` (one straight up) and notches at ``inner * r``;
    ``inner = cos(pi / k)`` gives the regular k-gon. Folding the angle into one half-sector reduces the
    inside test to a single half-plane: the origin's side of the edge tip -> notch."""
    half = np.pi / k
    phi = np.abs(np.mod(np.arctan2(u, -v) + half, 2 * half) - half)
    rho = np.hypot(u, v)
    px, py = rho * np.cos(phi), rho * np.sin(phi)
    ix, iy = inner * r * np.cos(half), inner * r * np.sin(half)
    return (ix - r) * py - iy * (px - r) >= 0


# Inside tests in the object frame (u right, v down) for outer radius r; a pixel is in when its centre is.
_INSIDE: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "circle": lambda u, v, r: u * u + v * v <= r * r,
    "ring": lambda u, v, r: np.abs(np.hypot(u, v) - 0.775 * r) <= 0.225 * r,  # the hole tells it from a circle
    "square": lambda u, v, r: np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r,
    "triangle": lambda u, v, r: _star(u, v, r, 3, 0.5),  # apex up
    "star": lambda u, v, r: _star(u, v, r, 5, 0.5),
    "cross": lambda u, v, r: (np.minimum(np.abs(u), np.abs(v)) <= 0.3 * r) & (np.maximum(np.abs(u), np.abs(v)) <= r),
}


def shape_mask(shape: str, size: int, cx: float, cy: float, r: float, angle: float = 0.0) -> np.ndarray:
    """Exact boolean mask [size, size] of ``shape`` with outer radius ``r`` centred at (cx, cy): a pixel
    belongs to it when its centre is inside the shape. Evaluated on the shape's bounding window only."""
    if shape not in _INSIDE:
        raise ValueError(f"shape_mask: unknown shape {shape!r}; expected one of {SHAPES}")
    win = _window(size, cx, cy, r * _BOUND[shape] + 1.0)
    out = np.zeros((size, size), bool)
    if win[1] > win[0] and win[3] > win[2]:
        out[win[0]:win[1], win[2]:win[3]] = _INSIDE[shape](*_local(win, cx, cy, angle), r)
    return out


def _pattern_shade(obj: ObjectSpec, win: tuple[int, int, int, int]) -> np.ndarray:
    """Boolean map, over window ``win``, of the object's pixels painted in the darker tone."""
    u, v = _local(win, obj.cx, obj.cy, obj.pattern_angle)
    mask = obj.mask[win[0]:win[1], win[2]:win[3]]
    w = max(2.0, obj.r / 3.0)
    if obj.pattern == "solid":
        shade = np.zeros_like(mask)
    elif obj.pattern == "striped":
        shade = np.floor(u / w).astype(int) % 2 == 1
    elif obj.pattern == "checkered":
        shade = (np.floor(u / w) + np.floor(v / w)).astype(int) % 2 == 1
    elif obj.pattern == "dotted":
        g = max(4.0, obj.r * 0.6)
        du, dv = np.mod(u, g) - g / 2, np.mod(v, g) - g / 2
        shade = du * du + dv * dv <= (0.3 * g) ** 2
    elif obj.pattern == "outlined":  # bright rim, dim inside (the window's free margin makes erosion exact)
        shade = binary_erosion(mask, iterations=max(1, int(obj.r) // 5))
    else:
        raise ValueError(f"unknown pattern {obj.pattern!r}; expected one of {PATTERNS}")
    return shade & mask


@functools.lru_cache(maxsize=4)
def _noise_tile(size: int) -> np.ndarray:
    return np.random.default_rng(size).integers(-8, 9, (2 * size, 2 * size, 1))


def render_background(scene: Scene) -> np.ndarray:
    """The scene's background alone, uint8 [size, size, 3]; regenerable from the scene spec."""
    s = scene.size
    if scene.texture == "plain":
        return np.full((s, s, 3), scene.base, np.uint8)
    if scene.texture == "noise":  # a crop of one fixed noise tile: as random-looking, far cheaper than an RNG
        oy, ox = divmod(scene.texture_seed % (s * s), s)
        delta = _noise_tile(s)[oy:oy + s, ox:ox + s]
    else:  # "gradient": brighter to the right
        delta = np.linspace(0, 12, s).astype(np.int64)[None, :, None].repeat(s, axis=0)
    return np.clip(np.array(scene.base, np.int64) + delta, 0, BG_MAX).astype(np.uint8)


def render_scene(scene: Scene) -> np.ndarray:
    """Paint every object's mask on the background: full colour, with the pattern in the shade tone."""
    img = render_background(scene)
    for obj in scene.objects:
        win = _window(scene.size, obj.cx, obj.cy, obj.r * _BOUND[obj.shape] + 1.0)
        view = img[win[0]:win[1], win[2]:win[3]]  # a view: painting it paints the image
        rgb = np.array(obj.rgb, np.float64)
        view[obj.mask[win[0]:win[1], win[2]:win[3]]] = rgb.astype(np.uint8)
        view[_pattern_shade(obj, win)] = np.round(rgb * _SHADE).astype(np.uint8)
    return img


def _sample_background(rng: np.random.Generator, size: int) -> Scene:
    base = tuple(int(c) for c in rng.integers(0, 36, 3))
    texture = ("plain", "noise", "gradient")[int(rng.integers(3))]
    return Scene(size, base, texture, int(rng.integers(0, 2**31)), [])


def _place(rng: np.random.Generator, scene: Scene, shape: str, r: float,
           tries: int = 30) -> tuple[float, float] | None:
    """Rejection-sample a centre whose bounding circle lies inside the image and keeps ``_GAP`` pixels
    from every placed object's bounding circle: objects then never overlap nor touch, by geometry."""
    bound = r * _BOUND[shape]
    lo, hi = bound + 1.0, scene.size - bound - 1.0
    for _ in range(tries):
        cx, cy = (float(c) for c in rng.uniform(lo, hi, 2))
        if all(np.hypot(cx - o.cx, cy - o.cy) > bound + o.r * _BOUND[o.shape] + _GAP for o in scene.objects):
            return cx, cy
    return None


def _add_object(rng: np.random.Generator, scene: Scene, shape: str, pattern: str, r: float,
                color: str | None = None) -> bool:
    drawn = list(COLORS)[int(rng.integers(len(COLORS)))]  # drawn even when fixed: the stream stays the same
    color = color or drawn
    jitter = rng.integers(-12, 13, 3)
    rgb = tuple(min(255, max(0, c + int(j))) for c, j in zip(COLORS[color], jitter))
    angle = 0.0 if shape in ("circle", "ring") else float(rng.uniform(-_TILT, _TILT))
    pattern_angle = float(rng.uniform(0, np.pi))
    centre = _place(rng, scene, shape, r)
    if centre is None:
        return False
    mask = shape_mask(shape, scene.size, centre[0], centre[1], r, angle)
    scene.objects.append(ObjectSpec(shape, color, pattern, *centre, r, angle, rgb, pattern_angle, mask))
    return True


def scene_for(seed: int, stream: str, index: int, size: int) -> Scene:
    """The multi-object scene of image ``index`` in ``stream`` (train/val/test); own RNG per image so
    any image can be regenerated alone (tests, parallel workers) and results never depend on order."""
    rng = np.random.default_rng([seed, _STREAM[stream], index])
    scene = _sample_background(rng, size)
    n = int(rng.integers(1, 4))
    r_lo, r_hi = max(4.0, 0.11 * size), max(5.0, (0.24 - 0.03 * (n - 1)) * size)
    for _ in range(n):  # an object that finds no room is dropped; captions count what was drawn
        shape, pattern = SHAPES[int(rng.integers(len(SHAPES)))], PATTERNS[int(rng.integers(len(PATTERNS)))]
        _add_object(rng, scene, shape, pattern, float(rng.uniform(r_lo, r_hi)))
    if not scene.objects:  # cannot happen for size >= 16 (the first object always fits)
        raise RuntimeError(f"scene_for: no object fits a {size}px image; use image_size >= 16")
    return scene


def czsl_scene_for(seed: int, index: int, size: int, attr: str, shape: str, family: str = "pattern") -> Scene:
    """A single, larger object with a fixed (attribute, shape) pair. ``family`` says what the attribute is:
    "pattern" (the colour is a random nuisance) or "color" (the pattern is the nuisance)."""
    if family not in ("pattern", "color"):
        raise ValueError(f"czsl_scene_for: family={family!r}; expected 'pattern' or 'color'")
    rng = np.random.default_rng([seed, _STREAM["czsl" if family == "pattern" else "czsl-colour"], index])
    scene = _sample_background(rng, size)
    r = float(rng.uniform(max(5.0, 0.2 * size), max(6.0, 0.36 * size)))
    if family == "pattern":
        pattern, color = attr, None
    else:
        pattern, color = PATTERNS[int(rng.integers(len(PATTERNS)))], attr
    if not _add_object(rng, scene, shape, pattern, r, color):
        raise RuntimeError(f"czsl_scene_for: a {shape} of radius {r:.1f} does not fit {size}px")
    return scene


def png_bytes(img: np.ndarray) -> bytes:
    """Minimal PNG (8-bit RGB, no filter, no metadata): equal pixels give equal bytes, and it is ~4x
    faster than PIL's encoder for small images, which matters for 20k of them."""
    h, w, _ = img.shape
    rows = np.zeros((h, w * 3 + 1), np.uint8)  # each scanline starts with filter byte 0 ("none")
    rows[:, 1:] = img.reshape(h, w * 3)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, truecolour, deflate, no filter/interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 1))
            + chunk(b"IEND", b""))


# ---- captions: colour, shape, counts and spatial relations; never the pattern -------------------------
_NUM = ("no", "one", "two", "three")


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _where(o: ObjectSpec, size: int) -> str:
    """Coarse position on a 3x3 grid of the image, e.g. "top left", "bottom", "center"."""
    row = ("top", "", "bottom")[min(2, int(3 * o.cy / size))]
    col = ("left", "", "right")[min(2, int(3 * o.cx / size))]
    return " ".join(w for w in (row, col) if w) or "center"


def _relation(a: ObjectSpec, b: ObjectSpec) -> str:
    """Where ``a`` is relative to ``b``, along the axis on which their centres differ most."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def _shape_counts(objs: list[ObjectSpec]) -> str:
    counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    plural = {s: (s + "es" if s.endswith("s") else s + "s") for s in SHAPES}
    return _join([f"{_NUM[n]} {s if n == 1 else plural[s]}" for s, n in counts.items() if n])


def _candidates(objs: list[Any], size: int, order: list[int]) -> list[str]:
    """Every caption template filled in for ``objs`` (anything with .shape, .color, .cx, .cy), with the
    objects named in ``order`` (the first two are the related pair) for multi-object scenes."""
    name = [_a(f"{o.color} {o.shape}") for o in objs]
    if len(objs) == 1:
        o, d = objs[0], f"{objs[0].color} {objs[0].shape}"
        return [_a(d), f"one {d} on a dark background", f"a single {d} at the {_where(o, size)}",
                f"there is one {d} in the image", f"a picture of exactly one shape: {_a(d)}",
                f"{_a(o.shape)} that is {o.color}"]
    i, j, n = order[0], order[1], len(objs)
    a, b = objs[i], objs[j]
    cands = [f"{name[i]} {_relation(a, b)} {name[j]}", f"{name[j]} {_relation(b, a)} {name[i]}",
             f"{_NUM[n]} shapes: {_join([name[t] for t in order])}",
             f"{_shape_counts(objs)} on a dark background",
             _join([f"{name[t]} at the {_where(objs[t], size)}" for t in order]),
             f"there are {_NUM[n]} objects, {_join([name[t] for t in order])}"]
    if n == 3:
        t = order[2]
        cands.append(f"{name[i]} {_relation(a, b)} {name[j]}, which is {_relation(b, objs[t])} {name[t]}")
    return cands


def captions_for(scene: Scene, rng: np.random.Generator, k: int = 5) -> list[str]:
    """``k`` distinct captions of the scene, drawn from templates in an order set by ``rng``."""
    objs = scene.objects
    order = [int(i) for i in rng.permutation(len(objs))] if len(objs) > 1 else [0]
    cands = _candidates(objs, scene.size, order)
    return [cands[int(c)] for c in rng.permutation(len(cands))[:k]]


@dataclass(frozen=True)
class SceneObject:
    """What a caption can say about an object: its shape, colour and centre (pixels)."""

    shape: str
    color: str
    cx: float
    cy: float


def true_captions(objects: list[Any], size: int) -> frozenset[str]:
    """Every caption the generator could write for a scene of these objects (any naming order): the
    captions that are true of it. ``objects`` need .shape, .color, .cx, .cy (ObjectSpec, SceneObject)."""
    orders = itertools.permutations(range(len(objects))) if len(objects) > 1 else [(0,)]
    return frozenset(c for order in orders for c in _candidates(list(objects), size, list(order)))


def scene_objects(instances: list[dict[str, Any]]) -> list[SceneObject] | None:
    """The SceneObjects of one image's instance records (``instances_{split}.json`` of a shapes world),
    or None when the records do not describe a shapes scene (no colour or centre: another data set)."""
    out = []
    for a in instances:
        if "center" not in a or "color" not in a or not 1 <= a.get("category_id", 0) <= len(SHAPES):
            return None
        out.append(SceneObject(SHAPES[a["category_id"] - 1], a["color"], *map(float, a["center"])))
    return out or None


def false_caption(objects: list[Any], size: int, rng: np.random.Generator, tries: int = 8) -> str | None:
    """A caption of a slightly changed scene that is false of this one: one object recoloured or reshaped,
    two objects' colours or places swapped (a hard negative that only binding and relations tell apart).
    None when no change yields a false caption within ``tries``."""
    objs = list(objects)
    truths = true_captions(objs, size)
    colors, shapes = list(COLORS), list(SHAPES)
    for _ in range(tries):
        new = [SceneObject(o.shape, o.color, o.cx, o.cy) for o in objs]
        kind = int(rng.integers(4 if len(objs) > 1 else 2))
        i = int(rng.integers(len(objs)))
        if kind == 0:
            c = colors[int(rng.integers(len(colors) - 1))]
            c = c if c != new[i].color else colors[-1]
            new[i] = SceneObject(new[i].shape, c, new[i].cx, new[i].cy)
        elif kind == 1:
            sh = shapes[int(rng.integers(len(shapes) - 1))]
            sh = sh if sh != new[i].shape else shapes[-1]
            new[i] = SceneObject(sh, new[i].color, new[i].cx, new[i].cy)
        else:
            j = (i + 1 + int(rng.integers(len(objs) - 1))) % len(objs)
            a, b = new[i], new[j]
            if kind == 2:  # swap colours: the same words, bound the other way
                new[i], new[j] = SceneObject(a.shape, b.color, a.cx, a.cy), SceneObject(b.shape, a.color, b.cx, b.cy)
            else:  # swap places: the same objects, other relations
                new[i], new[j] = SceneObject(a.shape, a.color, b.cx, b.cy), SceneObject(b.shape, b.color, a.cx, a.cy)
        order = [int(t) for t in rng.permutation(len(new))] if len(new) > 1 else [0]
        cands = [c for c in _candidates(new, size, order) if c not in truths]
        if cands:
            return cands[int(rng.integers(len(cands)))]
    return None


# ---- writers --------------------------------------------------------------------------------------------
def _render_item(job: tuple[int, str, int, int]) -> tuple[bytes, list[dict[str, Any]], list[str]]:
    """PNG bytes, instance records and captions of one image: a pure function of the job, so worker
    processes give the same bytes as a single one."""
    seed, split, index, size = job
    scene = scene_for(seed, split, index, size)
    caps = captions_for(scene, np.random.default_rng([seed, _STREAM[split], index, 1]))
    objs = []
    for o in scene.objects:
        rle = mask_utils.encode(np.asfortranarray(o.mask.astype(np.uint8)))
        objs.append({"category_id": SHAPES.index(o.shape) + 1,
                     "segmentation": {"size": [int(x) for x in rle["size"]], "counts": rle["counts"].decode()},
                     "area": int(mask_utils.area(rle)), "bbox": [float(x) for x in mask_utils.toBbox(rle)],
                     "iscrowd": 0, "color": o.color, "pattern": o.pattern, "center": [o.cx, o.cy]})
    return png_bytes(render_scene(scene)), objs, caps


def _render_czsl(job: tuple[int, int, int, str, str, str]) -> bytes:
    seed, index, size, attr, obj, family = job
    return png_bytes(render_scene(czsl_scene_for(seed, index, size, attr, obj, family)))


def _dump_json(path: Path, obj: Any) -> None:
    # Insertion-ordered keys, no timestamps, fixed separators: same data -> same bytes.
    path.write_text(json.dumps(obj, separators=(",", ":"), ensure_ascii=True) + "\n", encoding="utf-8")


Mapper = Callable[[Callable[[Any], Any], list[Any]], Iterable[Any]]


def _write_split(out: Path, split: str, n: int, size: int, seed: int, run: Mapper) -> dict[str, Any]:
    img_dir, ann_dir = out / "images" / split, out / "annotations"
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    caps: list[dict[str, Any]] = []
    insts: list[dict[str, Any]] = []
    for index, (png, objs, texts) in enumerate(run(_render_item, [(seed, split, i, size) for i in range(n)])):
        image_id = index + 1  # COCO ids start at 1 (some tools treat id 0 as "missing")
        fname = f"{image_id:06d}.png"
        (img_dir / fname).write_bytes(png)
        images.append({"id": image_id, "file_name": fname, "width": size, "height": size})
        caps += [{"id": len(caps) + 1 + k, "image_id": image_id, "caption": t} for k, t in enumerate(texts)]
        insts += [{"id": len(insts) + 1 + k, "image_id": image_id, **o} for k, o in enumerate(objs)]
    info = {"description": "vlkit synthetic shapes world", "version": GENERATOR_VERSION, "seed": seed,
            "split": split}
    cats = [{"id": k + 1, "name": s, "supercategory": "shape"} for k, s in enumerate(SHAPES)]
    files = {kind: ann_dir / f"{kind}_{split}.json" for kind in ("captions", "instances")}
    _dump_json(files["captions"], {"info": info, "licenses": [], "images": images, "annotations": caps})
    _dump_json(files["instances"], {"info": info, "licenses": [], "images": images, "annotations": insts,
                                    "categories": cats})
    return {"images": n, "objects": len(insts), "captions": len(caps), "images_dir": str(img_dir),
            "captions_file": str(files["captions"]), "instances_file": str(files["instances"])}


def czsl_pair_split(seed: int, split_name: str = CZSL_SPLIT_NAME) -> dict[str, list[tuple[str, str]]]:
    """MIT-States-style pair split of ``split_name``'s (attribute, shape) pairs.

    - natural (patterns): ~20% of the 30 pairs unseen in val, another ~20% unseen in test; val/test also
      hold as many seen pairs; every pattern and shape keeps >= 2 train pairs.
    - colour: 6 of the 48 pairs unseen in val, 6 unseen in test, and 16 in no split (they exist only in the
      open world, which then has 48 candidates against 32 in the closed world); every colour keeps >= 2 and
      every shape >= 3 train pairs, so each unseen pair composes an attribute and an object seen in several
      training pairs. Val/test hold 6 seen pairs each too."""
    if split_name not in CZSL_FAMILIES:
        raise ValueError(f"czsl_pair_split: unknown split {split_name!r}; expected one of {sorted(CZSL_FAMILIES)}")
    attrs = CZSL_FAMILIES[split_name][1]
    pairs = [(a, o) for a in attrs for o in SHAPES]
    if split_name == CZSL_SPLIT_NAME:
        rng, quota, least = np.random.default_rng([seed, 4]), {"val": len(pairs) // 5, "test": len(pairs) // 5}, (2, 2)
    else:
        rng, quota, least = np.random.default_rng([seed, 6]), {"val": 6, "test": 6, "open": 16}, (2, 3)
    train, held = list(pairs), {k: [] for k in quota}
    for idx in rng.permutation(len(pairs)):
        want = min(held, key=lambda k: len(held[k]) / quota[k])  # the least-filled bucket
        if len(held[want]) >= quota[want]:
            break
        rest = [q for q in train if q != pairs[idx]]
        if all(sum(q[0] == a for q in rest) >= least[0] for a in attrs) and \
                all(sum(q[1] == o for q in rest) >= least[1] for o in SHAPES):
            train, held[want] = rest, held[want] + [pairs[idx]]
    n_seen = quota["val"]
    seen = {s: [train[int(i)] for i in rng.choice(len(train), n_seen, replace=False)] for s in ("val", "test")}
    return {"train": sorted(train), "val": sorted(seen["val"] + held["val"]),
            "test": sorted(seen["test"] + held["test"]),
            "unseen_val": sorted(held["val"]), "unseen_test": sorted(held["test"]),
            "open_only": sorted(held.get("open", []))}


def _write_czsl(out: Path, seed: int, size: int, per_pair: int, run: Mapper) -> dict[str, Any]:
    """Both CZSL splits in one CSP-layout root: image folders ``<attr>_<shape>`` (pattern and colour names
    never collide), one pair folder and metadata file per split."""
    root = out / "czsl"
    summary: dict[str, Any] = {"root": str(root), "splits": {}}
    for split_name, (family, _) in CZSL_FAMILIES.items():
        split = czsl_pair_split(seed, split_name)
        (root / split_name).mkdir(parents=True, exist_ok=True)
        for s in SPLITS:
            text = "".join(f"{a} {o}\n" for a, o in split[s])
            (root / split_name / f"{s}_pairs.txt").write_text(text, encoding="utf-8")
        meta: list[dict[str, str]] = []
        counters: dict[tuple[str, str], int] = {}
        for s, a, o in [(s_, a, o) for s_ in SPLITS for a, o in split[s_] for _ in range(per_pair)]:
            k = counters[(a, o)] = counters.get((a, o), -1) + 1  # per-pair file number, unique across splits
            meta.append({"image": f"{a}_{o}/{k:06d}.png", "attr": a, "obj": o, "set": s})
            (root / "images" / f"{a}_{o}").mkdir(parents=True, exist_ok=True)
        jobs = [(seed, i, size, m["attr"], m["obj"], family) for i, m in enumerate(meta)]
        for m, png in zip(meta, run(_render_czsl, jobs)):
            (root / "images" / m["image"]).write_bytes(png)
        import torch  # lazily: spawned workers then start without paying for a torch import

        torch.save(meta, root / f"metadata_{split_name}.t7")
        summary["splits"][split_name] = {
            "pairs": {s: split[s] for s in SPLITS}, "unseen_val_pairs": split["unseen_val"],
            "unseen_test_pairs": split["unseen_test"], "open_only_pairs": split["open_only"],
            "images": {s: sum(m["set"] == s for m in meta) for s in SPLITS}}
    natural = summary["splits"][CZSL_SPLIT_NAME]  # the keys of the single-split summary, kept for callers
    return {**summary, **{k: natural[k] for k in ("pairs", "unseen_val_pairs", "unseen_test_pairs", "images")}}


def _clear(out: Path, overwrite: bool) -> None:
    existing = [out / p for p in ("images", "annotations", "czsl", "manifest.json") if (out / p).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"generate_shapes: {existing[0]} already exists; pass overwrite=True to replace "
                              "the shapes world there, or choose an empty directory")
    for p in existing:  # stale files from a bigger earlier run would otherwise survive
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def generate_shapes(out: str | Path, n_train: int = 20000, n_val: int = 1000, n_test: int = 1000,
                    image_size: int = 64, seed: int = 0, n_czsl_per_pair: int = 100, progress: bool = True,
                    overwrite: bool = False, workers: int | None = None) -> dict[str, Any]:
    """Write the shapes world under ``out`` (COCO captions + instances per split, and a CZSL split in the
    CSP layout) and return a summary with counts and paths. Same arguments -> byte-identical files, for
    any ``workers`` (default: up to 2 processes for big worlds, 1 for small ones)."""
    if image_size < 16:
        raise ValueError(f"generate_shapes: image_size={image_size} is too small; use >= 16 (64 is the default)")
    out = Path(out)
    _clear(out, overwrite)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    total = sum(counts.values()) + n_czsl_per_pair * sum(len(czsl_pair_split(seed, name)[s])
                                                         for name in CZSL_FAMILIES for s in SPLITS)
    if workers is None:  # a pool costs ~0.5 s to start: only worth it for thousands of images
        workers = min(2, os.cpu_count() or 1) if total >= 2000 else 1
    with tqdm(total=total, desc="shapes world", unit="img", disable=not progress) as bar, \
            (mp.get_context("spawn").Pool(workers) if workers > 1 else contextlib.nullcontext()) as pool:
        def run(fn: Callable[[Any], Any], jobs: list[Any]) -> Iterable[Any]:
            it = pool.imap(fn, jobs, chunksize=64) if pool is not None else map(fn, jobs)
            for result in it:  # imap keeps job order, so the output never depends on scheduling
                bar.update()
                yield result
        splits = {s: _write_split(out, s, n, image_size, seed, run) for s, n in counts.items()}
        czsl = _write_czsl(out, seed, image_size, n_czsl_per_pair, run)
    manifest = {"generator": GENERATOR_VERSION, "seed": seed, "image_size": image_size, "images": counts,
                "n_czsl_per_pair": n_czsl_per_pair, "czsl_images": czsl["images"],
                "czsl_pairs": {s: [f"{a} {o}" for a, o in czsl["pairs"][s]] for s in SPLITS},
                "czsl_splits": {name: {"images": v["images"], "open_only_pairs": [f"{a} {o}" for a, o in
                                                                                  v["open_only_pairs"]],
                                       **{s: [f"{a} {o}" for a, o in v["pairs"][s]] for s in SPLITS}}
                                for name, v in czsl["splits"].items()}}
    _dump_json(out / "manifest.json", manifest)
    return {"root": str(out), **manifest, "splits": splits, "czsl": czsl}
