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


BENCHMARKS = [("early exit on a false claim", bench_early_exit)]


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
