"""`vlkit train` that receives a real SIGTERM from the OS while computing optimizer step K.

Usage: python sigterm_at_step.py K key=value ...   (K = 0: never; the same run, uninterrupted)
The signal arrives during step K's forward pass, as an operator's `kill` would: the trainer finishes the
step, writes checkpoints/last and exits; `resume=true` must then continue exactly.
"""

import os
import signal
import sys

from vlkit.cli import main
from vlkit.engine.trainer import Trainer

K = int(sys.argv[1])
_step = Trainer._micro_step


def _micro_step(self, batch, optimizer):
    if K and self.state.step + 1 == K and not getattr(self, "_signalled", False):
        self._signalled = True
        os.kill(os.getpid(), signal.SIGTERM)
    return _step(self, batch, optimizer)


Trainer._micro_step = _micro_step
sys.exit(main(["train", *sys.argv[2:]]))
