"""glm_jax installs like a library: the wheel carries the configs, a fresh environment in
another directory runs the entry points by config name, and the import layering holds
(converters and ``import glm_jax`` never pull in jax)."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert p.returncode == 0, (cmd, p.stdout[-2000:], p.stderr[-3000:])
    return p.stdout


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs_from_anywhere(tmp_path):
    # Build the wheel from a copy of the checkout (setuptools leaves build/ and egg-info
    # behind), offline (the build backend is a test requirement).
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", "tests"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)])
    (wheel,) = os.listdir(tmp_path / "dist")
    # A new venv whose only view of the world is its own site-packages plus this one's
    # third-party packages (jax, flax, ... are not reinstalled; glm_jax is not among them).
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = str(venv / "bin" / "python")
    site = run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    with open(os.path.join(site, "third_party.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "-q", str(tmp_path / "dist" / wheel)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = run([py, "-c", "import glm_jax; print(glm_jax.__file__)"], cwd=elsewhere, env=env).strip()
    assert where.startswith(site), where  # the installed copy, not the checkout
    report = json.loads(run([py, "-m", "glm_jax.info", "--config", "chatglm-6b", "--json"], cwd=elsewhere, env=env))
    assert report["model"] == "chatglm-6b" and report["parameters"] == 6_707_929_088
    # A name that is neither a file nor a shipped config lists what is shipped, in one line.
    p = subprocess.run([py, "-m", "glm_jax.info", "--config", "chatglm-7b"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip() == ("error: config file not found: chatglm-7b; shipped configs: chatglm-6b, chatglm-6b-legacy, "
                                "chatglm-6b-lora, chatglm-6b-ptuning, "
                                "glm-10b, glm-130b, glm-large, glm-tiny")


def test_converters_and_the_package_import_without_jax():
    code = ("import sys, glm_jax, glm_jax.convert, glm_jax.convert.__main__, glm_jax.checkpoint.params, "
            "glm_jax.checkpoint.quantized; print(json.dumps(sorted(m for m in ('jax', 'torch', 'tensorflow') if m in sys.modules)))")
    out = run([sys.executable, "-c", "import json; " + code], cwd=ROOT)
    assert json.loads(out) == []


def test_configs_resolve_by_name_or_path(tmp_path, monkeypatch):
    from glm_jax.config import ConfigError, load_config, shipped_configs

    assert {"glm-tiny", "glm-130b", "chatglm-6b", "glm-large", "glm-10b"} <= set(shipped_configs())
    by_name = load_config("glm-130b")
    assert by_name == load_config("glm-130b.yaml") == load_config(os.path.join(ROOT, "configs", "glm-130b.yaml"))
    (tmp_path / "glm-130b.yaml").write_text("model: {num_layers: 2}\n")
    monkeypatch.chdir(tmp_path)  # a file in the working directory wins over the shipped config of that name
    assert load_config("glm-130b.yaml").model.num_layers == 2
    with pytest.raises(ConfigError, match="config file not found: nope/x.yaml; shipped configs: chatglm-6b"):
        load_config("nope/x.yaml")
