"""The ``coinfer`` command line.

Errors on bad input print one line and exit 1; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Annotated

import click
import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from coinfer.cli_help import MAX_CONDITION_HELP, TRUST_CODE_HELP
from coinfer.errors import CoinferError

app = typer.Typer(
    name="coinfer",
    help="Erasure-coded neural network inference: encode parity models (COIN), inspect, predict, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
#: ``inspect`` shows the condition numbers of at most this many erasure patterns.
INSPECT_PATTERNS = 32


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    """Erasure-coded neural network inference."""


def load_array(path: Path, key: str | None = None) -> np.ndarray:
    """Load a ``.npy`` array or one array of a ``.npz`` (``key``, else ``x``, else the only one)."""
    if not path.exists():
        raise CoinferError(f"input file {path} does not exist")
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:
                names = list(z.files)
                if key is None:
                    key = "x" if "x" in names else names[0] if len(names) == 1 else None
                if key is None or key not in names:
                    raise CoinferError(f"{path} holds arrays {names}; choose one with --key")
                return z[key]
        return np.load(path, allow_pickle=False)
    except CoinferError:
        raise
    except Exception as exc:
        raise CoinferError(f"cannot read {path} as .npy/.npz: {exc}") from None


def _parse_indices(text: str | None, n: int, what: str) -> list[int]:
    if not text:
        return []
    out = []
    for tok in text.split(","):
        tok = tok.strip()
        if not tok.lstrip("-").isdigit():
            raise CoinferError(f"{what} must be comma-separated worker indices, got {tok!r}")
        i = int(tok)
        if not 0 <= i < n:
            raise CoinferError(f"{what}: index {i} is out of range 0..{n - 1}")
        out.append(i)
    return sorted(set(out))


def _parse_options(pairs: list[str]) -> dict:
    opts = {}
    for p in pairs:
        if "=" not in p:
            raise CoinferError(f"--option expects key=value, got {p!r}")
        k, v = p.split("=", 1)
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    return opts


@app.command()
def encode(
    model: Annotated[
        list[Path],
        typer.Option("--model", "-m", help="Data model checkpoint (.safetensors); repeat k times, in order."),
    ],
    arch: Annotated[
        str, typer.Option(help="Architecture: mlp, lenet5, resnet20, or package.module:factory.")
    ],
    calibration: Annotated[
        Path, typer.Option(help="Calibration inputs: .npy (N, *input_shape) float, or .npz.")
    ],
    out: Annotated[Path, typer.Option(help="Bundle directory to write.")],
    arch_kwargs: Annotated[str, typer.Option(help="Architecture kwargs as JSON.")] = "{}",
    r: Annotated[int, typer.Option("--r", help="Number of coded (parity) models.")] = 1,
    method: Annotated[str, typer.Option(help="Encoder: heads (default), coin, average, distill.")] = "heads",
    estimator: Annotated[
        str, typer.Option(help="Fisher estimator for coin and heads: exact, sampled, empirical.")
    ] = "exact",
    samples: Annotated[int | None, typer.Option(help="Calibration samples used (default all).")] = None,
    normalize: Annotated[bool, typer.Option(help="Normalise each model's Fisher to the same total.")] = False,
    key: Annotated[str | None, typer.Option(help="Array name inside a calibration .npz.")] = None,
    labels_key: Annotated[
        str | None, typer.Option(help="Labels array in the .npz (for the empirical Fisher).")
    ] = None,
    weights: Annotated[str | None, typer.Option(help="Parity weights W as a JSON (r, k) list.")] = None,
    class_names: Annotated[str | None, typer.Option(help="Comma-separated class names.")] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(help="Extra encoder option key=value (JSON value); repeatable."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing bundle at --out (otherwise refused).")
    ] = False,
    max_condition: Annotated[
        float | None,
        typer.Option(help="Largest decoding condition number of the code (default 1e6, at most 1e12)."),
    ] = None,
) -> None:
    """Encode k model checkpoints into a bundle with r coded models.

    --arch is code you name yourself: a package.module:factory is imported and called."""
    from coinfer.bundle import Bundle, bundle_lock, check_save_target, load_model
    from coinfer.code import DEFAULT_MAX_CONDITION, Code
    from coinfer.encoders import encode as _encode

    with bundle_lock(out, shared=True):
        check_save_target(out, overwrite)  # before any work

    try:
        kwargs = json.loads(arch_kwargs)
    except json.JSONDecodeError as exc:
        raise CoinferError(f"--arch-kwargs is not valid JSON: {exc}") from None
    spec = {"name": arch, "kwargs": kwargs}
    for p in model:
        if not p.exists():
            raise CoinferError(f"model checkpoint {p} does not exist")
    # the architecture is the one the user typed, not one read from a file: trusted
    models = [load_model(spec, p, trust_code=True) for p in model]
    x = torch.from_numpy(np.asarray(load_array(calibration, key), dtype=np.float32))
    calib: object = x
    if labels_key:
        y = torch.from_numpy(np.asarray(load_array(calibration, labels_key), dtype=np.int64))
        calib = (x, y)
    w = json.loads(weights) if weights else None
    code = Code(len(models), r, w, max_condition=max_condition or DEFAULT_MAX_CONDITION)
    opts = _parse_options(option or [])
    if method in ("coin", "heads"):
        opts = {
            "estimator": estimator,
            "num_samples": samples,
            "normalize": normalize,
            "progress": True,
            **opts,
        }
    elif samples is not None:
        x = x[:samples]
        calib = x if not isinstance(calib, tuple) else (x, calib[1][:samples])
    coded = _encode(models, code, calib, method=method, **opts)
    names = class_names.split(",") if class_names else None
    bundle = Bundle(spec, code, models, list(coded), tuple(x.shape[1:]), names, coded.info)
    path = bundle.save(out, overwrite=overwrite)
    console.print(
        f"wrote bundle [bold]{path}[/] (k={code.k}, r={code.r}, method={method}, {coded.info['seconds']:.2f}s)"
    )
    if "fisher_totals" in coded.info:
        console.print(
            "Fisher totals per model: " + ", ".join(f"{t:.4g}" for t in coded.info["fisher_totals"])
        )
    info = coded.info
    if method == "heads":
        console.print(f"heads: split {info['split']}, ridge alpha {info['alpha']}")
    figures = [f"parity cost {info['parity_cost']:.3f}x one data model's FLOPs"]
    if info.get("heldout_recon") is not None:
        figures.append(f"held-out reconstruction {info['heldout_recon']:.3f}")
    figures.append(f"reconstruction on the calibration inputs {info['calibration_recon']:.3f}")
    console.print("; ".join(figures))


def _num(value: float, spec: str = ".4g") -> str:
    """A manifest number for display (a 400-digit integer from a hostile manifest
    does not fit a float: shown as too large, not a traceback)."""
    try:
        return format(float(value), spec)
    except OverflowError:
        return "(too large)"


@app.command()
def inspect(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    max_condition: Annotated[float | None, typer.Option(help=MAX_CONDITION_HELP)] = None,
) -> None:
    """Show a bundle's manifest, code, condition numbers and hash checks (builds no model, runs no code)."""
    from coinfer.architectures import is_registered
    from coinfer.bundle import Bundle

    manifest = Bundle.read_manifest(bundle)
    arch, code = Bundle.check_manifest(manifest, bundle / "manifest.json", max_condition)
    console.print(f"[bold]{bundle}[/]  format v{manifest['format_version']}")
    trust = "registered" if is_registered(arch) else "code: loading it needs --trust-code"
    console.print(f"architecture: {arch}  ({trust})")
    console.print(f"input shape: {manifest['input_shape']}   classes: {manifest.get('class_names')}")
    enc = manifest.get("encoder") or {}
    console.print(f"encoder: {enc.get('method')}  options: {enc.get('options')}")
    totals = enc.get("fisher_totals")
    if isinstance(totals, list) and all(isinstance(t, int | float) for t in totals):
        console.print("Fisher totals: " + ", ".join(_num(t) for t in totals))
    console.print(f"code: k={code.k} r={code.r} n={code.n}  W={np.round(code.weights, 4).tolist()}")
    for j in range(code.r):
        st = Bundle.parity_structure(manifest, code.k + j, code)
        if st is None:
            console.print(f"parity {j}: the architecture itself (parity cost 1.0)")
        else:
            cost = st.get("parity_cost")
            cost_s = _num(cost, ".3f") if isinstance(cost, int | float) else "unknown"
            console.print(
                f"parity {j}: {st['kind']} — trunk {st.get('trunk')}, split {st['split']!r}, "
                f"heads of models {st['members']}, weights {np.round(st['weights'], 4).tolist()}, "
                f"parity cost {cost_s} (as recorded by the encoder)"
            )
    sampled = "all" if code.patterns_checked == code.patterns_total else "a seeded sample"
    console.print(
        f"decoding matrices checked: {code.patterns_checked} of {code.patterns_total} ({sampled}), "
        f"worst condition number {code.worst_condition:.3g} <= max_condition {code.max_condition:.3g}"
    )
    total = code.count_erasure_patterns()
    t = Table("erased workers", "condition number")
    for pat in itertools.islice(code.iter_erasure_patterns(), INSPECT_PATTERNS):
        t.add_row(str(list(pat)), f"{code.condition_number(pat):.3g}")
    console.print(t)
    if total > INSPECT_PATTERNS:
        console.print(f"showing the first {INSPECT_PATTERNS} of {total} erasure patterns")
    checks = Bundle.check_files(bundle, manifest)
    h = Table("file", "sha256", "ok")
    for name, ok in checks.items():
        h.add_row(name, manifest["files"][name][:16] + "…", "[green]ok[/]" if ok else "[red]MISMATCH[/]")
    console.print(h)
    if not all(checks.values()):
        bad = [n for n, ok in checks.items() if not ok]
        raise CoinferError(f"hash check failed for {bad}")


@app.command()
def predict(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    input: Annotated[
        Path,
        typer.Option("--input", "-i", help="Inputs: .npy/.npz of (B, *input_shape) or one sample."),
    ],
    missing: Annotated[
        str | None,
        typer.Option(help="Comma-separated worker indices to treat as erased, e.g. 0,2."),
    ] = None,
    key: Annotated[str | None, typer.Option(help="Array name inside an .npz.")] = None,
    project: Annotated[
        bool, typer.Option(help="Project decoded outputs onto the probability simplex.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON with full probabilities.")] = False,
    trust_code: Annotated[bool, typer.Option("--trust-code", help=TRUST_CODE_HELP)] = False,
    max_condition: Annotated[float | None, typer.Option(help=MAX_CONDITION_HELP)] = None,
) -> None:
    """Run every model of a bundle, decoding the outputs of missing workers."""
    from coinfer.bundle import Bundle

    b = Bundle.load(bundle, trust_code=trust_code, max_condition=max_condition)
    x = np.asarray(load_array(input, key))
    if tuple(x.shape) == b.input_shape:
        x = x[None]
    if tuple(x.shape[1:]) != b.input_shape:
        raise CoinferError(
            f"input has shape {tuple(x.shape)}, expected (B, {', '.join(map(str, b.input_shape))})"
        )
    xt = torch.from_numpy(x.astype(np.float32))
    if not torch.isfinite(xt).all():
        raise CoinferError("input contains NaN or inf")
    erased = _parse_indices(missing, b.n, "--missing")
    outs = b.predict(xt, [i for i in range(b.n) if i not in erased])
    dec = b.code.decode(outs, project=project)
    names = b.class_names or [str(c) for c in range(dec.shape[-1])]
    result = []
    for j in range(b.code.k):
        top = dec[j].argmax(-1).tolist()
        result.append(
            {
                "model": j,
                "reconstructed": j in erased,
                "top1": top,
                "labels": [names[t] for t in top],
                "probabilities": dec[j].tolist(),
            }
        )
    if as_json:
        print(json.dumps({"erased": erased, "outputs": result}))
        return
    t = Table("model", "reconstructed", "top-1 per input")
    for r_ in result:
        t.add_row(str(r_["model"]), "yes" if r_["reconstructed"] else "no", " ".join(r_["labels"][:20]))
    console.print(t)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where to write the demo bundle.")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    serve: Annotated[
        bool,
        typer.Option(
            "--serve/--no-serve",
            help="After encoding, serve the bundle on local Ray and compare coded vs uncoded under stragglers.",
        ),
    ] = True,
) -> None:
    """Train k=2 models on bundled digits, encode heads, COIN and average parities, evaluate
    erasures, then serve the heads bundle on local Ray under injected stragglers and a killed worker."""
    from coinfer.experiments.demo import run_demo

    console.print("[bold]coinfer demo[/]: digits (scikit-learn), k=2 class-split models, r=1 parity")
    res = run_demo(out, seed=seed, progress=True)
    t = Table(
        "model",
        "classes",
        "own task acc",
        "method",
        "decoded task acc",
        "reconstruction acc",
        "TV to true",
        "build s",
        "parity cost",
    )
    for name, m in res["methods"].items():
        for row in m["rows"]:
            j = row["erased"]
            info = res["models"][j]
            t.add_row(
                str(j),
                ",".join(map(str, info["classes"])),
                f"{info['task_acc']:.3f}",
                name,
                f"{row['decoded_task_acc']:.3f}",
                f"{row['reconstruction_acc']:.3f}",
                f"{row['tv']:.3f}",
                f"{m.get('build_seconds', 0.0):.2f}",
                f"{m.get('parity_cost', 1.0):.2f}",
            )
    console.print(t)
    tv = ", ".join(f"{n}: {m['coded_tv'][0]:.3f}" for n, m in res["methods"].items())
    console.print(f"coded model's mean TV to the target mixture: {tv}")
    console.print(f"bundle: {res['bundle']}   ({res['seconds']:.1f}s)")
    if serve:
        _demo_serve(res["bundle"], seed)


def _demo_serve(bundle: str, seed: int) -> None:
    from coinfer.experiments.data import class_split, load_digits
    from coinfer.serving.demo import serve_demo

    ds = load_digits(seed=seed)
    console.print("\n[bold]serving[/]: the bundle on local Ray, requests through the HTTP API")
    out = serve_demo(
        bundle,
        ds.x_test.numpy(),
        ds.y_test.numpy(),
        class_split(ds.num_classes, 2),
        seed=seed,
        log=lambda m: console.print(f"  {m}"),
    )
    t = Table("scenario", "mode", "p50", "p99", "p99.9 ms", "answered", "rec.", "task acc")
    for key, s in out["runs"].items():
        scen, mode = key.split("/")
        t.add_row(
            scen,
            mode,
            *(f"{s[q]:.0f}" if q in s else "-" for q in ("p50_ms", "p99_ms", "p999_ms")),
            f"{s['answered']}/{s['sent']}",
            f"{s['reconstructed_fraction']:.2f}",
            "/".join(f"{a:.3f}" for a in s["task_accuracy"]),
        )
    console.print(t)
    c, u = out["runs"]["straggle/coded"], out["runs"]["straggle/uncoded"]
    if "p999_ms" in c and "p999_ms" in u:
        console.print(
            f"p99.9 - p50 under stragglers: coded {c['gap_p999_p50_ms']:.1f} ms, uncoded {u['gap_p999_p50_ms']:.1f} ms "
            f"(task acc = each data model's served top-1 accuracy on its own classes; serving {out['seconds']:.0f}s)"
        )


# Later parts of the system add their commands here: each module has
# ``register(app: typer.Typer) -> None``.
_COMMAND_MODULES = ["coinfer.experiments.commands", "coinfer.serving.commands"]


def _register_commands() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(app)


_register_commands()


def main() -> None:
    """Console entry point: one clear line on bad input, traceback with --debug."""
    debug = "--debug" in sys.argv[1:]
    try:
        app(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (CoinferError, ValueError, TypeError, OSError, KeyError, RuntimeError) as exc:
        if debug:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
