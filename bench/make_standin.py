"""Generate a TU-Berlin stand-in: ~20k sketches of 1111 px, 250 classes, HF parquet schema.

Same files, schema and metadata as kmewhort/tu-berlin-png (data/train-0000{0,1}-of-00002-*.parquet,
data/test-00000-of-00001-*.parquet, column image {bytes, path}, label int64, class names in the
`huggingface` schema metadata), so the real code paths run at the real scale offline.

Usage: python bench/make_standin.py [--out=bench/_work/tu-berlin-standin] [--per_class=80]
"""
from __future__ import annotations

import io
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from selfexplain.config import make_config, module_constants, run_cli  # noqa: E402
from selfexplain.logs import log  # noqa: E402

OUT = "bench/_work/tu-berlin-standin"  # dataset folder (DATA_ROOT for --dataset=parquet)
PER_CLASS = 80                         # 250 x 80 = 20,000 sketches, like TU-Berlin
CLASSES = 250                          # TU-Berlin's class count
SIZE = 1111                            # TU-Berlin's PNG side
SEED = 0                               # generator seed
WORKERS = 2                            # processes drawing and encoding PNGs
ROW_GROUP = 256                        # parquet rows per row group

FILES = ["data/train-00000-of-00002-standin.parquet", "data/train-00001-of-00002-standin.parquet",
         "data/test-00000-of-00001-standin.parquet"]


def class_template(label: int) -> np.ndarray:
    """A fixed random polyline skeleton per class: (strokes, points, 2) in [0.1, 0.9]."""
    rng = np.random.default_rng([SEED, label])
    return rng.uniform(0.1, 0.9, size=(rng.integers(3, 7), 5, 2))


def draw(label: int, index: int) -> bytes:
    """One sketch: the class skeleton with per-sample jitter, 3 px black strokes, as PNG."""
    rng = np.random.default_rng([SEED, label, index])
    strokes = class_template(label) + rng.normal(0, 0.025, size=class_template(label).shape)
    im = Image.new("L", (SIZE, SIZE), 255)
    pen = ImageDraw.Draw(im)
    for stroke in strokes:
        pts = [tuple(p) for p in (np.clip(stroke, 0.02, 0.98) * SIZE).tolist()]
        pen.line(pts, fill=0, width=3, joint="curve")
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def draw_batch(items: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
    return [(label, draw(label, i)) for label, i in items]


def write_shard(path: Path, rows: list[tuple[int, bytes]], names: list[str]) -> None:
    meta = {"info": {"features": {"image": {"_type": "Image"},
                                  "label": {"_type": "ClassLabel", "names": names}}}}
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", image_type), ("label", pa.int64())],
                       metadata={b"huggingface": json.dumps(meta).encode()})
    table = pa.table({"image": pa.array([{"bytes": b, "path": f"{lab}.png"} for lab, b in rows], type=image_type),
                      "label": pa.array([lab for lab, _ in rows], type=pa.int64())}, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp, row_group_size=ROW_GROUP)
    os.replace(tmp, path)


def main(**overrides) -> Path:
    cfg = make_config(module_constants(globals()), overrides)
    out = Path(cfg.OUT)
    if all((out / f).is_file() for f in FILES):
        log(f"stand-in already at {out}")
        return out
    names = [f"class_{c:03d}" for c in range(cfg.CLASSES)]
    items = [(c, i) for i in range(cfg.PER_CLASS) for c in range(cfg.CLASSES)]
    chunks = [items[i:i + 200] for i in range(0, len(items), 200)]
    shards: dict[int, list] = {0: [], 1: [], 2: []}
    with ProcessPoolExecutor(cfg.WORKERS) as pool, tqdm(total=len(items), desc="draw", unit="sketch") as bar:
        for rows in pool.map(draw_batch, chunks):
            for label, png in rows:
                k = len(shards[0]) + len(shards[1]) + len(shards[2])
                shards[2 if k % 5 == 4 else k % 2].append((label, png))  # ~80% train, 20% test
            bar.update(len(rows))
    for k, rel in enumerate(FILES):
        write_shard(out / rel, shards[k], names)
    return out


if __name__ == "__main__":
    run_cli(main, globals())
