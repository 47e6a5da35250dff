"""The walkthrough notebooks (notebooks/make.py writes them): the same code in English and Korean, as committed,
and run top to bottom here so that they can never drift from the package. Their checks are assertions."""
import os

import pytest

from tests.conftest import ROOT

nbformat = pytest.importorskip("nbformat") if not os.environ.get("CI") else __import__("nbformat")
from notebooks.make import NOTEBOOKS, STEPS, notebook  # noqa: E402


def code_cells(book) -> list[str]:
    return [cell.source for cell in book.cells if cell.cell_type == "code"]


def test_both_languages_run_the_same_code_and_the_files_are_current():
    english, korean = notebook("en"), notebook("ko")
    assert code_cells(english) == code_cells(korean) == [code for _, _, code in STEPS if code]
    for language, path in NOTEBOOKS.items():
        committed = nbformat.read(path, as_version=4)
        assert code_cells(committed) == code_cells(notebook(language)), f"run python notebooks/make.py ({path.name})"
        markdown = [c.source for c in committed.cells if c.cell_type == "markdown"]
        assert markdown == [c.source for c in notebook(language).cells if c.cell_type == "markdown"]
        pictures = [o for c in committed.cells if c.cell_type == "code" for o in c.get("outputs", [])
                    if "image/png" in o.get("data", {})]
        assert len(pictures) >= 8, f"{path.name} is stored with its pictures, for readers on GitHub"


@pytest.fixture(scope="module")
def environment(data_root, tmp_path_factory):
    """No trained checkpoint, so the first notebook trains its small model (on a few digits and T = 100, to stay
    quick: its flags come last and win)."""
    work = tmp_path_factory.mktemp("walkthrough")
    return {"DIFFUSION_DATA_ROOT": str(data_root), "WALKTHROUGH_TRAINED": str(work / "none"),
            "WALKTHROUGH_SMALL": str(work / "small"),
            "WALKTHROUGH_TRAIN_FLAGS": "--limit-train 256 --batch-size 64 --timesteps 100"}


@pytest.mark.parametrize("language", ["en", "ko"])  # ko finds the small model that en trained
def test_the_walkthrough_runs_top_to_bottom(environment, monkeypatch, language):
    from nbclient import NotebookClient

    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    book = notebook(language)
    NotebookClient(book, timeout=600, resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    text = "".join(o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.outputs)
    assert ("training a small model" in text) == (language == "en")
    assert "loss by hand" in text and "dpmpp: the steps it visits" in text
