"""`vlkit index` on one or several processes: under torchrun each process embeds its share of the
batches, the main process gathers them in the original order and writes the one index."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlkit.data.images import SkipReport, find_images
from vlkit.errors import VlkitError
from vlkit.retriever import Retriever


def _captions(path: str) -> list[str]:
    data = json.loads(Path(path).read_text())
    return [str(a["caption"]).strip() for a in sorted(data.get("annotations", []), key=lambda a: a["id"])]


def build_index(opts: Any) -> tuple[Retriever | None, SkipReport]:
    """Embed opts.images (sharded over processes when launched with torchrun) and save opts.out.
    Returns the retriever on the main process, None on the others."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from vlkit.commands import load_model_arg

    state = PartialState(cpu=not torch.cuda.is_available())
    files = find_images(opts.images)
    if not files:
        raise VlkitError(f"no image files found under {opts.images}")
    backbone = load_model_arg(opts.model, opts.pretrained)
    retriever = Retriever(backbone, kind=opts.kind, batch_size=opts.batch_size,
                          num_workers=opts.workers if opts.workers >= 0 else None, int8=opts.int8,
                          progress=opts.progress and state.is_main_process)
    report = SkipReport()
    kept, emb = retriever.embed_images(files, rank=state.process_index, world=state.num_processes, report=report)
    shards = gather_object([(kept, emb, [(str(p), r) for p, r in report.skipped])])
    if not state.is_main_process:
        state.wait_for_everyone()
        return None, report
    order = sorted((i, e) for k, em, _ in shards for i, e in zip(k, em))
    report = SkipReport(skipped=[(Path(p), r) for _, _, sk in shards for p, r in sk])
    if not order:
        state.wait_for_everyone()
        raise VlkitError(f"none of the {len(files)} images under {opts.images} could be read, so no index was "
                         f"written: {report.summary()}")
    positions = [i for i, _ in order]
    vectors = torch.stack([e for _, e in order])
    meta = [{"path": str(files[i].resolve())} for i in positions]
    retriever.add_vectors("images", vectors, ids=positions, metadata=meta)
    if opts.captions:
        retriever.add_texts(_captions(opts.captions))
    retriever.save(opts.out)
    report.log()
    state.wait_for_everyone()
    return retriever, report
