"""The README's main job: a real answer from the embedded default, offline, on CPU."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generate_answers_from_embedded_default():
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "jaxserve.cli", "generate",
                           "What is the capital of France?", "--max-tokens", "24"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout
    assert "<|im_end|>" not in proc.stdout


def test_readme_test_command_is_what_ci_runs():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    ci_cmd = [line for line in ci.splitlines() if line.startswith("scripts/setup.sh")][0]
    assert ci_cmd in readme
