"""The ``coinfer experiment`` and ``coinfer report`` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from coinfer.errors import CoinferError

__all__ = ["register"]

console = Console(width=None if __import__("sys").stdout.isatty() else 160)


def _ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise CoinferError(f"{what} must be comma-separated integers, got {text!r}") from None


def experiment(
    config: Annotated[
        Path | None, typer.Argument(help="Experiment config (TOML); flags override it.")
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="digits, mnist, fashion_mnist, cifar10, or a path to a dataset.")
    ] = None,
    data_dir: Annotated[
        str | None, typer.Option(help="Directory holding <dataset>.npz (or IDX / CIFAR).")
    ] = None,
    scenario: Annotated[str | None, typer.Option(help="class-split, dirichlet or iid.")] = None,
    alpha: Annotated[float | None, typer.Option(help="Dirichlet concentration.")] = None,
    k: Annotated[int | None, typer.Option("--k", help="Number of data models.")] = None,
    r: Annotated[int | None, typer.Option("--r", help="Number of coded models.")] = None,
    arch: Annotated[str | None, typer.Option(help="mlp, lenet5, resnet20 or package.module:factory.")] = None,
    base_epochs: Annotated[int | None, typer.Option(help="Epochs of the base model.")] = None,
    finetune_epochs: Annotated[int | None, typer.Option(help="Epochs of each fine-tuned copy.")] = None,
    methods: Annotated[str | None, typer.Option(help="Comma-separated method families.")] = None,
    calibration_sizes: Annotated[str | None, typer.Option(help="Comma-separated calibration sizes.")] = None,
    distill_epochs: Annotated[str | None, typer.Option(help="Comma-separated distillation epochs.")] = None,
    seeds: Annotated[str | None, typer.Option(help="Comma-separated seeds, e.g. 0,1,2.")] = None,
    train_limit: Annotated[int | None, typer.Option(help="Keep the first N training samples.")] = None,
    test_limit: Annotated[int | None, typer.Option(help="Keep the first N test samples.")] = None,
    name: Annotated[str | None, typer.Option(help="Run name (directory under --out).")] = None,
    out: Annotated[str | None, typer.Option(help="Output directory for runs.")] = None,
    cache_dir: Annotated[str | None, typer.Option(help="Cache directory of trained models.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    list_methods: Annotated[
        bool, typer.Option("--list-methods", help="List method families and exit.")
    ] = False,
) -> None:
    """Train k models from a common init, encode parities with every method, evaluate every erasure."""
    from coinfer.experiments.config import ExperimentConfig, TrainConfig, config_from_dict, load_config
    from coinfer.experiments.presets import PRESETS
    from coinfer.experiments.report import summary_rows

    if list_methods:
        for m, p in PRESETS.items():
            console.print(f"[bold]{m}[/]: {p.description}")
        return
    overrides = {
        "dataset": dataset,
        "data_dir": data_dir,
        "scenario": scenario,
        "alpha": alpha,
        "k": k,
        "r": r,
        "arch": arch,
        "methods": [m.strip() for m in methods.split(",") if m.strip()] if methods else None,
        "calibration_sizes": _ints(calibration_sizes, "--calibration-sizes"),
        "distill_epochs": _ints(distill_epochs, "--distill-epochs"),
        "seeds": _ints(seeds, "--seeds"),
        "train_limit": train_limit,
        "test_limit": test_limit,
        "name": name,
        "out_dir": out,
        "cache_dir": cache_dir,
        "threads": threads,
    }
    cfg: ExperimentConfig = load_config(config, **overrides) if config else config_from_dict({}, **overrides)
    if base_epochs is not None:
        cfg.base = TrainConfig(**{**cfg.base.__dict__, "epochs": base_epochs})
    if finetune_epochs is not None:
        cfg.finetune = TrainConfig(**{**cfg.finetune.__dict__, "epochs": finetune_epochs})
    from coinfer.experiments.run import run_experiment

    def show(res: dict) -> None:
        accs = ", ".join(f"{m['task_test_acc']:.4f}" for m in res["models"])
        console.print(
            f"[bold]{res['dataset']} {res['arch']['name']} {res['scenario']} k={res['k']} r={res['r']} "
            f"seed {res['seed']}[/]: own-task test acc {accs}; base {res['base_model']['test_acc']:.4f}; "
            f"{res['seconds']:.0f}s -> {res['run_dir']}"
        )

    results = run_experiment(cfg, progress=progress, on_result=show)
    t = Table(
        "method",
        "chosen on val",
        "recon acc",
        "recon acc (task)",
        "decoded task acc",
        "own task acc",
        "TV",
        "build s",
        "parity cost",
        title=f"{cfg.name}: test metrics, mean over seeds {cfg.seeds}",
    )
    for row in sorted(summary_rows(results), key=lambda x: -x["reconstruction_acc"]):
        t.add_row(
            row["family"],
            row["label"],
            f"{row['reconstruction_acc']:.4f}",
            f"{row['reconstruction_acc_task']:.4f}",
            f"{row['decoded_task_acc']:.4f}",
            f"{row['own_task_acc']:.4f}",
            f"{row['tv']:.3f}",
            f"{row['seconds']:.2f}",
            f"{row['parity_cost']:.2f}",
        )
    console.print(t)


def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories or results.json files.")],
    out: Annotated[Path, typer.Option(help="Where to write report.md, summary.csv and PNGs.")] = Path(
        "runs/report"
    ),
) -> None:
    """Aggregate runs over seeds (mean ± std) into a markdown table and plots."""
    from coinfer.experiments.report import write_report

    res = write_report(run_dirs, out)
    console.print(res["markdown"], markup=False, highlight=False)
    console.print(f"wrote {res['files']['markdown']}, {res['files']['csv']}, {res['files']['accuracy']}")
    for f in res["files"]["frontier"]:
        console.print(f"wrote {f}")


def register(app: typer.Typer) -> None:
    """Add ``experiment`` and ``report`` to the ``coinfer`` app."""
    app.command()(experiment)
    app.command()(report)
