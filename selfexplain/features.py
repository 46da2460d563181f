"""Run the frozen classifier once and collect what later stages need from it."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data
from .distributed import autocast


@torch.no_grad()
def iter_feature_maps(model, images: np.ndarray, indices: np.ndarray, prep: dict, device: torch.device,
                      batch_size: int = 256, amp: str = "auto", progress: bool = False,
                      desc: str = "features") -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Yield (indices, layer4 map float32 (B, C, H, W), logits float32 (B, classes)) over ``indices``.

    Indices come back in sorted order within each batch (memmap-friendly); the caller
    keeps them to align results.
    """
    model.eval()
    bar = tqdm(total=len(indices), desc=desc, unit="img", disable=None if progress else True, leave=False)
    for xb, _, idx in data.batches(images, np.zeros(len(images), dtype=np.int64), np.sort(indices), batch_size):
        x = data.model_input(xb, prep, device)
        with autocast(device, amp):
            fmap = model.features(x)
        fmap = fmap.float()
        yield idx, fmap, model.head(fmap).float()
        bar.update(len(idx))
    bar.close()


def tokens_of(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C) tokens, row-major over (h, w), like TopKSAE.map_to_tokens."""
    b, c, h, w = feature_map.shape
    return feature_map.permute(0, 2, 3, 1).reshape(b * h * w, c)
