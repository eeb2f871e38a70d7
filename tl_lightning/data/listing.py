"""The one folder lister: class subfolders and image files, with one rule for hidden entries.

Hidden files and folders (a name starting with ``.``, such as ``.DS_Store`` or ``.ipynb_checkpoints``)
are never classes and never images.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def class_folders(folder: str | Path) -> list[str]:
    """Sorted names of the non-hidden subfolders of ``folder``: one class each."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder '{folder}' does not exist")
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))



def list_images(root: str | Path) -> list[Path]:
    """Image files under ``root`` (recursive, sorted, by extension)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder '{root}' does not exist")
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )

