"""The `chatrt` command: `chat`, `serve`, `bench`, `loadtest`, `stats` and `info`.

Each subcommand loads the configured model (or the one named on the command line) and prints for people.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from chatrt import metrics
from chatrt.bench import workload as bench_workload
from chatrt.config import Config
from chatrt.errors import ChatrtError, ConfigError, MetricsUnavailable
from chatrt.stats import DeploymentStats, RuntimeStats

if TYPE_CHECKING:
    from chatrt.bench import reuse as bench
    from chatrt.runtime import ChatRuntime

console = Console()
err = Console(stderr=True, soft_wrap=True)  # an error stays one line, whatever the width


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ChatrtError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chatrt", description="A chat runtime that keeps every conversation's KV cache.")
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, func, help: str) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
        c = sub.add_parser(name, help=help, description=help)
        c.add_argument("--config", help="TOML config file (default: built-in defaults + CHATRT_* variables)")
        c.add_argument(
            "--model", help="model source: 'bundled', a transformers folder, a .gguf file or a Hub id (org/name)"
        )
        c.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
        c.add_argument("--chat-template", help="render prompts with this template: 'chatml-tools' (shipped: ChatML "
                       "with tool calls) or a Jinja file (default: the model's own)")  # fmt: skip
        c.set_defaults(func=func)
        return c

    chat = command("chat", _chat, "chat with the model in the terminal UI")
    chat.add_argument("--system", help="system prompt of the first session")
    chat.add_argument(
        "--plain", action="store_true", help="a line-by-line chat instead of the UI (the default when stdin is a pipe)"
    )
    chat.add_argument(
        "--exact", action="store_true", help="new chats decode greedily (plain transformers' replies) instead of "
        "sampling as the model recommends"
    )
    b = command("bench", _bench, "run the multi-session workload in several reuse modes and report")
    b.add_argument("--preset", default="default", help="configs/bench/<NAME>.toml or a .toml file (default: default)")
    for field, info in bench_workload.Workload.model_fields.items():
        if info.annotation is int:  # the preset's value unless given
            b.add_argument(f"--{field.replace('_', '-')}", type=int, help=info.description)
    b.add_argument("--interleave", action=argparse.BooleanOptionalAction, help="interleave the sessions' turns")
    b.add_argument("--modes", help=f"comma-separated, of: {', '.join(bench_workload.MODES)}")
    b.add_argument(
        "--concurrent",
        help="instead of the modes: sessions answering at once, e.g. 1,4,8,16 (each with ~1,000 tokens of history), "
        "and a new turn and a long prompt arriving while 8 decode",
    )
    b.add_argument(
        "--shared",
        type=int,
        help="instead of the modes: this many rows decoding together on one prompt, its KV copied into every row "
        "and shared by reference: the decode step's time and its attention's",
    )
    b.add_argument("--shared-tokens", type=int, default=400, help="the shared prompt's tokens (default: 400)")
    b.add_argument(
        "--structured",
        type=int,
        help="instead of the modes: this many sessions answering at once, freely and each under a JSON schema: "
        "decode tokens/s of each, the grammar's time per token, and how many replies validate",
    )
    b.add_argument("--out", default="bench-out", help="folder for report.json and ttft.png")
    stats = command(
        "stats",
        _stats,
        "print a runtime's cache statistics: a running one's metrics endpoint, a Redis-backed deployment, "
        "or (with neither) a short demo run here",
    )
    source = stats.add_mutually_exclusive_group()
    source.add_argument("--metrics-url", help="a running runtime's endpoint, e.g. http://127.0.0.1:9464/metrics")
    source.add_argument("--redis", help="the Redis URL a deployment shares: every process's stats and what it holds")
    serve = command("serve", _serve, "serve the model over HTTP: OpenAI-compatible chat completions, with sessions")
    serve.add_argument("--host", help="address to listen on (default: serve.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default: serve.port, 8000)")
    load = command(
        "loadtest",
        _loadtest,
        "simulated users chatting at once over HTTP with chatrt serve (started here unless --url names one), "
        "then the same workload through the Python API",
    )
    load.add_argument("--url", help="a running chatrt serve, e.g. http://127.0.0.1:8000/v1 (HTTP only)")
    load.add_argument("--users", default="1,4,16", help="concurrent users per run (default: 1,4,16)")
    load.add_argument("--turns", type=int, default=4, help="turns per user (default: 4)")
    load.add_argument("--max-tokens", type=int, default=32, help="reply limit per turn (default: 32)")
    load.add_argument("--out", default="bench-out", help="folder for loadtest.json")
    command("info", _info, "print the model, its fingerprint and the configuration")
    return p


def _config(args: argparse.Namespace) -> Config:
    config = Config.load(args.config)
    given = {"source": args.model, "dtype": args.dtype, "chat_template": args.chat_template}
    model = {k: v for k, v in given.items() if v}
    return config.with_values(model=model) if model else config


def _quiet_hub() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # chatrt shows its own progress


def _runtime(args: argparse.Namespace) -> ChatRuntime:
    return _runtime_from(_config(args))


def _runtime_from(config: Config) -> ChatRuntime:
    from chatrt.runtime import ChatRuntime  # the model stack is imported by the commands that load a model

    _quiet_hub()
    with console.status("loading the model…") as status:
        return ChatRuntime.from_config(config, progress=lambda msg: status.update(msg))


def _needs(extra: str, *modules: str) -> None:
    """A face's optional install is there, or a ConfigError that says which extra to install."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(f"this command needs {module}, an optional part: pip install 'chatrt[{extra}]'") from None


def _serve(args: argparse.Namespace) -> int:
    _needs("serve", "fastapi", "uvicorn", "sse_starlette")
    import uvicorn  # the server's imports are only paid for when it runs

    from chatrt.async_runtime import AsyncChatRuntime
    from chatrt.serve.app import create_app

    config = _config(args)
    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    config = config.with_values(serve=overrides) if overrides else config
    rt = _runtime_from(config)
    with rt:
        cfg = config.serve
        err.print(f"chatrt serve: {rt.lm.info.name} on http://{cfg.host}:{cfg.port}/v1")
        if not cfg.api_key.get_secret_value():
            err.print("[yellow]warning:[/yellow] no serve.api_key: anyone who can reach the port can use the model "
                      "and every session (set CHATRT_SERVE__API_KEY)")  # fmt: skip
        if rt.store is not None and not config.tiers.redis_secret.get_secret_value():
            from chatrt.runtime import REDIS_UNSIGNED

            err.print(f"[yellow]warning:[/yellow] {escape(REDIS_UNSIGNED)}")
        uvicorn.run(create_app(AsyncChatRuntime(rt), cfg), host=cfg.host, port=cfg.port, log_level="info")
    return 0


def _loadtest(args: argparse.Namespace) -> int:
    _needs("serve", "httpx", "fastapi")
    _warn_if_loaded()
    import asyncio

    from chatrt.async_runtime import AsyncChatRuntime
    from chatrt.bench import loadtest

    try:
        sizes = [int(n) for n in args.users.split(",")]
    except ValueError:
        raise ConfigError(f"--users takes user counts such as 1,4,16, not {args.users!r}") from None
    config = _config(args)
    results = []
    if args.url:
        with console.status(f"{args.users} users over HTTP at {args.url}…"):
            results += asyncio.run(loadtest.over_http(args.url, sizes, args.turns, args.max_tokens))
        name = "(remote)"
    else:
        with console.status("starting chatrt serve…"), _served(args) as url:
            console.log(f"{args.users} users over HTTP at {url}")
            results += asyncio.run(loadtest.over_http(url, sizes, args.turns, args.max_tokens))
        rt = _runtime_from(config)
        with rt, console.status(f"{args.users} users through the Python API…"):
            if rt.engine.compiled is not None:  # as the server was: once its decode step is compiled
                rt.engine.compiled.wait()
            results += asyncio.run(loadtest.in_process(AsyncChatRuntime(rt), sizes, args.turns, args.max_tokens))
        name = rt.lm.info.name
    report = loadtest.LoadReport(model=name, turns_per_user=args.turns, max_tokens=args.max_tokens, results=results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loadtest.json").write_text(report.model_dump_json(indent=2))
    table = Table(title=f"{name} · {args.turns} turns per user · replies of at most {args.max_tokens} tokens")
    for col in ("path", "users", "turns", "wall", "tok/s", "TTFT p50", "TTFT p95", "turn mean", "cached"):
        table.add_column(col, justify="right")
    for r in results:
        ms = [f"{x * 1000:.0f} ms" for x in (r.ttft_p50_s, r.ttft_p95_s, r.turn_s_mean)]
        table.add_row(r.path, str(r.users), str(r.turns), f"{r.wall_s:.1f} s", f"{r.tokens_per_s:.1f}", *ms,
                      f"{r.cached_share:.1%}")  # fmt: skip
    console.print(table)
    console.print(f"report: {out / 'loadtest.json'}")
    return 0


def _decode_step(url: str) -> str:
    with urllib.request.urlopen(f"{url}/readyz", timeout=10) as response:
        return str(json.load(response).get("decode_step", ""))


@contextlib.contextmanager
def _served(args: argparse.Namespace) -> Iterator[str]:
    """A chatrt serve subprocess with this command's model options, on a free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "chatrt", "serve", "--port", str(port)]
    for flag in ("config", "model", "dtype", "chat_template"):
        if getattr(args, flag):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):  # the model loads first: up to two minutes
            if proc.poll() is not None:
                raise ConfigError(f"chatrt serve exited with {proc.returncode}; run it alone to see why")
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise ConfigError("chatrt serve did not answer within two minutes")
        while _decode_step(url) in ("compiling", "loading"):  # measured as it serves once compiled (first: minutes)
            time.sleep(1)
        yield f"{url}/v1"
    finally:
        proc.terminate()
        proc.wait(30)


def _chat(args: argparse.Namespace) -> int:
    if args.plain or not sys.stdin.isatty():
        return _plain_chat(args)
    _needs("tui", "textual")
    import tui  # the UI's imports are only paid for when it runs

    config = _config(args)  # a bad config is reported here, before the screen is taken over

    def load(progress: Callable[[str], None]) -> ChatRuntime:
        """Behind the loading screen, which is up before the model stack is even imported."""
        progress("importing torch and transformers")
        from chatrt.runtime import ChatRuntime

        _quiet_hub()
        return ChatRuntime.from_config(config, progress)

    tui.run(load, system_prompt=args.system, sampling="exact" if args.exact else "chat")
    return 0


def _plain_chat(args: argparse.Namespace) -> int:
    rt = _runtime(args)
    session = rt.open_session(system_prompt=args.system)
    console.print(f"[bold]{rt.lm.info.name}[/bold] ready. Empty line or Ctrl-D quits; /regen regenerates.")
    with rt:
        while True:
            try:
                text = console.input("[bold cyan]you>[/bold cyan] ")
            except EOFError:
                break
            if not text.strip():
                break
            try:
                turn = session.stream_regenerate() if text.strip() == "/regen" else session.stream(text)
                console.print("[bold green]bot>[/bold green] ", end="")
                with turn:
                    for piece in turn:
                        console.print(piece, end="", markup=False, highlight=False)
            except ChatrtError as e:  # a bad message is the user's to fix; the chat goes on
                err.print(f"[red]{escape(str(e))}[/red]")
                continue
            except KeyboardInterrupt:
                console.print("\n[yellow]stopped: the reply so far is kept[/yellow]")
                continue
            if turn.reply is not None:
                t = turn.reply.stats
                console.print(
                    f"\n[dim]{t.prompt_tokens} prompt tokens, {t.reused_tokens} reused, {t.prefilled_tokens} "
                    f"prefilled · TTFT {t.ttft_s * 1000:.0f} ms · {t.decode_tokens_per_s:.1f} tok/s[/dim]"
                )
    return 0


def _warn_if_loaded() -> None:
    load, cores = bench_workload.machine_load()
    if load > cores:
        err.print(f"[yellow]warning:[/yellow] the machine is loaded (load average {load:.1f} on {cores} cores): "
                  "timings will be slow and noisy; ratios within the run hold up better")  # fmt: skip


def _bench(args: argparse.Namespace) -> int:
    _warn_if_loaded()
    if args.concurrent:
        return _bench_concurrent(args)
    if args.shared:
        return _bench_shared(args)
    if args.structured:
        return _bench_structured(args)
    _needs("bench", "matplotlib", "redis")
    from chatrt.bench import plot as bench_plot
    from chatrt.bench import reuse as bench

    preset = bench_workload.load_preset(args.preset)
    given = {f: getattr(args, f) for f in bench.Workload.model_fields if getattr(args, f, None) is not None}
    if args.modes:
        given["modes"] = tuple(m.strip() for m in args.modes.split(","))
    try:
        changed = {k for k in given if k != "modes" and given[k] != getattr(preset, k)}
        name = f"{preset.name} with {', '.join(sorted(changed))} changed" if changed else preset.name
        workload = bench.Workload.model_validate({**preset.model_dump(), **given, "name": name})
    except ValidationError as e:
        raise ConfigError(f"bench: {e}") from None
    rt = _runtime(args)
    total = workload.sessions * workload.turns
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        tasks = {m: bar.add_task(m, total=total) for m in workload.modes}
        report = bench.run(rt.lm, rt.config, workload, lambda mode, done, _: bar.update(tasks[mode], completed=done))
    if workload.restore_tokens:
        with console.status(f"restore vs recompute of a {workload.restore_tokens}-token history…"):
            report.restore = bench.restore_vs_recompute(rt.lm, rt.config, workload.restore_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(report.model_dump_json(indent=2))
    bench_plot.ttft_by_turn(report, out / "ttft.png")
    if not console.is_terminal:  # a log file gets the whole table, not one squeezed to 80 columns
        console.width = max(console.width, 150)
    console.print(_bench_table(report))
    if r := report.restore:
        console.print(
            f"Redis tier, {r.history_tokens} tokens ({_mib(r.stored_bytes)}): restore {r.restore_s * 1000:.0f} ms, "
            f"recompute {r.recompute_s * 1000:.0f} ms; the cost model chose {r.chosen} "
            f"(estimates {r.estimated_restore_s * 1000:.0f} / {r.estimated_recompute_s * 1000:.0f} ms)"
            f"{'' if r.chose_faster else ', not the faster one'}"
        )
    console.print(f"report: {out / 'report.json'} · plot: {out / 'ttft.png'}")
    return 0


def _bench_shared(args: argparse.Namespace) -> int:
    from chatrt.bench import shared as bench_shared

    rt = _runtime(args)
    with console.status(f"{args.shared} rows decoding on one shared prompt, copied and shared…"):
        report = bench_shared.run(rt.lm, rt.config, rows=args.shared, shared_tokens=args.shared_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shared.json").write_text(report.model_dump_json(indent=2))
    own = f"{report.own_tokens}-{report.own_tokens + report.steps}"
    table = Table(title=f"{report.model} · {report.dtype} · {report.device} · {report.decode_step} · {report.rows} "
                  f"rows · {report.shared_tokens} shared tokens + {own} own each")  # fmt: skip
    for col in ("prompt KV", "decode step", "attention", "KV held"):
        table.add_column(col, justify="right")
    for p in (report.copied, report.shared):
        table.add_row(p.how, f"{p.step_ms:.1f} ms", f"{p.attention_ms:.1f} ms", _mib(p.kv_bytes))
    console.print(table)
    console.print(f"attention time saved: {report.attention_saved:.0%} (KV reads saved: {report.reads_saved:.0%}) · "
                  f"report: {out / 'shared.json'}")  # fmt: skip
    return 0


def _bench_structured(args: argparse.Namespace) -> int:
    from chatrt.bench import structured as bench_structured

    rt = _runtime(args)
    with console.status(f"{args.structured} sessions answering at once, free and under JSON schemas…"):
        report = bench_structured.run(rt, rows=args.structured)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "structured.json").write_text(report.model_dump_json(indent=2))
    table = Table(title=f"{report.model} · {report.dtype} · {report.device} · {report.rows} sessions at once · "
                  f"{report.rounds} rounds each way, alternating")  # fmt: skip
    for col in ("replies", "tok/s, all", "tok/s, each", "grammar per token", "valid JSON"):
        table.add_column(col, justify="right")
    for w in (report.free, report.constrained):
        valid = f"{w.valid}/{w.replies}" if w.how == "schema" else "-"
        table.add_row(w.how, f"{w.tokens_per_s:.1f}", f"{w.session_tokens_per_s:.1f}", f"{w.mask_ms_per_token:.2f} ms",
                      valid)  # fmt: skip
    console.print(table)
    console.print(f"report: {out / 'structured.json'}")
    return 0


def _bench_concurrent(args: argparse.Namespace) -> int:
    from chatrt.bench import concurrent as bench_concurrent

    try:
        sizes = [int(n) for n in args.concurrent.split(",")]
    except ValueError:
        raise ConfigError(f"--concurrent takes session counts such as 1,4,8,16, not {args.concurrent!r}") from None
    rt = _runtime(args)
    with console.status(f"{', '.join(map(str, sizes))} sessions answering at once…"):
        report = bench_concurrent.run(rt.lm, rt.config, sizes, max_new_tokens=args.max_new_tokens or 64)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "concurrent.json").write_text(report.model_dump_json(indent=2))
    table = Table(
        title=f"{report.model} · {report.dtype} · {report.device} · {report.history_tokens} tokens of history each · "
        f"replies of at most {report.max_new_tokens} tokens · prefill chunk {report.prefill_chunk}"
    )
    for col in ("sessions", "tokens", "wall", "decode tok/s (sum)", "gain over 1", "end-to-end tok/s", "gain",
                "mean batch", "TTFT median", "TTFT max", "per-session tok/s"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in report.results:
        table.add_row(
            str(r.sessions), str(r.generated_tokens), f"{r.wall_s:.1f} s", f"{r.decode_tokens_per_s:.1f}",
            f"{r.decode_gain:.2f}×", f"{r.aggregate_tokens_per_s:.1f}", f"{r.gain:.2f}×", f"{r.mean_batch:.1f}",
            f"{statistics.median(r.ttft_s) * 1000:.0f} ms",
            f"{max(r.ttft_s) * 1000:.0f} ms", f"{statistics.median(r.tokens_per_s):.1f}",
        )  # fmt: skip
    console.print(table)
    if u := report.under_load:
        console.print(
            f"a new turn while {u.busy} sessions decode: TTFT {u.loaded_ttft_s * 1000:.0f} ms against "
            f"{u.idle_ttft_s * 1000:.0f} ms idle ({u.loaded_ttft_s / u.idle_ttft_s:.1f}×); "
            f"a {u.long_prompt_tokens}-token prompt arriving: longest gap between two pieces of a decoding stream "
            f"{u.longest_gap_s * 1000:.0f} ms "
            f"(a step took {u.step_s * 1000:.0f} ms before)"
        )
    if report.reference_decode_tokens_per_s and report.results and report.results[0].sessions == 1:
        one, plain = report.results[0].decode_tokens_per_s, report.reference_decode_tokens_per_s
        console.print(f"one session decodes at {one:.1f} tok/s, plain transformers at {plain:.1f} "
                      f"({one / plain:.2f}×); {report.compiled}")  # fmt: skip
    console.print(f"report: {out / 'concurrent.json'}")
    return 0


def _bench_table(report: bench.Report) -> Table:
    w = report.workload
    table = Table(
        title=f"{report.model} · {report.dtype} · {report.device} · preset {w.name}: {w.sessions} sessions × "
        f"{w.turns} turns · last prompt {report.last_turn_prompt_tokens} tokens · "
        f"replies identical in every mode: {report.replies_identical}"
    )
    columns = ("mode", "hit rate", "prefilled", "TTFT median", "p95", "last turn", "speed-up", "decode tok/s",
               "peak MiB device/host/redis", "restored/recomputed", "wall")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="right")
    baseline = "recompute" in w.modes
    for r in report.results:
        peaks = "/".join(f"{r.peak_tier_bytes.get(t, 0) / 2**20:.1f}" for t in ("device", "host", "redis"))
        c = r.tier_counters
        table.add_row(
            r.mode, f"{r.hit_rate:.1%}", f"{r.prefilled_tokens:,}",
            f"{r.ttft_median_s * 1000:.0f} ms", f"{r.ttft_p95_s * 1000:.0f} ms", f"{r.last_turn_ttft_s * 1000:.0f} ms",
            f"{report.speedup(r.mode):.1f}×" if baseline else "-", f"{r.decode_tokens_per_s:.1f}", peaks,
            f"{c.restores}/{c.recomputes + c.drops}", f"{r.wall_s:.0f} s",
        )  # fmt: skip
    table.caption = (
        "speed-up: last-turn TTFT of recompute over the mode's, same run · plain transformers greedy decode on "
        f"the last prompt: {report.reference_decode_tokens_per_s:.1f} tok/s"
    )
    return table


def _stats(args: argparse.Namespace) -> int:
    if args.metrics_url:
        text = _fetch(args.metrics_url)
        print_stats(metrics.parse(text), latency=_latency(text))
        return 0
    if args.redis:
        print_deployment(_deployment(args.redis, _config(args).tiers.redis_cluster))
        return 0
    config = _config(args)
    if not config.tiers.device_sessions:  # room for one idle session on the device, so the demo moves caches
        config = config.with_values(tiers={"device_sessions": 1})
    from chatrt.runtime import ChatRuntime

    _quiet_hub()
    with console.status("loading the model…") as status, ChatRuntime.from_config(config, status.update) as rt:
        sessions = [rt.open_session(system_prompt="You are a concise assistant.") for _ in range(3)]
        for question in ("What is a cache?", "Why does it help?"):
            for s in sessions:
                s.send(question, max_new_tokens=24)
        print_stats(rt.stats())
    return 0


def _latency(text: str) -> dict[str, str]:
    """TTFT and inter-token latency percentiles from the scrape's histograms."""
    rows = {}
    for label, name in (("TTFT", "chatrt_ttft_seconds"), ("inter-token latency", "chatrt_inter_token_latency_seconds")):
        if q := metrics.quantiles(text, name, (0.5, 0.95, 0.99)):
            rows[label] = " · ".join(f"p{round(k * 100)} {v * 1000:,.0f} ms" for k, v in q.items())
    return rows


def print_stats(stats: RuntimeStats, latency: dict[str, str] | None = None) -> None:
    table = Table(title="chatrt runtime", show_header=False)
    for key, value in (latency or {}).items():
        table.add_row(key, value)
    for key, value in stats.model_dump(exclude={"tiers", "tier_counters"}).items():
        table.add_row(key.replace("_", " "), _shown(key, value))
    for tier, usage in stats.tiers.items():
        budget = f" of {_mib(usage.budget_bytes)}" if usage.budget_bytes else ""
        table.add_row(f"{tier} tier", f"{usage.sessions:,} sessions · {_mib(usage.bytes)}{budget}")
    for key, value in stats.tier_counters.model_dump().items():
        table.add_row(key.replace("_", " "), _shown(key, value))
    console.print(table)


def print_deployment(d: DeploymentStats) -> None:
    table = Table(title=f"chatrt deployment · {len(d.runtimes)} live processes")
    for col in ("process", "turns", "hit rate", "prompt", "reused", "prefilled", "open", "device", "host"):
        table.add_column(col, justify="right")
    for name, s in sorted(d.runtimes.items()):
        table.add_row(
            name, f"{s.turns:,}", f"{s.hit_rate:.1%}", f"{s.prompt_tokens:,}", f"{s.reused_tokens:,}",
            f"{s.prefilled_tokens:,}", f"{s.sessions_open:,}",
            *(_mib(s.tiers[t].bytes) if t in s.tiers else "-" for t in ("device", "host")),
        )  # fmt: skip
    t = d.total()
    table.add_row("all", f"{t.turns:,}", f"{t.hit_rate:.1%}", f"{t.prompt_tokens:,}", f"{t.reused_tokens:,}",
                  f"{t.prefilled_tokens:,}", "", "", "", style="bold")  # fmt: skip
    table.caption = (
        f"Redis holds {d.sessions:,} sessions ({d.sessions_with_kv:,} with KV, {_mib(d.kv_bytes)}) "
        f"and {d.prefixes:,} prefixes ({_mib(d.prefix_bytes)})"
    )
    console.print(table)


def _fetch(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()
    except (OSError, ValueError) as e:
        hint = "is the runtime running with [metrics] enabled?"
        raise MetricsUnavailable(f"could not read metrics from {url}: {e}; {hint}") from None


def _deployment(url: str, cluster: bool) -> DeploymentStats:
    _needs("redis", "redis")
    from chatrt.board import Board
    from chatrt.cache.store import RedisStore

    store = RedisStore(url, ttl_s=1, lease_s=1, cluster=cluster)
    try:
        return Board(store).deployment()
    finally:
        store.close()


def _shown(key: str, value: object) -> str:
    if key == "hit_rate":
        return f"{value:.1%}"
    if key.endswith("_s") and isinstance(value, float):
        return f"{value * 1000:,.0f} ms"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _info(args: argparse.Namespace) -> int:
    config = _config(args)
    rt = _runtime(args)
    template = {"takes_tools": rt.template.takes_tools}  # whether tools with tool_choice auto can be answered
    console.print_json(json.dumps({"model": rt.lm.info.model_dump(), "chat_template": template,
                                   "config": config.model_dump(mode="json")}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
