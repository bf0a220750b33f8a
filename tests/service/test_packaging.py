"""The API side never imports torch or transformers (the API image has neither), and the CLI that the API
image uses (`python -m worker.cli.serve api-key|migrate|jobs ...`) runs without them."""

from __future__ import annotations

import subprocess
import sys

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
