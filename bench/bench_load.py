"""Load: N concurrent chat sessions against the running app, turn times and server memory.

    python bench/bench_load.py --sessions 20 --turns 10 [--json] [-- APP OPTIONS]

Starts `recllm serve` on a free 127.0.0.1 port in a child process (options after `--` go to it, e.g.
`-- --adapter none`), warms it with one turn, then runs `--sessions` gradio_client sessions at once, each
sending `--turns` scripted messages (an ask naming its own movie, refinements, why, and finally "what do you
know about me?"). Reports every reply's arrival, cross-talk (a session's profile naming another session's
opening movie that it was never shown itself), turn-time p50/p95/max (seconds; a turn waits in the engine
queue: up to RECLLM_CONCURRENCY turns run at once, sharing model calls), and the server's RSS after warm-up, after each quarter of the turns and at
the end. The server is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

SCRIPT = ['I loved "{title}"', "something older", "not that one", "why #2?", "more like #1", "no horror",
          "something newer", "why the first one?", "show me more"]
LAST = "what do you know about me?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Terminate a child process; kill it when it has not ended after `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def rss_mb(pid: int) -> float:
    """Resident memory of `pid` and its children (MB), from /proc."""
    total = 0
    for p in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def children(pid: int) -> list[int]:
    try:
        kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in children(k)]


def text_of(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return " ".join(str(c.get("text", c)) if isinstance(c, dict) else str(c) for c in content)
    return str(content)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    app_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--turns", type=int, default=10, help="messages per session (the last asks for the profile)")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from gradio_client import Client

    from recllm.catalog import load_catalog, load_interactions

    catalog, ratings = load_catalog(), load_interactions()
    popular = [i for i, _ in ratings.popularity().most_common(200)]
    titles = [catalog.get(i).title for i in popular if len(catalog.get(i).title) > 8][: args.sessions]
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = subprocess.Popen([sys.executable, "-m", "recllm", "serve", "--port", str(port), "--no-memory",
                               *app_args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + args.start_timeout
        while True:
            if server.poll() is not None:
                print(f"bench: the app exited: {server.stderr.read()[-2000:]}", file=sys.stderr)
                return 1
            try:
                Client(url, verbose=False)
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    print("bench: the app did not start in time", file=sys.stderr)
                    return 1
                time.sleep(2)
        t = time.monotonic()
        Client(url, verbose=False).predict('I loved "Heat"', api_name="/chat")
        warm_s = time.monotonic() - t
        rss_start = rss_mb(server.pid)

        times: list[float] = []
        rss_by_turns: dict[int, float] = {}  # server RSS (MB) after every quarter of the turns
        outcomes: dict[int, object] = {}
        lock = threading.Lock()

        def converse(n: int) -> None:
            try:
                client = Client(url, verbose=False)
                script = [SCRIPT[i % len(SCRIPT)].format(title=titles[n]) for i in range(args.turns - 1)] + [LAST]
                for message in script:
                    t0 = time.monotonic()
                    out = client.predict(message, api_name="/chat")
                    with lock:
                        times.append(time.monotonic() - t0)
                        if len(times) % max(1, len(titles) * args.turns // 4) == 0:
                            rss_by_turns[len(times)] = round(rss_mb(server.pid), 1)
                conversation = out[1]
                said = [text_of(m) for m in conversation if m["role"] == "user"]
                profile = text_of(conversation[-1])
                seen = " ".join(text_of(m) for m in conversation[:-1])  # what this session was shown itself
                # cross-talk: the profile names another session's opening movie that this session never saw
                others = [t for j, t in enumerate(titles) if j != n and t in profile and t not in seen]
                outcomes[n] = {"replies": len(said), "own_messages": said[-len(script):] == script,
                               "own_title_in_profile": titles[n] in profile, "other_titles": others}
            except Exception as exc:  # noqa: BLE001 - reported
                outcomes[n] = {"error": repr(exc)[:300]}

        t = time.monotonic()
        threads = [threading.Thread(target=converse, args=(n,)) for n in range(len(titles))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.monotonic() - t
        rss_end = rss_mb(server.pid)
    finally:
        stop(server)

    errors = {n: o["error"] for n, o in outcomes.items() if "error" in o}
    crosstalk = {n: o["other_titles"] for n, o in outcomes.items() if o.get("other_titles")}
    wrong = [n for n, o in outcomes.items() if "error" not in o
             and not (o["own_messages"] and o["own_title_in_profile"])]
    arr = np.array(times) if times else np.array([np.nan])
    report = {
        "sessions": len(titles), "turns_per_session": args.turns, "turns_answered": len(times),
        "turns_expected": len(titles) * args.turns, "errors": errors, "crosstalk": crosstalk,
        "sessions_missing_own_state": wrong, "turn_s": {"p50": round(float(np.median(arr)), 2),
                                                         "p95": round(float(np.percentile(arr, 95)), 2),
                                                         "max": round(float(arr.max()), 2)},
        "throughput_turns_per_s": round(len(times) / wall, 3), "wall_s": round(wall, 1),
        "warm_turn_s": round(warm_s, 2), "rss_mb": {"after_warmup": round(rss_start, 1), "by_turns_answered": rss_by_turns,
                                                    "end": round(rss_end, 1)},
        "app_args": app_args, "ranker": os.environ.get("RECLLM_RANKER", "llm"), "load_avg": os.getloadavg(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['turns_answered']}/{report['turns_expected']} turns answered by {len(titles)} sessions in "
              f"{report['wall_s']} s; errors {len(errors)}, cross-talk {len(crosstalk)}, "
              f"missing own state {len(wrong)}")
        print(f"turn time p50 {report['turn_s']['p50']} s, p95 {report['turn_s']['p95']} s, "
              f"max {report['turn_s']['max']} s")
        print(f"server RSS after warm-up {report['rss_mb']['after_warmup']} MB, after all turns "
              f"{report['rss_mb']['end']} MB; by turns answered {rss_by_turns}")
    return 0 if not errors and not crosstalk and not wrong and len(times) == report["turns_expected"] else 1


if __name__ == "__main__":
    sys.exit(main())
