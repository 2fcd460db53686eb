"""Load generator for the generation server: simulated devices, open-loop Poisson arrivals.

    python -m experiments.loadtest --checkpoint=runs/synthetic/duet \
        --out=benchmarks/results/cpu-amd-epyc-2core/serving

For every scenario (upload kind x delivery format) and offered rate, ``--devices`` simulated
devices send requests for ``--step_s`` seconds with exponential gaps (open loop: a slow
answer does not slow the arrivals), each carrying that device's real trigger (the
synthetic fleet's device-test sequences, or ``z`` encoded from them on the device). Per
step it records p50/p95/p99 end-to-end latency of answered requests, the server-side
generation time per request (the batched call's seconds over its rows), achieved
throughput, errors and 503 rejections. A sweep stops after ``--stop_after`` saturated
steps in a row (fewer than 90% of the offered requests answered, or errors). It then runs
the first scenario against an unbatched server (``max_batch=1``) at the same rates, and a
soak (``--soak_s``) at ``--soak_fraction`` of the best rate (the highest with p99 under
``--p99_ms`` and no errors; the lowest rate when none is), sampling the server's RSS.

The servers are started here (``python -m experiments.serve``) on 127.0.0.1, one per
configuration, and stopped with SIGTERM. Writes ``loadtest.json`` (machine and versions,
every step) and ``loadtest.png``. Client and server share this machine's cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
from absl import flags

from duet_jax import files
from experiments import cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "DUET run directory to serve.",
                                  required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_CONFIG_NAME = flags.DEFINE_string("data_config", "synthetic",
                                   "Shipped config whose data gives the devices' triggers.")
_SCENARIOS = flags.DEFINE_list("scenarios", ["ids:float32", "ids:int8", "z:float32", "z:int8"],
                               "upload:format pairs to sweep.")
_RATES = flags.DEFINE_list("rates", ["10", "25", "50", "75", "100", "150", "200", "300", "400"],
                           "Offered request rates (requests per second), ascending.")
_STEP_S = flags.DEFINE_float("step_s", 8.0, "Seconds per rate step.")
_DEVICES = flags.DEFINE_integer("devices", 1000, "Simulated devices.")
_P99_MS = flags.DEFINE_float("p99_ms", 50.0, "Latency target: p99 below this, no errors.")
_STOP_AFTER = flags.DEFINE_integer("stop_after", 2, "Stop a sweep after this many steps in "
                                   "a row past saturation (answered < 90% of offered).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 64, "The batched server's max_batch.")
_MAX_WAIT_MS = flags.DEFINE_float(
    "max_wait_ms", 0.0, "The batched server's max_wait_ms. 0: a batch is what arrived while "
    "the previous call ran (one call at a time), which on 2 cores beats waiting longer.")
_INLINE = flags.DEFINE_bool("inline_generation", False,
                            "Servers generate on the event loop's thread (serve.py's flag).")
_UNBATCHED = flags.DEFINE_bool("unbatched", True, "Also sweep the first scenario with "
                               "max_batch=1.")
_SWEEPS = flags.DEFINE_bool("sweeps", True, "Run the open-loop rate sweeps.")
_PAIRED_ROUNDS = flags.DEFINE_integer(
    "paired_rounds", 6, "Batched vs unbatched: rounds of closed-loop saturation, both servers "
    "up, alternating which goes first (0 = skip).")
_PAIRED_S = flags.DEFINE_float("paired_s", 4.0, "Seconds per server per paired round.")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 32, "Closed loop: requests in flight.")
_NAME = flags.DEFINE_string("name", "loadtest", "Output file stem (NAME.json, NAME.png).")
_SOAK_S = flags.DEFINE_float("soak_s", 300.0, "Soak seconds (0 = no soak).")
_SOAK_FRACTION = flags.DEFINE_float("soak_fraction", 0.7, "Soak rate / best rate.")
_SOAK_RPS = flags.DEFINE_float("soak_rps", 0.0, "Soak at this rate instead (0: the fraction "
                               "of this run's best rate).")
_TIMEOUT_S = flags.DEFINE_float("timeout_s", 5.0, "Per-request timeout.")
_SEED = flags.DEFINE_integer("seed", 0, "Arrivals and device choice.")
_NOTE = flags.DEFINE_string("note", "", "Free text stored in the JSON (e.g. machine load).")

MAX_REQUESTS_PER_STEP = 200_000  # a bound on memory and time whatever the flags say


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int | None:
    """Resident set size of process ``pid`` (Linux /proc), None elsewhere."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@contextlib.contextmanager
def server(checkpoint: str, max_batch: int, uploads: list[str], formats: list[str],
           max_wait_ms: float):
    """A server on a free localhost port -> (url, pid, warm-up seconds); SIGTERM at exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "experiments.serve", f"--checkpoint={checkpoint}",
           f"--port={port}", f"--max_batch={max_batch}", f"--max_wait_ms={max_wait_ms}",
           f"--uploads={','.join(uploads)}", f"--formats={','.join(formats)}",
           "--max_queue=1024", f"--inline_generation={_INLINE.value}"]
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.dirname(__file__)) or ".")
    url = f"http://127.0.0.1:{port}"
    try:
        start, deadline = time.monotonic(), time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}: {cmd}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not get ready in 15 minutes")
            time.sleep(0.5)
        yield url, proc.pid, time.monotonic() - start
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def device_triggers(devices: int, seed: int, num_items: int) -> np.ndarray:
    """``[devices, L]`` int32: each device's last device-test trigger in the synthetic fleet
    (distinct users, chosen with ``seed``)."""
    from experiments import config as config_lib
    from experiments import experiment

    config = _shipped(_CONFIG_NAME.value)
    config_lib.validate(config)
    test = experiment.load_data(config).test
    last = {}
    for row, user in enumerate(test.user):
        last[int(user)] = row
    rows = np.array(sorted(last.values()))
    rng = np.random.default_rng(seed)
    rows = rng.choice(rows, size=min(devices, len(rows)), replace=False)
    seqs = test.trigger_seq[rows].astype(np.int32)
    if seqs.max() > num_items:
        raise ValueError(f"the data's item ids reach {seqs.max()}, the model has {num_items}")
    return seqs


def _shipped(name: str):
    import importlib

    return importlib.import_module(f"experiments.configs.{name}").get_config()


async def one_rate(url: str, bodies: list[bytes], ctype: str, rate: float, seconds: float,
                   rng: np.random.Generator, timeout_s: float, rss_pid: int | None = None
                   ) -> dict:
    """Open-loop Poisson arrivals at ``rate`` for ``seconds``: one step's measurements."""
    count = min(int(rng.poisson(rate * seconds)), MAX_REQUESTS_PER_STEP)
    times = np.sort(rng.uniform(0, seconds, count))
    who = rng.integers(0, len(bodies), count)
    latencies, gen_per_req, batch_rows, queue_s = [], [], [], []
    status: dict[str, int] = {}
    rss = []
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        t0 = time.perf_counter()

        async def send(body: bytes) -> None:
            start = time.perf_counter()
            try:
                r = await client.post("/v1/generate", content=body,
                                      headers={"content-type": ctype,
                                               "accept": "application/msgpack"})
            except httpx.TimeoutException:
                status["timeout"] = status.get("timeout", 0) + 1
                return
            except httpx.HTTPError as err:
                key = type(err).__name__
                status[key] = status.get(key, 0) + 1
                return
            took = time.perf_counter() - start
            status[str(r.status_code)] = status.get(str(r.status_code), 0) + 1
            if r.status_code == 200:
                latencies.append(took)
                timing = _timing(r.content)
                gen_per_req.append(timing["generation_s"] / timing["batch_rows"])
                batch_rows.append(timing["batch_rows"])
                queue_s.append(timing["queue_s"])

        async def sample_rss() -> None:
            while True:
                rss.append((time.perf_counter() - t0, rss_bytes(rss_pid)))
                await asyncio.sleep(10)

        sampler = asyncio.create_task(sample_rss()) if rss_pid else None
        tasks = set()
        for at, i in zip(times, who, strict=True):  # open loop: arrivals ignore answers
            delay = at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(send(bodies[i]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        if sampler:
            sampler.cancel()
            rss.append((wall, rss_bytes(rss_pid)))
    ok = len(latencies)
    lat = np.asarray(latencies) * 1e3
    pct = {f"p{q}_ms": float(np.percentile(lat, q)) if ok else None for q in (50, 95, 99)}
    errors = sum(v for k, v in status.items() if k not in ("200", "503"))
    out = {
        "offered_rps": rate, "seconds": seconds, "wall_s": wall, "sent": count,
        "loadavg_1m_after": os.getloadavg()[0],  # the machine's other work, client included
        "ok": ok, "rejected_503": status.get("503", 0), "errors": errors, "status": status,
        "throughput_rps": ok / wall, **pct,
        "mean_ms": float(lat.mean()) if ok else None,
        "server_generation_ms_per_request": 1e3 * float(np.mean(gen_per_req)) if ok else None,
        "mean_batch_rows": float(np.mean(batch_rows)) if ok else None,
        "mean_queue_ms": 1e3 * float(np.mean(queue_s)) if ok else None,
    }
    if rss:
        out["rss"] = [{"t_s": round(t, 1), "bytes": b} for t, b in rss]
    return out


async def saturate(url: str, bodies: list[bytes], ctype: str, concurrency: int,
                   seconds: float, rng: np.random.Generator, timeout_s: float) -> dict:
    """Closed loop: ``concurrency`` requests always in flight for ``seconds``; what the
    server answers per second when it is never idle."""
    latencies, rows, status = [], [], {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    order = rng.integers(0, len(bodies), 1 << 20)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        t0 = time.perf_counter()
        end = t0 + seconds

        async def worker(w: int) -> None:
            i = w
            while time.perf_counter() < end:
                start = time.perf_counter()
                try:
                    r = await client.post("/v1/generate", content=bodies[order[i % len(order)]],
                                          headers={"content-type": ctype})
                    key = str(r.status_code)
                except httpx.HTTPError as err:
                    r, key = None, type(err).__name__
                status[key] = status.get(key, 0) + 1
                if r is not None and r.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                    rows.append(_timing(r.content)["batch_rows"])
                i += concurrency

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1e3
    return {"throughput_rps": len(lat) / wall, "ok": len(lat), "wall_s": wall,
            "status": status, "p50_ms": float(np.median(lat)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "mean_batch_rows": float(np.mean(rows)) if rows else None,
            "loadavg_1m_after": os.getloadavg()[0]}


def paired_batching(kind: str, fmt: str, bodies: list[bytes], ctype: str) -> dict:
    """Batched (``--max_batch``) vs unbatched (1) servers, both up, measured in alternating
    closed-loop rounds so that both see the same machine load; -> rounds and ratios."""
    rounds = []
    with server(_CHECKPOINT.value, _MAX_BATCH.value, [kind], [fmt], _MAX_WAIT_MS.value) as (
            url_b, _, _), server(_CHECKPOINT.value, 1, [kind], [fmt], 0.0) as (url_u, _, _):
        for r in range(_PAIRED_ROUNDS.value):
            order = [("batched", url_b), ("unbatched", url_u)]
            entry = {}
            for name, url in (order if r % 2 == 0 else order[::-1]):
                entry[name] = asyncio.run(saturate(
                    url, bodies, ctype, _CONCURRENCY.value, _PAIRED_S.value,
                    np.random.default_rng([_SEED.value, r]), _TIMEOUT_S.value))
            entry["ratio"] = (entry["batched"]["throughput_rps"]
                              / max(entry["unbatched"]["throughput_rps"], 1e-9))
            rounds.append(entry)
            print(f"paired round {r}: batched {entry['batched']['throughput_rps']:.1f} rps "
                  f"(batch {entry['batched']['mean_batch_rows'] or 0:.1f}), unbatched "
                  f"{entry['unbatched']['throughput_rps']:.1f} rps, ratio "
                  f"{entry['ratio']:.2f}", flush=True)
    ratios = [e["ratio"] for e in rounds]
    return {"scenario": f"{kind}:{fmt}", "concurrency": _CONCURRENCY.value,
            "seconds_per_round": _PAIRED_S.value, "rounds": rounds,
            "ratio_median": float(np.median(ratios)), "ratio_min": float(min(ratios)),
            "ratio_max": float(max(ratios))}


def _timing(body: bytes) -> dict:
    """The ``timing`` entry of a msgpack answer (the heads are not decoded: client CPU)."""
    import msgpack

    doc = msgpack.unpackb(body, raw=False)
    return doc["timing"]


def meets(step: dict, p99_ms: float) -> bool:
    return (step["ok"] > 0 and step["errors"] == 0 and step["rejected_503"] == 0
            and step["p99_ms"] < p99_ms)


def sweep(url: str, bodies: list[bytes], ctype: str, rates: list[float], seed: int,
          label: str) -> list[dict]:
    steps, misses = [], 0
    for i, rate in enumerate(rates):
        rng = np.random.default_rng([seed, i])
        step = asyncio.run(one_rate(url, bodies, ctype, rate, _STEP_S.value, rng,
                                    _TIMEOUT_S.value))
        step["meets_target"] = meets(step, _P99_MS.value)
        steps.append(step)
        print(f"{label} {rate:7.0f} rps: ok {step['ok']:6d} 503 {step['rejected_503']:5d} "
              f"err {step['errors']:4d} thr {step['throughput_rps']:7.1f} p50 "
              f"{_ms(step['p50_ms'])} p99 {_ms(step['p99_ms'])} gen/req "
              f"{_ms(step['server_generation_ms_per_request'], 4)} ms "
              f"batch {step['mean_batch_rows'] or 0:.1f}", flush=True)
        saturated = step["throughput_rps"] < 0.9 * rate or step["errors"] > 0
        misses = misses + 1 if saturated else 0
        if misses >= _STOP_AFTER.value:
            break
    return steps


def _ms(x, digits: int = 1) -> str:
    return "   -  " if x is None else f"{x:6.{digits}f}"


def best_rate(steps: list[dict]) -> float | None:
    good = [s["offered_rps"] for s in steps if s["meets_target"]]
    return max(good) if good else None


def request_bodies(kind: str, fmt: str, seqs: np.ndarray, z: np.ndarray | None) -> list[bytes]:
    from duet_jax.serving import codec

    rows = seqs if kind == "ids" else z
    return [codec.encode_request(kind, row[None], fmt, binary=True)[0] for row in rows]


def engine_timing(run, max_batch: int, repeats: int = 30) -> dict:
    """Generation alone, in this process, no HTTP: median ms per call and per row at batch 1
    and ``max_batch`` (ids upload, float32), after compilation."""
    from duet_jax.serving.engine import Engine

    engine = Engine(run, max_batch=max_batch, uploads=("ids",), formats=("float32",))
    out = {}
    for n in sorted({1, max_batch}):
        x = np.ones((n, engine.seq_len), np.int32)
        engine.run("ids", "float32", x)
        ms = 1e3 * float(np.median([engine.run("ids", "float32", x)[1]
                                    for _ in range(repeats)]))
        out[f"batch_{n}"] = {"ms_per_call": ms, "ms_per_request": ms / n}
    return out


def plot(path: str, payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, sweep_ in payload["sweeps"].items():
        steps = sweep_["steps"]
        x = [s["offered_rps"] for s in steps]
        for q, style in (("p50_ms", ":"), ("p99_ms", "-")):
            ax1.plot(x, [s[q] if s[q] is not None else np.nan for s in steps], style,
                     marker="o", ms=3, label=f"{name} {q[:3]}")
        ax2.plot(x, [s["throughput_rps"] for s in steps], marker="o", ms=3, label=name)
    ax1.axhline(payload["target"]["p99_ms"], color="grey", lw=0.8)
    ax1.set(xlabel="offered load (requests/s)", ylabel="end-to-end latency (ms)",
            yscale="log", title="latency vs offered load")
    ax2.plot(ax2.get_xlim(), ax2.get_xlim(), color="grey", lw=0.8)
    ax2.set(xlabel="offered load (requests/s)", ylabel="answered (requests/s)",
            title="throughput vs offered load")
    ax1.legend(fontsize=6, ncol=2)
    ax2.legend(fontsize=7)
    fig.suptitle(f"DUET generation server, {payload['machine']['processor']} "
                 f"({payload['machine']['cpu_count']} cores, shared with the client)",
                 fontsize=9)
    fig.tight_layout()
    with files.atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def main(argv):
    cli.start(argv)
    from duet_jax.cloud import Cloud
    from duet_jax.serving.engine import load_run
    from experiments import report

    run = load_run(_CHECKPOINT.value)
    rates = [float(r) for r in _RATES.value]
    scenarios = [tuple(s.split(":")) for s in _SCENARIOS.value]
    seqs = device_triggers(_DEVICES.value, _SEED.value, run.duet.model.config.num_items)
    z = None
    if any(kind == "z" for kind, _ in scenarios):  # encoded on each device
        z, _ = Cloud(run.duet, run.params, "z", mesh=None).device_upload(seqs)
    ctype = "application/msgpack"
    engine_only = engine_timing(run, _MAX_BATCH.value)
    print(f"engine alone: {engine_only}", flush=True)
    payload = {
        "machine": report.environment(), "note": _NOTE.value,
        "checkpoint": {"path": os.path.abspath(_CHECKPOINT.value), "version": run.version,
                       "step": run.step, "model": run.duet.model.name,
                       "model_config": {k: getattr(run.duet.model.config, k) for k in (
                           "num_items", "seq_len", "embed_dim")},
                       "head_values": run.duet.spec.num_values},
        "settings": {"devices": len(seqs), "step_s": _STEP_S.value, "rates": rates,
                     "max_batch": _MAX_BATCH.value, "max_wait_ms": _MAX_WAIT_MS.value,
                     "inline_generation": _INLINE.value,
                     "timeout_s": _TIMEOUT_S.value, "seed": _SEED.value,
                     "body": "msgpack, one trigger per request"},
        "target": {"p99_ms": _P99_MS.value, "errors": 0, "rejections": 0},
        "paper_generation_ms_per_request": 0.34,
        "engine_only": engine_only,
        "sweeps": {},
    }
    out = _OUT.value
    uploads = sorted({k for k, _ in scenarios})
    formats = sorted({f for _, f in scenarios})

    def save():
        files.write_text_atomic(os.path.join(out, f"{_NAME.value}.json"), files.dumps(payload))

    if _PAIRED_ROUNDS.value > 0:
        kind, fmt = scenarios[0]
        payload["batched_vs_unbatched_paired"] = paired_batching(
            kind, fmt, request_bodies(kind, fmt, seqs, z), ctype)
        save()
    with contextlib.ExitStack() as stack:
        if not _SWEEPS.value:
            scenarios_swept = []
        else:
            url, pid, warm = stack.enter_context(server(
                _CHECKPOINT.value, _MAX_BATCH.value, uploads, formats, _MAX_WAIT_MS.value))
            payload["server_warmup_s"] = warm
            scenarios_swept = scenarios
        for kind, fmt in scenarios_swept:
            name = f"{kind}:{fmt}"
            steps = sweep(url, request_bodies(kind, fmt, seqs, z), ctype, rates, _SEED.value,
                          name)
            payload["sweeps"][name] = {"max_batch": _MAX_BATCH.value, "steps": steps,
                                       "best_rps": best_rate(steps)}
            save()
    if _UNBATCHED.value and _SWEEPS.value:
        kind, fmt = scenarios[0]
        with server(_CHECKPOINT.value, 1, [kind], [fmt], 0.0) as (url, pid, warm):
            steps = sweep(url, request_bodies(kind, fmt, seqs, z), ctype, rates,
                          _SEED.value, f"{kind}:{fmt} unbatched")
        batched = payload["sweeps"][f"{kind}:{fmt}"]
        payload["sweeps"][f"{kind}:{fmt}:max_batch=1"] = {"max_batch": 1, "steps": steps,
                                                          "best_rps": best_rate(steps)}
        top_b = max(s["throughput_rps"] for s in batched["steps"])
        top_u = max(s["throughput_rps"] for s in steps)
        payload["batched_vs_unbatched"] = {
            "scenario": f"{kind}:{fmt}", "max_throughput_batched_rps": top_b,
            "max_throughput_unbatched_rps": top_u, "ratio": top_b / top_u,
            "best_rps_batched": batched["best_rps"], "best_rps_unbatched": best_rate(steps)}
        save()
    first = payload["sweeps"].get(f"{scenarios[0][0]}:{scenarios[0][1]}", {})
    if _SOAK_S.value > 0:
        kind, fmt = scenarios[0]
        rate = _SOAK_RPS.value or _SOAK_FRACTION.value * (first.get("best_rps") or rates[0])
        with server(_CHECKPOINT.value, _MAX_BATCH.value, [kind], [fmt],
                    _MAX_WAIT_MS.value) as (url, pid, warm):
            step = asyncio.run(one_rate(url, request_bodies(kind, fmt, seqs, z), ctype, rate,
                                        _SOAK_S.value, np.random.default_rng([_SEED.value, 99]),
                                        _TIMEOUT_S.value, rss_pid=pid))
        step["scenario"] = f"{kind}:{fmt}"
        step["rate_from"] = (
            "--soak_rps" if _SOAK_RPS.value else f"{_SOAK_FRACTION.value} x best_rps"
            if first.get("best_rps") else
            f"{_SOAK_FRACTION.value} x the lowest rate (none met the target)")
        rss = [r["bytes"] for r in step.get("rss", []) if r["bytes"]]
        step["rss_start_bytes"], step["rss_end_bytes"] = (rss[0], rss[-1]) if rss else (None,
                                                                                      None)
        payload["soak"] = step
        print(f"soak {rate:.0f} rps for {_SOAK_S.value:.0f} s: ok {step['ok']} errors "
              f"{step['errors']} 503 {step['rejected_503']} p99 {_ms(step['p99_ms'])} ms, "
              f"RSS {step['rss_start_bytes']} -> {step['rss_end_bytes']}", flush=True)
    save()
    if payload["sweeps"]:
        plot(os.path.join(out, f"{_NAME.value}.png"), payload)
    print(f"written to {os.path.abspath(out)}/{_NAME.value}.json")


run = cli.entry_point(main)  # the console script duet-loadtest

if __name__ == "__main__":
    run()
