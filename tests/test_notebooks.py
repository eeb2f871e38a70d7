"""The notebooks: stored clean, public API only, and each runs end to end with small parameters."""

from __future__ import annotations

import ast
import importlib.util
import textwrap
from pathlib import Path

import nbformat
import pytest

import tl_lightning

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def _load_gallery():
    spec = importlib.util.spec_from_file_location("make_gallery", ROOT / "docs" / "make_gallery.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gallery = _load_gallery()

# Smoke-test sizes: tiny images, a few steps. Each dict must name every parameter of the notebook.
SMALL = {
    "01_feature_extraction.ipynb": {"IMAGE_SIZE": 32, "EPOCHS": 2, "BATCH_SIZE": 64},
    "02_fine_tuning.ipynb": {"IMAGE_SIZE": 32, "EPOCHS": 3, "LR": 1e-3, "LIMIT_BATCHES": 3},
    "03_domain_adaptation.ipynb": {"IMAGE_SIZE": 28, "STEPS": 12, "BATCH_SIZE": 32, "VAL_EVERY": 6},
    "04_few_shot.ipynb": {
        "IMAGE_SIZE": 32,
        "WAY": 5,
        "SHOT": 5,
        "QUERY": 5,
        "TEST_EPISODES": 20,
        "TRAIN_EPOCHS": 1,
        "TRAIN_EPISODES": 4,
    },
    "05_from_the_cli.ipynb": {
        "CONFIG": str(ROOT / "configs" / "quickstart.yaml"),
        "EPOCHS": 1,
        "IMAGE_SIZE": 32,
        "EXTRA_ARGS": ["--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2"],
    },
}

# Cells appended after each notebook: its story's claims, checked on its own variables.
CHECKS = {
    "01_feature_extraction.ipynb": """
        assert val_features.shape == (len(val_y), backbone.feature_dim)  # read from the cache
        assert cm.sum() == len(test_set)
        assert 0.3 < test_acc <= 1.0, test_acc  # chance is 0.1
        assert len(history.rows) == EPOCHS
    """,
    "02_fine_tuning.ipynb": """
        lrs, epochs = recorder.lrs, np.array(recorder.epochs)
        assert list(lrs)[0] == "head" and len(lrs) == 1 + len(backbone.group_names())
        assert all(lr == 0 for lr in np.array(lrs["backbone.stem"])[epochs < second])
        assert all(lr > 0 for lr in np.array(lrs["backbone.neck"])[epochs >= first])
        assert lrs["head"][-1] > lrs["backbone.neck"][-1] > lrs["backbone.stem"][-1] > 0
        assert 0.0 <= fe_test_acc <= 1.0 and 0.0 <= ft_test_acc <= 1.0
        assert advice.description.splits["train"] == 1078 and 0.0 <= advice.distance.probe_acc <= 1.0
        assert advice.config["trainer"]["max_epochs"] == rec.epochs and rec.reasons
    """,
    "03_domain_adaptation.ipynb": """
        baseline, dann = runs["source only"][2], runs["DANN"][2]
        assert max(baseline.grl) == 0.0  # no domain gradient reaches the baseline's features
        assert dann.grl[-1] > dann.grl[0] >= 0.0  # lambda_p rises with training progress
        assert len(dann.steps) == STEPS and len(dann.val_steps) == STEPS // VAL_EVERY
    """,
    "04_few_shot.ipynb": """
        assert len(results) == 3  # 1-shot, SHOT-shot, trained Conv-4
        for res, accs in results.values():
            assert len(accs) == TEST_EPISODES == res["episodes"]
            assert 0.0 < res["acc_ci95"] < 0.5
        assert prototypes.shape == (WAY, model.backbone.feature_dim)
    """,
    "05_from_the_cli.ipynb": """
        assert {"val/acc", "val/loss"} <= set(tags["scalars"])
        assert any(t.startswith("lr-") for t in tags["scalars"])
        assert Path(cli.trainer.checkpoint_callback.best_model_path).is_file()
    """,
}


def _notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def _code_cells(path: Path) -> list:
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def test_every_notebook_has_small_test_parameters():
    assert [p.name for p in _notebooks()] == sorted(SMALL) == sorted(CHECKS)


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.stem)
def test_notebook_is_stored_clean_with_one_leading_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in cells), "strip the outputs"
    assert gallery.parameters_cell(nb) is cells[0]
    assert gallery.parameter_names(cells[0].source) == set(SMALL[path.name])


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.stem)
def test_notebook_imports_only_the_public_api(path):
    public = set(tl_lightning.__all__)
    for cell in _code_cells(path):
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("tl_lightning") for a in node.names), cell.source
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "tl_lightning"
            ):
                names = {a.name for a in node.names}
                if node.module == "tl_lightning.cli":
                    assert names == {"run_cli"}
                else:
                    assert node.module == "tl_lightning" and names <= public, (node.module, names)


def test_gallery_names_are_unique_across_notebooks():
    names = [
        tag
        for path in _notebooks()
        for cell in nbformat.read(path, as_version=4).cells
        for tag in cell.metadata.get("tags", [])
        if tag.startswith("gallery:")
    ]
    assert len(names) == len(set(names)) >= 5


def test_run_notebook_rejects_parameters_that_do_not_match(tmp_path):
    path = NOTEBOOKS / "01_feature_extraction.ipynb"
    with pytest.raises(ValueError, match="IMAGE_SIZE"):
        gallery.run_notebook(path, {"EPOCHS": 1, "BATCH_SIZE": 8}, tmp_path)


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory) -> str:
    """One feature cache for all notebooks: 01, 02 and 05 embed the same digits and reuse it."""
    return str(tmp_path_factory.mktemp("feature_cache"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL), ids=lambda n: n.removesuffix(".ipynb"))
def test_notebook_runs_end_to_end_with_small_parameters(name, tmp_path, feature_cache):
    checks = "import numpy as np\nfrom pathlib import Path\n" + textwrap.dedent(CHECKS[name])
    nb = gallery.run_notebook(
        NOTEBOOKS / name,
        SMALL[name],
        tmp_path,
        timeout=300,  # per cell
        extra_cells=[checks],
        # one thread: the suite shares its cores, and oversubscribed OpenMP (t-SNE) crawls
        env={"TL_LIGHTNING_CACHE": feature_cache, "OMP_NUM_THREADS": "1"},
    )
    figures = gallery.gallery_figures(nb)  # raises if a tagged figure cell drew nothing
    assert figures and all(png.startswith(b"\x89PNG") for png in figures.values())
