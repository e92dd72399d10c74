"""Scale-out (issue 22, benchmarks), in one run over SmolLM2-135M-Instruct and random rank-8 LoRAs of it (all seven
projections: 9.8 MB of float32 safetensors each, the size of a real adapter of this base):

  (1) The first request on an adapter a vLLM server has never seen, through moerge's LoRA resolver vs a local path.
      Two `moerge serve` processes side by side: `remote` names a vLLM server "on another machine" by
      MOERGE_VLLM_REMOTE (bench/remote.py: another Unix user that cannot read MOERGE_HOME, its own resolver cache,
      stock vLLM LoRA ops), `local` manages its own vLLM server with the same flags (stock ops, no compile, the
      same --max-model-len, --max-loras and KV cache). Each of N fresh adapters is registered on both, then asked
      1 + L times in a row through each (the order of the two alternating per adapter): the first request
      (max_tokens 1, greedy) end to end, the second, and the steady state (the median of the L after the first;
      before all this, one adapter on each server untimed: a server's first LoRA ever costs more). Through
      `remote` moerge sends the adapter's id and the server's resolver downloads the files from moerge and checks
      them against the sha256 manifest before vLLM loads them; through `local` moerge POSTs /v1/load_lora_adapter
      with its folder's path. The resolver's share: its Fetcher (moerge_vllm_resolver.fetch) timed alone against
      the same moerge into an empty cache.
  (2) Two gateway replicas vs one in front of that remote vLLM server: a second `moerge serve --no-worker` on the
      same PostgreSQL database and MOERGE_HOME; C clients on plain adapters, fixed-length requests (`ignore_eos`,
      greedy), in segments of S seconds in the order 1, 2, 2, 1, ...; with two replicas half of the clients ask
      each (a round-robin in the client, no load balancer).

    .venv/bin/python -m bench.scale_out [--adapters 7 --later 3] [--clients 24 --seconds 30 --segments 12]
                                         [--max-tokens 16] [--only 1,2]

About 8.5 minutes with the defaults here (two vLLM starts, side by side, included).

PostgreSQL: scripts/postgres.sh (started if it is not running; left running); each run makes fresh databases and
drops them. Writes bench/results/scale_out.json and a section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.load import (  # noqa: E402
    MOERGE,
    TOPICS,
    Call,
    CpuShare,
    Kind,
    Stack,
    _load_avg,
    _random_adapters,
    check_completion,
    errors_of,
    free_port,
    import_expert,
    moerge_env,
    process_tree,
    run_load,
    summarize,
    warm_up,
)
from bench.remote import RemoteVLLM, remote_vllm  # noqa: E402
from bench.results import write_section  # noqa: E402
from serving.vllm_process import cpu_bind_list  # noqa: E402

ADMIN_KEY = "bench-scale-out-admin-key-0123456789"
PROMPT = TOPICS[0].prompts[0]
# Both vLLM servers alike: what the remote one gets through remote_vllm's arguments, the managed one through moerge.
MAX_LORAS, MAX_MODEL_LEN, KV_CACHE_GIB = 8, 512, 1
REPLICA_ORDER = (1, 2, 2, 1)  # repeated: drift falls on both alike


# --------------------------------------------------------------------------------------------- set-up


def postgres_url() -> str:
    """The test PostgreSQL server's URL (scripts/postgres.sh starts it if it is not running)."""
    done = subprocess.run(["bash", str(ROOT / "scripts/postgres.sh")], check=True, capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1]


async def _autocommit(url: str, sql: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.exec_driver_sql(sql)
    finally:
        await engine.dispose()


def fresh_database(server_url: str, prefix: str, cleanup: contextlib.ExitStack) -> str:
    """The URL of a new database on the server of ``server_url``, dropped when ``cleanup`` closes."""
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    asyncio.run(_autocommit(server_url, f'CREATE DATABASE "{name}"'))
    cleanup.callback(lambda: asyncio.run(_autocommit(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')))
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def new_stack(home: Path, roots: Sequence[Path], base: Path, **settings: str) -> Stack:
    """`moerge init` on ``home`` and the base registered as `base` (before the server starts: MOERGE_VLLM_REMOTE
    is read then), the server not yet started."""
    home.mkdir(parents=True)
    stack = Stack(home, moerge_env(home, roots, **settings), ADMIN_KEY)
    stack.init()
    subprocess.run([str(MOERGE), "expert", "add", str(base), "--slug", "base"], env=stack.env, check=True,
                   capture_output=True)  # fmt: skip
    return stack


def stop_all(stacks: Mapping[str, Stack]) -> None:
    for stack in stacks.values():
        stack.stop()


# --------------------------------------------------------------------------------------------- (1) first request


def ask(stack: Stack, model: str, timeout_s: float) -> float:
    """One greedy 1-token chat completion of ``model`` through ``stack``: its time end to end, in ms."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 1, "temperature": 0}
    start = time.perf_counter()
    resp = httpx.post(f"{stack.url}/v1/chat/completions", json=body, headers=stack.headers, timeout=timeout_s)
    elapsed = (time.perf_counter() - start) * 1000
    problem = f"HTTP {resp.status_code} {resp.text[:300]}" if resp.status_code != 200 else None
    problem = problem or check_completion(resp.json(), model, 1)
    if problem:
        raise RuntimeError(f"{model} through {stack.url}: {problem}\n{stack.tails()}")
    return elapsed


def fetch_alone(stack: Stack, key: str, ref: str, cache: Path) -> tuple[float, int]:
    """The resolver's download and check of ``ref`` from ``stack`` into the empty ``cache``: ms and bytes."""
    from moerge_vllm_resolver.fetch import FetchConfig, Fetcher

    fetcher = Fetcher(FetchConfig(url=stack.url, key=key, cache_dir=cache))
    start = time.perf_counter()
    found = asyncio.run(fetcher.fetch(ref))
    elapsed = (time.perf_counter() - start) * 1000
    if found is None:
        raise RuntimeError(f"the resolver's Fetcher found no adapter {ref!r}")
    return elapsed, sum(size for _, size, _ in found[0].files)


def first_requests(
    stacks: Mapping[str, Stack], remote: RemoteVLLM, fetch_key: str, adapters: Sequence[Path], work: Path,
    timeout_s: float, later: int, prefix: str = "fresh",
) -> list[dict[str, Any]]:  # fmt: skip
    """Per adapter: registered on every stack, then through each (the stacks' order turning per adapter) the first
    request and ``later`` more (the first of them is the second request; their median, the steady state), then the
    Fetcher alone against the `remote` stack."""
    rows = []
    names = list(stacks)
    for i, folder in enumerate(adapters):
        slug = f"{prefix}-{i}"
        ids = {name: import_expert(stack, folder, slug, base="base")["id"] for name, stack in stacks.items()}
        row: dict[str, Any] = {"slug": slug, "order": names[i % len(names) :] + names[: i % len(names)]}
        for name in row["order"]:
            first = ask(stacks[name], slug, timeout_s)
            row[name] = {"first_ms": first, "later_ms": [ask(stacks[name], slug, timeout_s) for _ in range(later)]}
        if ids["remote"] not in remote.models():
            raise RuntimeError(f"{slug} answered through the remote stack, yet its server does not list it")
        row["fetch_ms"], row["bytes"] = fetch_alone(stacks["remote"], fetch_key, ids["remote"], work / "fetch" / slug)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def first_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per path: median, min and max over the adapters of the first request, the second, the steady state (each
    adapter's median of its later requests) and the first minus the steady state; the Fetcher's time and share."""
    out: dict[str, Any] = {"fetch_ms": _stats([r["fetch_ms"] for r in rows]), "mb": rows[0]["bytes"] / 1e6}
    for name in ("remote", "local"):
        steady = [statistics.median(r[name]["later_ms"]) for r in rows]
        out[name] = {
            "first_ms": _stats([r[name]["first_ms"] for r in rows]),
            "second_ms": _stats([r[name]["later_ms"][0] for r in rows]),
            "steady_ms": _stats(steady),
            "added_ms": _stats([r[name]["first_ms"] - st for r, st in zip(rows, steady, strict=True)]),
        }
    out["fetch_share"] = _stats([r["fetch_ms"] / r["remote"]["first_ms"] for r in rows])
    out["remote_minus_local_ms"] = _stats([r["remote"]["first_ms"] - r["local"]["first_ms"] for r in rows])
    return out


# --------------------------------------------------------------------------------------------- (2) replicas


def _cpu_seconds(pids: Sequence[int]) -> float:
    """CPU time used so far by ``pids`` (user + system)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def segment(
    urls: Sequence[str], headers: Mapping[str, str], kinds: Sequence[Kind], *, clients: int, seconds: float,
    **options: Any,
) -> tuple[list[Call], float]:  # fmt: skip
    """``clients`` clients for ``seconds``, split evenly over ``urls`` (each client keeps to one); returns every
    call and the wall time until the stop."""
    stop = asyncio.Event()
    calls: list[Call] = []
    shares = [clients // len(urls) + (i < clients % len(urls)) for i in range(len(urls))]
    start = time.monotonic()
    loads = [
        asyncio.create_task(run_load(url, headers, kinds, clients=n, stop=stop, calls=calls, **options))
        for url, n in zip(urls, shares, strict=True)
    ]
    await asyncio.sleep(seconds)
    stop.set()
    wall = time.monotonic() - start
    await asyncio.gather(*loads)
    return calls, wall


def compare_replicas(
    replicas: Sequence[Stack], remote: RemoteVLLM, slugs: Sequence[str], *, segments: int, **options: Any
) -> dict[str, Any]:
    """``segments`` segments, 1 or 2 replicas in the order REPLICA_ORDER. Per count: answers/s and tokens/s of the
    answers that ended within their segment, over the time from each segment's start to the last of them (the
    clients start together and their fixed-length requests end in waves: counting to the segment's end would add
    up to a wave's worth of noise); latencies of every answer; the CPU the gateways and the vLLM server used."""
    kinds = [Kind("adapters", tuple(slugs))]
    acc: dict[int, dict[str, Any]] = {
        n: {"calls": [], "counted": [], "span": 0.0, "cpu": [0.0, 0.0], "elapsed": 0.0} for n in (1, 2)
    }
    rows = []
    for i in range(segments):
        n = REPLICA_ORDER[i % len(REPLICA_ORDER)]
        groups = [[p for r in replicas if r.server for p in process_tree(r.server.pid)], process_tree(remote.proc.pid)]
        cpu0, t0 = [_cpu_seconds(g) for g in groups], time.monotonic()
        calls, wall = asyncio.run(segment([r.url for r in replicas[:n]], replicas[0].headers, kinds, **options))
        cpu1, elapsed = [_cpu_seconds(g) for g in groups], time.monotonic() - t0
        start = min(c.start for c in calls)
        within = [c for c in calls if c.ok and c.end <= start + wall]
        span = max((c.end for c in within), default=start + wall) - start
        mode = acc[n]
        mode["calls"] += calls
        mode["counted"] += within
        mode["span"] += span
        mode["elapsed"] += elapsed
        mode["cpu"] = [mode["cpu"][k] + cpu1[k] - cpu0[k] for k in (0, 1)]
        rows.append(
            {
                "replicas": n,
                "answers": len(within),
                "span_s": span,
                "answers_per_s": len(within) / span,
                "p50_ms": summarize(calls, wall)["all"]["p50_ms"],
                "errors": sum(not c.ok for c in calls),
                "load_avg": _load_avg(),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    out: dict[str, Any] = {"segments": rows}
    for n, mode in acc.items():
        out[str(n)] = summarize(mode["calls"], float("inf"))["all"] | {
            "span_s": mode["span"],
            "answers_per_s": len(mode["counted"]) / mode["span"],
            "tokens_per_s": sum(c.tokens for c in mode["counted"]) / mode["span"],
            "errors_seen": errors_of(mode["calls"])[:20],
            "gateway_cores": mode["cpu"][0] / mode["elapsed"],
            "vllm_cores": mode["cpu"][1] / mode["elapsed"],
        }
    out["ratio_answers"] = out["2"]["answers_per_s"] / out["1"]["answers_per_s"]
    # each pair of neighbouring segments (one of each count): the machine's drift cancels within a pair
    pairs = [sorted(rows[i : i + 2], key=lambda row: row["replicas"]) for i in range(0, len(rows) - 1, 2)]
    out["pair_ratios"] = [two["answers_per_s"] / one["answers_per_s"] for one, two in pairs]
    out["pair_ratio_median"] = statistics.median(out["pair_ratios"]) if pairs else float("nan")
    return out


# --------------------------------------------------------------------------------------------- the run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=7, help="fresh adapters for (1)")
    parser.add_argument("--later", type=int, default=3, help="requests after the first on each adapter, for (1)")
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=30, help="each segment of (2)")
    parser.add_argument("--segments", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=300, help="each request's total client timeout, s")
    parser.add_argument("--only", default="1,2", help="comma-separated benchmarks: 1, 2")
    args = parser.parse_args()
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    # The remote server binds its OpenMP threads to every core, as moerge does for its managed ones (vLLM's
    # `auto` keeps one of the two cores for its scheduler); server_env passes VLLM_* on.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_bind_list("all"))
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "adapters": args.adapters,
        "clients": args.clients,
        "seconds": args.seconds,
        "segments": args.segments,
        "max_tokens": args.max_tokens,
        "load_before": _load_avg(),
    }
    from registry.convert import cached_smollm2

    base = cached_smollm2()
    work = Path(tempfile.mkdtemp(prefix="moerge-scale-out-"))  # 0700: the remote user cannot read the homes
    stacks: dict[str, Stack] = {}
    done = False
    cpu = CpuShare()
    try:
        with contextlib.ExitStack() as cleanup:
            server = postgres_url()
            adapters = _random_adapters(base, work / "adapters", args.adapters + 1)  # the last one warms up
            remote_port = free_port()
            roots = [work, base]
            stacks["remote"] = new_stack(
                work / "home-remote",
                roots,
                base,
                MOERGE_DATABASE_URL=fresh_database(server, "moerge_bench_remote", cleanup),
                MOERGE_VLLM_REMOTE=f"base=http://127.0.0.1:{remote_port}",
                MOERGE_SESSION_SECRET=f"bench-{uuid.uuid4().hex}",  # one for every replica
            )
            stacks["local"] = new_stack(
                work / "home-local",
                roots,
                base,
                MOERGE_DATABASE_URL=fresh_database(server, "moerge_bench_local", cleanup),
                MOERGE_VLLM_LORA_OPS="vllm",
                MOERGE_VLLM_COMPILE="0",
                MOERGE_VLLM_MAX_MODEL_LEN=str(MAX_MODEL_LEN),
                MOERGE_VLLM_KV_CACHE_GIB=str(KV_CACHE_GIB),
            )
            cleanup.callback(stop_all, stacks)
            for stack in stacks.values():
                stack.start_server()
            keys = stacks["remote"].api("POST", "/api/keys", json={"name": "resolver", "scopes": ["fetch"]})
            fetch_key = keys.json()["key"]
            t0 = time.monotonic()
            # the managed server starts on its first request, meanwhile the remote one
            pool = ThreadPoolExecutor(1)
            local_start = pool.submit(warm_up, stacks["local"], [Kind("base", ("base",))])
            cleanup.callback(pool.shutdown, wait=False)
            remote = cleanup.enter_context(
                remote_vllm(
                    base,
                    moerge_url=stacks["remote"].url,
                    fetch_key=fetch_key,
                    port=remote_port,
                    max_loras=MAX_LORAS,
                    max_model_len=MAX_MODEL_LEN,
                    kv_cache_gib=KV_CACHE_GIB,
                )
            )
            local_start.result()
            warm_up(stacks["remote"], [Kind("base", ("base",))])
            results["servers_ready_s"] = time.monotonic() - t0
            results["remote_user"] = remote.user.pw_name if remote.user else None
            # one adapter through each before anything is timed: a server's first LoRA load ever costs more
            results["warm_adapter"] = first_requests(
                stacks, remote, fetch_key, adapters[-1:], work, args.timeout, args.later, prefix="warm"
            )[0]
            if "1" in only:
                results["load_before_1"] = _load_avg()
                rows = first_requests(stacks, remote, fetch_key, adapters[:-1], work, args.timeout, args.later)
                results["first"] = {"rows": rows, "summary": first_summary(rows), "load_after": _load_avg()}
                print(json.dumps(results["first"]["summary"], indent=1), flush=True)
            if "2" in only:
                slugs = [f"fresh-{i}" for i in range(min(4, args.adapters))]
                if "1" not in only:
                    for i, folder in enumerate(adapters[: len(slugs)]):
                        import_expert(stacks["remote"], folder, slugs[i], base="base")
                second = Stack(work / "replica-2", stacks["remote"].env, ADMIN_KEY)  # the same home and database
                second.home.mkdir()  # (its log only: Stack keeps logs in `home`)
                stacks["replica-2"] = second
                second.start_server()
                for replica in (stacks["remote"], second):
                    warm_up(replica, [Kind("adapters", tuple(slugs))])
                mark = cpu.mark()
                results["load_before_2"] = _load_avg()
                results["replicas"] = compare_replicas(
                    [stacks["remote"], second],
                    remote,
                    slugs,
                    segments=args.segments,
                    clients=args.clients,
                    seconds=args.seconds,
                    max_tokens=args.max_tokens,
                    timeout_s=args.timeout,
                )
                results["replicas"]["cpu"] = cpu.since(mark)
                results["replicas"]["adapters"] = slugs
                print(json.dumps(results["replicas"], indent=1, default=str), flush=True)
        done = True
    finally:
        cpu.close()
        if done:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work} (the processes' logs are in its home-* folders)", file=sys.stderr)
    results["load_after"] = _load_avg()
    (ROOT / "bench/results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench/results/scale_out.json").write_text(json.dumps(results, indent=1, default=str))
    body = report_markdown(results)
    write_section(ROOT / "bench/RESULTS.md", "Scale-out: remote adapters and gateway replicas (issue 22)", body)
    print(body)


def _md_table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A markdown table, every column but the first right-aligned."""
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _ms(s: Mapping[str, float]) -> str:
    return f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})"


def report_markdown(r: Mapping[str, Any]) -> str:
    lines = [
        "`bench/scale_out.py`: SmolLM2-135M-Instruct (float32) and random rank-8 LoRAs on its seven projections "
        f"(each {r['warm_adapter']['bytes'] / 1e6:.1f} MB of files, the size of a real "
        "adapter of this base). One remote vLLM server (`bench/remote.py`: run as another Unix user "
        f"({r['remote_user'] or 'this user: not root'}) that cannot read moerge's data directory, its own resolver "
        "cache, stock vLLM LoRA ops, moerge's resolver pip-installed), moerge on PostgreSQL. "
        f"{r['machine']}, shared with other jobs: load average (1/5/15 min) {r['load_before']} before, "
        f"{r['load_after']} after.",
        "",
    ]
    if "first" in r:
        s, w = r["first"]["summary"], r["warm_adapter"]
        lines += [
            f"### First request on an adapter the server has never seen ({len(r['first']['rows'])} adapters)",
            "",
            "Two `moerge serve` side by side: `remote` names the remote server (MOERGE_VLLM_REMOTE: moerge sends "
            "the adapter's id, the resolver downloads its files from moerge, checks them against the sha256 "
            "manifest, vLLM loads them); `local` manages its own vLLM server with the same flags (stock LoRA ops, "
            f"no compile, --max-loras {MAX_LORAS}, --max-model-len {MAX_MODEL_LEN}, {KV_CACHE_GIB} GiB KV cache) "
            "and POSTs /v1/load_lora_adapter with the folder's path. Each adapter is registered on both, then "
            f"asked {1 + len(w['remote']['later_ms'])} times in a row through each, the order of the two turning per "
            "adapter; a chat completion of 1 token, greedy, timed end to end at the client. Steady: each adapter's "
            "median of its requests after the first. Median over the adapters (min-max), ms:",
            "",
        ]
        paths = (("remote", "remote server, resolver"), ("local", "managed local server, path"))
        lines += _md_table(
            ("path", "first request", "second request", "steady", "first - steady"),
            (
                [label, *(_ms(s[name][k]) for k in ("first_ms", "second_ms", "steady_ms", "added_ms"))]
                for name, label in paths
            ),
        )
        lines += [
            "",
            "The first request through the resolver minus the first through a local path, adapter by adapter: "
            f"{_ms(s['remote_minus_local_ms'])} ms. The resolver's download and check alone (its `Fetcher`, against "
            f"the same moerge, into an empty cache): {_ms(s['fetch_ms'])} ms, {s['fetch_share']['median']:.0%} of "
            f"the remote first request (median). Load average {r['load_before_1']} before, "
            f"{r['first']['load_after']} after. Not counted: "
            f"a first adapter on each server beforehand (a server's first LoRA ever: remote "
            f"{w['remote']['first_ms']:.0f} ms, local {w['local']['first_ms']:.0f} ms).",
        ]
    if "replicas" in r:
        p = r["replicas"]
        cpu_ms = [1000 * p[n]["gateway_cores"] / p[n]["answers_per_s"] for n in ("1", "2")]
        rates = [row["answers_per_s"] for row in p["segments"]]
        ratios = p["pair_ratios"] or [float("nan")]
        cost = (
            f"changes the throughput by less than this shared machine's noise (the pairs range from "
            f"{min(ratios):.2f} to {max(ratios):.2f})"
            if min(ratios) <= 1 <= max(ratios)
            else f"changes the throughput in every pair of segments ({min(ratios):.2f} to {max(ratios):.2f})"
        )
        lines += [
            "",
            f"### One vs two gateway replicas, {r['clients']} clients",
            "",
            f"`moerge serve --no-worker` x 1 or 2 on one PostgreSQL database and one MOERGE_HOME, both naming the "
            f"same remote vLLM server; {r['clients']} clients on {len(p['adapters'])} plain adapters, each request "
            f"{r['max_tokens']} tokens (`ignore_eos`), greedy, half of them streamed; with two replicas half of the "
            f"clients ask each. {len(p['segments'])} segments of {r['seconds']:.0f} s in the order "
            f"{', '.join(str(row['replicas']) for row in p['segments'])} (load average {r['load_before_2']} "
            f"before; this benchmark's processes used {p['cpu']['ours_cores']:.2f} cores on average, other jobs "
            f"{p['cpu']['others_cores']:.2f}).",
            "",
        ]
        columns = (("answers", "answers", "d"), ("errors", "errors", "d"), ("answers/s", "answers_per_s", ".2f"),
                   ("tokens/s", "tokens_per_s", ".1f"), ("p50 ms", "p50_ms", ".0f"), ("p95 ms", "p95_ms", ".0f"),
                   ("CPU cores: gateways", "gateway_cores", ".2f"), ("vLLM", "vllm_cores", ".2f"))  # fmt: skip
        lines += _md_table(
            ["replicas", *(head for head, _, _ in columns)],
            ([n, *(format(p[n][key], spec) for _, key, spec in columns)] for n in ("1", "2")),
        )
        lines += [
            "",
            f"Two replicas / one in answers/s: **{p['pair_ratio_median']:.2f}**, the median of the "
            f"{len(p['pair_ratios'])} pairs of neighbouring segments ("
            + ", ".join(f"{x:.2f}" for x in p["pair_ratios"])
            + f"); {p['ratio_answers']:.2f} over all segments. Errors: {p['1']['errors']} with one replica, "
            f"{p['2']['errors']} with two. Answers/s and tokens/s count the answers that ended within "
            "their segment, over the time from its start to the last of them (the clients start together and their "
            "fixed-length requests end in waves); latencies every answer. Segment by segment (answers/s): "
            + ", ".join(f"{row['replicas']}: {row['answers_per_s']:.2f}" for row in p["segments"])
            + f". The one vLLM server is the bottleneck on this 2-core machine: it used {p['1']['vllm_cores']:.2f} "
            f"and {p['2']['vllm_cores']:.2f} cores, the gateways together {p['1']['gateway_cores']:.2f} and "
            f"{p['2']['gateway_cores']:.2f} (about {cpu_ms[0]:.0f} and {cpu_ms[1]:.0f} ms of a gateway's CPU an "
            "answer). A second replica cannot raise the throughput here, and the figure stands for no more than "
            f"that: a second replica on the same database and store {cost} and adds "
            f"{'no' if p['2']['errors'] == 0 else p['2']['errors']} errors (answers/s ran from {min(rates):.2f} to "
            f"{max(rates):.2f} segment to segment). Where replicas pay off (vLLM on GPU "
            "machines, more of the gateway's own work: routing, streams, many clients) this machine cannot show.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
