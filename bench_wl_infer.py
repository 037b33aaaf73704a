#!/usr/bin/env python3
"""Benchmarks for wl_infer.py (`make bench`), against the fakes of the test module.

Every figure is a ratio against a baseline measured in the same run, on the
same machine: these boxes are noisy, so absolute times are printed for
information only and nothing here is a pass/fail timing test.

Benchmarks:
- early exit: time to a MISMATCH verdict for a claim that diverges at the
  3rd token of a 400-token output, with the fake Ollama streaming at a fixed
  50 tokens/s, against a full re-run of the same job (what the Go `wl infer
  verify` always does, and what a correct claim costs). Target: >= 20x.
- worker: a board of 20 jobs behind a slow wl (every call takes 1.0 s, as on
  the DoltHub API) and an Ollama taking 2.0 s per job; jobs per minute and
  the Ollama busy fraction (time generating / wall time) of `work --once`
  against a shell loop of `run` per job (measured over 5 jobs: its rate is
  the same for every job). Target: busy fraction >= 0.9 with `work`.
"""

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import test_wl_infer as fakes  # noqa: E402
import wl_infer  # noqa: E402

WL_INFER = os.path.join(HERE, "wl_infer.py")


def timed(argv, env, expect):
    """Seconds for one wl_infer.py run, as a user's shell sees it."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, WL_INFER] + argv, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if proc.returncode != expect:
        raise SystemExit("bench: %s exited %d, expected %d: %s"
                         % (" ".join(argv), proc.returncode, expect, proc.stderr.decode().strip()))
    return elapsed


def bench_early_exit(folder):
    tokens, rate = 400, 50.0
    ollama = fakes.FakeOllama()
    ollama.piece_chars, ollama.piece_delay = 4, 1.0 / rate
    prompt = "write 400 tokens"
    text = "".join(" w%02d" % (i % 100) for i in range(tokens))  # 400 tokens of 4 characters
    ollama.outputs[("llama3.2:1b", prompt)] = text
    ollama.start()
    try:
        board = fakes.FakeBoard(folder, rig="bob")
        env = dict(os.environ, WL_BIN=board.exe, OLLAMA_HOST=ollama.address)
        job = wl_infer.make_job(prompt, "llama3.2:1b")

        def completed(output):
            item_id = board.add(wl_infer.encode_job(job))
            evidence = wl_infer.encode_evidence(wl_infer.make_evidence(job, output))
            for argv in (("claim", item_id), ("done", item_id, "--evidence=" + evidence)):
                assert board.wl(*argv, rig="carol").returncode == 0
            return item_id

        forged = completed(text[:8] + " xxx" + text[12:])  # the 3rd token differs
        honest = completed(text)
        early = [timed(["verify", forged, "-q"], env, 1) for _ in range(5)]
        full = [timed(["verify", honest, "-q"], env, 0) for _ in range(2)]
    finally:
        ollama.stop()
    e, f = statistics.median(early), statistics.median(full)
    return [("verify: claim diverging at token 3 of %d (%g tok/s)" % (tokens, rate), "%.3f s" % e, "median of 5"),
            ("verify: full re-run of %d tokens (the Go behaviour)" % tokens, "%.3f s" % f, "median of 2"),
            ("early exit speed-up", "%.0fx" % (f / e), "target >= 20x: %s" % ("met" if f / e >= 20 else "NOT MET"))]


def bench_worker(folder, jobs=20, loop_jobs=5, wl_call=1.0, generation=2.0):
    ollama = fakes.FakeOllama()
    ollama.piece_chars, ollama.piece_delay = 4, generation / 20  # 20 tokens per job
    ollama.start()
    try:
        board = fakes.FakeBoard(folder, rig="bob")
        for command in ("browse", "status", "claim", "done", "unclaim"):
            board.fail(command, delay=wl_call)  # every call waits, then succeeds
        env = dict(os.environ, WL_BIN=board.exe, OLLAMA_HOST=ollama.address,
                   XDG_STATE_HOME=os.path.join(folder, "state"))

        def add(n):
            ids = []
            for _ in range(n):
                prompt = "job %d" % len(board.load()["items"])
                ollama.outputs[("llama3.2:1b", prompt)] = "".join(" w%02d" % k for k in range(20))
                ids.append(board.add(wl_infer.encode_job(wl_infer.make_job(prompt, "llama3.2:1b", max_tokens=64))))
            return ids

        def generating(since):
            return sum(s["end"] - s["start"] for s in ollama.streams[since:])

        loop = add(loop_jobs)
        start = time.perf_counter()
        for item_id in loop:
            timed(["run", item_id, "-q"], env, 0)
        loop_wall = time.perf_counter() - start
        loop_busy = generating(0) / loop_wall
        since = len(ollama.streams)
        add(jobs)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, WL_INFER, "work", "--once", "--json"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        work_wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit("bench: work exited %d: %s" % (proc.returncode, proc.stderr.decode().strip()))
        import json

        doc = json.loads(proc.stdout)
        if doc["done"] != jobs:
            raise SystemExit("bench: work did %d of %d jobs: %s" % (doc["done"], jobs, proc.stderr.decode()))
        work_busy = generating(since) / work_wall
    finally:
        ollama.stop()
    return [("`run` per job in a loop (%d jobs)" % loop_jobs, "%.1f/min" % (loop_jobs * 60 / loop_wall),
             "Ollama busy %.2f" % loop_busy),
            ("`work --once` (%d jobs)" % jobs, "%.1f/min" % (jobs * 60 / work_wall),
             "Ollama busy %.2f (work's own figure: %.2f); target >= 0.9: %s" % (
                 work_busy, doc["servers"][0]["busy_fraction"], "met" if work_busy >= 0.9 else "NOT MET")),
            ("speed-up", "%.1fx" % (loop_wall / loop_jobs / (work_wall / jobs)),
             "wl %.1f s per call, %.1f s per generation" % (wl_call, generation))]


BENCHMARKS = [("early exit on a false claim", bench_early_exit), ("worker busy fraction", bench_worker)]


def main():
    print("wl_infer %s benchmarks: Python %s on %s, %d CPUs" % (
        wl_infer.__version__, platform.python_version(), platform.platform(terse=True), os.cpu_count() or 0))
    for title, bench in BENCHMARKS:
        with tempfile.TemporaryDirectory() as folder:
            rows = bench(folder)
        print("\n== %s" % title)
        width = max(len(r[0]) for r in rows)
        for name, value, note in rows:
            print("  %-*s  %10s  %s" % (width, name, value, note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
