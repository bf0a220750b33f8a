"""The API side never imports torch or transformers (the API image has neither), and the CLI that the API
image uses (`python -m worker.cli.serve api-key|migrate|jobs ...`) runs without them.

The API image itself (docker/Dockerfile.api) is checked without a docker engine: the files it copies, with
the requirements it installs (docker/requirements-api.txt, the owner of the API's dependency set), in a clean
virtual environment, serve a job submission and run the light worker's and the CLI's imports, without torch.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile.api"
REQUIREMENTS = ROOT / "docker" / "requirements-api.txt"

BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers'):
            raise ImportError(f'{name} imported on the API side')
sys.meta_path.insert(0, Block())
"""


def test_api_worker_app_and_cli_import_without_torch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    code = BLOCK + (
        "import app.main, worker.celery_app, worker.tasks\n"
        "import worker.cli.serve\n"
        "app.main.create_app()\n"
        "worker.cli.serve.main(['api-key', 'create', '--tenant', 'x'])\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"HIPP_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_every_setting_is_documented() -> None:
    from pathlib import Path

    from app.config import Settings

    doc = (Path(__file__).resolve().parents[2] / "docs" / "service.md").read_text()
    missing = [f"HIPP_{name.upper()}" for name in Settings.model_fields if f"`HIPP_{name.upper()}`" not in doc]
    assert not missing, f"document these settings in docs/service.md: {missing}"


def test_the_whole_cli_parser_builds_without_torch():
    """`hipp --help` and the service commands work in the torch-free API image."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("torch", "transformers", "peft"):
                    raise ImportError("blocked " + name)
        sys.meta_path.insert(0, Block())
        from worker.cli import build_parser
        build_parser().parse_args(["jobs", "list"])
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# --- the API image, without a docker engine ---------------------------------------------------------------
def dockerfile_instructions(path: Path) -> list[tuple[str, list[str]]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, list[str]]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + line)
        pending = ""
        out.append((words[0].upper(), words[1:]))
    return out


def stage_image_files(dest: Path) -> Path:
    """Copy what the Dockerfile's COPY instructions put into its WORKDIR (from this checkout) under
    ``dest``; returns the staged WORKDIR."""
    workdir = "/"
    for instruction, args in dockerfile_instructions(DOCKERFILE):
        if instruction == "WORKDIR":
            workdir = args[0]
        if instruction != "COPY" or any(a.startswith("--") for a in args):
            continue
        *sources, target = args
        target_path = Path(target if target.startswith("/") else f"{workdir}/{target}")
        if not target_path.is_relative_to(workdir):
            continue  # outside the application's folder (the requirements file, installed separately)
        into = dest / target_path.relative_to(workdir)
        found = [Path(p) for src in sources for p in sorted(glob.glob(str(ROOT / src)))]
        assert found or all("*" in src for src in sources), f"{DOCKERFILE.name} copies missing {sources}"
        for src in found:
            to = into / src.name if target.endswith("/") or len(found) > 1 else into
            if src.is_dir():
                shutil.copytree(src, to, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
            else:
                to.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, to)
    return dest


IN_THE_IMAGE = """
import contextlib, importlib.util, io, sys
assert importlib.util.find_spec("torch") is None and importlib.util.find_spec("transformers") is None
import worker.celery_app, worker.tasks  # the light worker (beat, relay, reaper, retention sweep)
import worker.cli
worker.cli.build_parser()
import hipp_client  # the light client the CLI's `jobs` commands run on
out = io.StringIO()
with contextlib.redirect_stdout(out):
    assert worker.cli.main(["api-key", "create", "--tenant", "image"]) == 0
key = out.getvalue().strip()
from fastapi.testclient import TestClient
import app.main
with TestClient(app.main.create_app()) as c:
    assert c.get("/readyz").status_code == 200
    headers = {"Authorization": "Bearer " + key}
    job = {"model": "testbed", "preference": {"utility": 0.5, "robustness": 0.2, "compression": 0.3}}
    r = c.post("/jobs", json=job, headers=headers)
    assert r.status_code == 201, r.text
    assert c.get("/jobs/" + r.json()["id"], headers=headers).json()["status"] == "queued"
    assert hipp_client.HippClient("http://testserver", key, http=c).get_job(r.json()["id"]).status == "queued"
assert not {"torch", "transformers"} & set(sys.modules)
print("ok")
"""


@pytest.mark.slow
def test_the_api_image_runs_from_its_own_files_and_requirements(tmp_path: Path) -> None:
    """What docker/Dockerfile.api builds, without docker: its files, its requirements, a clean venv."""
    tree = stage_image_files(tmp_path / "srv")
    assert not (tree / "worker" / "hipp" / "testbed").exists() and not list(tree.rglob("*.safetensors"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    # What the image's `pip install -e .` puts on the path: each folder pyproject's package discovery searches.
    where = tomllib.loads((tree / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["where"]
    env = {**env, "PYTHONPATH": os.pathsep.join(str(tree / w) for w in where), "HIPP_HOME": str(tmp_path / "home")}
    env = {k: v for k, v in env.items() if not k.startswith("HIPP_") or k == "HIPP_HOME"}
    run = subprocess.run(
        [str(venv / "bin" / "python"), "-c", IN_THE_IMAGE],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tree,
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), (run.stdout[-2000:], run.stderr[-3000:])


def requirements(lines: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()]
    return {r.name.lower(): r for r in reqs}


def test_the_api_requirements_are_the_projects_own() -> None:
    """docker/requirements-api.txt owns the API's set; the project's full install (pyproject) holds each of
    them with the same version range (its uvicorn without the [standard] extra: it lists the parts it uses),
    so the API image runs on the versions the tests run on. Neither torch nor transformers is in the set."""
    api = requirements(REQUIREMENTS.read_text().splitlines())
    full = requirements(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    assert not {"torch", "transformers", "peft", "accelerate", "safetensors"} & set(api)
    missing = sorted(set(api) - set(full))
    assert not missing, f"add to pyproject's dependencies: {missing}"
    differ = {n: (str(api[n].specifier), str(full[n].specifier)) for n in api if api[n].specifier != full[n].specifier}
    assert not differ, f"version ranges differ (requirements-api.txt, pyproject.toml): {differ}"
