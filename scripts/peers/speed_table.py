"""bench.json (from scripts/peers/compare.sh) -> the markdown tables of docs/results/speed.md.

    .venv/bin/python scripts/peers/speed_table.py artifacts/smollm2-135m-speed/bench.json
"""

import json
import sys


def ms(case, graph):
    m = case["median_ms"].get(graph)
    return f"{m['median_ms']:.1f} ({m['p10_ms']:.1f}-{m['p90_ms']:.1f})" if m else "-"


def main(path: str) -> None:
    r = json.load(open(path))
    graphs = [g for g in ("full:plain", "skipped:plain", "full:optimized", "skipped:optimized", "peer:genai",
                          "peer:optimum") if g in r["graphs"]]
    print(f"ONNX Runtime {r['onnxruntime']}, {r['precision']}, threads: {r['threads']}; {r['method']}.")
    print(f"Load average (1, 5, 15 min): {r.get('load_average_start')} at start, {r.get('load_average_end')} at the end.\n")
    print("| phase | batch | context / tokens | " + " | ".join(graphs) + " |")
    print("|---|---:|---:|" + "---:|" * len(graphs))
    for phase in ("decode", "prefill"):
        for c in r[phase]:
            print(f"| {phase} | {c['batch']} | {c['size']} | " + " | ".join(ms(c, g) for g in graphs) + " |")
    print("\nRatios (time / time; below 1 is faster) and removal efficiency (measured saving / predicted saving):\n")
    peers = [g for g in graphs if g.startswith("peer:")]
    head = ["ours optimized / " + p[5:] for p in peers] + ["ours plain / " + p[5:] for p in peers]
    print("| phase | batch | context / tokens | " + " | ".join(head) + " | optimized / plain (full) | "
          "predicted saving | measured saving plain | efficiency plain | measured saving optimized | efficiency optimized |")
    print("|---|---:|---:|" + "---:|" * (len(head) + 6))
    for phase in ("decode", "prefill"):
        for c in r[phase]:
            cells = [f"{c.get(f'full_optimized_vs_{p}', float('nan')):.3f}" for p in peers]
            cells += [f"{c.get(f'full_plain_vs_{p}', float('nan')):.3f}" for p in peers]
            cells.append(f"{c.get('full_optimized_vs_plain', float('nan')):.3f}")
            cells.append(f"{c['plain']['predicted_saving']:.1%}")
            for v in ("plain", "optimized"):
                if v in c:
                    cells += [f"{c[v]['measured_saving']:.1%}", f"{c[v]['removal_efficiency']:.2f}"]
            print(f"| {phase} | {c['batch']} | {c['size']} | " + " | ".join(cells) + " |")
    m = r["memory"]
    print("\n| graph | KV cache bytes / token (measured) | peak RSS at context "
          f"{next(iter(m.get('peak_rss', {}).values()), {}).get('context', '-')} (MiB) | RSS after load (MiB) |")
    print("|---|---:|---:|---:|")
    for g in graphs:
        peak = m.get("peak_rss", {}).get(g, {})
        print(f"| {g} | {m['kv_bytes_per_token_measured'].get(g, '-'):,} | {peak.get('peak_rss_mb', '-')} | "
              f"{peak.get('after_load_rss_mb', '-')} |")
    print(f"\nKV reduction measured {m['kv_reduction_measured']:.1%}; attention layers removed "
          f"{m['attention_layers_removed_fraction']:.1%}; equal: {m['kv_reduction_matches_removed_fraction']}.")
    ops = r.get("graph_ops", {})
    if ops:
        kinds = sorted({k for g in graphs for k in ops.get(g, {})}, key=lambda k: -max(ops[g].get(k, 0) for g in graphs))
        print("\n| op | " + " | ".join(graphs) + " |")
        print("|---|" + "---:|" * len(graphs))
        for k in kinds:
            print(f"| {k} | " + " | ".join(str(ops.get(g, {}).get(k, 0)) for g in graphs) + " |")
        print("| (nodes) | " + " | ".join(str(sum(ops.get(g, {}).values())) for g in graphs) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
