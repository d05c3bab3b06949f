"""One-off, kept for provenance: the records of the sweep arms whose run directories were lost with a machine
(2026-12-05), rebuilt from the aggregate committed in d912779 (docs/results/tables_v2_partial.json; runs
trained at abff837). Per seed: the table metrics and pruning curve; a learning curve only where that
aggregate held one seed (points averaged with another seed's partial run left out), else the variant's mean
and std as curve_group.json. It ran at commit 0f1dea9, against that commit's paper.yaml (run it from a
checkout of 0f1dea9); e9748e4 then moved the records to the variants that name their configs today
(selfdistil_t -> paper_schedule, no_freeze -> with_layerdrop, no_layerdrop -> with_freeze, the other
ablations of that recipe -> *_paper_schedule):
    PYTHONPATH=. python docs/results/paper_runs/reconstruct_d912779.py
"""
import json
import subprocess
from pathlib import Path

from sdt_dist.eval.sweep_spec import arms, load_spec

spec = load_spec("launchers/configs/sweeps/paper.yaml")
agg = json.loads(subprocess.check_output(["git", "show", "d912779:docs/results/tables_v2_partial.json"]))
evals = {}
for tname, table in agg["tables"].items():
    for name, row in table["rows"].items():
        for col in row["columns"].values():
            assert len(col["values"]) == len(row["seeds"]), (tname, name)
            for seed, v in zip(row["seeds"], col["values"]):
                node = evals.setdefault((name, seed), {})
                *parents, leaf = col["metric"].split(".")
                for p in parents:
                    node = node.setdefault(p, {})
                assert node.get(leaf, v) == v
                node[leaf] = v
        for seed, pr in zip(row["seeds"], row["pruning"]):
            evals[(name, seed)]["pruning"] = pr
curves = {}
for rows in agg["learning_curves"].values():
    for name, c in rows.items():
        curves.setdefault(name, c)
out = Path("docs/results/paper_runs")
src = "reconstructed from docs/results/tables_v2_partial.json (d912779): the run directory was lost"
for (name, seed), ev in sorted(evals.items()):
    (arm,) = [a for a in arms(spec, [name], [seed]) if a.variant.name == name]
    ev.update({"step": arm.config.train.max_steps, "weights": arm.variant.weights})
    c = curves.get(name)
    nseeds = len([s for (n, s) in evals if n == name])
    curve = []
    if c and arm.variant.train_as is None and nseeds == 1:
        # points averaged with a partial run of another seed are left out
        curve = [[t // (arm.config.train.global_batch_size * arm.config.model.seq_length), p]
                 for t, p, n in zip(c["tokens"], c["ppl_mean"], c["seeds"]) if n == 1]
    rec = {"variant": name, "seed": seed, "weights": arm.variant.weights, "config": arm.config.to_dict(),
           "eval": ev, "curve": curve, "source": src}
    (out / name).mkdir(parents=True, exist_ok=True)
    (out / name / f"seed{seed}.json").write_text(json.dumps(rec, indent=1) + "\n")
for name, c in curves.items():
    seeds = sorted(s for (n, s) in evals if n == name)
    if len(seeds) > 1 and spec.variants[name].train_as is None:
        assert c["seeds"] == [len(seeds)] * len(c["seeds"]), (name, c["seeds"])
        (arm,) = [a for a in arms(spec, [name], [seeds[0]]) if a.variant.name == name]
        tps = arm.config.train.global_batch_size * arm.config.model.seq_length
        g = {"config": arm.config.to_dict(), "seeds": seeds, "steps": [t // tps for t in c["tokens"]],
             "ppl_mean": c["ppl_mean"], "ppl_std": c["ppl_std"], "source": src}
        (out / name / "curve_group.json").write_text(json.dumps(g, indent=1) + "\n")
print(sorted(str(p) for p in out.rglob("*.json")))
