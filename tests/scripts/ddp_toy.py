"""Run the toy plugin under torchrun (two gloo processes); each rank records a hash of its weights."""

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import toy_plugin  # noqa: E402

import vlkit  # noqa: E402
from vlkit.cli import resolve_config  # noqa: E402
from vlkit.engine.run import train  # noqa: E402

vlkit.register_plugin(toy_plugin.PLUGIN)
plugin, cfg = resolve_config(sys.argv[1:])
metrics = train(cfg, plugin)

import os  # noqa: E402

from safetensors.torch import load_file  # noqa: E402

rank = int(os.environ.get("RANK", 0))

weights = load_file(str(Path(cfg.run.dir) / "checkpoints/last/task.safetensors"))
digest = hashlib.sha1(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()
Path(cfg.run.dir, f"rank{rank}.json").write_text(json.dumps({"metrics": metrics, "weights": digest}))
