"""The one loop that embeds stored images: `module.embed` over store rows, in batches.

Used wherever a run's images are embedded outside training (inspection and notebooks, the
linear probe, `infer.py`); evaluation during training goes through the callbacks' loaders.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm


@torch.no_grad()
def embed_rows(module, images, rows=None, batch_size: int = 256, desc=None) -> np.ndarray:
    """`module.embed` of `images[rows]` (uint8 store images; all when `rows` is None), on the
    module's device, float32 [len(rows), D] on the CPU; `desc`: a progress bar's title."""
    rows = torch.as_tensor(np.arange(len(images)) if rows is None else np.asarray(rows))
    device = next(module.parameters()).device
    starts = range(0, len(rows), batch_size)
    out = [
        module.embed(torch.as_tensor(images[rows[i : i + batch_size]]).to(device)).float().cpu()
        for i in (tqdm(starts, desc=desc) if desc else starts)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)
