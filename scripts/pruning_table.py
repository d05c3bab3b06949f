"""Print a table's pruning degradation (% perplexity increase after removing k layers) from a sweep's
tables JSON, as a markdown table: mean ± sample std over seeds.

  python scripts/pruning_table.py docs/results/table1.json table1
"""

from __future__ import annotations

import json
import statistics
import sys


def main(path: str, table: str) -> None:
    rows = json.load(open(path))[table]["rows"]
    ks = sorted({k for row in rows.values() for p in row.get("pruning", []) for k in p["increase_pct"]
                 if k != "0"}, key=int)
    print("| variant | seeds | " + " | ".join(f"ppl +% ({k} removed)" for k in ks) + " |")
    print("|---|---|" + "---|" * len(ks))
    for row in rows.values():
        cells = []
        for k in ks:
            values = [p["increase_pct"][k] for p in row.get("pruning", []) if k in p["increase_pct"]]
            sd = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.2f}{sd}" if values else "-")
        print(f"| {row['label']} | {len(row.get('pruning', []))} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
