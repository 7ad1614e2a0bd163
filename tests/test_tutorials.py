"""Every tutorial runs, start to finish, as the script it is, and draws the figures it shows.

Each tutorial is executed in its own Python process, exactly as a reader runs it
(`python tutorials/NN_name.py`), with MINIMOBILE_TUTORIAL_QUICK=1 to shrink its sizes and repeats
(a few minutes for all of them on 2 CPU cores) and MINIMOBILE_FIGURES_DIR pointing at a temporary
folder, so the figures committed beside the tutorials are never overwritten. The figures a tutorial
"promises" are the `![...](figures/NAME.png)` links in its markdown cells: each must be drawn by the
run and committed in tutorials/figures/, and tutorials/README.md must link the tutorial.

To add a tutorial, add its name to TUTORIALS (the test below fails until you do).
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TUTORIALS_DIR = REPO / "tutorials"
TUTORIALS = (
    "01_depthwise_separable_from_scratch",
    "02_mobilenet_layer_by_layer",
    "03_training_on_cifar100",
    "04_one_step_many_devices",
    "05_why_depthwise_is_slow",
)
MARKS = {"04_one_step_many_devices": [pytest.mark.multiprocess]}  # it starts two processes on loopback
TIMEOUT_S = 600  # per tutorial: generous, because 2 shared cores can be several times slower than idle ones


def promised_figures(name: str) -> list[str]:
    """The PNGs a tutorial's markdown shows: ![caption](figures/NAME.png)."""
    text = (TUTORIALS_DIR / f"{name}.py").read_text()
    return re.findall(r"!\[[^\]]*\]\(figures/([^)\s]+\.png)\)", text)


def test_every_tutorial_is_listed():
    on_disk = sorted(p.stem for p in TUTORIALS_DIR.glob("[0-9][0-9]_*.py"))
    assert on_disk == sorted(TUTORIALS), "add new tutorials to TUTORIALS in this file"


@pytest.mark.parametrize("name", [pytest.param(n, marks=MARKS.get(n, [])) for n in TUTORIALS])
def test_tutorial_runs_and_draws_its_figures(name, tmp_path):
    figures = tmp_path / "figures"
    # A clean environment: the tutorial decides its own XLA flags (tutorial 4 asks for 8 devices), not
    # this test process (conftest.py asks for 8 for every other test).
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(MINIMOBILE_TUTORIAL_QUICK="1", MINIMOBILE_FIGURES_DIR=str(figures), MPLBACKEND="Agg")
    result = subprocess.run([sys.executable, str(TUTORIALS_DIR / f"{name}.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    promised = promised_figures(name)
    assert promised, f"{name} shows no figure"
    for png in promised:
        assert (figures / png).stat().st_size > 1000, f"{name} did not draw {png}"


@pytest.mark.parametrize("name", TUTORIALS)
def test_tutorial_is_a_notebook_with_committed_figures(name):
    jupytext = pytest.importorskip("jupytext")
    notebook = jupytext.read(TUTORIALS_DIR / f"{name}.py")
    kinds = [cell.cell_type for cell in notebook.cells]
    assert kinds[0] == "markdown" and "code" in kinds, "a title cell first, then prose and code"
    for png in promised_figures(name):
        assert (TUTORIALS_DIR / "figures" / png).is_file(), f"{png} is shown but not committed"
    assert f"{name}.py" in (TUTORIALS_DIR / "README.md").read_text(), "link it from tutorials/README.md"
