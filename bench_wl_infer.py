#!/usr/bin/env python3
"""Benchmarks for wl_infer.py (`make bench`), against the fakes of the test module.

Every timing is a median over repeated runs, shown with its spread (the
interquartile range) and as a ratio against a baseline measured in the same
run, on the same machine: these boxes are noisy, so nothing here is a
pass/fail timing test. The one thing that fails the benchmark (exit 1) is a
command making more wl calls than its floor: those counts are exact.

`python3 bench_wl_infer.py` prints a table with each target beside its
figure; `--json` prints the same figures as one JSON object, a key per row
(and "machine"), each row with median_s, baseline_median_s, ratio and n.

Rows:
- start-up: `./wl_infer.py --version` as a user runs it, against
  `python3 -c pass` with the same interpreter, and both again in a venv of
  the same interpreter without site-packages. A figure, not a target.
- own cost per command: `status`, `verify` and `run` against fakes that
  answer at once, less the time inside the fake wl processes (from their
  log, plus their interpreter start and exit, measured alone beside each
  sample) and inside the fake Ollama (from its request log), less start-up
  (measured beside them too); target < 50 ms.
- wl calls per command, from the fake wl's log: post 1, status 1, verify 1,
  run 3, list 1, audit 1 + 1 per item, work 1 browse per poll + 2 per job.
- memory: peak RSS of `run` for a 60,000-character output streamed one
  character per token, against `--version`; target < 2x.
- streaming client: characters/s that Ollama.generate takes from a fake
  Ollama (in another process) sending as fast as loopback allows, 4
  characters per token with logprobs, against a bare http.client body
  reader of the same stream; target > 20,000 tokens/s (100x any local model).
- early exit: time to a MISMATCH for a claim that diverges at the 3rd
  token of 400 (fake Ollama at 50 tokens/s) against a full re-run (what the
  Go `wl infer verify` always does); target >= 20x.
- tolerant verification: an honest 400-token claim made on "other
  hardware" (3 near-ties flipped) verified with --tolerance 0.5, against an
  exact verification of a same-hardware claim (fake Ollama at 400 tokens/s):
  tokens generated (target: the submitted output's length plus one per near-tie, the
  probe that asks for the candidates there), requests, and the wall-time ratio.
- sampled verification: `verify --sample 4 --window 16` of an honest
  1,000-token claim against its full verification, on a fake Ollama with a
  cost model (a prompt token costs 1/10 of a generated one; the prefix
  shared with the previous request is free, as with Ollama's cache); also
  in the fake's token-units, against the floor of that cost model (the
  windows generated, plus the rest of the claim evaluated once as prompt).
- many workers: 1, 2, 4 and 8 `work --once` processes on one board of 40
  jobs, every wl call 0.2 s: jobs/min, wl calls and claim attempts per job
  (from the fake wl's log), the largest share against the fair one;
  target for 8: at most 4 calls and 2 claims per job, every job done once.
- worker: 30 jobs behind a slow wl (0.25 s per call) and Ollama (0.5 s per
  job): jobs/min and Ollama busy fraction of `work --once` against a shell
  loop of `run` per job; target busy >= 0.9.
- batches: `post --batch` of 1,000 jobs (wl calls per job, from the fake
  wl's log: exactly 1; own time per job above the wl call: < 5 ms; peak
  memory of checking 1,000 and 10,000 lines: flat); `results` of 1,000
  finished jobs with every wl call 0.2 s, against the sequential floor
  (a browse and a status per job, one after the other); `results --wait`
  on 1,000 unfinished jobs: wl calls per poll (exactly 1); `results
  --sample 4` of the sampling row's claim in token-units, against `verify
  --sample 4` (the same cost).
"""

import collections
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import test_wl_infer as fakes  # noqa: E402
import wl_infer  # noqa: E402

MODEL = "llama3.2:1b"


# =============================================================================
# Measuring
# =============================================================================


class Setup(object):
    """wl_infer.py installed as a user has it: a copy in its own folder,
    run as ./wl_infer.py, its `#!/usr/bin/env python3` finding the
    benchmark's interpreter first on PATH."""

    def __init__(self, folder):
        self.folder = folder
        self.exe = os.path.join(folder, "install", "wl_infer.py")
        os.makedirs(os.path.dirname(self.exe))
        shutil.copy2(os.path.join(HERE, "wl_infer.py"), self.exe)
        self.bin = os.path.join(folder, "bin")
        os.makedirs(self.bin)
        os.symlink(sys.executable, os.path.join(self.bin, "python3"))
        self.env = dict(os.environ, PATH=self.bin + os.pathsep + os.environ.get("PATH", ""),
                        XDG_STATE_HOME=os.path.join(folder, "state"))
        self.run(["--version"])

    def run(self, argv, env=None, expect=0):
        """Seconds for one ./wl_infer.py run, as a user's shell sees it."""
        return run_argv([self.exe] + argv, env or self.env, expect)


def run_argv(argv, env, expect=0):
    """Seconds for one run of any command; it must exit with `expect`."""
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if proc.returncode != expect:
        raise SystemExit("bench: %s exited %d, expected %d: %s"
                         % (" ".join(argv), proc.returncode, expect, proc.stderr.decode().strip()))
    return elapsed


def interleaved(n, **measures):
    """Each measure run n times, round-robin, so drifts in machine load
    fall on all of them alike: {name: [seconds, ...]}."""
    found = {name: [] for name in measures}
    for _ in range(n):
        for name, measure in measures.items():
            found[name].append(measure())
    return found


def spread(samples):
    """(low, high): the interquartile range, or min and max for few samples."""
    if len(samples) >= 4:
        q = statistics.quantiles(samples, n=4)
        return q[0], q[2]
    return min(samples), max(samples)


def ms(seconds):
    return "%.1f ms" % (seconds * 1e3)


def timing(samples, fmt=ms):
    low, high = spread(samples)
    return "%s (%s-%s)" % (fmt(statistics.median(samples)), fmt(low).split()[0], fmt(high).split()[0])


def row(title, samples=None, baseline=None, ratio=None, target=None, met=None, figure=None, base_figure="",
        n=None, **extra):
    """One row: its figures for JSON, and `_shown`, its cells in the table."""
    found = {"title": title, "median_s": statistics.median(samples) if samples else None,
             "spread_s": list(spread(samples)) if samples else None,
             "baseline_median_s": statistics.median(baseline) if baseline else None,
             "ratio": None if ratio is None else round(ratio, 3), "n": len(samples or []) if n is None else n,
             "target": target, "met": met}
    found.update(extra)
    found["_shown"] = (figure or (timing(samples) if samples else ""), base_figure,
                       "" if ratio is None else "%.3gx" % ratio)
    return found


# A child's ru_maxrss also counts the memory it had before exec: a copy of
# (or, with vfork, the very) memory of the process that started it. So the
# measured run is started by this small process, not by the benchmark.
PEAK_RSS = """
import os, sys
pid = os.fork()
if pid == 0:
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    try:
        os.execve(sys.argv[1], sys.argv[1:], os.environ)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128)
"""


def peak_rss_kb(argv, env, expect=0):
    """The peak resident memory of one run, in KB; the run must exit with `expect`."""
    proc = subprocess.run([sys.executable, "-S", "-c", PEAK_RSS] + argv, env=env, stdout=subprocess.PIPE,
                          universal_newlines=True)
    kb, code = proc.stdout.split()
    if code != str(expect):
        raise SystemExit("bench: %s exited %s" % (" ".join(argv), code))
    return int(kb)


# =============================================================================
# Rows
# =============================================================================


def bench_startup(setup, n=40):
    found = interleaved(n, base=lambda: run_argv([sys.executable, "-c", "pass"], setup.env),
                        started=lambda: setup.run(["--version"]))
    base, started = statistics.median(found["base"]), statistics.median(found["started"])
    rows = {"startup": row("start-up: ./wl_infer.py --version", found["started"], found["base"], started / base,
                           base_figure="%s python3 -c pass" % ms(base))}
    venv = os.path.join(setup.folder, "venv")
    made = subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    if made.returncode != 0:  # e.g. Debian without python3-venv
        return dict(rows, startup_clean=row("  in a venv without site-packages: no venv module here"))
    python = os.path.join(venv, "bin", "python3")
    env = dict(setup.env, PATH=os.path.dirname(python) + os.pathsep + setup.env["PATH"])
    clean = interleaved(n, base=lambda: run_argv([python, "-c", "pass"], env),
                        started=lambda: setup.run(["--version"], env=env))
    base = statistics.median(clean["base"])
    rows["startup_clean"] = row("  the same in a venv without site-packages", clean["started"], clean["base"],
                                statistics.median(clean["started"]) / base,
                                base_figure="%s python3 -c pass" % ms(base))
    return rows


class Fakes(object):
    """A fake board and an in-process fake Ollama that answers at once
    (unless told otherwise), with what the model says for each prompt."""

    def __init__(self, setup):
        self.board = fakes.FakeBoard(setup.folder, rig="bob")
        self.ollama = fakes.FakeOllama().start()
        self.env = dict(setup.env, WL_BIN=self.board.exe, OLLAMA_HOST=self.ollama.address)

    def add(self, prompt, max_tokens=0):
        return self.board.add(wl_infer.encode_job(wl_infer.make_job(prompt, MODEL, max_tokens=max_tokens)))

    def output(self, prompt):
        return self.ollama.outputs.get((MODEL, prompt)) or fakes.default_output(MODEL, prompt)

    def completed(self, prompt, output=None, rig="carol", **provenance):
        """An in_review item whose evidence (of `output`, else the model's own) another rig submitted."""
        item_id = self.add(prompt)
        text = self.output(prompt) if output is None else output
        evidence = wl_infer.encode_evidence(wl_infer.make_evidence(wl_infer.make_job(prompt, MODEL), text,
                                                                   provenance))
        for argv in (("claim", item_id), ("done", item_id, "--evidence=" + evidence)):
            assert self.board.wl(*argv, rig=rig).returncode == 0
        return item_id

    def stop(self):
        self.ollama.stop()


def fake_wl_process_cost(board, item_id, n):
    """(before, after): the seconds a fake wl process spends outside its own
    log's start..end, as its caller sees it (interpreter start, exit)."""
    before, after = [], []
    for _ in range(n):
        start = time.time()
        subprocess.run([board.exe, "status", item_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        end = time.time()
        call = board.calls()[-1]
        before.append(call["start"] - start)
        after.append(end - call["end"])
    return statistics.median(before), statistics.median(after)


def bench_overhead(setup, n=10):
    """Own cost per command, and the wl calls every command made."""
    fake = Fakes(setup)
    try:
        board = fake.board
        status_id, verify_id = fake.completed("status me"), fake.completed("verify me")
        run_ids = [fake.add("run me %d" % i) for i in range(n)]
        costs = []  # the fake wl's own start and exit, measured beside each sample (same load)
        rows, counts = {}, {}

        def own(argv):
            """Wall time less the time inside the fakes; counts the wl calls made."""
            calls, requests = len(board.calls()), len(fake.ollama.requests)
            wall = setup.run(argv, env=fake.env)
            made = board.calls()[calls:]
            before, after = fake_wl_process_cost(board, status_id, n=3)
            costs.append(before + after)
            in_wl = sum(before + c["end"] - c["start"] + after for c in made)
            in_ollama = sum(r["end"] - r["start"] for r in fake.ollama.requests[requests:])
            counts.setdefault(argv[0], []).append([c["argv"][0] for c in made])
            return wall - in_wl - in_ollama

        def count(argv):
            calls = len(board.calls())
            setup.run(argv, env=fake.env)
            counts[argv[0]] = [[c["argv"][0] for c in board.calls()[calls:]]]

        queue = list(run_ids)
        found = interleaved(n, startup=lambda: setup.run(["--version"], env=fake.env),
                            status=lambda: own(["status", status_id]), verify=lambda: own(["verify", verify_id]),
                            run=lambda: own(["run", queue.pop(0)]))
        startup = found.pop("startup")  # beside the samples, under the same load
        for command, samples in found.items():
            above = statistics.median(samples) - statistics.median(startup)
            rows["overhead_" + command] = row(
                "own cost: %s, above start-up" % command, samples, startup, None, "< 50 ms", above < 0.050,
                figure="%s of %s" % (ms(above), timing(samples)),
                base_figure="start-up %s" % ms(statistics.median(startup)),
                above_startup_s=above, fake_wl_start_and_exit_s=statistics.median(costs))

        # the other commands, counted once
        def waiting(status):
            return len([i for i in board.load()["items"].values() if i["status"] == status])

        count(["post", "--prompt", "posted", "--model", MODEL])
        count(["list"])
        reviewed = waiting("in_review")
        count(["audit"])
        jobs = 3
        for i in range(jobs):
            fake.add("work %d" % i, max_tokens=64)  # work skips uncapped jobs, like the posted one
        count(["work", "--once"])
        if waiting("open") != 1:
            raise SystemExit("bench: work --once left %d of the %d jobs open" % (waiting("open") - 1, jobs))
    finally:
        fake.stop()
    floors = {"post": (1, "1"), "status": (1, "1"), "verify": (1, "1"), "run": (3, "3: status, claim, done"),
              "list": (1, "1"), "audit": (1 + reviewed, "1 + 1 per item (%d)" % reviewed),
              "work": (1 + 2 * jobs, "1 browse + 2 per job (%d jobs)" % jobs)}
    for command, (floor, shown) in floors.items():
        worst = max(len(calls) for calls in counts[command])
        rows["wl_calls_" + command] = row(
            "wl calls: %s" % command, None, None, worst / floor, "<= %d" % floor, worst <= floor,
            figure="%d%s" % (worst, " (%s)" % ", ".join(counts[command][-1]) if worst <= 3 else ""),
            base_figure="floor " + shown, n=len(counts[command]), count=worst, floor=floor)
    return rows


def bench_memory(setup, chars=60000, n=3):
    fake = Fakes(setup)
    try:
        fake.ollama.piece_chars, fake.ollama.burst = 1, True
        text = "".join("abcdefghij"[i % 10] for i in range(chars))
        prompt = "a long answer"
        fake.ollama.outputs[(MODEL, prompt)] = text
        ids = [fake.add(prompt) for _ in range(n)]
        wl_infer.Ollama(fake.ollama.address).generate(wl_infer.make_job(prompt, MODEL))  # rendered once

        runs = [peak_rss_kb([setup.exe, "run", item_id, "-q"], fake.env) for item_id in ids]
        versions = [peak_rss_kb([setup.exe, "--version"], fake.env) for _ in range(n)]
    finally:
        fake.stop()
    ratio = statistics.median(runs) / statistics.median(versions)
    return {"memory": row("memory: peak RSS of run, %d chars in 1-char tokens" % chars, None, None, ratio, "< 2x",
                          ratio < 2, figure="%.1f MB" % (statistics.median(runs) / 1024.0),
                          base_figure="%.1f MB --version" % (statistics.median(versions) / 1024.0),
                          n=len(runs), peak_rss_kb=statistics.median(runs),
                          baseline_peak_rss_kb=statistics.median(versions))}


FAKE_SERVER = """
import sys
sys.path.insert(0, sys.argv[1])
import test_wl_infer
ollama = test_wl_infer.FakeOllama()
ollama.burst, ollama.piece_chars = True, 4
ollama.outputs[(sys.argv[2], "fast")] = sys.stdin.readline().rstrip("\\n")
ollama.start()
print(ollama.address, flush=True)
sys.stdin.read()
"""


def bench_streaming(setup, tokens=25000, n=5):
    text = "".join(" w%02d" % (i % 100) for i in range(tokens))
    server = subprocess.Popen([sys.executable, "-c", FAKE_SERVER, HERE, MODEL], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, universal_newlines=True)
    try:
        server.stdin.write(text + "\n")
        server.stdin.flush()
        ollama = wl_infer.Ollama(server.stdout.readline().strip())
        job = wl_infer.make_job("fast", MODEL)
        assert ollama.generate(job).text == text  # and the stream is rendered

        def bare():
            """What any client must at least do: take the body off the socket."""
            resp = ollama._open("POST", "/api/generate", wl_infer.generate_request(job))
            start = time.perf_counter()
            while resp.read1():
                pass
            resp.close()
            return time.perf_counter() - start

        def timed(stream):
            start = time.perf_counter()
            stream()
            return time.perf_counter() - start

        found = interleaved(n, bare=bare, run=lambda: timed(lambda: ollama.generate(job)),
                            verify=lambda: timed(lambda: ollama.compare(wl_infer.generate_request(job), text)))
    finally:
        server.stdin.close()
        server.wait()
    rows = {}
    for name, title in (("run", "streaming client (run)"), ("verify", "  comparing as it reads (verify)")):
        rate = len(text) / statistics.median(found[name])
        bare_rate = len(text) / statistics.median(found["bare"])
        rows["stream_" + name] = row(
            "%s: %d tokens of 4 chars" % (title, tokens), found[name], found["bare"], rate / bare_rate,
            "> 20,000 tok/s", rate / 4 > 20000, figure="%.0f KB/s, %.0f tok/s" % (rate / 1e3, rate / 4),
            base_figure="%.0f KB/s bare reader" % (bare_rate / 1e3), chars_per_s=rate, tokens_per_s=rate / 4)
    return rows


def bench_early_exit(setup, tokens=400, rate=50.0):
    fake = Fakes(setup)
    try:
        fake.ollama.piece_chars, fake.ollama.piece_delay = 4, 1.0 / rate
        text = "".join(" w%02d" % (i % 100) for i in range(tokens))  # 400 tokens of 4 characters
        fake.ollama.outputs[(MODEL, "write 400 tokens")] = text
        forged = fake.completed("write 400 tokens", output=text[:8] + " xxx" + text[12:])  # the 3rd token differs
        honest = fake.completed("write 400 tokens")
        early = [setup.run(["verify", forged, "-q"], env=fake.env, expect=1) for _ in range(5)]
        full = [setup.run(["verify", honest, "-q"], env=fake.env) for _ in range(2)]
    finally:
        fake.stop()
    speedup = statistics.median(full) / statistics.median(early)
    return {"early_exit": row("verify: MISMATCH at token 3 of %d (%g tok/s)" % (tokens, rate), early, full,
                              1 / speedup, "<= 0.05x (20x faster)", speedup >= 20,
                              base_figure="%s full re-run" % timing(full, lambda s: "%.2f s" % s),
                              figure=timing(early, lambda s: "%.2f s" % s), speedup=speedup)}


def bench_tolerance(setup, tokens=400, rate=400.0, ties=(100, 200, 300), n=5):
    """An honest claim from "other hardware" (the scripted model took the
    runner-up at 3 near-ties) verified with --tolerance 0.5, against the
    exact verification of a claim made on the verifier's own hardware."""
    fake = Fakes(setup)
    try:
        words = "".join(" w%02d" % (i % 100) for i in range(tokens))  # 400 tokens of 4 characters
        model = fakes.ScriptedModel(words, dict((i, 0.3) for i in ties))
        fake.ollama.scripts[(MODEL, "other hardware")] = fake.ollama.scripts[(MODEL, "same hardware")] = model
        fake.ollama.piece_chars, fake.ollama.piece_delay = 4, 1.0 / rate
        flipped = "".join(token for token, _, _ in model.generate("", set(ties), -1)[0])
        other = fake.completed("other hardware", output=flipped)
        same = fake.completed("same hardware", output=words)
        before = len(fake.ollama.requests)
        proc = subprocess.run([setup.exe, "verify", other, "--tolerance", "0.5", "--json"], env=fake.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        doc = json.loads(proc.stdout.decode("utf-8"))
        assert doc["verdict"] == "VERIFIED" and len(doc["forced"]) == len(ties), proc.stderr
        asked = [r["body"] for r in fake.ollama.requests[before:] if r["path"] == "/api/generate"]
        found = interleaved(n, tolerant=lambda: setup.run(["verify", other, "--tolerance", "0.5", "-q"], env=fake.env),
                            exact=lambda: setup.run(["verify", same, "-q"], env=fake.env))
    finally:
        fake.stop()
    ratio = statistics.median(found["tolerant"]) / statistics.median(found["exact"])
    generated = doc["tokens_generated"]
    return {"tolerance": row("verify --tolerance 0.5: %d-token claim, %d near-ties (%g tok/s)"
                             % (tokens, len(ties), rate), found["tolerant"], found["exact"], ratio,
                             "tokens generated = submitted + 1 per near-tie (its probe)",
                             generated == tokens + len(doc["forced"]),
                             figure="%s, %d tokens generated, %d requests" % (
                                 timing(found["tolerant"], lambda v: "%.2f s" % v), generated, len(asked)),
                             base_figure="%s exact, 1 request" % timing(found["exact"], lambda v: "%.2f s" % v),
                             tokens_generated=generated, submitted_tokens=tokens, requests=len(asked),
                             forced=len(doc["forced"]))}


def bench_sampling(setup, tokens=1000, rate=500.0, n=5):
    """verify --sample 4 --window 16 of an honest 1,000-token claim against
    its full verification, on a fake Ollama with a cost model: a prompt
    token costs 1/10 of a generated one, and the prefix shared with the
    previous request is free (Ollama's cache). Also in the fake's own units:
    tokens generated plus a tenth of the prompt tokens evaluated."""
    fake = Fakes(setup)
    try:
        fake.ollama.piece_chars, fake.ollama.piece_delay, fake.ollama.prompt_cost = 5, 1.0 / rate, 0.1
        text = "".join(" w%03d" % (i % 1000) for i in range(tokens))  # tokens of 5 characters
        fake.ollama.outputs[(MODEL, "write 1000 tokens")] = text
        item_id = fake.completed("write 1000 tokens", token_lengths=[5] * tokens)
        sample = ["--sample", "4", "--window", "16"]

        def units(argv, command="verify"):  # the fake's cost of one check: generated + prompt_cost x prompt tokens
            fake.ollama.slot = ""  # each from a cache that holds none of the claim: what comes before is alike
            fake.ollama.saved.clear()
            streams, prefilled = len(fake.ollama.streams), len(fake.ollama.prefilled)
            setup.run([command, item_id, "-q"] + argv, env=fake.env)
            generated = sum(s["sent"] for s in fake.ollama.streams[streams:])
            return generated + fake.ollama.prompt_cost * sum(fake.ollama.prefilled[prefilled:])

        seeded = sample + ["--sample-seed", "7"]
        cost = {"sampled": units(sample), "full": units([]), "verify_seeded": units(seeded),
                "results_seeded": units(seeded, "results")}
        fake.ollama.cache_prompt = False  # every prompt evaluated from scratch: kinder than a real Ollama
        cost.update(sampled_uncached=units(sample), full_uncached=units([]))
        fake.ollama.cache_prompt = True
        found = interleaved(n, sampled=lambda: setup.run(["verify", item_id, "-q"] + sample, env=fake.env),
                            full=lambda: setup.run(["verify", item_id, "-q"], env=fake.env))
    finally:
        fake.stop()
    ratio = statistics.median(found["sampled"]) / statistics.median(found["full"])
    # the least any sampling that checks the end can cost: the windows generated, and the rest of the claim
    # evaluated once as prompt (the last window's prompt is all of it but the window; the cache keeps the rest)
    floor = (4 * 16 + 0.1 * (tokens - 4 * 16)) / tokens
    return {"sampling": row("verify --sample 4 --window 16: honest %d-token claim (%g tok/s, prompt 1/10, cached "
                            "prefix)" % (tokens, rate), found["sampled"], found["full"], ratio,
                            "token-units at the floor, %.1f%%" % (100 * floor),
                            cost["sampled"] / cost["full"] <= floor * 1.02,
                            figure="%s; %.0f of %.0f token-units (%.1f%%)" % (
                                timing(found["sampled"], lambda v: "%.2f s" % v), cost["sampled"], cost["full"],
                                100 * cost["sampled"] / cost["full"]),
                            base_figure="%s full" % timing(found["full"], lambda v: "%.2f s" % v),
                            units=cost, units_ratio=cost["sampled"] / cost["full"], floor=floor),
            "sampling_uncached": row("  the same on a server without the prompt cache (token-units)", None, None,
                                     cost["sampled_uncached"] / cost["full_uncached"], None, None,
                                     figure="%.0f of %.0f token-units (%.1f%%)" % (
                                         cost["sampled_uncached"], cost["full_uncached"],
                                         100 * cost["sampled_uncached"] / cost["full_uncached"])),
            "sampling_results": row("results --sample 4 --window 16 of the same claim, against verify's", None, None,
                                    cost["results_seeded"] / cost["verify_seeded"], "the same cost",
                                    abs(cost["results_seeded"] / cost["verify_seeded"] - 1) < 0.02,
                                    figure="%.0f token-units" % cost["results_seeded"],
                                    base_figure="verify: %.0f" % cost["verify_seeded"])}


def bench_scaling(setup, jobs=40, wl_call=0.2, fleet=(1, 2, 4, 8)):
    """1, 2, 4 and 8 `work --once` processes (distinct rigs) on one board of
    40 jobs of one priority, every wl call taking 0.2 s: throughput, and from
    the fake wl's log the wl calls and claim attempts per job, and the
    largest share against the fair one."""
    found, base = {}, setup.folder
    for workers in fleet:
        setup.folder = os.path.join(base, "fleet of %d" % workers)  # a board of its own
        os.makedirs(setup.folder)
        fake = Fakes(setup)
        setup.folder = base
        try:
            ids = [fake.add("job %d" % n, max_tokens=16) for n in range(jobs)]
            for command in ("browse", "claim", "done", "unclaim", "status"):
                fake.board.fail(command, delay=wl_call)
            rigs = ["w%d" % n for n in range(workers)]
            start = time.perf_counter()
            procs = [subprocess.Popen([setup.exe, "work", "--once", "-q"], env=dict(fake.env, FAKE_WL_RIG=rig),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for rig in rigs]
            for proc in procs:
                if proc.wait() != 0:
                    raise SystemExit("bench: work --once failed: %s" % proc.stderr.read().decode().strip())
                proc.stderr.close()
            wall = time.perf_counter() - start
            calls = [c for c in fake.board.calls() if c["rig"] in rigs]
        finally:
            fake.stop()
        done = [c["argv"][1] for c in calls if c["argv"][0] == "done" and c["exit"] == 0]
        shares = [len([c for c in calls if c["rig"] == rig and c["argv"][0] == "done" and c["exit"] == 0])
                  for rig in rigs]
        found[workers] = {"jobs_per_min": 60 * len(done) / wall, "wall_s": wall,
                          "calls_per_job": len(calls) / jobs,
                          "claims_per_job": len([c for c in calls if c["argv"][0] == "claim"]) / jobs,
                          "once_each": sorted(done) == sorted(ids), "max_share": max(shares) / (jobs / workers),
                          "idle": shares.count(0)}
    big, one = found[max(fleet)], found[min(fleet)]
    met = (all(f["once_each"] for f in found.values()) and big["calls_per_job"] <= 4
           and big["claims_per_job"] <= 2 and not (big["idle"] and big["max_share"] > 2)
           and one["calls_per_job"] <= 2 + 1.0 / jobs)
    figure = "; ".join("%d: %.0f jobs/min, %.2f wl calls and %.2f claims per job, largest share %.1fx" % (
        n, f["jobs_per_min"], f["calls_per_job"], f["claims_per_job"], f["max_share"]) for n, f in found.items())
    return {"scaling": row("work --once by 1, 2, 4 and 8 workers on one board: %d jobs, wl %g s/call"
                           % (jobs, wl_call), [f["wall_s"] for f in found.values()][-1:],
                           [one["wall_s"]], None, "8 workers: <= 4 calls, <= 2 claims per job; 1: 2 per job + "
                           "1 browse", met, figure=figure, base_figure="", fleet=found)}


def bench_batches(setup, jobs=1000, wl_call=0.2, big=10000):
    """post --batch and results at the size of a real batch."""
    rows = {}
    fake = Fakes(setup)
    fake.env["XDG_STATE_HOME"] = os.path.join(setup.folder, "state")  # ledgers of this row's own
    try:
        board = fake.board
        path = os.path.join(setup.folder, "prompts.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps({"prompt": "question %d" % n, "max_tokens": 8}) + "\n" for n in range(jobs))
        started = statistics.median([setup.run(["--version"], env=fake.env) for _ in range(5)])
        # the baseline: the same wl posts one after the other on a board of its own, as a shell loop makes them
        os.makedirs(os.path.join(setup.folder, "loop"))
        loop_board = fakes.FakeBoard(os.path.join(setup.folder, "loop"), rig="bob")
        start = time.perf_counter()
        for n in range(jobs):
            job = wl_infer.make_job("question %d" % n, MODEL, max_tokens=8, batch="prompts.0badcafe", custom_id=str(n))
            loop_board.wl("post", "--title=" + wl_infer.post_title(job.prompt), "--type=inference", "--priority=2",
                          "--effort=small", "--description=" + wl_infer.encode_job(job))
        loop = time.perf_counter() - start
        wall = setup.run(["post", "--batch", path, "--model", MODEL, "-q"], env=fake.env)
        posts = [c["argv"][0] for c in board.calls()]
        own = (wall - started - loop) / jobs
        rows["batch_post"] = row("post --batch of %d jobs: own time per job above its wl call" % jobs, [wall],
                                 [loop], wall / loop, "1 wl call per job; < 5 ms per job",
                                 posts == ["post"] * jobs and own < 0.005,
                                 figure="%+.1f ms per job; %d wl calls (%s)" % (own * 1e3, len(posts), ", ".join(
                                     sorted(set(posts)))), base_figure="a loop of wl post: %.1f s" % loop,
                                 own_per_job_s=own, wl_calls=len(posts))
        # memory while checking: every line read and refused at the last one, so nothing is posted
        peaks = {}
        for n in (jobs, big):
            lines = os.path.join(setup.folder, "lines-%d.jsonl" % n)
            with open(lines, "w") as f:
                f.writelines(json.dumps({"prompt": "p%d %s" % (i, "x" * 1000), "max_tokens": 8}) + "\n"
                             for i in range(n))
                f.write("not a job\n")
            peaks[n] = peak_rss_kb([setup.exe, "post", "--batch", lines, "--model", MODEL, "-q"], fake.env, expect=2)
        rows["batch_memory"] = row("post --batch: peak memory checking %d and %d lines of 1 KB" % (jobs, big), None,
                                   None, peaks[big] / peaks[jobs], "flat: < 1.2x", peaks[big] < 1.2 * peaks[jobs],
                                   figure="%.1f MB and %.1f MB" % (peaks[jobs] / 1024, peaks[big] / 1024),
                                   peak_kb=peaks)

        # 1,000 finished jobs, every wl call slow
        finish_all(board, sorted(board.load()["items"]))
        for command in ("browse", "status"):
            board.fail(command, delay=wl_call)
        count = len(board.calls())
        wall = setup.run(["results", "prompts", "-q"], env=fake.env)
        made = [c["argv"][0] for c in board.calls()[count:]]
        floor = (1 + jobs) * wl_call
        rows["batch_results"] = row("results of %d finished jobs, wl %g s/call, %d reads in flight"
                                    % (jobs, wl_call, wl_infer.READS_IN_FLIGHT), [wall], [floor], wall / floor,
                                    "1 browse + 1 status per job", made.count("browse") == 1
                                    and made.count("status") == jobs and len(made) == jobs + 1,
                                    figure="%.1f s; %d browse, %d status" % (wall, made.count("browse"),
                                                                             made.count("status")),
                                    base_figure="sequential floor %.0f s" % floor, wl_calls=len(made))
    finally:
        fake.stop()
    # --wait on unfinished jobs: one browse per poll, whatever the batch's size
    setup.folder = os.path.join(setup.folder, "waiting")  # a board and ledgers of its own
    os.makedirs(setup.folder)
    fake = Fakes(setup)
    fake.env["XDG_STATE_HOME"] = os.path.join(setup.folder, "state")
    try:
        board = fake.board
        with open(path, "w") as f:
            f.writelines(json.dumps({"prompt": "open %d" % n, "max_tokens": 8}) + "\n" for n in range(jobs))
        setup.run(["post", "--batch", path, "--model", MODEL, "-q"], env=fake.env)
        count = len(board.calls())
        setup.run(["results", "prompts", "-q", "--wait", "--interval", "0.2", "--wait-timeout", "2"],
                  env=fake.env, expect=wl_infer.EXIT_UNFINISHED)
        made = [c["argv"][0] for c in board.calls()[count:]]
        rows["batch_wait"] = row("results --wait on %d unfinished jobs: wl calls per poll" % jobs, None, None,
                                 None, "1 per poll", set(made) == {"browse"}, figure="%d calls in %d polls" % (
                                     len(made), made.count("browse")), polls=made.count("browse"))
    finally:
        fake.stop()
    return rows


def finish_all(board, ids, rig="carol"):
    """Every job done by `rig` with the fake model's own answer, written
    straight into the board (thousands of wl calls would take minutes)."""
    def change(state):
        for item_id in ids:
            item = state["items"][item_id]
            job = wl_infer.decode_job(item["description"])
            chunks, _ = fakes.FakeOllama().chunks_for(job.model, job.prompt, wl_infer.ollama_options(job))
            output = "".join(text for text, _ in chunks)
            item.update(status="in_review", claimed_by=rig, completion={
                "id": "c-" + item_id[2:].ljust(16, "0"), "completed_by": rig,
                "evidence": wl_infer.encode_evidence(wl_infer.make_evidence(job, output))})
    board.update(change)


def bench_worker(setup, jobs=30, loop_jobs=5, wl_call=0.25, generation=0.5):
    fake = Fakes(setup)
    try:
        ollama, board = fake.ollama, fake.board
        ollama.piece_chars, ollama.piece_delay = 4, generation / 20  # 20 tokens per job
        for command in ("browse", "status", "claim", "done", "unclaim"):
            board.fail(command, delay=wl_call)  # every call waits, then succeeds

        def add(count):
            ids = []
            for _ in range(count):
                prompt = "job %d" % len(board.load()["items"])
                ollama.outputs[(MODEL, prompt)] = "".join(" w%02d" % k for k in range(20))  # 20 tokens
                ids.append(fake.add(prompt, max_tokens=64))
            return ids

        def generating(since):
            return sum(s["end"] - s["start"] for s in ollama.streams[since:])

        loop = add(loop_jobs)
        start = time.perf_counter()
        for item_id in loop:
            setup.run(["run", item_id, "-q"], env=fake.env)
        loop_wall = time.perf_counter() - start
        loop_busy = generating(0) / loop_wall
        since = len(ollama.streams)
        add(jobs)
        start = time.perf_counter()
        proc = subprocess.run([setup.exe, "work", "--once", "--json"], env=fake.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
        work_wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit("bench: work exited %d: %s" % (proc.returncode, proc.stderr.decode().strip()))
        doc = json.loads(proc.stdout)
        if doc["done"] != jobs:
            raise SystemExit("bench: work did %d of %d jobs: %s" % (doc["done"], jobs, proc.stderr.decode()))
        work_busy = generating(since) / work_wall
    finally:
        fake.stop()
    per_job, loop_per_job = work_wall / jobs, loop_wall / loop_jobs
    return {"worker": row("work --once: %d jobs (wl %g s/call, Ollama %g s/job)" % (jobs, wl_call, generation),
                          [per_job], [loop_per_job], per_job / loop_per_job, "busy >= 0.9", work_busy >= 0.9,
                          figure="%.1f jobs/min, busy %.2f" % (60 / per_job, work_busy),
                          base_figure="%.1f jobs/min, busy %.2f run loop" % (60 / loop_per_job, loop_busy),
                          busy_fraction=work_busy, reported_busy_fraction=doc["servers"][0]["busy_fraction"],
                          baseline_busy_fraction=loop_busy, jobs=jobs, baseline_jobs=loop_jobs)}


# =============================================================================
# Table and JSON
# =============================================================================


# =============================================================================
# A real model (`make realmodel`; never part of `make test`)
# =============================================================================

REAL_MODEL = "gemma3:270m"
REAL_PROMPTS = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
                "Explain how a bicycle stays upright while it moves.",
                "Describe a busy market in a coastal town at dawn.",
                "Write a letter from a young sailor to his family.",
                "List the steps to bake a loaf of bread, with a sentence on each."]
REAL_SETUP = ("../shared/realmodel/setup.sh builds it once (about 20 minutes; under $REALMODEL, default "
              "~/.cache/wl-infer-realmodel)")


def realmodel_paths():
    """(python of the AVX2 build, of the AVX-512 build or None, the GGUF, the shim), or None when not set up."""
    root = os.environ.get("REALMODEL") or os.path.expanduser("~/.cache/wl-infer-realmodel")
    shim = os.path.join(HERE, "..", "shared", "realmodel", "ollama_shim.py")
    builds = [os.path.join(root, name, "bin", "python") for name in ("venv-avx2", "venv-avx512")]
    models = sorted(f for f in os.listdir(os.path.join(root, "models")) if f.endswith(".gguf")) \
        if os.path.isdir(os.path.join(root, "models")) else []
    if not (os.path.exists(shim) and os.path.exists(builds[0]) and models):
        return None
    return builds[0], builds[1] if os.path.exists(builds[1]) else None, os.path.join(root, "models", models[0]), shim


class Shim(object):
    """One ollama_shim.py server on a free port, until stop(); `extra`: its options."""

    def __init__(self, python, gguf, shim, log, extra=()):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.proc = subprocess.Popen([python, shim, "--model-path", gguf, "--port", str(self.port), "--quiet"]
                                     + list(extra), stdout=subprocess.DEVNULL, stderr=log)
        self.url = "http://127.0.0.1:%d" % self.port
        deadline = time.monotonic() + 180
        while True:
            try:
                wl_infer.Ollama(self.url, 5).version()
                return
            except wl_infer.UserError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("realmodel: the server did not start (see %s)" % log.name)
                time.sleep(0.5)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(30)


CACHE_PROMPTS = ["Name three rivers and say where each one flows.", "Why is the sky blue? Answer in a paragraph.",
                 "Write a haiku about autumn leaves.", "Give two tips for learning a new language.",
                 "Describe the smell of rain.", "What does a carpenter do all day?",
                 "Tell a short joke about a cat.", "Explain what a prime number is.",
                 "Write the opening line of a mystery novel.", "Compare tea and coffee in three sentences.",
                 "Describe a mountain village in winter.", "How do bees make honey?"]


def other_hardware(paths, log):
    """(python, options, what it is) of the server that plays "other
    hardware": the AVX-512 build where it runs here, else the AVX2 build with
    another attention kernel (--flash-attn). An AVX-512 build can start and
    then die at its first generation (SIGILL) on a CPU that lacks one of the
    extensions it was built with (seen on an AMD EPYC without AVX-VNNI)."""
    avx2, avx512, gguf, shim_path = paths
    if avx512:
        server = Shim(avx512, gguf, shim_path, log)
        try:
            wl_infer.Ollama(server.url, 120).generate(wl_infer.make_job("hi", REAL_MODEL, max_tokens=2), top=None)
            return avx512, [], "the AVX-512 build"
        except wl_infer.UserError:
            pass
        finally:
            server.stop()
    return avx2, ["--flash-attn"], "the AVX2 build with --flash-attn (%s)" % (
        "the AVX-512 build dies at its first generation here" if avx512 else "no AVX-512 here")


def realmodel_cache(paths, folder, log, tokens=96):
    """What Ollama's prompt cache does to exact verification, measured twice:
    on servers that cache as Ollama does, and on the same servers evaluating
    every prompt from scratch (--no-cache-prompt). Four servers, one role
    each: a worker that runs the jobs in order (each after the one before);
    a verifier that checks each claim after the other claims (first check),
    again at once (second check: the prompt is in its cache), a third time
    after a priming request that shares only the chat template's opening
    (the split a worker's server mostly has), then with --tolerance 0.5; the
    same on "other hardware"; and one box that runs a job, then verifies it.
    Returns ({mode: {measure: [verdicts]}, mode + " details": [per prompt]},
    what the other hardware is)."""
    avx2, avx512, gguf, shim_path = paths
    other_build, other_extra, other_name = other_hardware(paths, log)
    checks = ("first check", "second check", "third check, primed", "fourth check, primed long",
              "fifth check, --tolerance 0.5")
    found = {}
    for mode, extra in (("cache", []), ("no cache", ["--no-cache-prompt"])):
        worker, verifier, one_box = [Shim(avx2, gguf, shim_path, log, extra) for _ in range(3)]
        other = Shim(other_build, gguf, shim_path, log, other_extra + extra)
        try:
            own = os.path.join(folder, mode.replace(" ", "-"))
            os.makedirs(own)
            board = fakes.FakeBoard(own, rig="poster")
            measures = collections.OrderedDict([("run then verify on one server", [])]
                                               + [(c, []) for c in checks]
                                               + [("other hardware, " + c, []) for c in checks])

            def cli(server, *args, board=board, own=own):
                env = dict(os.environ, WL_BIN=board.exe, OLLAMA_HOST=server.url, FAKE_WL_RIG="carol",
                           XDG_STATE_HOME=os.path.join(own, "state"))
                proc = subprocess.run([sys.executable, os.path.join(HERE, "wl_infer.py"), "--json"] + list(args),
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                if proc.returncode == 2:
                    raise SystemExit("realmodel: wl_infer %s: %s" % (" ".join(args), proc.stderr.decode()))
                return json.loads(proc.stdout.decode("utf-8"))

            def prime(server, job, text="Hello."):
                """A request that shares only the chat template's opening with the job's prompt."""
                client = wl_infer.Ollama(server.url, 600)
                rendered = client.rendered_prompt(job)
                opening = rendered[:rendered.index(job.prompt)]
                client.candidates(wl_infer.continuation_request(job, opening, text, 1), 0)

            details = []  # per prompt: output tokens, and the prompt tokens each finished check evaluated
            for prompt in CACHE_PROMPTS:
                sys.stderr.write("realmodel (%s): %s\n" % (mode, prompt))
                job = wl_infer.make_job(prompt, REAL_MODEL, max_tokens=tokens)
                local = board.add(wl_infer.encode_job(job))
                cli(one_box, "run", local)
                measures["run then verify on one server"].append(cli(one_box, "verify", local)["verdict"])
                item_id = board.add(wl_infer.encode_job(job))
                evidence = cli(worker, "run", item_id)["evidence"]
                row = {"prompt": prompt, "output_tokens": evidence["eval_count"],
                       "worker_prompt_eval": evidence.get("prompt_eval_count"), "checks": []}
                for server, prefix in ((verifier, ""), (other, "other hardware, ")):
                    for name in checks:
                        if "primed long" in name:  # about as long as a job and its answer: 120 tokens or so
                            prime(server, job, " ".join(["A long line of filler words to fill the cache."] * 12))
                        elif "primed" in name:
                            prime(server, job)
                        doc = cli(server, "verify", item_id, *(["--tolerance", "0.5"] if "tolerance" in name
                                                               else []))
                        measures[prefix + name].append(doc["verdict"])
                        row["checks"].append((doc["verdict"], doc["local"]["prompt_eval_count"]))
                details.append(row)
            found[mode] = measures
            found[mode + " details"] = details
        finally:
            for server in (worker, verifier, one_box, other):
                server.stop()
    return found, other_name


def realmodel(argv):
    """post -> run -> verify (exact, tolerant, sampled) and forgeries on a
    real model, through the command line against a fake wl board; then
    (or alone, `realmodel cache`) what the prompt cache does."""
    paths = realmodel_paths()
    if paths is None:
        print("realmodel: the real model is not set up here; %s. Then run `make realmodel` again." % REAL_SETUP)
        return 0
    if argv[:1] == ["cache"]:
        with tempfile.TemporaryDirectory() as folder, open(os.path.join(folder, "shim.log"), "w") as log:
            found, other = realmodel_cache(paths, folder, log)
        print(realmodel_cache_report(found, other))
        return 0
    avx2, avx512, gguf, shim_path = paths
    sample = ["--sample", "4", "--window", "16"]
    with tempfile.TemporaryDirectory() as folder, open(os.path.join(folder, "shim.log"), "w") as log:
        other_build, other_extra, other_name = other_hardware(paths, log)
        same = Shim(avx2, gguf, shim_path, log)
        uncached = Shim(avx2, gguf, shim_path, log, ["--no-cache-prompt"])  # kinder than any real Ollama
        other = Shim(other_build, gguf, shim_path, log, other_extra)
        try:
            board = fakes.FakeBoard(folder, rig="poster")

            def cli(rig, server, *args):
                env = dict(os.environ, WL_BIN=board.exe, OLLAMA_HOST=server.url, FAKE_WL_RIG=rig,
                           XDG_STATE_HOME=os.path.join(folder, rig))
                start = time.perf_counter()
                proc = subprocess.run([sys.executable, os.path.join(HERE, "wl_infer.py"), "--json"] + list(args),
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                elapsed = time.perf_counter() - start
                doc = json.loads(proc.stdout.decode("utf-8"))
                if proc.returncode == 2:
                    raise SystemExit("realmodel: wl_infer %s: %s" % (" ".join(args), doc.get("error")))
                return doc, elapsed

            def forge(job, output, lengths):
                """A completion by mallory with `output` and consistent token_lengths (a careful forger)."""
                item_id = board.add(wl_infer.encode_job(job))
                evidence = dict(wl_infer.make_evidence(job, output), token_lengths=lengths)
                board.wl("claim", item_id, rig="mallory")
                board.wl("done", item_id, "--evidence=" + wl_infer.encode_evidence(evidence), rig="mallory")
                return item_id

            def timed(call, *args, **kwargs):
                start = time.perf_counter()
                call(*args, **kwargs)
                return time.perf_counter() - start

            results = []
            for prompt in REAL_PROMPTS:
                sys.stderr.write("realmodel: %s\n" % prompt)
                job = wl_infer.make_job(prompt, REAL_MODEL, max_tokens=400)
                client = wl_infer.Ollama(same.url, 600)
                r = {"prompt": prompt,
                     "bare_s": timed(client.generate, job, top=None),  # Go's request, no logprobs
                     "logprobs_s": timed(client.generate, job)}  # what `run` asks by default
                honest = board.add(wl_infer.encode_job(job))
                doc, r["run_s"] = cli("alice", same, "run", honest)
                r["evidence"] = doc["evidence"]
                doc, r["exact_s"] = cli("carol", same, "verify", honest)
                r["exact"] = doc["verdict"]
                doc, r["sampled_s"] = cli("carol", same, "verify", honest, *sample)
                r["sampled"], r["coverage"] = doc["verdict"], doc["coverage"]
                r["exact_uncached_s"] = cli("carol", uncached, "verify", honest)[1]
                r["sampled_uncached_s"] = cli("carol", uncached, "verify", honest, *sample)[1]
                if other is not None:
                    moved = board.add(wl_infer.encode_job(job))
                    cli("bob", other, "run", moved)
                    r["other_exact"] = cli("carol", same, "verify", moved)[0]
                    r["other_tolerant"] = cli("carol", same, "verify", moved, "--tolerance", "0.5")[0]
                    r["other_sampled"] = cli("carol", same, "verify", moved, "--tolerance", "0.5", *sample)[0]
                results.append(r)
            forgeries = {"cut at 60%": [], "another prompt's output": [], "half honest, then pasted": [],
                         "one word changed": []}
            coverage = []
            for n, r in enumerate(results):
                job = wl_infer.make_job(r["prompt"], REAL_MODEL, max_tokens=400)
                text, lengths = r["evidence"]["output"], r["evidence"]["token_lengths"]
                other_r = results[(n + 1) % len(results)]["evidence"]
                ends = [sum(lengths[:i + 1]) for i in range(len(lengths))]
                cut = ends[int(len(ends) * 0.6)]
                half = ends[len(ends) // 2]
                cases = [("cut at 60%", text[:cut], lengths[:int(len(ends) * 0.6) + 1]),
                         ("another prompt's output", other_r["output"], other_r["token_lengths"]),
                         ("half honest, then pasted", text[:half] + other_r["output"][half:],
                          lengths[:len(ends) // 2 + 1] + [len(other_r["output"][half:])])]
                for name, output, claimed in cases:
                    item_id = forge(job, output, claimed)
                    forgeries[name].append(cli("carol", same, "verify", item_id, *sample)[0]["verdict"])
                words = [i for i in range(len(text) // 4, 3 * len(text) // 4) if text[i] == " " and text[i + 1:i + 2]
                         .isalpha()]
                for trial in range(8):
                    at = words[(trial * 7919) % len(words)] + 1
                    end = at + 1
                    while end < len(text) and text[end].isalpha():
                        end += 1
                    word = text[at:end]
                    edited = text[:at] + ("x" * len(word) if word != "x" * len(word) else "y" * len(word)) + text[end:]
                    doc = cli("carol", same, "verify", forge(job, edited, lengths), *sample)[0]
                    forgeries["one word changed"].append(doc["verdict"])
                    if doc["coverage"] is not None:
                        coverage.append(doc["coverage"])
        finally:
            for server in (same, uncached, other):
                server.stop()
        cache, _ = realmodel_cache(paths, folder, log)
    print(realmodel_report(results, forgeries, coverage, other_name))
    print(realmodel_cache_report(cache, other_name))
    return 0


def realmodel_cache_report(found, other):
    lines = ["wl_infer %s against %s on llama.cpp (ollama_shim.py), %d prompts, %d-token jobs, exact verification; "
             "other hardware: %s; %s" % (wl_infer.__version__, REAL_MODEL, len(CACHE_PROMPTS), 96, other,
                                         platform.platform(terse=True)),
             "  %-42s %-12s %s" % ("VERIFIED", "with the cache", "without it")]
    for measure in found["cache"]:
        lines.append("  %-42s %-12s %s" % (measure, *("%d/%d" % (v.count("VERIFIED"), len(v))
                                                       for v in (found[m][measure] for m in ("cache", "no cache")))))
    lines.append("  with the cache, per prompt: output tokens, the worker's prompt_eval_count, and each check, "
                 "the verifier's then other hardware's (V VERIFIED, M MISMATCH; then the prompt tokens it evaluated, "
                 "when it ran to its end):")
    for row in found["cache details"]:
        lines.append("    %3s %3s  %s  %s" % (row["output_tokens"], row["worker_prompt_eval"], " ".join(
            "%s%s" % (v[0], "" if count is None else count) for v, count in row["checks"]), row["prompt"][:40]))
    return "\n".join(lines)


def realmodel_report(results, forgeries, coverage, other):
    def median(key):
        return statistics.median(r[key] for r in results)

    def causes(docs):
        found = ["%s%s" % (d["cause"]["kind"], "" if d["refuted"] else ", not refuted") for d in docs if d["cause"]]
        return " (MISMATCH: %s)" % "; ".join(found) if found else ""

    n = len(results)
    lines = ["wl_infer %s against %s on llama.cpp (ollama_shim.py), %d prompts, 400-token jobs; %s" % (
        wl_infer.__version__, REAL_MODEL, n, platform.platform(terse=True)),
        "  bare generation (Go's request)      %.2f s" % median("bare_s"),
        "  the same with logprobs (run's)      %.2f s: %.2fx (the worker's logprob tax)" % (
            median("logprobs_s"), median("logprobs_s") / median("bare_s")),
        "  run                                 %.2f s" % median("run_s"),
        "  verify, exact (honest, same build)  %.2f s: %.2fx a bare generation; VERIFIED %d/%d" % (
            median("exact_s"), median("exact_s") / median("bare_s"), sum(r["exact"] == "VERIFIED" for r in results),
            n),
        "  verify --sample 4 --window 16       %.2f s: %.0f%% of the exact one; VERIFIED %d/%d, coverage %.1f%%" % (
            median("sampled_s"), 100 * median("sampled_s") / median("exact_s"),
            sum(r["sampled"] == "VERIFIED" for r in results), n, 100 * statistics.median(r["coverage"] or 0
                                                                                        for r in results)),
        "  the same without the prompt cache   %.2f s: %.0f%% of the exact one there (%.2f s)" % (
            median("sampled_uncached_s"), 100 * median("sampled_uncached_s") / median("exact_uncached_s"),
            median("exact_uncached_s")),
        "  other hardware: %s" % other]
    if other:
        lines += ["  other build, exact                  VERIFIED %d/%d (MISMATCH causes: %s)" % (
                      sum(r["other_exact"]["verdict"] == "VERIFIED" for r in results), n,
                      ", ".join(sorted(set(r["other_exact"]["cause"]["kind"] for r in results
                                           if r["other_exact"]["cause"])) or "none")),
                  "  other build, --tolerance 0.5        VERIFIED %d/%d%s" % (
                      sum(r["other_tolerant"]["verdict"] == "VERIFIED" for r in results), n,
                      causes(r["other_tolerant"] for r in results)),
                  "  other build, tolerant and sampled   VERIFIED %d/%d%s" % (
                      sum(r["other_sampled"]["verdict"] == "VERIFIED" for r in results), n,
                      causes(r["other_sampled"] for r in results))]
    for name, verdicts in forgeries.items():
        lines.append("  forgery: %-27s refuted %d/%d" % (name, verdicts.count("MISMATCH"), len(verdicts)))
    if coverage:
        # a mid-text edit (tokens 100-300 of 400) is in a window only if one of the 2 random ones holds it:
        # they start anywhere from token 16 to 368
        middle = 2 * 16 / (400 - 3 * 16)
        lines.append("  (one word changed mid-text: caught %.0f%%; the stated coverage is %.1f%%, and a mid-text "
                     "token falls in one of the 2 random windows with %.1f%%)" % (
                         100 * forgeries["one word changed"].count("MISMATCH") / len(forgeries["one word changed"]),
                         100 * statistics.mean(coverage), 100 * middle))
    return "\n".join(lines)


def machine():
    return {"python": platform.python_version(), "platform": platform.platform(terse=True),
            "cpus": os.cpu_count() or 0, "wl_infer": wl_infer.__version__}


def table(rows):
    shown = [(r["title"], r["_shown"][0], r["_shown"][1], r["_shown"][2],
              "" if r.get("target") is None else "%s  %s" % (r["target"], "met" if r["met"] else "NOT MET"))
             for r in rows.values()]
    head = ("row", "figure (spread)", "baseline", "ratio", "target")
    widths = [max(len(line[i]) for line in shown + [head]) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [head] + shown]
    return "\n".join(lines)


def main(argv):
    if argv[:1] == ["realmodel"]:
        return realmodel(argv[1:])
    want_json = "--json" in argv
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        setup = Setup(folder)
        steps = [("start-up", lambda: bench_startup(setup)),
                 ("own cost and wl calls", lambda: bench_overhead(setup)),
                 ("memory", lambda: bench_memory(setup)), ("streaming", lambda: bench_streaming(setup)),
                 ("early exit", lambda: bench_early_exit(setup)), ("tolerance", lambda: bench_tolerance(setup)),
                 ("sampling", lambda: bench_sampling(setup)), ("scaling", lambda: bench_scaling(setup)),
                 ("worker", lambda: bench_worker(setup)), ("batches", lambda: bench_batches(setup))]
        for name, step in steps:
            if not want_json:
                sys.stderr.write("bench: %s...\n" % name)
            with tempfile.TemporaryDirectory(dir=folder) as own:
                setup.folder = own
                rows.update(step())
    over = [key for key, r in rows.items() if key.startswith("wl_calls_") and not r["met"]]
    if want_json:
        doc = {"machine": machine()}
        doc.update((key, {k: v for k, v in r.items() if k != "_shown"}) for key, r in rows.items())
        print(json.dumps(doc, indent=2))
    else:
        m = machine()
        print("wl_infer %s, Python %s on %s, %d CPUs; medians, spread = interquartile range"
              % (m["wl_infer"], m["python"], m["platform"], m["cpus"]))
        print(table(rows))
    if over:
        sys.stderr.write("bench: more wl calls than the floor: %s\n" % ", ".join(k[len("wl_calls_"):] for k in over))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
