"""Two toy-world benchmark summaries side by side, concept by concept (a paired comparison).

    python benchmarks/toyworld_paired.py A.json B.json [--names seventh eighth] [--out paired.json]

A and B are summaries written by ``benchmarks/toyworld.py --summarize-only --out ...`` (for example two
models' records: ``--model <folder>`` picks the records of that model's fingerprint). For every extraction
variant in both, the concepts are paired by scene seed and ground-truth object (a concept whose mask matched
no object is left out), and the generations right (shape and colour, ``toyworld.classify``) are counted on
the shared scenes only. Pairing removes most of the scene-to-scene spread, which dominates unpaired rates
on a few scenes: the number that moves is how many objects each side draws better.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffusers_conceptexpress.atomic import atomic_file


def _rows(summary: dict, variant: str) -> tuple[set[int], dict[tuple[int, int], dict]]:
    """The variant's scenes, and its concepts by (seed, ground-truth object) where the concept matched one."""
    rows = summary["extraction"][variant].get("per_concept")
    if rows is None:
        raise SystemExit(f"{variant!r} has no per_concept rows: re-summarise with the current toyworld.py")
    return {r["seed"] for r in rows}, {(r["seed"], r["target"]): r for r in rows if r["target"] is not None}


def compare(a: dict, b: dict) -> dict:
    """Per variant present in both: shared scenes and objects, right generations of each, objects better in each."""
    out = {}
    for variant in a.get("extraction", {}):
        if variant not in b.get("extraction", {}):
            continue
        (seeds_a, ra), (seeds_b, rb) = _rows(a, variant), _rows(b, variant)
        seeds = seeds_a & seeds_b
        # the objects of the shared scenes that either side learned; one the other side missed counts 0 there
        keys = sorted({k for k in (*ra, *rb) if k[0] in seeds})
        right_a = [ra[k]["both"] if k in ra else 0 for k in keys]
        right_b = [rb[k]["both"] if k in rb else 0 for k in keys]
        images = [max(ra.get(k, {}).get("images", 0), rb.get(k, {}).get("images", 0)) for k in keys]
        out[variant] = {
            "scenes": len(seeds),
            "objects": len(keys),
            "generations": sum(images),
            "right_a": sum(right_a),
            "right_b": sum(right_b),
            "a_better": sum(x > y for x, y in zip(right_a, right_b, strict=True)),
            "b_better": sum(y > x for x, y in zip(right_a, right_b, strict=True)),
            "objects_rows": [
                {"seed": k[0], "object": k[1], "a": x, "b": y}
                for k, x, y in zip(keys, right_a, right_b, strict=True)
            ],
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--names", nargs=2, default=["A", "B"])
    p.add_argument("--out", default=None, help="write the comparison as JSON here")
    args = p.parse_args()
    result = compare(json.loads(Path(args.a).read_text()), json.loads(Path(args.b).read_text()))
    a, b = args.names
    print(
        f"| variant | scenes | objects | generations | {a}: right | {b}: right | objects {a} better | objects {b} better |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for variant, r in result.items():
        n = max(r["generations"], 1)
        print(
            f"| {variant} | {r['scenes']} | {r['objects']} | {r['generations']} | {r['right_a']} ({r['right_a'] / n:.0%}) "
            f"| {r['right_b']} ({r['right_b'] / n:.0%}) | {r['a_better']} | {r['b_better']} |"
        )
    if args.out:
        with atomic_file(Path(args.out), "w") as handle:
            handle.write(json.dumps({"a": args.a, "b": args.b, "names": args.names, **result}, indent=2))


if __name__ == "__main__":
    main()
