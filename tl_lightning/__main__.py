"""``python -m tl_lightning`` == ``tl-lightning``."""

from tl_lightning.cli import main

main()
