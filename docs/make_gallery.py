"""Render the README gallery: run each notebook with gallery-sized parameters, save its tagged figures.

A figure cell is tagged ``gallery:<name>`` in its notebook; its first PNG output becomes
``docs/gallery/<name>.png``. The gallery therefore shows exactly what the notebooks show, drawn by
the library's own code on the offline data.

    python docs/make_gallery.py                   # all notebooks: ~6 CPU-minutes, DANN's 2 x 600 steps most
    python docs/make_gallery.py --only 04_few_shot
"""

from __future__ import annotations

import argparse
import ast
import base64
import io
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
GALLERY = ROOT / "docs" / "gallery"
MAX_BYTES = 200_000  # keep the repository light

# Between the test suite's smoke sizes and the notebooks' defaults: figures that tell the story.
GALLERY_PARAMETERS: dict[str, dict[str, Any]] = {
    "01_feature_extraction": {"IMAGE_SIZE": 48, "EPOCHS": 8, "BATCH_SIZE": 64},
    "02_fine_tuning": {"IMAGE_SIZE": 32, "EPOCHS": 6, "LR": 1e-3, "LIMIT_BATCHES": 1.0},
    "03_domain_adaptation": {"IMAGE_SIZE": 28, "STEPS": 600, "BATCH_SIZE": 64, "VAL_EVERY": 100},
    "04_few_shot": {
        "IMAGE_SIZE": 48,
        "WAY": 5,
        "SHOT": 5,
        "QUERY": 15,
        "TEST_EPISODES": 300,
        "TRAIN_EPOCHS": 3,
        "TRAIN_EPISODES": 100,
    },
    "05_from_the_cli": {
        "CONFIG": str(ROOT / "configs" / "quickstart.yaml"),
        "EPOCHS": 6,
        "IMAGE_SIZE": 48,
        "EXTRA_ARGS": [],
    },
}

log = logging.getLogger("make_gallery")


def parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The notebook's one code cell tagged ``parameters``."""
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1 or tagged[0].cell_type != "code":
        raise ValueError(f"expected exactly one code cell tagged 'parameters', found {len(tagged)}")
    return tagged[0]


def parameter_names(source: str) -> set[str]:
    """Names assigned at the top level of a parameters cell."""
    return {
        target.id
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


def run_notebook(
    path: Path,
    parameters: dict[str, Any],
    workdir: Path,
    timeout: int = 600,
    extra_cells: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> nbformat.NotebookNode:
    """Execute ``path`` in ``workdir`` with its parameters cell replaced; return the executed notebook.

    Every name of the parameters cell must be given, and no other: a renamed or new parameter
    fails loudly instead of silently running at full size. ``extra_cells`` run after the notebook
    (e.g. checks on its variables); ``env`` adds environment variables for the kernel, which
    always imports this checkout of ``tl_lightning`` (whatever the working directory).
    """
    nb = nbformat.read(path, as_version=4)
    cell = parameters_cell(nb)
    expected = parameter_names(cell.source)
    if set(parameters) != expected:
        raise ValueError(
            f"{path.name}: parameters {sorted(parameters)} do not match the notebook's "
            f"parameters cell {sorted(expected)}"
        )
    cell.source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    nb.cells += [nbformat.v4.new_code_cell(src) for src in extra_cells]
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    kernel_env = {**(env or {}), "PYTHONPATH": python_path}
    previous = {name: os.environ.get(name) for name in kernel_env}
    os.environ.update(kernel_env)  # the kernel process inherits this environment
    try:
        client = NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(workdir)}},
        )
        client.execute()
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return nb


def gallery_figures(nb: nbformat.NotebookNode) -> dict[str, bytes]:
    """``{name: png bytes}`` of the first image output of each cell tagged ``gallery:<name>``."""
    figures = {}
    for cell in nb.cells:
        for tag in cell.get("metadata", {}).get("tags", []):
            if not tag.startswith("gallery:"):
                continue
            pngs = [
                o["data"]["image/png"]
                for o in cell.get("outputs", [])
                if "image/png" in o.get("data", {})
            ]
            if not pngs:
                raise ValueError(f"cell tagged '{tag}' produced no figure")
            figures[tag.removeprefix("gallery:")] = base64.b64decode(pngs[0])
    return figures


def shrink(png: bytes, limit: int = MAX_BYTES) -> bytes:
    """Re-encode a PNG over ``limit`` bytes with a 256-colour palette, then scale it down until it fits."""
    if len(png) <= limit:
        return png
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    scale = 1.0
    while True:
        size = (round(image.width * scale), round(image.height * scale))
        out = io.BytesIO()
        image.resize(size, Image.LANCZOS).quantize(colors=256).save(out, "PNG", optimize=True)
        if out.tell() <= limit or scale < 0.3:
            return out.getvalue()
        scale *= 0.9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="notebook names (without .ipynb) to render")
    parser.add_argument(
        "--out", type=Path, default=GALLERY, help="output folder (default docs/gallery)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = args.only or list(GALLERY_PARAMETERS)
    unknown = sorted(set(names) - set(GALLERY_PARAMETERS))
    if unknown:
        raise SystemExit(f"unknown notebooks {unknown}; valid: {list(GALLERY_PARAMETERS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        env = {"TL_LIGHTNING_CACHE": str(Path(workdir) / "cache")}  # fresh, shared by the notebooks
        for name in names:
            start = time.perf_counter()
            nb = run_notebook(
                NOTEBOOKS / f"{name}.ipynb", GALLERY_PARAMETERS[name], Path(workdir), env=env
            )
            for figure, png in gallery_figures(nb).items():
                png = shrink(png)
                (args.out / f"{figure}.png").write_bytes(png)
                log.info("%s/%s.png (%d KB)", args.out, figure, len(png) // 1000)
            log.info("%s: %.0f s", name, time.perf_counter() - start)


if __name__ == "__main__":
    sys.exit(main())
