"""Predicted per-GPU efficiency of data-parallel training past the GPUs we can measure on.

For each preset and ZeRO stage: the bytes each GPU sends per optimizer step (ring collectives
move (N - 1) / N of the buffer per GPU), the time that takes at the slowest link on the ring
(NVLink inside a host of 8, 400 Gb/s InfiniBand per GPU across hosts), and the step's compute
time at the single-GPU MFU. The part of communication not hidden behind compute (1 - overlap)
is added to the step:

    efficiency(N) = compute / (compute + (1 - overlap) * communication(N))

Volumes per GPU per optimizer step, P parameters, bf16 (2 bytes), A accumulation steps:
    ZeRO-1  reduce-scatter gradients once, all-gather parameters once:   2 * 2P
    ZeRO-2  gradients reduce-scattered every micro-step, one all-gather: (A + 1) * 2P
    ZeRO-3  parameters all-gathered in forward and backward, gradients
            reduce-scattered, every micro-step:                          3A * 2P
(each times (N - 1) / N). Latency (a ring's steps grow with N) and hierarchical all-reduce across
hosts are left out: both matter most for small models on many hosts. `--measured` calibrates the overlap from a measured 2-GPU efficiency,
so the prediction at 2 GPUs equals the measurement and the other points follow from it.

    python -m tools.scaling_model --presets 125m,350m,1b,3b --plot benchmarks/results/scaling.png
    python -m tools.scaling_model --presets 350m --stages 2 --measured 1.0   # calibrated on 2 H100s
"""
import argparse
import json

from foldscale.config import ModelConfig

NVLINK_GBS = 360.0
"""Ring bus bandwidth per GPU inside one H100 host (NVLink 4, NCCL without NVLS); an assumption."""
IB_GBS = 45.0
"""400 Gb/s = 50 GB/s per GPU, about 90% of it reached by NCCL across hosts; an assumption."""


def volume_bytes(params: int, stage: int, accum: int, n_gpus: int) -> float:
    """Bytes each GPU sends per optimizer step under ZeRO `stage` (see the module docstring)."""
    buffers = {1: 2, 2: accum + 1, 3: 3 * accum}[stage]
    return buffers * 2 * params * (n_gpus - 1) / n_gpus


def bandwidth_gbs(n_gpus: int, gpus_per_host: int, nvlink_gbs: float, ib_gbs: float) -> float:
    """The slowest link on the ring: NVLink within one host, InfiniBand once the ring leaves it."""
    return nvlink_gbs if n_gpus <= gpus_per_host else ib_gbs


def predict(cfg: ModelConfig, stage: int, n_gpus: int, args) -> dict:
    compute_s = args.tokens * args.accum * cfg.flops_per_token() / (args.mfu * args.peak_tflops * 1e12)
    bw = bandwidth_gbs(n_gpus, args.gpus_per_host, args.nvlink_gbs, args.ib_gbs)
    comm_s = volume_bytes(cfg.num_params(), stage, args.accum, n_gpus) / (bw * 1e9)
    return {"gpus": n_gpus, "zero": stage, "volume_gb": volume_bytes(cfg.num_params(), stage, args.accum, n_gpus) / 1e9,
            "link_gbs": bw, "compute_ms": 1e3 * compute_s, "comm_ms": 1e3 * comm_s,
            "efficiency_no_overlap": compute_s / (compute_s + comm_s)}


def calibrated_overlap(row: dict, measured: float) -> float:
    """The overlap that makes the 2-GPU prediction equal the measured efficiency (clamped to [0, 1])."""
    exposed_ms = row["compute_ms"] / measured - row["compute_ms"]
    return min(1.0, max(0.0, 1 - exposed_ms / row["comm_ms"])) if row["comm_ms"] else 1.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="125m,350m,1b,3b")
    p.add_argument("--stages", default="1,2,3")
    p.add_argument("--gpus", default="2,8,64,512")
    p.add_argument("--tokens", type=int, default=32768, help="tokens per GPU per micro-step")
    p.add_argument("--accum", type=int, default=4, help="gradient accumulation steps")
    p.add_argument("--mfu", type=float, default=0.5, help="single-GPU MFU (50-62%% measured on one H100)")
    p.add_argument("--peak-tflops", type=float, default=800.0)
    p.add_argument("--gpus-per-host", type=int, default=8)
    p.add_argument("--nvlink-gbs", type=float, default=NVLINK_GBS)
    p.add_argument("--ib-gbs", type=float, default=IB_GBS)
    p.add_argument("--overlap", type=float, default=0.0, help="fraction of communication hidden behind compute")
    p.add_argument("--measured", type=float, help="measured 2-GPU per-GPU efficiency: calibrates --overlap")
    p.add_argument("--json")
    p.add_argument("--plot")
    args = p.parse_args(argv)
    rows = []
    for preset in args.presets.split(","):
        cfg = ModelConfig.load(preset)
        for stage in map(int, args.stages.split(",")):
            overlap = args.overlap
            if args.measured is not None:
                overlap = calibrated_overlap(predict(cfg, stage, 2, args), args.measured)
            for n in map(int, args.gpus.split(",")):
                row = {"preset": preset, **predict(cfg, stage, n, args), "overlap": overlap}
                exposed = (1 - overlap) * row["comm_ms"]
                row["efficiency"] = row["compute_ms"] / (row["compute_ms"] + exposed)
                rows.append(row)
    columns = ["preset", "zero", "gpus", "volume_gb", "link_gbs", "compute_ms", "comm_ms", "overlap",
               "efficiency_no_overlap", "efficiency"]
    print(" | ".join(columns))
    for r in rows:
        print(" | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in columns))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in dict.fromkeys((r["preset"], r["zero"]) for r in rows):
            pts = [r for r in rows if (r["preset"], r["zero"]) == key]
            ax.plot([r["gpus"] for r in pts], [r["efficiency"] for r in pts], marker="o", label=f"{key[0]} ZeRO-{key[1]}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs")
        ax.set_ylabel("predicted per-GPU efficiency")
        ax.axhline(0.95, color="grey", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        ax.set_title(f"{args.tokens} tokens x {args.accum} per GPU-step, MFU {args.mfu:.0%}, "
                     f"NVLink {args.nvlink_gbs:g} / IB {args.ib_gbs:g} GB/s")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    return rows


if __name__ == "__main__":
    main()
