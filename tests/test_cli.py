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


def test_generate_samples_through_the_engine_reproducibly():
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "jaxserve", "generate", "Write a haiku about the sea.",
           "--temperature", "0.8", "--top-p", "0.95", "--top-k", "40", "--max-tokens", "12",
           "--seed", "7"]
    runs = [subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            for _ in range(2)]
    assert all(p.returncode == 0 for p in runs), runs[0].stderr[-2000:]
    assert runs[0].stdout.strip() and runs[0].stdout == runs[1].stdout   # the seed fixes it
    assert "<|im_end|>" not in runs[0].stdout


def test_readme_test_command_is_what_ci_runs():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    ci_cmd = [line for line in ci.splitlines() if line.startswith("scripts/setup.sh")][0]
    assert ci_cmd in readme


def test_interactive_chat_keeps_the_conversation():
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "jaxserve.cli", "chat", "--max-tokens", "30"],
                          input="What is the capital of France?\nAnd of Italy?\n\n",
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    replies = [line for line in proc.stdout.split("> ") if line.strip()]
    assert "Paris" in replies[0] and "Rome" in replies[1]


def test_config_file_sets_flags(tmp_path):
    from jaxserve.cli import _apply_config_file, build_parser
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max-num-seqs: 3\nport: 9001\n")
    parser = build_parser()
    argv = ["serve", "--config", str(cfg), "--port", "9002"]
    _apply_config_file(parser, argv)
    args = parser.parse_args(argv)
    assert args.max_num_seqs == 3 and args.port == 9002   # the command line wins
    bad = tmp_path / "bad.yaml"
    bad.write_text("no-such-flag: 1\n")
    import pytest
    with pytest.raises(ValueError, match="no-such-flag"):
        _apply_config_file(build_parser(), ["serve", "--config", str(bad)])
