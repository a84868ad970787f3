"""torchkeep inside the tools people already use.

``torch_load``: :func:`patch_torch_load` routes ``torch.load`` (called by code you do not
control) through torchkeep's restricted loader. ``lightning``: a ``CheckpointIO`` plugin
and an RNG-state callback (``pip install 'torchkeep[lightning]'``). Each module imports
torch (and its package); this package itself imports nothing.
"""

from __future__ import annotations
