"""Bad input ends in a clear error, a non-finite step is skipped without touching any weight."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdt_dist.config import Config, ConfigError, check_layout, load_config
from tests.helpers import OWT, REPO, TINY, free_port, full_student_params, make_cfg, random_batch, worker_env


@pytest.mark.parametrize("plain", [False, True])
def test_non_finite_loss_skips_the_step_everywhere(single_rank, monkeypatch, plain):
    from sdt_dist.train_module import SDTrainModule
    from sdt_dist.train_step import train_step

    cfg = make_cfg("distill.ema_tau=0.5", *(["distill.lambda_kd=0", "distill.lambda_sd=0"] if plain else []))
    tm = SDTrainModule(cfg, single_rank)
    train_step(tm, [random_batch(cfg, 0)], 0)
    before = full_student_params(tm)
    teacher_before = tm.teacher.full_parameters()
    inner = tm.engine.optimizer
    steps_before = [s["step"].clone() for s in inner.state.values()]
    # LM alone (a step without teacher) or LM and KD from one fused pass: the LM term goes non-finite in both
    import sdt_dist.train_module as step_module

    real_lm_loss = step_module.fused_lm_loss
    monkeypatch.setattr(step_module, "fused_lm_loss", lambda *a, **k: real_lm_loss(*a, **k) * float("nan"))
    real_fused = step_module.lm_kd_losses
    monkeypatch.setattr(step_module, "lm_kd_losses",
                        lambda *a, **k: (lambda r: r._replace(weighted=r.weighted * float("nan"),
                                                               lm=r.lm * float("nan")))(real_fused(*a, **k)))
    res = train_step(tm, [random_batch(cfg, 1)], 1)
    assert res.skipped
    assert all(torch.equal(a, b) for a, b in zip(before, full_student_params(tm)))
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, tm.teacher.full_parameters()))
    assert all(torch.equal(a["step"], b) for a, b in zip(inner.state.values(), steps_before))
    monkeypatch.setattr(step_module, "fused_lm_loss", real_lm_loss)
    monkeypatch.setattr(step_module, "lm_kd_losses", real_fused)
    res = train_step(tm, [random_batch(cfg, 2)], 2)
    assert not res.skipped and any(not torch.equal(a, b) for a, b in zip(before, full_student_params(tm)))


def test_non_finite_gradient_with_finite_loss_skips_the_step(single_rank):
    """ZeRO-1: DeepSpeed sees the non-finite gradient norm and does not step; the teacher must not move either."""
    from sdt_dist.train_module import SDTrainModule
    from sdt_dist.train_step import train_step

    cfg = make_cfg("distill.ema_tau=0.5", "parallel.zero_stage=1", "parallel.ds_config=ds_configs/zero1.json")
    tm = SDTrainModule(cfg, single_rank)
    train_step(tm, [random_batch(cfg, 0)], 0)
    before = full_student_params(tm)
    teacher_before = tm.teacher.full_parameters()
    param = next(p for p in tm.engine.module.parameters() if p.requires_grad)
    handle = param.register_hook(lambda g: torch.full_like(g, float("inf")))
    res = train_step(tm, [random_batch(cfg, 1)], 1)
    handle.remove()
    assert res.skipped and torch.isfinite(torch.tensor(res.loss))
    assert all(torch.equal(a, b) for a, b in zip(before, full_student_params(tm)))
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, tm.teacher.full_parameters()))
    res = train_step(tm, [random_batch(cfg, 2)], 2)
    assert not res.skipped and any(not torch.equal(a, b) for a, b in zip(before, full_student_params(tm)))


_KEYS = [(section.name, f.name) for section in dataclasses.fields(Config)
         for f in dataclasses.fields(section.default_factory())]
_VALUES = st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                    st.text(max_size=8), st.none(), st.lists(st.floats(-2, 2), max_size=4))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_KEYS + [("model", "nope"), ("nosuch", "key")]), _VALUES),
                min_size=1, max_size=4), st.integers(1, 9))
def test_random_configs_load_or_fail_with_config_error(changes, world):
    overrides = [f"{s}.{k}={v!r}" if isinstance(v, str) else f"{s}.{k}={v}" for (s, k), v in changes]
    try:
        check_layout(load_config(None, TINY + overrides), world)
    except ConfigError as e:
        assert str(e).split(":")[0].strip()  # names a key
        assert "Traceback" not in str(e)


def test_bad_config_at_the_entry_point_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "launchers/pretrain_owt.py", "--config", "launchers/configs/tiny.yaml",
                           "--set", "distill.ema_tau=1.5"], cwd=REPO, env=worker_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "distill.ema_tau" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def small_prepared(tmp_path_factory):
    if not OWT.is_file():
        pytest.skip(f"{OWT} not present")
    from sdt_dist.data.prepare import prepare_corpus

    return prepare_corpus(str(OWT), tmp_path_factory.mktemp("p") / "owt", vocab_size=1024, workers=2,
                          progress=False)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["train-00000.bin", "train-00000.idx", "valid-00000.bin", "valid-00000.idx",
                        "manifest.json", "tokenizer/tokenizer.model"]),
       st.sampled_from(["truncate", "flip", "append", "delete"]), st.integers(0, 10**9))
def test_corrupted_prepared_data_is_refused_naming_the_file(small_prepared, tmp_path_factory, name, how, where):
    from sdt_dist.data.errors import DataError
    from sdt_dist.data.manifest import verify_prepared
    from sdt_dist.data.tokenizer import check_vocab

    bad = tmp_path_factory.mktemp("bad") / "owt"
    shutil.copytree(small_prepared, bad, ignore=shutil.ignore_patterns("cache"))
    target = bad / name
    data = target.read_bytes()
    if how == "truncate":
        target.write_bytes(data[: where % max(1, len(data))])
    elif how == "flip":
        i = where % len(data)
        target.write_bytes(data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:])
    elif how == "append":
        target.write_bytes(data + b"\0")
    else:
        target.unlink()
    with pytest.raises(DataError) as err:
        verify_prepared(bad)
        check_vocab(bad, 1024)
    assert name.split("/")[-1] in str(err.value) or "manifest" in str(err.value)


@pytest.mark.slow
def test_corrupted_shard_stops_every_rank_before_training(small_prepared, tmp_path):
    bad = tmp_path / "owt"
    shutil.copytree(small_prepared, bad, ignore=shutil.ignore_patterns("cache"))
    data = bytearray((bad / "train-00000.bin").read_bytes())
    data[100] ^= 0xFF
    (bad / "train-00000.bin").write_bytes(bytes(data))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "launchers/pretrain_owt.py", "--config", "launchers/configs/tiny.yaml", "--set", "data.source=null",
         "--set", f"data.prepared=[{bad}]", "--set", "model.vocab_size=1024", "--set", f"train.out_dir={tmp_path}/run"],
        cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("train-00000.bin") >= 2  # named on both ranks
    assert "rank 0: DataError" in proc.stderr and "rank 1: DataError" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


class _Payload:
    def __reduce__(self):
        return (open, ("/tmp/sdt_pwned_marker", "w"))


def test_tampered_checkpoint_pickle_is_refused_before_it_runs(tmp_path):
    import pickle

    from sdt_dist.checkpoint import refuse_unsafe_pickles

    marker = __import__("pathlib").Path("/tmp/sdt_pwned_marker")
    marker.unlink(missing_ok=True)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "mp_rank_00_model_states.pt")
    refuse_unsafe_pickles(tmp_path)  # a clean file passes
    bad = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"state": _Payload()}, bad)  # a torch.save archive whose pickle calls open()
    with pytest.raises(ValueError, match=r"io\.open"):
        refuse_unsafe_pickles(tmp_path)
    with open(bad, "wb") as f:  # a legacy raw pickle, which torch.load(weights_only=False) would execute
        pickle.dump({"state": _Payload()}, f)
    with pytest.raises(ValueError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        refuse_unsafe_pickles(tmp_path)
    assert not marker.exists()  # inspected, never executed


def test_a_stale_extension_build_lock_is_named_before_a_start_waits_on_it(tmp_path, monkeypatch, capsys):
    """A build killed midway leaves torch's lock behind; every later start would wait on it without a word."""
    import os
    import time

    from sdt_dist.parallel.dims import warn_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, building = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (stale, building):
        lock.parent.mkdir()
        lock.touch()
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert warn_stale_build_locks() == [stale]
    err = capsys.readouterr().err
    assert str(stale) in err and "60 minutes old" in err and str(building) not in err
