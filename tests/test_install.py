"""What users install is what is tested: the sdist, the wheel built from it, a fresh venv outside the checkout.

The wheel is installed (``--no-deps``) into a new virtual environment whose
dependencies come from the project's environment through a ``.pth`` file,
and everything runs from a folder that holds a ``models.py`` and a ``node/``
package of the user's own: ``profiles list``, ``run`` on a real series,
``serve`` with a C-ECHO and a C-STORE from DCMTK and one worker job, and
the old top-level names (``models``, ``node``, ...) must not be importable.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread

from tests.peers import (
    DCMTK_ENV,
    store_statuses,
    storescu,
    wait_until,
    write_node_config,
)

pytestmark = pytest.mark.peer  # DCMTK echoscu / storescu

REPO = Path(__file__).resolve().parent.parent
THORAX = sorted((REPO / "tests" / "data" / "thorax_cta").glob("*.dcm"))
#: files a code path reads at run time, as installed
PACKAGE_DATA = ["segnode/profiles/lungs.yaml", "segnode/profiles/totalsegmentator_snomed_mapping.csv",
                "segnode/storage/data/confidentiality_profile_attributes.json"]


def build_sdist_and_wheel(out: Path) -> tuple[Path, Path]:
    """The sdist of the checkout, and the wheel pip builds from that sdist (as ``make wheel`` does)."""
    out.mkdir(parents=True, exist_ok=True)
    name = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                           "print(b.build_sdist(sys.argv[1]))", str(out)],
                          cwd=REPO, check=True, capture_output=True, text=True).stdout.split()[-1]
    sdist = out / name
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(sdist)], check=True, capture_output=True, text=True)
    (wheel,) = out.glob("segnode-*.whl")
    return sdist, wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A fresh venv with the wheel, and a user's folder with a ``models.py`` and a ``node/`` of its own."""
    tmp = tmp_path_factory.mktemp("install")
    sdist, wheel = build_sdist_and_wheel(tmp / "dist")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # dependencies from the project's environment; its .pth files (the editable install) are not processed
    Path(site, "project-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    user = tmp / "user"
    (user / "node").mkdir(parents=True)
    (user / "models.py").write_text("raise ImportError('the user models.py was imported')\n")
    (user / "node" / "__init__.py").write_text("raise ImportError('the user node/ was imported')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", TCP_NODELAY="1",
               SEGNODE_WEIGHTS_DIR=str(tmp / "weights"))
    yield {"sdist": sdist, "wheel": wheel, "venv": venv, "user": user, "env": env, "tmp": tmp}


def segnode(installed: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(installed["venv"] / "bin" / "segnode"), *args], cwd=installed["user"],
                          env=installed["env"], capture_output=True, text=True, timeout=timeout)


def test_wheel_and_sdist_hold_one_namespace_and_every_data_file(installed: dict) -> None:
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert {n.split("/")[0] for n in names if not n.startswith("segnode-")} == {"segnode"}
    assert set(PACKAGE_DATA) <= set(names)
    assert "segnode/errors.py" in names and "segnode/node/cli/main.py" in names
    with tarfile.open(installed["sdist"]) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    assert {"profiles/totalsegmentator_snomed_mapping.csv", "storage/data/confidentiality_profile_attributes.json",
            "base/errors.py", "pyproject.toml"} <= members


def test_old_top_level_names_are_not_importable(installed: dict) -> None:
    python = installed["venv"] / "bin" / "python"
    empty = installed["tmp"] / "empty"
    empty.mkdir(exist_ok=True)
    for name in ("models", "node", "storage", "routing", "profiles"):
        probe = subprocess.run([str(python), "-c", f"import {name}"], cwd=empty, env=installed["env"],
                               capture_output=True, text=True)
        assert probe.returncode == 1 and "ModuleNotFoundError" in probe.stderr, name
    where = subprocess.run([str(python), "-c", "import segnode.node.cli.main as c; print(c.__file__)"], cwd=empty,
                           env=installed["env"], capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(installed["venv"])), where  # the wheel, not the checkout


def test_profiles_list_loads_every_built_in_profile(installed: dict) -> None:
    result = segnode(installed, "profiles", "list")
    assert result.returncode == 0, result.stderr
    assert {line.split()[0] for line in result.stdout.splitlines()} >= {"lungs", "liver", "bone", "kidneys"}
    assert str(installed["venv"]) in result.stdout  # the installed profiles, not the checkout's


def test_run_writes_a_seg_and_prints_no_library_warnings(installed: dict) -> None:
    """The liver slices' one-component PatientName makes highdicom warn: that goes to the log, not the operator."""
    out = installed["tmp"] / "run"
    result = segnode(installed, "run", "--organ", "lungs", "--model", "hu_based",
                     str(REPO / "tests/data/liver_3slice"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr
    (seg,) = out.glob("SEG_*.dcm")
    assert dcmread(seg).Modality == "SEG"


def test_serve_answers_echo_stores_and_runs_a_worker_job(installed: dict) -> None:
    work = installed["tmp"] / "serve"
    work.mkdir()
    config = write_node_config(work / "node.yaml")
    state = Path(yaml.safe_load(config.read_text())["state_dir"])
    proc = subprocess.Popen([str(installed["venv"] / "bin" / "segnode"), "serve", "--config", str(config)],
                            cwd=installed["user"], env=installed["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert "listening on" in line, line + (proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        port = int(line.split("listening on ", 1)[1].split(",")[0].rsplit(":", 1)[1])
        assert state.stat().st_mode & 0o777 == 0o700
        echo = subprocess.run(["echoscu", "-aet", "SCANNER", "-aec", "SEGNODE", "127.0.0.1", str(port)],
                              env=DCMTK_ENV, capture_output=True, text=True, timeout=30)
        assert echo.returncode == 0, echo.stderr
        sent = storescu(port, THORAX[40:100])
        assert set(store_statuses(sent.stderr)) == {"Success"}

        def done() -> str | None:
            listing = segnode(installed, "jobs", "list", "--config", str(config), timeout=60).stdout
            assert " failed " not in listing, listing
            return listing if " done " in listing else None

        wait_until(done, 240, "the job to be done", interval=0.5)
        show = segnode(installed, "jobs", "show", "1", "--config", str(config), timeout=60).stdout
        seg = Path(show.split("SEG ", 1)[1].split()[0])
        assert dcmread(seg).Modality == "SEG"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "open to other users" not in err, err  # it made its own state folder private
