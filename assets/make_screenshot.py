"""Screenshot of the draw-and-explain page: assets/draw_page.png (shown in the README).

Starts the page's server on the trained models, draws a circle with spokes and dots in
headless Chromium with pointer events (as a person would), waits for the explanation and
saves the page.

Usage: python assets/make_screenshot.py                      (after `make demo`)
       python assets/make_screenshot.py --classifier_ckpt=runs/x/best.pt --sae_ckpt=runs/y/best_sae.pt
"""
from __future__ import annotations

import math
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selfexplain import artifacts, serve  # noqa: E402
from selfexplain.browser import Chromium  # noqa: E402
from selfexplain.config import make_config, module_constants, run_cli  # noqa: E402
from selfexplain.logs import log  # noqa: E402

CLASSIFIER_CKPT = artifacts.CLASSIFIER_CKPT   # stage 1 checkpoint
SAE_CKPT = artifacts.SAE_CKPT                 # stage 2 checkpoint
REPORT_DIR = artifacts.REPORT_DIR             # the atlas the concept links point at
CACHE_DIR = artifacts.CACHE_DIR               # decoded images (the familiarity calibration reads validation)
OUT = "assets/draw_page.png"                  # where the screenshot goes
WIDTH = 1100                                  # browser viewport width, CSS pixels
HEIGHT = 1300                                 # browser viewport height, CSS pixels (the whole answer fits)
DEVICE = "auto"                               # auto | cpu | cuda


def sketch_strokes(left: float, top: float, side: float) -> list[tuple[str, list[tuple[float, float]]]]:
    """A person's circle-spokes-dots, in viewport pixels: a circle (mouse), a star burst of
    eight spokes (pen) and five dots as on a die (touch), each part in its own place."""
    def at(u, v):
        return left + u * side, top + v * side

    circle = [at(0.3 + 0.2 * math.cos(t * math.pi / 24), 0.32 + 0.2 * math.sin(t * math.pi / 24)) for t in range(49)]
    rays = [0.2 + k * math.pi / 4 for k in range(8)]
    spokes = [[at(0.66 + 0.04 * math.cos(a), 0.7 + 0.04 * math.sin(a)),
               at(0.66 + 0.2 * math.cos(a), 0.7 + 0.2 * math.sin(a))] for a in rays]
    dots = [[at(u, v), at(u + 0.004, v + 0.004)]
            for u, v in ((0.7, 0.16), (0.84, 0.16), (0.77, 0.23), (0.7, 0.3), (0.84, 0.3))]
    return [("mouse", circle)] + [("pen", s) for s in spokes] + [("touch", d) for d in dots]


def main(**overrides) -> Path:
    cfg = make_config(module_constants(globals()), overrides)
    server = serve.make_server(cfg.CLASSIFIER_CKPT, cfg.SAE_CKPT, cfg.REPORT_DIR, cfg.CACHE_DIR, port=0,
                               device=cfg.DEVICE, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with Chromium(cfg.WIDTH, cfg.HEIGHT) as browser:
            browser.goto("http://%s:%d/" % server.server_address[:2])
            box = browser.evaluate("(r => [r.left, r.top, r.width])(document.getElementById('pad').getBoundingClientRect())")
            for pointer, points in sketch_strokes(*box):
                browser.stroke(points, pointer)
            # the last stroke's answer is on the page and its overlay has loaded
            browser.wait_for("document.body.dataset.explained && !document.getElementById('status').textContent "
                             "&& document.getElementById('overlay').complete")
            shot = browser.screenshot()
    finally:
        server.shutdown()
        server.server_close()
    out = artifacts.atomic_write_bytes(cfg.OUT, shot)
    log(f"wrote {out}")
    return out


if __name__ == "__main__":
    run_cli(main, globals())
