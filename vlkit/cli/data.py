"""`vlkit data` (the shapes world generator) and `vlkit caption` (an MLLM backbone describes images)."""

from __future__ import annotations

from dataclasses import dataclass

from vlkit.cli.common import Command, kv_help, load_model_arg
from vlkit.config import bounded, parse_kv
from vlkit.errors import VlkitError


@dataclass
class ShapesArgs:
    out: str = "data/shapes"
    n_train: int = 20000
    n_val: int = 1000
    n_test: int = 1000
    image_size: int = 64
    seed: int = 0


def _data(args: list[str]) -> int:
    if not args or args[0] != "shapes":
        raise VlkitError("usage: vlkit data shapes out=DIR [...]; 'shapes' is the one generator so far")
    opts = parse_kv(args[1:], ShapesArgs)
    from vlkit.data.shapes import generate_shapes

    summary = generate_shapes(opts.out, n_train=opts.n_train, n_val=opts.n_val, n_test=opts.n_test,
                              image_size=opts.image_size, seed=opts.seed)
    print(summary)
    return 0


@dataclass
class CaptionArgs:
    # an image file, or a folder (every image in it is captioned)
    image: str = ""
    # an MLLM backbone: the shipped tiny LLaVA by default; a run's backbone folder, hf:FOLDER, ...
    model: str = "cached:vlkit-tiny-llava-shapes"
    max_new_tokens: int = bounded(40, 1)
    batch_size: int = bounded(32, 1)


def _caption(args: list[str]) -> int:
    from pathlib import Path

    import torch

    from vlkit.data.images import find_images, load_image
    opts = parse_kv(args, CaptionArgs)
    if not opts.image:
        raise VlkitError("vlkit caption needs image=PATH (a file or a folder of images)")
    path = Path(opts.image)
    if not path.exists():
        raise VlkitError(f"image={opts.image!r} does not exist")
    files = find_images(path) if path.is_dir() else [path]
    if not files:
        raise VlkitError(f"{opts.image!r} holds no images (png, jpg, ...)")
    backbone = load_model_arg(opts.model)
    if getattr(backbone, "kind", "clip") != "mllm":
        raise VlkitError(f"model={opts.model!r} is a CLIP backbone, which cannot write text; caption needs an MLLM "
                         "(model=cached:vlkit-tiny-llava-shapes, a caption run's backbone folder, or hf:FOLDER)")
    backbone.eval()
    for i in range(0, len(files), opts.batch_size):
        chunk = files[i:i + opts.batch_size]
        images = torch.stack([backbone.preprocess(load_image(f)) for f in chunk])
        for f, text in zip(chunk, backbone.generate_captions(images, opts.max_new_tokens)):
            print(f"{f}\t{text}" if len(files) > 1 else text)
    return 0


DATA = Command(_data, "write a data set", lambda a: kv_help("data shapes", ShapesArgs))
CAPTION = Command(_caption, "describe an image with an MLLM backbone", lambda a: kv_help("caption", CaptionArgs))
