"""A CLI fit's own TensorBoard run, served by ``tensorboard --logdir runs`` as the README says: scalars and images."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tl_lightning.cli import run_cli

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _fit(tmp_path, capsys) -> tuple[object, str]:
    """``tl-lightning fit`` of the quickstart, tiny: two epochs, its default TensorBoard logger."""
    cli = run_cli(
        [
            "fit",
            "--config",
            str(REPO / "configs/quickstart.yaml"),
            "--model.init_args.backbone=resnet18",
            "--model.init_args.weights=null",
            "--data.init_args.image_size=16",
            "--data.init_args.batch_size=16",
            "--data.init_args.num_workers=0",
            "--trainer.precision=32-true",
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=2",
            "--trainer.log_every_n_steps=1",
            "--visuals.embeddings=false",
        ]
    )
    return cli, capsys.readouterr().out


def test_tensorboard_serves_the_cli_runs_scalars_and_images(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli, out = _fit(tmp_path, capsys)
    # the CLI tells the user where the run is; that folder is under runs/ and holds the events
    printed = re.search(r"tensorboard --logdir (\S+)", out).group(1)
    log_dir = Path(printed)
    assert log_dir.resolve() == Path(cli.trainer.logger.log_dir).resolve()
    assert log_dir.resolve().is_relative_to((tmp_path / "runs").resolve())
    run = log_dir.resolve().relative_to((tmp_path / "runs").resolve()).as_posix()
    final_acc = float(cli.trainer.callback_metrics["val/acc"])

    port = free_port()
    tensorboard = Path(sys.executable).with_name("tensorboard")
    command = [str(tensorboard)] if tensorboard.exists() else [sys.executable, "-m", "tensorboard"]
    base = f"http://127.0.0.1:{port}"
    # output to a file, not a pipe that could fill and block the server
    with open(tmp_path / "tensorboard.log", "w") as log:
        server = subprocess.Popen(
            [
                *command,
                "--logdir",
                "runs",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--load_fast",
                "false",  # the pure-Python loader: no separate data-server binary
                "--reload_interval",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        try:
            tags: dict = {}
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                if server.poll() is not None:
                    raise AssertionError((tmp_path / "tensorboard.log").read_text()[-2000:])
                try:
                    tags = get_json(f"{base}/data/plugin/scalars/tags")
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    tags = {}
                if run in tags and "val/acc" in tags[run]:
                    break
                time.sleep(0.5)
            assert run in tags, f"tensorboard did not serve {run} within 90 s: {tags}"
            assert {"val/acc", "val/loss", "val/f1_macro"} <= set(tags[run])
            assert any(t.startswith("lr-AdamW") for t in tags[run])  # the LR monitor's
            assert "hp_metric" not in tags[run]
            query = urllib.parse.urlencode({"run": run, "tag": "val/acc"})
            points = get_json(f"{base}/data/plugin/scalars/scalars?{query}")
            # [wall_time, step, value]: one point per validation epoch, the last one the run's result
            assert [p[1] for p in points] == [1, 3]
            assert abs(points[-1][2] - final_acc) < 1e-6
            images = get_json(f"{base}/data/plugin/images/tags")
            assert {"val/confusion_matrix", "val/predictions"} <= set(images[run])
        finally:  # stop the server we started, by its own handle
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)
