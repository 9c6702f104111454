"""What the default demo's clipping buys: the built-in ``demo`` config with and without the callback, and without
spikes.

Runs ``lightning-clip fit`` (the built-in ``demo`` config: Adam at lr 0.01 on the mnist1d MLP, 100x the loss every
100th step) three times through the same LightningCLI, and prints the final validation loss and accuracy of each:

    python examples/demo_effect.py            # 3 runs x 10 epochs, about 40 s on 2 CPU cores
    python examples/demo_effect.py --epochs 3 # shorter
"""

from __future__ import annotations

import argparse
import tempfile
import time

from lightning_clip.cli import build_cli, builtin_configs

RUNS = {
    "spikes, adaptive clipping (the demo)": [],
    "spikes, no clipping": ["--trainer.callbacks=null"],
    "no spikes, adaptive clipping": ["--model.spike_every=0"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in RUNS.items():
            cli = build_cli(
                [
                    "fit",
                    "--config",
                    str(builtin_configs()["demo"]),
                    f"--trainer.max_epochs={args.epochs}",
                    "--trainer.enable_progress_bar=false",
                    "--trainer.enable_model_summary=false",
                    f"--trainer.default_root_dir={tmp}",
                    f"--trainer.logger.init_args.save_dir={tmp}",
                    *extra,
                ]
            )
            m = cli.trainer.callback_metrics
            rows.append((name, float(m["val/loss"]), float(m["val/acc"])))
    print(f"\n| run ({args.epochs} epochs, seed 0) | val loss | val accuracy |\n| --- | --- | --- |")
    for name, loss, acc in rows:
        print(f"| {name} | {loss:.3f} | {acc:.3f} |")
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
