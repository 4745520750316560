"""CLI commands of the serving layer: ``serve``, ``bench latency`` and ``admin``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console

from coinfer.cli_help import MAX_CONDITION_HELP, TRUST_CODE_HELP
from coinfer.errors import CoinferError

__all__ = ["parse_tasks", "register"]

console = Console()
_URL_OPT = typer.Option(help="Admin URL (loopback).")


def _parse_workers(text: str | None) -> list[int] | None:
    if text is None or text.strip() in ("", "all"):
        return None
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise CoinferError(f"workers must be comma-separated indices or 'all', got {text!r}") from None


def serve(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory to serve.")],
    host: Annotated[str, typer.Option(help="Interface of the public API (0.0.0.0 for all).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the public API.")] = 8000,
    admin_port: Annotated[int, typer.Option(help="Port of the admin API (always on 127.0.0.1).")] = 8001,
    address: Annotated[
        str | None,
        typer.Option(help="Join this Ray cluster (e.g. 127.0.0.1:6379) instead of starting a local Ray."),
    ] = None,
    num_cpus: Annotated[
        float | None, typer.Option(help="Logical CPUs of the local Ray (default: enough for the workers).")
    ] = None,
    worker_cpus: Annotated[float, typer.Option(help="Ray CPUs per worker process.")] = 0.25,
    worker_gpus: Annotated[float, typer.Option(help="GPUs per worker process (>0 runs on CUDA).")] = 0.0,
    worker_host: Annotated[
        str | None,
        typer.Option(
            help="Address the workers' sockets listen on (default: their Ray node's; 127.0.0.1 locally)."
        ),
    ] = None,
    replicas: Annotated[int, typer.Option(help="Worker processes per worker (requests alternate).")] = 1,
    max_batch_size: Annotated[
        int,
        typer.Option(
            help="Worker-side batching: requests queued behind a busy model run together, up to this many rows."
        ),
    ] = 32,
    mode: Annotated[str, typer.Option(help="Default mode: coded, uncoded, replicated, hedged.")] = "coded",
    timeout: Annotated[float, typer.Option(help="Request timeout in seconds.")] = 5.0,
    degraded_timeout: Annotated[
        float,
        typer.Option(
            help="Request timeout while /healthz is degraded (no decodable set usable): a fast 503."
        ),
    ] = 0.5,
    hedge_ms: Annotated[float, typer.Option(help="Hedged mode: delay before the backup request.")] = 20.0,
    decode_slack: Annotated[
        str,
        typer.Option(
            help="Once a decodable set has arrived, wait up to this long for missing data outputs before "
            "decoding them: MS, or 'auto' (until the request is as old as the missing data workers' recent "
            "q99 latency, at most --decode-slack-max-ms); 0 decodes at the first decodable set."
        ),
    ] = "auto",
    decode_slack_max_ms: Annotated[float, typer.Option(help="Cap of the 'auto' decode slack, ms.")] = 50.0,
    baselines: Annotated[
        bool, typer.Option(help="Deploy the r extra replicas used by the replicated and hedged modes.")
    ] = True,
    delay: Annotated[
        str | None,
        typer.Option(help="Delay model of every worker: constant:MS, exponential:MS, heavy:MS:P[:ALPHA]."),
    ] = None,
    slow_worker: Annotated[
        str | None, typer.Option(help="One persistently slow worker: WORKER:MS (constant extra delay).")
    ] = None,
    fail_prob: Annotated[float, typer.Option(help="Probability that a worker call fails.")] = 0.0,
    kill: Annotated[str | None, typer.Option(help="Comma-separated workers to kill once started.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the injected delays.")] = 0,
    max_request_batch: Annotated[int, typer.Option(help="Largest batch accepted in one request.")] = 1024,
    max_body_bytes: Annotated[int, typer.Option(help="Largest accepted request body.")] = 8 * 1024 * 1024,
    trust_code: Annotated[bool, typer.Option("--trust-code", help=TRUST_CODE_HELP)] = False,
    max_condition: Annotated[float | None, typer.Option(help=MAX_CONDITION_HELP)] = None,
    verify: Annotated[
        float | None,
        typer.Option(
            help="Coded mode, r >= 2: locate a worker answering wrongly, with this residual threshold "
            "(e.g. the 99th percentile of coinfer.Code.residual on clean validation outputs); each "
            "request then waits, within the decode slack, for k + 2 outputs."
        ),
    ] = None,
    max_inflight: Annotated[
        int | None,
        typer.Option(
            help="Most prediction requests in flight; more get an immediate 503 'overloaded' with "
            "Retry-After (default: 2 x max-batch-size x replicas)."
        ),
    ] = None,
    body_timeout: Annotated[
        float, typer.Option(help="Seconds to receive a request body before answering 408.")
    ] = 10.0,
    max_body_readers: Annotated[
        int | None,
        typer.Option(
            help="Most request bodies being received at once (a request is admitted only once its body "
            "has arrived, so slow senders cannot take the --max-inflight slots); more get an immediate "
            "503 'overloaded' with Retry-After (default: 4 x the --max-inflight limit)."
        ),
    ] = None,
) -> None:
    """Serve a bundle over HTTP on Ray: every request goes to all workers; the data outputs
    that are still missing once a decodable set and the decode slack have passed are decoded."""
    from coinfer.serving.injection import Injection, parse_delay
    from coinfer.serving.runtime import ServeConfig
    from coinfer.serving.server import Server, bind_sockets, start_runtime

    base = parse_delay(delay, fail_prob) if delay else Injection(fail_prob=fail_prob)
    config = ServeConfig(
        bundle=bundle,
        address=address,
        num_cpus=num_cpus,
        worker_cpus=worker_cpus,
        worker_gpus=worker_gpus,
        worker_host=worker_host,
        replicas=replicas,
        max_batch_size=max_batch_size,
        mode=mode,
        timeout_s=timeout,
        degraded_timeout_s=degraded_timeout,
        hedge_ms=hedge_ms,
        decode_slack=decode_slack,
        decode_slack_max_ms=decode_slack_max_ms,
        baselines=baselines,
        seed=seed,
        max_batch=max_request_batch,
        max_body_bytes=max_body_bytes,
        trust_code=trust_code,
        max_condition=max_condition,
        verify=verify,
        max_inflight=max_inflight,
        max_body_readers=max_body_readers,
        body_timeout_s=body_timeout,
    )
    manifest_n = None
    sockets = bind_sockets(host, port, admin_port)  # a port in use fails here, before Ray starts
    console.print(
        f"starting workers for [bold]{bundle}[/] ({'Ray at ' + address if address else 'local Ray'})"
    )
    rt = start_runtime(config, sockets)
    try:
        manifest_n = len(rt.slots)
        if base.active:
            rt.set_injection(None, base)
        if slow_worker:
            try:
                w, ms = slow_worker.split(":")
                rt.set_injection([int(w)], Injection(kind="constant", ms=float(ms), fail_prob=fail_prob))
            except ValueError:
                raise CoinferError(f"--slow-worker expects WORKER:MS, got {slow_worker!r}") from None
        for w in _parse_workers(kill) or []:
            rt.kill(w)
        server = Server(rt, host, port, admin_port, sockets=sockets)

        def started(s: Server) -> None:
            console.print(
                f"serving k={rt.code.k} r={rt.code.r} ({manifest_n} workers, mode {rt.mode}) on "
                f"[bold]{s.url}[/]  (docs {s.url}/docs, admin {s.admin_url}); Ctrl-C to stop"
            )

        server.run(on_started=started)
    finally:
        for s in sockets:
            s.close()  # no-op once the server has closed them
        rt.shutdown()
        console.print("stopped")


def _classes_text(classes: list[int]) -> str:
    """``[0, 1, 2, 3, 5]`` as ``0-3,5``."""
    runs: list[list[int]] = []
    for c in sorted(set(classes)):
        if runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def parse_tasks(text: str, k: int, num_classes: int | None) -> list[list[int]] | None:
    """The ``--tasks`` of ``bench latency``: which labels each of the ``k`` served outputs is
    scored on. ``all``: every output on every label (``None``); ``classes``: output ``j`` on
    the ``j``-th contiguous block of the ``num_classes`` classes (the class split of
    ``coinfer demo`` and ``make_mnist_bundle.py --split classes``); or ``k`` groups separated
    by ``;``, each a comma-separated list of classes or ranges, e.g. ``0-4;5-9``.

    Raises:
        CoinferError: anything else, naming the value and what was expected.
    """
    spec = text.strip().lower()
    if spec == "all":
        return None
    if spec == "classes":
        if num_classes is None:
            raise CoinferError(
                "--tasks classes needs the number of classes, and the server reports no class_names; "
                "give the groups, e.g. --tasks '0-4;5-9'"
            )
        from coinfer.experiments.data import class_split

        return class_split(num_classes, k)
    groups: list[list[int]] = []
    try:
        for group in spec.split(";"):
            classes: list[int] = []
            for item in group.split(","):
                lo, _, hi = item.strip().partition("-")
                classes += list(range(int(lo), int(hi or lo) + 1))
            groups.append(classes)
    except ValueError:
        raise CoinferError(
            f"--tasks must be 'all', 'classes' or {k} groups of classes like '0-4;5-9', got {text!r}"
        ) from None
    if len(groups) != k or not all(groups):
        raise CoinferError(
            f"--tasks {text!r} gives {len(groups)} groups of classes; the server serves k = {k}"
        )
    if num_classes is not None:
        bad = sorted({c for g in groups for c in g if not 0 <= c < num_classes})
        if bad:
            raise CoinferError(
                f"--tasks {text!r} names classes {bad}; the server's classes are 0..{num_classes - 1}"
            )
    return groups


def _reference(info: dict, x: np.ndarray, bundle: Path | None, trust_code: bool):
    """``(reference top-1, None)``, or ``(None, why it cannot be computed and how to fix it)``."""
    from coinfer.errors import UntrustedCodeError
    from coinfer.serving.loadgen import reference_top1

    path = bundle if bundle is not None else info["bundle"]
    try:
        return reference_top1(path, x, info["k"], trust_code=trust_code, served=info), None
    except UntrustedCodeError:
        name = (info.get("architecture") or {}).get("name", "?")
        return None, (
            f"the bundle {path} has the architecture {name!r}, which is code, not a registered "
            "architecture; pass --trust-code to run its data models here (only for a bundle you trust), "
            "or --no-agreement"
        )
    except CoinferError as exc:
        where = " (the path the server reports in /v1/models)" if bundle is None else ""
        return None, (
            f"{exc}{where}; pass --bundle with the served bundle's directory as seen from here, "
            "or --no-agreement"
        )


def _line(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _report(summary: dict, tasks: list[list[int]] | None, data: Path | None, reference) -> None:
    """The agreement and accuracy lines of ``bench latency``."""
    if summary.get("agreement") is not None:
        scope = "" if tasks is None else ", on inputs of each output's own classes"
        n_rec = summary["agreement_reconstructed_outputs"]
        _line(
            f"agreement with the data models' own top-1 (the uncoded answer, computed here{scope}): "
            f"{summary['agreement']:.4f} of {summary['agreement_outputs']} outputs; "
            + (
                f"{summary['agreement_reconstructed']:.4f} of {n_rec} reconstructed"
                if n_rec
                else "no output was reconstructed"
            )
        )
    if "accuracy" not in summary:
        return
    if tasks is None:
        key, scoring = "accuracy", "every output scored against the label of its input (--tasks all)"
    else:
        key = "task_accuracy"
        scoring = "output " + ", output ".join(
            f"{j} scored on inputs labelled {_classes_text(t)}" for j, t in enumerate(tasks)
        )
    if summary.get(key) is None:
        _line(f"task accuracy vs the labels of {data}: no answered input has a label of the scored classes")
        return
    parts = [f"served {summary[key]:.4f}"]
    sub = [
        f"{what} {summary[f'{key}_{what}']:.4f}"
        for what in ("received", "reconstructed")
        if summary.get(f"{key}_{what}") is not None
    ]
    if sub:
        parts[0] += f" ({', '.join(sub)})"
    own = summary.get("data_model_accuracy" if tasks is None else "data_model_task_accuracy")
    if own is not None:
        parts.append(f"the data models themselves {own:.4f}")
    _line(f"task accuracy vs the labels of {data}, {scoring}: {', '.join(parts)}")
    if tasks is None and reference is not None and reference.shape[1] > 1:
        predicted = [set(np.unique(reference[:, j]).tolist()) for j in range(reference.shape[1])]
        if all(not (p & q) for i, p in enumerate(predicted) for q in predicted[i + 1 :]):
            shown = " / ".join(_classes_text(sorted(p)) for p in predicted)
            _line(
                f"  the data models predict disjoint classes on these inputs ({shown}): a class-split "
                "bundle? --tasks classes scores each output on its own classes only"
            )


def latency(
    url: Annotated[str, typer.Option(help="Server URL (loopback only).")] = "http://127.0.0.1:8000",
    data: Annotated[
        Path | None,
        typer.Option(help="Inputs .npz with x (N, *input_shape) and optional y labels; default random."),
    ] = None,
    rate: Annotated[float, typer.Option(help="Poisson arrival rate, requests per second.")] = 20.0,
    requests: Annotated[int, typer.Option(help="Largest number of requests.")] = 1000,
    duration: Annotated[float, typer.Option(help="Longest time of arrivals, seconds.")] = 60.0,
    mode: Annotated[str | None, typer.Option(help="Mode of every request (default: the server's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of arrivals and input choice.")] = 0,
    out: Annotated[Path, typer.Option(help="JSON results file.")] = Path("runs/bench-latency.json"),
    plot: Annotated[Path | None, typer.Option(help="Latency CDF PNG (default: next to --out).")] = None,
    decode_slack: Annotated[
        str | None,
        typer.Option(help="Set the server's decode slack (MS or 'auto') through --admin-url before the run."),
    ] = None,
    admin_url: Annotated[str, _URL_OPT] = "http://127.0.0.1:8001",
    agreement: Annotated[
        bool,
        typer.Option(
            help="Also run the served bundle's data models here and report how often each served output's "
            "top-1 agrees with what its data model says (the uncoded answer), overall and on reconstructed "
            "outputs."
        ),
    ] = True,
    bundle: Annotated[
        Path | None,
        typer.Option(
            help="The served bundle's directory as seen from here, for the agreement (default: the path the "
            "server reports in /v1/models); it must match the served code, architecture and shapes."
        ),
    ] = None,
    trust_code: Annotated[bool, typer.Option("--trust-code", help=TRUST_CODE_HELP)] = False,
    tasks: Annotated[
        str,
        typer.Option(
            help="With labels (y in --data): which labels each served output is scored on. 'all': every "
            "output on every label (models trained on all classes); 'classes': output j on the j-th "
            "contiguous block of classes (class-split bundles, as in coinfer demo); or k groups like "
            "'0-4;5-9'."
        ),
    ] = "all",
) -> None:
    """Open-loop Poisson load: p50/p90/p99/p99.9, gap, throughput, reconstructed fraction, agreement
    of the served outputs with the data models' own answers and, with labels, task accuracy."""
    import httpx

    from coinfer.serving.loadgen import check_loopback, plot_cdf, run_load, summarize
    from coinfer.serving.runtime import parse_decode_slack

    check_loopback(url)
    slack = None if decode_slack is None else parse_decode_slack(decode_slack)
    if slack is not None:
        check_loopback(admin_url)
    try:
        info = httpx.get(url.rstrip("/") + "/v1/models", timeout=10).json()
    except httpx.HTTPError as exc:
        raise CoinferError(f"no coinfer server answers at {url}: {exc}") from None
    shape = tuple(info["input_shape"])
    y = None
    if data is not None:
        if not data.exists():
            raise CoinferError(f"data file {data} does not exist")
        with np.load(data) as z:
            if "x" not in z.files:
                raise CoinferError(f"{data} must hold an array 'x' (and optionally 'y'); it has {z.files}")
            x = z["x"].astype(np.float32)
            y = z["y"] if "y" in z.files else None
        if tuple(x.shape[1:]) != shape:
            raise CoinferError(f"{data}: x has shape {x.shape}, the server expects (N, {shape})")
    else:
        x = np.random.default_rng(seed).standard_normal((256, *shape)).astype(np.float32)
    names = info.get("class_names")
    groups = parse_tasks(tasks, info["k"], len(names) if names else None)
    if groups is not None and y is None:
        raise CoinferError(f"--tasks {tasks} scores labels, but there are none: give --data with a 'y' array")
    if slack is not None:
        from coinfer.serving.client import AdminClient

        admin = AdminClient(admin_url)
        try:
            admin.config(decode_slack=slack)
        finally:
            admin.close()
    reference, why = _reference(info, x, bundle, trust_code) if agreement else (None, None)
    if why is not None:  # said once, before the run, so that a long run can be stopped and fixed
        _line(f"agreement not computed: {why}")
    console.print(
        f"{rate:g} req/s Poisson, up to {requests} requests / {duration:g}s, mode {mode or 'server default'}"
    )
    res = run_load(
        url, x, y, rate=rate, requests=requests, duration_s=duration, mode=mode, seed=seed, k=info["k"]
    )
    summary = summarize(res, reference=reference, tasks=groups)
    if why is not None:
        summary["agreement_not_computed"] = why
    if decode_slack is not None:
        summary["decode_slack"] = decode_slack
    summary["latency_ms"] = [None if np.isnan(v) else round(float(v) * 1000, 4) for v in res.latency_s]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    plot = plot or out.with_suffix(".png")
    plot_cdf({mode or info["default_mode"]: res.latency_s * 1000}, plot, title=f"{rate:g} req/s")
    keys = ["p50_ms", "p90_ms", "p99_ms", "p999_ms", "gap_p999_p50_ms", "throughput_rps"]
    console.print("  ".join(f"{key}={summary[key]:.2f}" for key in keys if key in summary))
    _line(
        f"answered {summary['answered']}/{summary['sent']}, reconstructed {summary['reconstructed_fraction']:.3f} "
        f"of requests ({summary['reconstructed_outputs']} outputs)"
        + (f", errors {summary['errors']}" if summary["errors"] else "")
    )
    _report(summary, groups, data, reference)
    console.print(f"wrote {out} and {plot}")


def _admin_app() -> typer.Typer:
    admin = typer.Typer(help="Admin API of a running server (loopback only): injection, kill, mode.")

    def client(url: str):
        from coinfer.serving.client import AdminClient

        return AdminClient(url)

    @admin.command("state")
    def state(url: Annotated[str, _URL_OPT] = "http://127.0.0.1:8001") -> None:
        """Show mode, workers, down workers and injections."""
        print(json.dumps(client(url).state(), indent=1))

    @admin.command("inject")
    def inject(
        delay: Annotated[str, typer.Argument(help="none, constant:MS, exponential:MS, heavy:MS:P[:ALPHA].")],
        workers: Annotated[str, typer.Option(help="Comma-separated workers or 'all'.")] = "all",
        fail_prob: Annotated[float, typer.Option(help="Failure probability.")] = 0.0,
        corrupt: Annotated[
            str,
            typer.Option(help="Well-formed wrong answers: none, random, or other (another data worker's)."),
        ] = "none",
        url: Annotated[str, _URL_OPT] = "http://127.0.0.1:8001",
    ) -> None:
        """Set a delay model (and failure probability, corruption) on workers."""
        import dataclasses

        from coinfer.serving.injection import parse_delay

        inj = dataclasses.replace(parse_delay(delay, fail_prob), corrupt=corrupt)
        print(json.dumps(client(url).inject(_parse_workers(workers), **inj.to_dict()), indent=1))

    @admin.command("kill")
    def kill(
        worker: Annotated[int, typer.Argument(help="Worker index.")],
        url: Annotated[str, _URL_OPT] = "http://127.0.0.1:8001",
    ) -> None:
        """Kill a worker's process; it stays out of the pool until restarted."""
        print(json.dumps(client(url).kill(worker)))

    @admin.command("restart")
    def restart(
        worker: Annotated[int, typer.Argument(help="Worker index.")],
        url: Annotated[str, _URL_OPT] = "http://127.0.0.1:8001",
    ) -> None:
        """Start new processes for a worker and use it again; a process that refuses to start
        (its model file changed since the server verified it) is reported and the worker kept down."""
        print(json.dumps(client(url).restart(worker)))

    @admin.command("mode")
    def mode(
        mode: Annotated[str, typer.Argument(help="coded, uncoded, replicated or hedged.")],
        url: Annotated[str, _URL_OPT] = "http://127.0.0.1:8001",
    ) -> None:
        """Set the server's default mode."""
        print(json.dumps(client(url).config(mode=mode)["mode"]))

    return admin


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``bench latency`` and ``admin`` to the ``coinfer`` command."""
    app.command("serve")(serve)
    bench = typer.Typer(help="Benchmarks of a running server.")
    bench.command("latency")(latency)
    app.add_typer(bench, name="bench")
    app.add_typer(_admin_app(), name="admin")
