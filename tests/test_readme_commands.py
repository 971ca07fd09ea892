"""Every command the README shows parses as written, and the package needs nothing from the test
extra at run time (what `scripts/setup.sh` without `--test` installs is enough)."""

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_ONLY = ("pytest", "hypothesis", "openai")   # the `test` extra of pyproject.toml


def _readme_commands() -> list[list[str]]:
    text = open(os.path.join(ROOT, "README.md")).read()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = re.split(r"\s+#\s", line)[0].strip()
            line = line.removeprefix("scripts/setup.sh && ")
            for prefix in (".venv/bin/jaxserve", "jaxserve"):
                if line == prefix or line.startswith(prefix + " "):
                    cmds.append(shlex.split(line[len(prefix):].replace('"$KEY"', "k")))
                    break
    return cmds


COMMANDS = _readme_commands()


def test_the_readme_shows_commands():
    assert len(COMMANDS) >= 10 and [] in COMMANDS   # the bare `jaxserve` among them


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c) or "(serve)" for c in COMMANDS])
def test_readme_command_parses(argv, monkeypatch):
    from jaxserve.cli import parse_command_line
    monkeypatch.chdir(ROOT)   # `--config configs/...` is relative to the checkout
    args, _ = parse_command_line(argv)
    assert callable(args.func)


def test_every_module_imports_without_the_test_extra():
    code = f"""
import importlib, importlib.abc, pkgutil, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {TEST_ONLY!r}:
            raise ImportError(name + " is in the test extra only")
sys.meta_path.insert(0, Block())
import jaxserve, pallas_kernels
for pkg in (jaxserve, pallas_kernels):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if not m.name.endswith(".__main__"):   # that one runs the command
            importlib.import_module(m.name)
print("ok")
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
