"""Damaged checkpoints are found by name and survived; a resume with a changed run-defining config is refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from sdt_dist.checkpoint.integrity import CheckpointDamaged, file_digests, verify
from sdt_dist.checkpoint.resume import choose, config_changes
from tests.helpers import make_cfg, run_job


def _fake_checkpoint(root: Path, step: int) -> Path:
    path = root / f"step_{step:08d}"
    (path / "export").mkdir(parents=True)
    (path / "optim_states.pt").write_bytes(bytes(range(256)) * 64)
    (path / "export" / "student.safetensors").write_bytes(b"w" * 1000)
    (path / "meta.json").write_text(json.dumps({"step": step, "files": file_digests(path)}))
    return path


def _flip_two_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in (len(data) // 2, len(data) // 2 + 7):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_truncate_half, _flip_two_bytes])
def test_auto_falls_back_past_a_damaged_checkpoint_naming_the_file(tmp_path, damage):
    older, newest = _fake_checkpoint(tmp_path, 2), _fake_checkpoint(tmp_path, 4)
    assert verify(newest)
    damage(newest / "optim_states.pt")
    logged: list[str] = []
    assert choose("auto", tmp_path, logged.append) == older
    assert len(logged) == 1 and "step_00000004/optim_states.pt" in logged[0]
    with pytest.raises(CheckpointDamaged, match="step_00000004/optim_states.pt"):
        choose(str(newest), tmp_path, logged.append)


def test_a_checkpoint_without_checksums_is_taken_as_it_is(tmp_path):
    path = _fake_checkpoint(tmp_path, 2)
    (path / "meta.json").write_text(json.dumps({"step": 2}))
    logged: list[str] = []
    assert choose("auto", tmp_path, logged.append) == path and "no checksums" in logged[0]


def test_config_changes_name_run_defining_keys_only():
    saved = make_cfg().to_dict()
    changed = make_cfg("model.hidden_size=64", "train.max_steps=99", "train.lr=1e-4", "logging.log_interval=3")
    assert [c.split(":")[0] for c in config_changes(saved, changed.to_dict())] == ["model.hidden_size"]
    del saved["distill"]["lambda_kd"]  # a key an older checkpoint never recorded: not comparable
    assert config_changes(saved, make_cfg("distill.lambda_kd=0.5").to_dict()) == []


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def _copy_run(base: Path, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("run.lock"))
    (out / "metrics.jsonl").write_text("")
    return out


@pytest.mark.slow
def test_real_resumes_survive_damage_and_refuse_changed_configs(owt_small, tmp_path):
    common = ("train.max_steps=4", "train.save_interval=2", "train.eval_interval=100", "train.keep_checkpoints=3")
    base = tmp_path / "base"
    proc = run_job(base, owt_small, *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = _losses(base)
    optim = next((base / "checkpoints" / "step_00000004").glob("*optim_states.pt")).name

    # truncated to half: resume=auto names the file, resumes from step 2 and repeats the run bit for bit
    out = _copy_run(base, tmp_path, "truncated")
    _truncate_half(out / "checkpoints" / "step_00000004" / optim)
    proc = run_job(out, owt_small, *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(rf"checkpoint damaged.*step_00000004/{optim}: \d+ bytes", proc.stdout)
    assert "step_00000002 at step 2" in proc.stdout
    assert _losses(out) == {s: reference[s] for s in (3, 4)}

    # two flipped bytes: the same, and a longer train.max_steps is a change a resume allows
    out = _copy_run(base, tmp_path, "flipped")
    damaged = out / "checkpoints" / "step_00000004"
    _flip_two_bytes(damaged / optim)
    # (named explicitly: exit 2 naming the file, nothing trained)
    proc = run_job(out, owt_small, *common, f"train.resume={damaged}")
    assert proc.returncode == 2 and f"{optim}: sha256" in proc.stderr, proc.stderr[-3000:]
    assert (out / "metrics.jsonl").read_text() == ""
    proc = run_job(out, owt_small, *common, "train.max_steps=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(rf"checkpoint damaged.*step_00000004/{optim}: sha256", proc.stdout)
    assert "step_00000002 at step 2" in proc.stdout and sorted(_losses(out)) == [3, 4, 5]

    # another model.hidden_size: exit 2 naming the key
    out = _copy_run(base, tmp_path, "wider")
    proc = run_job(out, owt_small, *common, "model.hidden_size=64")
    assert proc.returncode == 2 and "model.hidden_size: differ" in proc.stderr, proc.stderr[-3000:]
    assert (out / "metrics.jsonl").read_text() == ""
