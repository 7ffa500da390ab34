"""`vlkit index` on one or several processes: under torchrun each process embeds its share of the
batches, the main process gathers them in the original order and writes the one index."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlkit.data.coco import caption_texts
from vlkit.data.images import SkipReport, find_images
from vlkit.errors import VlkitError
from vlkit.index.retriever import Retriever


def build_index(opts: Any) -> tuple[Retriever | None, SkipReport]:
    """Embed opts.images (sharded over processes when launched with torchrun) and save opts.out.
    Returns the retriever on the main process, None on the others."""
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from omegaconf import OmegaConf

    from vlkit.engine.run import load_model

    state = PartialState(cpu=not torch.cuda.is_available())
    files = find_images(opts.images)
    if not files:
        raise VlkitError(f"no image files found under {opts.images}")
    backbone = load_model(OmegaConf.create({"name": opts.model, "pretrained": opts.pretrained}))
    retriever = Retriever(backbone, kind=opts.kind, batch_size=opts.batch_size,
                          num_workers=opts.workers if opts.workers >= 0 else None, int8=opts.int8,
                          encoders=None if opts.encoders == -1 else opts.encoders,
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
        retriever.add_texts(caption_texts(opts.captions))
    retriever.save(opts.out)
    report.log()
    state.wait_for_everyone()
    return retriever, report
