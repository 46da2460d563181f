"""Shared pytest fixtures: seeding, and a tiny trained pipeline built once per session."""
from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]  # the repo root; pytest.ini puts it and tests/ on sys.path
torch.set_num_threads(min(2, os.cpu_count() or 1))
# The device the pipeline fixtures train and summarise on (the scripts' DEVICE=auto): a test that recomputes
# their figures does it here too (a CUDA report checked against a CPU recomputation failed on an H200)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def ctrl_c_as_in_a_terminal() -> None:
    """``preexec_fn`` for a script a test stops with SIGINT: Ctrl-C acts as in a terminal even where this run was
    started in the background (``nohup make test &``), which makes every child ignore SIGINT, so Python never
    raised KeyboardInterrupt and those tests failed there only."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# The tiny synthetic config every pipeline test shares (64 px, layer4 stride 2 -> 2x2 layer4 map). It pins the
# quadrants style, which a 2-epoch run on 24 images per class learns; the demo's varied style needs ~35k images (540 steps).
TINY_DATA = dict(dataset="synthetic", synthetic_per_class=24, synthetic_style="quadrants", image_size=64, seed=0)
TINY_CNN = dict(TINY_DATA, epochs=2, batch_size=32, lr=3e-3, tensorboard=False, amp="off", layer4_stride=2)


@pytest.fixture
def seed():
    """Seed every RNG the code uses; returns the seed."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One decoded-image cache for the whole session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory, cache_dir) -> Path:
    """A classifier trained for seconds on the tiny synthetic set; returns its run folder."""
    import train_standard_cnn

    out = tmp_path_factory.mktemp("standard_cnn")
    train_standard_cnn.main(**TINY_CNN, out_dir=str(out), cache_dir=str(cache_dir))
    return out


@pytest.fixture(scope="session")
def tiny_sae(tmp_path_factory, tiny_classifier, cache_dir) -> Path:
    """An SAE trained for seconds on the tiny classifier; returns its run folder."""
    import train_sae

    out = tmp_path_factory.mktemp("sae_topk")
    train_sae.main(classifier_ckpt=str(tiny_classifier / "best.pt"), out_dir=str(out), latent_dim=64, top_k=4,
                   arch="topk", dead_latents="both",  # the tests below check Top-K's exact L0; e2e runs the default
                   epochs=3, min_steps=0, tensorboard=False, cache_dir=str(cache_dir))
    return out
