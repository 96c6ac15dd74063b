"""Deep LoRA's compression on deep matrix factorisation / completion (CPU, float64, seconds).

    python -m bench.deep_lora_dmf [--sizes 30 40 60] [--seed 0] [--json out.json]

Prints, per size d, the relative end-to-end gap ``||X(t) - X_full(t)||_F / ||Phi||_F`` to the
full-width run of the compressed run (paper eq. (9)), of the FusedDeepLoRALinear three-factor form
and of a random narrow factorisation of the same width, with the Prop. 2.2 bound; then the
numerical ranks and held-out errors of matrix completion (low-rank bias). With ``--json`` the
figures are also written as data.
"""

import argparse
import json

from .deep_factorization import low_rank_bias_experiment, trajectory_experiment

CHECKPOINTS = (0, 100, 200, 300, 400)


def _trajectory_rows(sizes: list[int], seed: int) -> list[dict]:
    rows = []
    for d in sizes:
        out = trajectory_experiment(d=d, seed=seed)
        row = {key: out[key] for key in ("d", "k", "r", "depth", "eps", "lr", "steps", "seed", "bound")}
        for name in ("compressed", "merged", "narrow"):
            gaps = out[f"gap_{name}"]
            row[f"max_gap_{name}"] = gaps.max().item()
            row[f"gap_{name}_at"] = {t: gaps[t].item() for t in CHECKPOINTS if t < gaps.numel()}
        for name in ("full", "compressed", "merged", "narrow"):
            row[f"final_error_{name}"] = out[f"final_error_{name}"]
        rows.append(row)
    return rows


def _completion_row(seed: int) -> dict:
    out = low_rank_bias_experiment(seed=seed)
    row = {key: out[key] for key in ("d", "k", "r", "observed", "steps", "rtol", "seed")}
    for name in ("depth1", "lora", "full", "deep_lora"):
        row[f"rank_{name}"] = out[f"rank_{name}"]
        row[f"heldout_error_{name}"] = out[f"heldout_error_{name}"]
        row[f"top_singular_values_{name}"] = [round(v, 4) for v in out[f"spectrum_{name}"][:10].tolist()]
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[30, 40, 60])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)

    trajectories = _trajectory_rows(args.sizes, args.seed)
    first = trajectories[0]
    print(
        f"Prop. 2.2, deep matrix factorisation: rank-{first['k']} target, depth {first['depth']}, "
        f"compressed width r = {first['r']}, eps = {first['eps']}, lr = {first['lr']}, {first['steps']} GD steps, float64"
    )
    print("relative gap to the full-width run, max over steps (and at steps " + ", ".join(map(str, CHECKPOINTS)) + ")")
    for row in trajectories:
        print(f"  d = {row['d']:3d}   bound sqrt(d - r) eps^L / ||Phi|| = {row['bound']:.3e}")
        for name in ("compressed", "merged", "narrow"):
            at = "  ".join(f"{v:.2e}" for v in row[f"gap_{name}_at"].values())
            print(f"    {name:10s} max {row[f'max_gap_{name}']:.3e}   [{at}]")
        print(f"    narrow / compressed max gap: {row['max_gap_narrow'] / row['max_gap_compressed']:.0f}x")
        print(
            "    final relative error to the target: "
            + ", ".join(f"{name} {row[f'final_error_{name}']:.1e}" for name in ("full", "compressed", "merged", "narrow"))
        )

    completion = _completion_row(args.seed)
    print(
        f"\nLow-rank bias, matrix completion: {completion['d']} x {completion['d']} rank-{completion['k']} target, "
        f"{completion['observed']:.0%} observed, {completion['steps']} GD steps, width {completion['r']}; "
        f"numerical rank = singular values > {completion['rtol']:g} x the largest"
    )
    for name, label in (("depth1", "depth 1 (GD on X)"), ("lora", "LoRA (depth 2)"),
                        ("full", "full width depth 3"), ("deep_lora", "Deep LoRA (compressed)")):
        print(
            f"  {label:24s} rank {completion[f'rank_{name}']:2d}   held-out error {completion[f'heldout_error_{name}']:.3f}   "
            f"top singular values {completion[f'top_singular_values_{name}'][:9]}"
        )

    figures = {"trajectory": trajectories, "completion": completion}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)
        print(f"\nwrote {args.json}")
    return figures


if __name__ == "__main__":
    main()
