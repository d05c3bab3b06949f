"""A sweep YAML parsed into variants, tables and arms (variant x seed, each a full training config).

The YAML format is `sdt_dist/eval/sweep.py`'s docstring; an arm's state (trained, evaluated) is read from its
run directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdt_dist.config import Config, ConfigError, config_from_dict, load_config
from sdt_dist.paths import expand_vars

# the training program is the package's own entry point, not a path into a checkout
DEFAULT_LAUNCHER = "{python} -m torch.distributed.run --standalone --nproc_per_node {nproc} -m sdt_dist.cli"


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    overrides: list[str] = field(default_factory=list)
    train_as: str | None = None  # reuse this variant's training runs (e.g. evaluate its EMA weights)
    weights: str = "student"


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    rows: list[str]  # variant names
    columns: list[dict[str, str]]  # {label, metric (dotted path into eval.json)}
    labels: dict[str, str] = field(default_factory=dict)  # row labels other than the variants' own
    pruning_plot: bool = False
    note: str = ""


@dataclass
class SweepSpec:
    path: Path
    base: str
    out_dir: Path
    seeds: list[int]
    variants: dict[str, Variant]
    tables: list[Table]
    eval: dict[str, Any]
    overrides: list[str] = field(default_factory=list)
    nproc: int = 1
    launcher: str = DEFAULT_LAUNCHER
    records: Path | None = None  # where each evaluated arm's result is kept beyond its run directory

    def base_config(self) -> Config:
        """The base config with the sweep-wide overrides (each arm adds its own to these)."""
        return load_config(self.base, self.overrides)


def _expand(value: Any) -> Any:
    if isinstance(value, str):
        return expand_vars(value)
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def load_spec(path: str | Path) -> SweepSpec:
    """Parse and check a sweep YAML (every arm's config is validated before anything runs)."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    known = {"base", "out_dir", "seeds", "variants", "tables", "eval", "set", "nproc", "launcher", "records"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key {unknown[0]} (valid: {', '.join(sorted(known))})")
    for key in ("base", "out_dir", "seeds", "variants", "eval"):
        if key not in raw:
            raise ConfigError(f"{path}: missing sweep key {key}")
    variants: dict[str, Variant] = {}
    for v in raw["variants"]:
        if v["name"] in variants:
            raise ConfigError(f"{path}: variant {v['name']} defined twice")
        variants[v["name"]] = Variant(v["name"], v.get("label", v["name"]), [str(o) for o in _expand(v.get("set", []))],
                                      v.get("train_as"), v.get("weights", "student"))
    for v in variants.values():
        if v.train_as is not None and (v.train_as not in variants or variants[v.train_as].train_as is not None):
            raise ConfigError(f"{path}: variant {v.name}: train_as must name a variant that trains itself")
        if v.train_as is not None and v.overrides:
            raise ConfigError(f"{path}: variant {v.name} has train_as, so it cannot have its own overrides")
        if v.weights not in ("student", "teacher"):
            raise ConfigError(f"{path}: variant {v.name}: weights must be student or teacher")
    tables = []
    for t in raw.get("tables", []):
        # a row is a variant name, or {variant, label} to show a shared arm under another name
        rows = [r if isinstance(r, str) else r["variant"] for r in t["rows"]]
        labels = {r["variant"]: r["label"] for r in t["rows"] if not isinstance(r, str)}
        tables.append(Table(t["name"], t.get("title", t["name"]), rows, t["columns"], labels,
                            t.get("pruning_plot", False), t.get("note", "")))
    for t in tables:
        missing = [r for r in t.rows if r not in variants]
        if missing:
            raise ConfigError(f"{path}: table {t.name} names unknown variant {missing[0]}")
    ev = dict(raw["eval"])
    ev["data"] = _expand(ev.get("data", []))
    if not ev["data"]:
        raise ConfigError(f"{path}: eval.data names no dataset")
    spec = SweepSpec(path=path, base=_expand(raw["base"]), out_dir=Path(_expand(raw["out_dir"])),
                     seeds=[int(s) for s in raw["seeds"]], variants=variants, tables=tables, eval=ev,
                     overrides=[str(o) for o in _expand(raw.get("set", []))], nproc=int(raw.get("nproc", 1)),
                     launcher=raw.get("launcher", DEFAULT_LAUNCHER),
                     records=Path(_expand(raw["records"])) if raw.get("records") else None)
    return spec


def run_identity(cfg: Config) -> dict[str, Any]:
    """What `cfg` trains: its dict but for where it runs (a run moved to the variant that names it now, e.g.
    the sweep arm chosen as the new default recipe, is the same run)."""
    out = cfg.to_dict()
    out["train"].pop("out_dir")
    return out


def recorded_identity(recorded: dict[str, Any] | None) -> dict[str, Any] | None:
    """run_identity of a recorded config dict, keys added since read with their legacy value or default (as a
    resumed checkpoint would); None when there is none or it is not comparable."""
    if recorded is None:
        return None
    try:
        return run_identity(config_from_dict(json.loads(json.dumps(recorded))))
    except ConfigError:  # a key that no longer exists: not comparable
        return None


def same_run(recorded: dict[str, Any] | None, cfg: Config) -> bool:
    """The recorded config trains what `cfg` trains (recorded_identity, run_identity)."""
    theirs = recorded_identity(recorded)
    return theirs is not None and theirs == run_identity(cfg)


@dataclass(frozen=True)
class Arm:
    variant: Variant
    seed: int
    train_dir: Path
    eval_dir: Path
    overrides: list[str]  # every --set of its training run
    config: Config

    @property
    def name(self) -> str:
        return f"{self.variant.name}/seed{self.seed}"

    @property
    def final_checkpoint(self) -> Path:
        return self.train_dir / "checkpoints" / f"step_{self.config.train.max_steps:08d}"

    @property
    def eval_json(self) -> Path:
        return self.eval_dir / "eval.json"

    def trained(self) -> bool:
        """The final checkpoint exists (complete: meta.json is written last) and was made by this config."""
        meta_path = self.final_checkpoint / "meta.json"
        if not meta_path.is_file() or not (self.final_checkpoint / "export" / "student.safetensors").is_file():
            return False
        meta = json.loads(meta_path.read_text())
        if meta.get("config_sha256") != self.config.sha256() and not same_run(meta.get("config"), self.config):
            raise ConfigError(f"{self.final_checkpoint} was trained with another config than arm {self.name} "
                              f"(the sweep YAML or base config changed?); delete {self.train_dir} or use another "
                              f"out_dir")
        return True

    def evaluated(self, ev: dict[str, Any]) -> bool:
        """eval.json exists, is newer than the final checkpoint (a retrained run is evaluated again), is for
        these weights, and covers the requested datasets and pruning (a grown eval section re-evaluates,
        without retraining). Call only when `trained()`."""
        meta = self.final_checkpoint / "meta.json"
        if not self.eval_json.is_file() or self.eval_json.stat().st_mtime_ns < meta.stat().st_mtime_ns:
            return False
        report = json.loads(self.eval_json.read_text())
        from sdt_dist.eval.evaluate import parse_data_arg

        names = {parse_data_arg(d)[0] for d in ev["data"]}
        return (report.get("step") == self.config.train.max_steps and report.get("weights") == self.variant.weights
                and names <= set(report["datasets"]) and set(ev.get("prune", [])) <= set(report["pruning"]["removed"]))


def arms(spec: SweepSpec, variants: list[str] | None = None, seeds: list[int] | None = None) -> list[Arm]:
    """The arms to run: variants that train, then those evaluating another's runs (train_as), each in YAML
    order; a train_as variant's training arm comes along."""
    wanted = list(spec.variants) if variants is None else variants
    needed = {spec.variants[v].train_as for v in wanted if spec.variants[v].train_as} | set(wanted)
    base_cfg = spec.base_config()  # fail early on a bad base
    data_fixed = ["data.source=null"] if base_cfg.data.source is not None else []
    out = []
    for name, v in sorted(spec.variants.items(), key=lambda item: item[1].train_as is not None):
        if name not in needed:
            continue
        trainer = spec.variants[v.train_as] if v.train_as else v
        for seed in seeds or spec.seeds:
            train_dir = spec.out_dir / trainer.name / f"seed{seed}"
            overrides = [*spec.overrides, *trainer.overrides, *data_fixed, f"train.seed={seed}",
                         f"train.out_dir={train_dir}"]
            try:
                cfg = load_config(spec.base, overrides)
            except ConfigError as e:
                raise ConfigError(f"variant {name}: {e}") from None
            out.append(Arm(v, seed, train_dir, spec.out_dir / name / f"seed{seed}" / "eval", overrides, cfg))
    return out
