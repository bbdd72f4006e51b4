"""Every file path the code's docstrings and comments (and README.md) name exists in the repo:
a pointer that lies sends a reader nowhere. Allowed besides: outputs the code writes (under
gitignored folders or a run directory), placeholders a user replaces, and files inside installed
third-party packages (named with the package's own top-level folder)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PATH = re.compile(r"(?<![\w/<.~-])((?:[A-Za-z_][\w.-]*/)+[\w.-]+\.(?:py|md|yaml|yml|json|txt|sh|toml|png)"
                  r"|[A-Z][A-Z_]+\.md)\b")
PLACEHOLDERS = ("path/to/", "run_dir/")
OUTPUT_DIRS = ("bench/results/", "outputs/", "multirun/", "runs/")
SKIP = (".venv", "outputs", "build", "multirun", ".git")


def sources() -> list[Path]:
    files = [p for p in ROOT.glob("**/*.py") if not set(p.relative_to(ROOT).parts) & set(SKIP)
             and ".egg-info" not in str(p)]
    return sorted(files) + [ROOT / "README.md"]


def resolves(path: str, where: Path) -> bool:
    if path.startswith(PLACEHOLDERS + OUTPUT_DIRS):
        return True
    if any((base / path).exists() for base in (ROOT, where.parent, ROOT / "sync", ROOT / "conf")):
        return True
    top = path.split("/", 1)[0]
    return "/" in path and top not in {p.name for p in ROOT.iterdir()} and importlib.util.find_spec(top) is not None


def test_every_named_path_exists():
    missing = []
    for f in sources():
        for number, line in enumerate(f.read_text().splitlines(), 1):
            missing += [f"{f.relative_to(ROOT)}:{number}: {m.group(1)}" for m in PATH.finditer(line)
                        if not resolves(m.group(1), f)]
    assert not missing, "paths named but not in the repo:\n" + "\n".join(missing)


def test_no_machine_paths():
    machine = re.compile(r"/work/|/home/\w+|/Users/\w+|/root/")
    found = [f"{f.relative_to(ROOT)}:{n}" for f in sources() if f.name != Path(__file__).name
             for n, line in enumerate(f.read_text().splitlines(), 1) if machine.search(line)]
    assert not found, found
