"""``tensorboard --logdir`` starts on a free localhost port and serves a run's scalars over HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from lightning.pytorch.loggers import TensorBoardLogger


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_tensorboard_serves_the_run_scalars_on_localhost(tmp_path):
    # a run written the way a fit writes it: Lightning's TensorBoardLogger under runs/<name>
    logger = TensorBoardLogger(tmp_path / "runs", name="demo", default_hp_metric=False)
    for step, acc in enumerate([0.25, 0.5, 0.75]):
        logger.log_metrics({"val/acc": acc, "train/loss": 1.0 - acc}, step=step)
    logger.finalize("success")
    run = Path(logger.log_dir).relative_to(tmp_path / "runs").as_posix()  # demo/version_0

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
                str(tmp_path / "runs"),
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
                if run in tags:
                    break
                time.sleep(0.5)
            assert run in tags, f"tensorboard did not serve {run} within 90 s: {tags}"
            assert {"val/acc", "train/loss"} <= set(tags[run])
            query = urllib.parse.urlencode({"run": run, "tag": "val/acc"})
            points = get_json(f"{base}/data/plugin/scalars/scalars?{query}")
            # [wall_time, step, value] per point
            assert [(p[1], round(p[2], 6)) for p in points] == [(0, 0.25), (1, 0.5), (2, 0.75)]
        finally:  # stop the server we started, by its own handle
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)
