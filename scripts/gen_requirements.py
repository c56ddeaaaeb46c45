"""Write requirements/{cpu,cuda}.txt (the bento images' requirements) from pyproject.toml.

    python scripts/gen_requirements.py          # write
    python scripts/gen_requirements.py --check  # exit 1 if the files are stale
"""

import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
CPU_TORCH = "torch==2.13.0"


def render() -> dict[Path, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    cpu = [CPU_TORCH if d.startswith("torch>") else d for d in deps]
    cuda = deps + project["optional-dependencies"]["gpu"]
    head = "# Generated from pyproject.toml by scripts/gen_requirements.py; do not edit.\n"
    return {ROOT / "requirements" / "cpu.txt": head + "\n".join(cpu) + "\n",
            ROOT / "requirements" / "cuda.txt": head + "\n".join(cuda) + "\n"}


def main() -> int:
    files = render()
    if "--check" in sys.argv:
        stale = [str(p) for p, text in files.items() if not p.is_file() or p.read_text() != text]
        if stale:
            print("stale:", ", ".join(stale), "- run python scripts/gen_requirements.py")
            return 1
        return 0
    for path, text in files.items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
