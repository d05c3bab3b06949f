"""Real processes per layout (tests/workers/recompute_memory.py): recompute (model.recompute) changes neither
losses nor gradients under TP and PP, and sdt-plan's steady-state peak is the measured one within 15%."""

import pytest

from sdt_dist.plan.inventory import parameter_inventory
from sdt_dist.plan.memory import plan_layout, run_layout, run_precision
from tests.helpers import make_cfg, read_json, run_ranks

pytestmark = pytest.mark.slow

# tens of MiB of model states and activations per rank, so that the process's own memory is noise
BASE = ["model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=4", "model.vocab_size=8192",
        "model.seq_length=128", "train.micro_batch_size=4", "train.global_batch_size=8", "model.dropout=0",
        "distill.layerdrop_p=0", "model.tie_embeddings=false"]
ALL_MODES = "none,selective,full"
LAYOUTS = {  # name -> (ranks, recompute modes, overrides)
    "zero1": (1, ALL_MODES, ["train.global_batch_size=4"]),
    "zero0_accumulating": (1, "none", ["parallel.zero_stage=0"]),
    "zero3_wide": (1, "none", ["parallel.zero_stage=3", "model.hidden_size=384", "model.vocab_size=4096",
                               "train.global_batch_size=4"]),
    "zero3_dp2": (2, "none", ["parallel.zero_stage=3"]),
    "tp2": (2, ALL_MODES, ["parallel.tensor=2"]),
    "pp2": (2, ALL_MODES, ["parallel.pipeline=2"]),
}


class Runs(dict):
    """Layout name -> what its worker recorded; each layout runs once, when a test first asks for it."""

    def __init__(self, root) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> dict:
        nproc, modes, overrides = LAYOUTS[name]
        path = self.root / f"{name}.json"
        run_ranks(nproc, "recompute_memory.py", str(path), modes, *BASE, *overrides)
        self[name] = read_json(path)
        return self[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("recompute_memory"))


@pytest.mark.parametrize("name", ["tp2", "pp2"])
def test_recompute_gives_the_same_losses_and_gradients(runs, name):
    for rank in runs[name]["ranks"]:
        modes = rank["modes"]
        ref = modes["none"]
        for mode in ("selective", "full"):
            got = modes[mode]
            assert got["losses"] == pytest.approx(ref["losses"], rel=1e-6, abs=0), (rank["rank"], mode)
            assert got["numel"] == ref["numel"] > 0
            assert got["grads_equal"] or got["grads_rel"] <= 1e-6, (rank["rank"], mode, got["grads_rel"])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_plan_steady_peak_is_the_measured_peak(runs, name):
    nproc, modes, overrides = LAYOUTS[name]
    res = runs[name]
    for mode in modes.split(","):
        cfg = make_cfg(*BASE, *overrides, f"model.recompute={mode}")
        layout = run_layout(cfg, nproc)
        stages = plan_layout(cfg, parameter_inventory(cfg), layout,
                             run_precision(cfg, layout.dp, "cpu"))
        for rank in res["ranks"]:
            planned, measured = stages[rank["pp_rank"]].steady_peak, rank["modes"][mode]["peak"]
            print(f"{name} {mode} rank {rank['rank']}: plan {planned / 2**20:.1f} MiB, "
                  f"measured {measured / 2**20:.1f} MiB")
            assert abs(planned - measured) <= 0.15 * measured, (name, mode, rank["rank"], planned, measured)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_plan_model_states_are_the_engine_bytes(runs, name):
    """sdt-plan's exact terms (parameters, fp32 masters, Adam moments, teacher shard) are the bytes each rank's
    engine holds, on these wider configs too (test_parallel.py checks the tiny one), in every recompute mode."""
    nproc, modes, overrides = LAYOUTS[name]
    res = runs[name]
    for mode in modes.split(","):
        cfg = make_cfg(*BASE, *overrides, f"model.recompute={mode}")
        layout = run_layout(cfg, nproc)
        stages = plan_layout(cfg, parameter_inventory(cfg), layout, run_precision(cfg, layout.dp))
        for rank in res["ranks"]:
            got = rank["modes"][mode]["engine_bytes"]
            assert got == stages[rank["pp_rank"]].exact, (name, mode, rank["rank"])
            assert got["optimizer_state"] > 0
