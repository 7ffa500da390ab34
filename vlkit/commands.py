"""The commands beside train/eval/plugins: data generation, indexing, search, pruning, export, demo."""

from __future__ import annotations

from dataclasses import dataclass

from vlkit.cli import command
from vlkit.config import describe, parse_kv


@dataclass
class ShapesArgs:
    out: str = "data/shapes"
    n_train: int = 20000
    n_val: int = 1000
    n_test: int = 1000
    image_size: int = 64
    seed: int = 0


def _kv_help(verb: str, schema: type) -> str:
    return "\n".join([f"usage: vlkit {verb} key=value ...", "", "keys (type = default):", *describe(schema)])


@command("data", "write a data set: vlkit data shapes out=DIR [n_train=.. n_val=.. n_test=.. image_size=.. seed=..]",
         lambda a: _kv_help("data shapes", ShapesArgs))
def _data(args: list[str]) -> int:
    from vlkit.errors import VlkitError

    if not args or args[0] != "shapes":
        raise VlkitError("usage: vlkit data shapes out=DIR [...]; 'shapes' is the one generator so far")
    opts = parse_kv(args[1:], ShapesArgs)
    from vlkit.data.shapes import generate_shapes

    summary = generate_shapes(opts.out, n_train=opts.n_train, n_val=opts.n_val, n_test=opts.n_test,
                              image_size=opts.image_size, seed=opts.seed)
    print(summary)
    return 0
