"""`sdt-plot` draws the curves of one or several runs into a PNG."""

from __future__ import annotations

import json
import math

from sdt_dist.plot import load_run, main


def _write_run(run, scale: float, resumed_from: int | None = None) -> None:
    run.mkdir(parents=True)
    lines = []
    for step in range(1, 21):
        lines.append({"step": step, "loss": scale * 8 / step, "loss_lm": 6 / step, "loss_kd": 0.1, "loss_align": 0.9,
                      "lr": 1e-3, "tokens_per_s": 4000.0 + step, "frozen_layers": step // 8,
                      **({"val_ppl": math.exp(6 / step)} if step % 10 == 0 else {})})
    if resumed_from is not None:  # the steps after a checkpoint written again by the resumed run
        lines += [{**r, "loss": -1.0} for r in lines[resumed_from:]]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")


def test_plots_several_runs_into_one_png(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _write_run(a, 1.0)
    _write_run(b, 2.0, resumed_from=15)
    assert load_run(b)[20]["loss"] == -1.0 and load_run(b)[15]["loss"] == 2.0 * 8 / 15
    out = tmp_path / "cmp.png"
    main([str(a), str(b), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    main([str(a)])
    assert (a / "curves.png").is_file() and "wrote" in capsys.readouterr().out
