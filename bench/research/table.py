"""Print bench/_work/research/results.jsonl as a Markdown table (one row per run, in order)."""
import json
import sys
from pathlib import Path

log = Path(__file__).resolve().parents[1] / "_work" / "research" / "results.jsonl"
rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
print("| dataset | recipe | seed | ACC | NMI | ARI | s |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['dataset']} | {r['recipe']} | {r['seed']} | {r['acc']:.3f} | {r['nmi']:.3f} | {r['ari']:.3f} | {r['seconds']:.0f} |")
