"""The bento builds (CPU and CUDA variants) and its requirements match pyproject.toml."""

import subprocess
import sys
import tarfile

import pytest

from tests.conftest import REPO_ROOT


def test_requirements_files_are_generated_from_pyproject():
    proc = subprocess.run([sys.executable, "scripts/gen_requirements.py", "--check"], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("bentofile,variant", [("bentofile.cpu.yaml", "cpu"), ("bentofile.yaml", "cuda")])
def test_bentoml_build(bentofile, variant, tmp_path):
    env = {"BENTOML_HOME": str(tmp_path / "bentoml"), "PATH": __import__("os").environ["PATH"]}
    build = subprocess.run([sys.executable, "-m", "bentoml", "build", "-f", bentofile, "--output", "tag"],
                           cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    tag = build.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("microverse:")
    out = tmp_path / "bento.bento"
    export = subprocess.run([sys.executable, "-m", "bentoml", "export", tag, str(out)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-2000:]
    with tarfile.open(out) as tar:
        names = tar.getnames()
        reqs = tar.extractfile(next(n for n in names if n.endswith("env/python/requirements.txt"))).read().decode()
        bento_yaml = tar.extractfile(next(n for n in names if n.endswith("bento.yaml"))).read().decode()
    assert any(n.endswith("src/service.py") for n in names)
    for module in ("microverse/engine.py", "evaluation/judge.py", "simulator/render.py", "media/video.py"):
        assert any(n.endswith(f"src/{module}") for n in names), module  # every layer the service imports
    assert any(n.endswith("src/microverse/assets/microverse-demo/transformer/config.json") for n in names)
    assert not any("/tests/" in n for n in names)
    assert "diffusers==0.42.1" in reqs
    assert f"variant: {variant}" in bento_yaml
