"""Test fixtures in the real formats: Hugging Face parquet shards, image folders, broken
images, and a fake Hugging Face hub served over real HTTP on 127.0.0.1.

The fake hub answers the requests that ``huggingface_hub.snapshot_download`` (2.x)
makes for a dataset repo:

* ``GET  /api/datasets/{repo}/revision/{rev}``  -> repo info with ``sha`` and ``siblings``
* ``GET  /api/datasets/{repo}/tree/{commit}?recursive=True`` -> file listing (no xetHash,
  so the client never takes the hf_xet path)
* ``HEAD /datasets/{repo}/resolve/{commit}/{file}`` -> ``ETag``, ``X-Repo-Commit``,
  ``Content-Length`` (and ``X-Linked-Etag``/``X-Linked-Size`` for LFS files, as the hub does)
* ``GET  /datasets/{repo}/resolve/{commit}/{file}`` -> the bytes
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import struct
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from conftest import ROOT as REPO_ROOT

TU_BERLIN_FILES = (  # the shard names of kmewhort/tu-berlin-png, hash suffixes made up
    "data/train-00000-of-00002-5f1c1b2a.parquet",
    "data/train-00001-of-00002-9e0d3c4b.parquet",
    "data/test-00000-of-00001-7a6b5c4d.parquet",
)


# ----------------------------------------------------------------------------- images
def sketch(label: int, size: int = 64, index: int = 0, width: int | None = None) -> Image.Image:
    """Black strokes on white, different per class: ``label + 1`` spokes from the centre."""
    im = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(im)
    c, r = size / 2, size * 0.4
    for k in range(label + 1):
        angle = 2 * np.pi * (k / (label + 1)) + 0.1 * index
        draw.line([(c, c), (c + r * np.cos(angle), c + r * np.sin(angle))], fill=0,
                  width=width or max(1, size // 32))
    return im


def png_bytes(im: Image.Image, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **save_kwargs)
    return buf.getvalue()


def png_with_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` (8-bit grey) with one tiny IDAT: nothing is allocated."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def bad_image_payloads() -> dict[str, bytes]:
    """Awkward payloads; the transparent/16-bit/palette ones draw a dark diagonal stroke
    from (8, 8) to (56, 56) on a 64 px image whose background must come out white."""
    good = png_bytes(sketch(3, 64))
    stroke = [(8, 8), (56, 56)]

    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent *black*: naive convert is all black
    ImageDraw.Draw(rgba).line(stroke, fill=(0, 0, 0, 255), width=4)
    la = Image.new("LA", (64, 64), (0, 0))
    ImageDraw.Draw(la).line(stroke, fill=(0, 255), width=4)

    gray16 = np.full((64, 64), 65535, np.uint16)  # white background in 16 bits
    gray16[40:56, 4:20] = 32768  # a mid-grey block: must come out ~128, not 255
    im16 = Image.fromarray(gray16)
    ImageDraw.Draw(im16).line(stroke, fill=0, width=4)

    pal = Image.new("P", (64, 64), 0)  # index 0 = black, but transparent
    pal.putpalette([0, 0, 0, 0, 0, 90] + [0] * (256 * 3 - 6))
    ImageDraw.Draw(pal).line(stroke, fill=1, width=4)  # index 1 = dark blue stroke

    return {
        "zero_bytes": b"",
        "not_an_image": b"class,label\nairplane,0\nthis is a CSV, not a PNG\n",
        "truncated_png": good[: len(good) // 2],
        "rgba_transparent": png_bytes(rgba),
        "la_transparent": png_bytes(la),
        "png_16bit": png_bytes(im16),
        "palette_transparent": png_bytes(pal, transparency=0),
        "huge_header": png_with_header(20000, 20000),  # 400 MP: past PIL's own bomb limit
        "large_header": png_with_header(8000, 8000),  # 64 MP: past MAX_PIXELS, under PIL's limit
        "long_strip": png_with_header(200000, 1),  # 0.2 MP, but padding it square would take 40 GB
    }


# ----------------------------------------------------------------------------- parquet
def hf_metadata(class_names: list[str]) -> bytes:
    """The ``huggingface`` schema metadata value that ``datasets`` writes."""
    features = {"image": {"_type": "Image"}, "label": {"names": list(class_names), "_type": "ClassLabel"}}
    return json.dumps({"info": {"features": features}}).encode()


def readme_text(class_names: list[str]) -> str:
    """A dataset card whose front matter holds the ``dataset_info`` block the hub generates."""
    names = "\n".join(f"          '{i}': {name}" for i, name in enumerate(class_names))
    return ("---\nlicense: cc-by-4.0\ndataset_info:\n  features:\n  - name: image\n    dtype: image\n"
            "  - name: label\n    dtype:\n      class_label:\n        names:\n" + names + "\n"
            "  splits:\n  - name: train\n    num_bytes: 1234\n    num_examples: 10\n"
            "---\n\n# Fixture dataset\n\nNot TU-Berlin: a made-up fixture.\n")


def make_hf_parquet(folder, n_per_class: int, class_names: list[str], image_size: int = 64,
                    with_metadata: bool = True, split_files=TU_BERLIN_FILES, readme: bool = False,
                    row_group_size: int = 4) -> dict[str, list[int]]:
    """Write parquet shards in the Hugging Face image-classification schema.

    Rows go round-robin over ``split_files``; small row groups exercise streaming.
    Returns ``{relative file: [label of each row, in order]}``.
    """
    folder = Path(folder)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows: dict[str, list] = {name: [] for name in split_files}
    for i in range(n_per_class * len(class_names)):
        label, index = i % len(class_names), i // len(class_names)
        rows[split_files[i % len(split_files)]].append((label, index))
    manifest = {}
    for rel, items in rows.items():
        images = [{"bytes": png_bytes(sketch(lab, image_size, idx)), "path": f"{lab}_{idx}.png"}
                  for lab, idx in items]
        schema = pa.schema([("image", image_type), ("label", pa.int64())],
                           metadata={b"huggingface": hf_metadata(class_names)} if with_metadata else None)
        table = pa.table({"image": pa.array(images, type=image_type),
                          "label": pa.array([lab for lab, _ in items], type=pa.int64())}, schema=schema)
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, folder / rel, row_group_size=row_group_size)
        manifest[rel] = [lab for lab, _ in items]
    if readme:
        (folder / "README.md").write_text(readme_text(class_names))
    return manifest


# ----------------------------------------------------------------------------- folders
def make_image_folder(root, class_names: list[str], n_per_class: int, image_size: int = 64,
                      extensions=(".png", ".jpg", ".bmp", ".PNG"), clutter: bool = True) -> dict[str, int]:
    """Write ``root/<class>/<i><ext>`` sketches; with ``clutter``, add what a real folder
    holds and a reader must skip (hidden files and folders, a text file, an empty class).

    Returns ``{relative image path: label}`` for the images that must be read.
    """
    root = Path(root)
    expected = {}
    for label, name in enumerate(class_names):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            ext = extensions[(label + i) % len(extensions)]
            sketch(label, image_size, i).convert("RGB" if ext == ".jpg" else "L").save(
                root / name / f"{i:03d}{ext}", format={".jpg": "JPEG", ".bmp": "BMP"}.get(ext, "PNG"))
            expected[f"{name}/{i:03d}{ext}"] = label
    if clutter:
        first = root / class_names[0]
        (first / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (first / "._000.png").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS resource fork
        (first / "notes.txt").write_text("not an image")
        (root / ".ipynb_checkpoints").mkdir(exist_ok=True)
        sketch(0, image_size).save(root / ".ipynb_checkpoints" / "x.png")
        (root / "zz_empty_class").mkdir(exist_ok=True)
        (root / "README.txt").write_text("loose files at the top level are not classes")
    return expected


# ----------------------------------------------------------------------------- fake hub
def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHubServer:
    """A Hugging Face hub for one dataset repo, over real HTTP on 127.0.0.1 (own thread).

    ``files`` maps repo paths to bytes; ``*.parquet`` files are served as LFS files.
    ``requests`` records ``(method, path)`` of every request. Use as a context manager.
    """

    def __init__(self, files: dict[str, bytes], repo_id: str = "kmewhort/tu-berlin-png"):
        self.files, self.repo_id = dict(files), repo_id
        self.commit = hashlib.sha1("\n".join(sorted(self.files)).encode() + b"fixture").hexdigest()
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FakeHubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def downloads(self) -> list[str]:
        """Repo paths fetched with GET (not HEAD)."""
        prefix = f"/datasets/{self.repo_id}/resolve/{self.commit}/"
        return [p[len(prefix):] for m, p in self.requests if m == "GET" and p.startswith(prefix)]

    # -- responses
    def tree(self, recursive: bool, under: str = "") -> list[dict]:
        entries, folders = [], set()
        for path, data in sorted(self.files.items()):
            if under and not path.startswith(under.rstrip("/") + "/"):
                continue
            rest = path[len(under.rstrip("/") + "/"):] if under else path
            if "/" in rest and not recursive:
                folders.add((under.rstrip("/") + "/" if under else "") + rest.split("/")[0])
                continue
            parts = path.split("/")
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)) if recursive)
            entry = {"type": "file", "oid": _git_blob_sha1(data), "size": len(data), "path": path}
            if path.endswith(".parquet"):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        dirs = [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
                for f in sorted(folders) if f]
        return dirs + entries

    def info(self) -> dict:
        return {"_id": "fixture", "id": self.repo_id, "author": self.repo_id.split("/")[0], "sha": self.commit,
                "private": False, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
                "tags": ["fixture"], "lastModified": "2024-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": p} for p in sorted(self.files)]}

    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_HEAD(self):
                self._route(send_body=False)

            def do_GET(self):
                self._route(send_body=True)

            def _send(self, status, body=b"", headers=None, send_body=True):
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def _json(self, obj, status=200):
                self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

            def _error(self, status, code, message, send_body=True):
                self._send(status, json.dumps({"error": message}).encode(),
                           {"Content-Type": "application/json", "X-Error-Code": code,
                            "X-Error-Message": message}, send_body)

            def _route(self, send_body):
                url = urlsplit(self.path)
                path = unquote(url.path)
                hub.requests.append((self.command, path))
                api = f"/api/datasets/{hub.repo_id}"
                resolve = f"/datasets/{hub.repo_id}/resolve/"
                if path in (api, api + "/revision/main", f"{api}/revision/{hub.commit}"):
                    return self._json(hub.info())
                if path.startswith(api + "/revision/"):
                    return self._error(404, "RevisionNotFound", "Invalid rev id")
                if path.startswith(api + "/tree/"):
                    rev, _, under = path[len(api + "/tree/"):].partition("/")
                    if rev not in ("main", hub.commit):
                        return self._error(404, "RevisionNotFound", "Invalid rev id")
                    recursive = parse_qs(url.query).get("recursive", ["False"])[0].lower() == "true"
                    return self._json(hub.tree(recursive, under))
                if path.startswith(resolve):
                    rev, _, name = path[len(resolve):].partition("/")
                    if rev not in ("main", hub.commit):
                        return self._error(404, "RevisionNotFound", "Invalid rev id", send_body)
                    if name not in hub.files:
                        return self._error(404, "EntryNotFound", "Entry not found", send_body)
                    data = hub.files[name]
                    headers = {"X-Repo-Commit": hub.commit, "ETag": f'"{_git_blob_sha1(data)}"',
                               "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
                    if name.endswith(".parquet"):  # LFS: the hub links the sha256 and size
                        headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
                        headers["X-Linked-Size"] = str(len(data))
                    return self._send(200, data, headers, send_body)
                return self._error(404, "RepoNotFound", "Repository not found", send_body)

        return Handler


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connection refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def hub_env(endpoint: str, hf_home, **extra: str) -> dict[str, str]:
    """Environment for a subprocess whose huggingface_hub talks to ``endpoint`` only.

    huggingface_hub reads HF_ENDPOINT/HF_HUB_OFFLINE at import time, so a fresh
    process is the honest way to point it elsewhere.
    """
    env = {k: v for k, v in os.environ.items() if not (k.startswith("HF_") or k.startswith("HUGGINGFACE"))}
    env.update({"HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_XET": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "HF_HUB_ETAG_TIMEOUT": "3",
                "PYTHONPATH": str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
    env.update(extra)
    return env


PYTHON = sys.executable
