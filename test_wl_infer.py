#!/usr/bin/env python3
"""Tests for wl_infer.py, and the two fakes they run against.

- FakeOllama: a real HTTP server on 127.0.0.1 (chunked NDJSON streaming,
  /api/generate, /api/tags, /api/version, /api/show), scriptable per test.
- FakeBoard: a real `wl` executable written into a temp dir, with its board
  in a JSON file, the output formats, error lines and exit codes of
  ../shared/contracts/wl-cli.md, PR mode, ID prefixes, failure injection and
  a call log.

`python3 test_wl_infer.py` runs the suite (what `make test` does);
`python3 test_wl_infer.py demo` walks post -> run -> verify -> status against
the fakes; `python3 test_wl_infer.py faults` runs the fault matrix and the
hostile-input tests and prints their tally (`make faults`);
`python3 test_wl_infer.py fake-wl STATE ARGS...` is the fake wl.
"""

import atexit
import collections
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
WL_INFER = os.path.join(HERE, "wl_infer.py")
sys.path.insert(0, HERE)
import wl_infer  # noqa: E402

# In-process library tests keep their state (the spool, the worker's memory) here, never in the user's.
_STATE_HOME = tempfile.mkdtemp(prefix="wl_infer_test_state.")
os.environ["XDG_STATE_HOME"] = _STATE_HOME
atexit.register(shutil.rmtree, _STATE_HOME, True)

DEADLINE = 30.0  # seconds any wait-for-condition may take before failing


def wait_for(condition, what, deadline=DEADLINE):
    """Wait until condition() is true, polling; fail after the deadline."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.01)


# =============================================================================
# Fake Ollama
# =============================================================================


def default_output(model, prompt):
    """What the fake model answers when a test scripted nothing: a
    deterministic function of (model, prompt) with multi-byte characters."""
    return "Réponse de %s à « %s » : 42 ✓ — 答え 🙂" % (model, prompt[:40])


TEMPLATE_OPENING = "<start_of_turn>user\n"  # what every templated prompt starts with


def render_template(prompt):
    """The fake models' chat template (Gemma's shape): the text a templated
    request feeds the model, and what `_debug_render_only` answers."""
    return TEMPLATE_OPENING + "%s<end_of_turn>\n<start_of_turn>model\n" % prompt


BRANCH_WORDS = ("amber ", "basalt ", "cinder ", "delta ", "ember ", "fjord ", "gravel ", "harbor ")


class ScriptedModel(object):
    """A small deterministic "model" of one prompt, for tolerant
    verification. Greedy decoding gives `text`, in tokens of `piece_chars`
    characters; at token i the runner-up is ties.get(i, 3.0) nats below the
    choice. Taking anything but the choice (forced through a raw prompt, or
    flipped by "other hardware": FakeOllama.flips) leads into another
    continuation, as deterministic, with near-ties at the same positions and
    the same length in tokens."""

    def __init__(self, text, ties=None, piece_chars=4):
        self.main = [text[i:i + piece_chars] for i in range(0, len(text), piece_chars)]
        self.ties = dict(ties or {})

    def candidates(self, branch, index):
        """[(token, logprob)], best first, at token `index` after the choices `branch`."""
        if branch:
            key = ("%s@%d" % (branch, index)).encode()
            token = BRANCH_WORDS[zlib.crc32(key) % len(BRANCH_WORDS)]
        else:
            token = self.main[index]
        runner_up = token.swapcase() if token.swapcase() != token else "~" + token
        best = round(-0.05 * (index % 5), 6)
        gap = self.ties.get(index, 3.0)
        return [(token, best), (runner_up, best - gap)] + [("#%d" % k, best - gap - k) for k in range(1, 19)]

    def state(self, text):
        """(branch, index) after `text`, what a raw prompt adds to the
        rendered one: the candidates it takes, longest first. Text off every
        path is a branch of its own (a real model goes on from any text)."""
        branch, index, at = "", 0, 0
        while at < len(text) and index < len(self.main):
            fits = [(len(t), -rank) for rank, (t, _) in enumerate(self.candidates(branch, index))
                    if text.startswith(t, at)]
            if not fits:
                return "%s?%x" % (branch, zlib.crc32(text[at:].encode())), index
            length, rank = max(fits)
            branch += "/%d:%d" % (index, -rank) if rank else ""
            at, index = at + length, index + 1
        return branch, index

    def generate(self, text, flips, limit):
        """Greedy decoding after `text` (runner-ups at the token indexes in
        `flips`), at most `limit` tokens when it is positive (Ollama's runner
        stops at num_predict > 0, with "length" even where the text would
        end): [(token, logprob, candidates)] and the done reason."""
        branch, index = self.state(text)
        tokens = []
        while True:
            if 0 < limit <= len(tokens):
                return tokens, "length"
            if index >= len(self.main):
                return tokens, "stop"
            candidates = self.candidates(branch, index)
            rank = 1 if index in flips else 0
            branch += "/%d:1" % index if rank else ""
            tokens.append(candidates[rank] + (candidates,))
            index += 1


class FakeOllama(object):
    """A threaded HTTP server that behaves like Ollama's API (see
    ../shared/contracts/ollama-api.md). Scriptable attributes:

    outputs[(model, prompt)] = text   what the model generates
    models = {name: digest}           what /api/tags lists
    piece_chars                       characters per streamed token
    byte_tokens = True                one token per UTF-8 byte outside ASCII (a real
                                      tokenizer's byte fallback): the server holds
                                      back a partial character and sends it whole,
                                      one chunk with a logprob entry per token
    piece_delay                       seconds between tokens
    wire_chunk                        re-chunk the HTTP body into N-byte chunks
                                      (splits lines and UTF-8 sequences)
    fail = (status, message)          answer /api/generate with an HTTP error
    fail_prompts[prompt] = (status, message)   the same, for one prompt only (a poison job)
    error_after = (n, message)        send n tokens, then an {"error"} line
    stall_after = n                   send n tokens, then nothing (until stop)
    end_after = n                     send n tokens, then close without `done`
    inject = (n, raw_bytes)           send n tokens, then this raw line, then go on
    drop = True                       close /api/generate connections unanswered
    endless = text                    a model that never stops: streams this token forever
    gate = threading.Event()          every stream waits for it before its final message
    gates[i] = threading.Event()      the same, for the i-th stream only (counting from 0)
    burst = True                      as fast as loopback allows: a stream is rendered once
                                      (kept for the same request) and written 64 KB at a time,
                                      still one HTTP chunk per line as Ollama flushes each token
    thinking[(model, prompt)] = text  a thinking model: streamed as `thinking` first
    logprobs_supported = False        an older server: ignores logprobs/top_logprobs
    logprob_shift = x                 add x to every logprob (other weights, same text)
    near_ties[i] = (token, margin)    token i's runner-up and its distance in nats
                                      (default: "~", 3.0 nats below: a clear winner)
    scripts[(model, prompt)] = ScriptedModel(...)   a model with near-ties and other
                                      continuations; its raw prompts (the rendered
                                      prompt plus text) go on from that text
    flips = {i, ...}                  "other hardware": scripted models take the
                                      runner-up at these token indexes
    render_supported = False          an older server (before 0.11.5): ignores
                                      `_debug_render_only` and generates
    prompt_cost = x                   evaluating a prompt token costs x of piece_delay
    the prompt cache, as Ollama has it (llama-server's, cache_prompt on every request):
                                      a request reuses the longest common prefix with
                                      the slot (the previous request's prompt and what it
                                      generated), or with a saved state of an earlier
                                      request that shares more (cache_states of them, the
                                      newest; one is skipped when the prompt keeps under
                                      a quarter of it), always evaluating at least the
                                      prompt's last token; only evaluated tokens cost and
                                      count (prompt_eval_count); `prefilled` records them
    cache_prompt = False              evaluate every prompt from scratch (kinder than
                                      any real Ollama: for the cost bench's baseline)
    split_ties = {i, ...}             a prompt evaluated otherwise than a fresh one (more
    split_shift = x                   reused than the chat template's opening, which every
                                      prompt shares; or one this server evaluated before,
                                      whatever came between: measured on llama.cpp, see
                                      make realmodel) sees scripted models take the
                                      runner-up at these token indexes, and every
                                      logprob shifted by x
    requests                          one record per request: method, path, body, and
                                      `start` and `end` of its handling (time.time())
    streams                           one record per streamed generate: its prompt,
                                      pieces sent, `start`, `final` (its done message
                                      sent) and `end` (time.time()), and `ended` once
                                      the handler is done
    """

    def __init__(self):
        self.models = {"llama3.2:1b": "a80c4f17acd5" + "0" * 52, "qwen2.5:0.5b": "c5396e06af29" + "1" * 52}
        self.outputs = {}
        self.piece_chars = 3
        self.byte_tokens = False
        self.piece_delay = 0.0
        self.wire_chunk = None
        self.fail = None
        self.fail_prompts = {}
        self.error_after = None
        self.stall_after = None
        self.end_after = None
        self.inject = None
        self.drop = False
        self.endless = None
        self.gate = None
        self.gates = {}
        self.burst = False
        self.rendered = {}  # burst: the framed stream per request body
        self.thinking = {}
        self.logprobs_supported = True
        self.logprob_shift = 0.0
        self.near_ties = {}
        self.scripts = {}
        self.flips = set()
        self.render_supported = True
        self.prompt_cost = 0.0  # a prompt token's cost, in generated tokens' piece_delay (0.1: a cost model)
        self.cache_prompt = True
        self.cache_states = 16
        self.slot = ""  # what the KV cache holds: the last request's prompt and what it generated
        self.saved = collections.OrderedDict()  # saved states: their text, oldest first
        self.prefilled = []  # prompt tokens evaluated per generate request (the rest came from the cache)
        self.split_ties = set()
        self.split_shift = 0.0
        self.evaluated = set()  # every prompt this server has evaluated
        self.streams = []
        self.version = "0.12.11"
        self.requests = []
        self.generating = threading.Event()  # set when a generate request arrives
        self.released = threading.Event()  # ends stalls at stop()
        self.lock = threading.Lock()
        self.server = None

    # -- lifecycle ----------------------------------------------------------
    def start(self):
        from http.server import ThreadingHTTPServer

        Handler = _ollama_handler()
        Handler.fake = self
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # a short poll interval: stop() waits for one, once per test
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.released.set()
        for gate in [self.gate] + list(self.gates.values()):
            if gate is not None:
                gate.set()
        self.server.shutdown()
        self.server.server_close()

    @property
    def address(self):
        return "127.0.0.1:%d" % self.server.server_address[1]

    def generate_requests(self):
        with self.lock:
            return [r["body"] for r in self.requests if r["path"] == "/api/generate"]

    # -- the "model" --------------------------------------------------------
    def find(self, name):
        wanted = wl_infer.full_model_name(name).lower()
        return next((n for n in self.models if n.lower() == wanted), None)

    def chunks_for(self, model, prompt, options, after=""):
        """What the model generates as stream chunks: [(text, [token bytes, ...])],
        and the done reason. num_predict counts tokens, not chunks. `after`:
        the text a raw prompt adds to the rendered one; the model goes on
        from there (from the same place in its answer, whatever that text
        says: an edited claim does not lead it astray)."""
        text = self.outputs.get((model, prompt))
        if text is None:
            text = default_output(model, prompt)
        text = text[len(after):]
        if self.byte_tokens:
            chunks = [(ch, [bytes([b]) for b in ch.encode("utf-8")] if ord(ch) > 127 else [ch.encode()])
                      for ch in text]
        else:
            n = self.piece_chars
            chunks = [(text[i:i + n], [text[i:i + n].encode("utf-8")]) for i in range(0, len(text), n)]
        limit = (options or {}).get("num_predict", -1)
        if not isinstance(limit, int) or limit < 0:
            return chunks, "stop"
        kept, count = [], 0
        for chunk in chunks:
            count += len(chunk[1])
            if count > limit:
                return kept, "length"  # a partial character held back is never sent
            kept.append(chunk)
        # Ollama's runner stops at num_predict before it would sample the end
        return kept, "length" if 0 < limit <= count else "stop"

    def generation(self, body, split=False):
        """What the model generates for a request: chunks [(text, [token
        bytes])], the done reason, per token (its logprob, its candidates)
        when a scripted model made it (else None), and the index of its
        first token in the answer (a raw prompt goes on from the middle).
        `split`: its prompt was evaluated in other batches than a fresh one."""
        options = body.get("options") or {}
        prompt = body.get("prompt", "")
        fed = prompt if body.get("raw") is True else render_template(prompt)
        for (model, scripted), script in self.scripts.items():
            head = render_template(scripted)
            if self.find(model) == self.find(body["model"]) and fed.startswith(head):
                limit = options.get("num_predict", -1)
                flips = self.flips | (self.split_ties if split else set())
                tokens, reason = script.generate(fed[len(head):], flips, limit if type(limit) is int else -1)
                return ([(t, [t.encode("utf-8")]) for t, _, _ in tokens], reason,
                        [(logprob, candidates) for _, logprob, candidates in tokens], 0)
        turn = re.match(r"<start_of_turn>user\n(.*?)<end_of_turn>\n<start_of_turn>model\n", fed, re.S)
        if body.get("raw") is True and turn:
            after = fed[turn.end():]
            chunks, reason = self.chunks_for(body["model"], turn.group(1), options, after)
            return chunks, reason, None, len(after) // self.piece_chars
        chunks, reason = self.chunks_for(body["model"], prompt, options)
        return chunks, reason, None, 0

    def tokens(self, text):
        return -(-len(text) // self.piece_chars)  # the fake tokenizes by piece_chars characters

    def evaluate(self, fed):
        """How Ollama evaluates the prompt `fed` (llama-server with
        cache_prompt): (tokens evaluated, tokens reused from the slot or a
        saved state, whether the evaluation is split otherwise than a
        fresh one's). Recorded in `prefilled`."""
        total, n = self.tokens(fed), self.piece_chars
        with self.lock:
            seen = fed in self.evaluated
            self.evaluated.add(fed)
            reused = wl_infer._common_prefix(self.slot, fed) // n if self.cache_prompt else 0
            best = None
            for text in (self.saved if self.cache_prompt else ()):
                shared = wl_infer._common_prefix(text, fed) // n
                if shared > reused and shared >= 0.25 * self.tokens(text) and (best is None or shared > best[0]):
                    best = (shared, text)
            if best is not None:  # restored from the host-memory cache
                reused = best[0]
                self.saved.move_to_end(best[1])
            reused = min(reused, total - 1)  # the prompt's last token is always evaluated
            self.prefilled.append(total - reused)
        return total - reused, reused, seen or reused > len(TEMPLATE_OPENING) // n

    def remember(self, fed, generated, complete):
        """After a request: the slot holds its prompt and what it generated;
        a request that ran to its end is saved as a state too."""
        with self.lock:
            self.slot = fed + generated
            if complete and self.cache_states:
                self.saved[self.slot] = True
                self.saved.move_to_end(self.slot)
                while len(self.saved) > self.cache_states:
                    self.saved.popitem(last=False)


    def logprobs_for(self, index, token, top, scripted=None, shift=0.0):
        """Ollama's logprob entry for answer token `index` (its bytes), with
        `top` candidates (`scripted`: its logprob and candidates), shifted
        by `shift` more (a split prompt). A token that is not whole UTF-8
        shows as U+FFFD in `token`, as Go's JSON encoder writes invalid
        bytes; `bytes` has them."""
        shift += self.logprob_shift
        chosen = round(-0.05 * (index % 5) + shift, 6)
        runner_up, margin = self.near_ties.get(index, ("~", 3.0))
        candidates = [(token, chosen), (runner_up.encode("utf-8"), chosen - margin)]
        candidates += [(b"#%d" % k, chosen - margin - k) for k in range(1, max(top - 1, 0))]
        if scripted:
            chosen = scripted[0] + shift
            candidates = [(t.encode("utf-8"), lp + shift) for t, lp in scripted[1]]

        def entry(raw, logprob):
            return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

        return dict(entry(token, chosen), top_logprobs=[entry(t, lp) for t, lp in candidates[:top]])


def _ollama_handler():
    """The request handler class (built on first use: http.server is slow to
    import, and the fake wl imports this module on every call)."""
    from http.server import BaseHTTPRequestHandler

    class Handler(_OllamaHandlerMixin, BaseHTTPRequestHandler):  # ours first
        pass

    return Handler


class _OllamaHandlerMixin(object):
    protocol_version = "HTTP/1.1"
    fake = None

    def log_message(self, *args):
        pass

    def _json(self, status, doc):
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw.decode()) if raw else {}
        except ValueError as exc:
            return exc

    def handle_one_request(self):
        self.current = None
        super(_OllamaHandlerMixin, self).handle_one_request()
        if self.current is not None:
            self.current["end"] = time.time()

    def parse_request(self):  # the request line has arrived: its handling starts
        self.started = time.time()
        return super(_OllamaHandlerMixin, self).parse_request()

    def _record(self, body):
        self.current = {"method": self.command, "path": self.path, "body": body, "start": self.started,
                        "end": None}
        with self.fake.lock:
            self.fake.requests.append(self.current)

    def do_GET(self):
        self._record(None)
        if self.path == "/api/tags":
            self._json(200, {"models": [
                {"name": n, "model": n, "modified_at": "2026-11-01T10:00:00Z", "size": 1321098329,
                 "digest": d, "details": {"format": "gguf", "family": "llama", "parameter_size": "1.2B",
                                          "quantization_level": "Q8_0"}}
                for n, d in sorted(self.fake.models.items())]})
        elif self.path == "/api/version":
            self._json(200, {"version": self.fake.version})
        else:
            self._not_found()

    def _not_found(self):
        data = b"404 page not found"
        self.send_response(404)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = self._body()
        self._record(body if isinstance(body, dict) else None)
        if isinstance(body, Exception):
            return self._json(400, {"error": str(body)})
        if self.path == "/api/show":
            name = self.fake.find(body.get("model") or "")
            if not name:
                return self._json(404, {"error": "model '%s' not found" % body.get("model")})
            return self._json(200, {"modelfile": "", "parameters": "", "template": "{{ .Prompt }}",
                                    "details": {"format": "gguf"}, "model_info": {}})
        if self.path != "/api/generate":
            return self._not_found()
        if not body.get("model"):
            return self._json(400, {"error": "model is required"})
        self.fake.generating.set()
        if self.fake.drop:
            self.close_connection = True
            return
        if self.fake.fail or body.get("prompt") in self.fake.fail_prompts:
            status, message = self.fake.fail or self.fake.fail_prompts[body["prompt"]]
            return self._json(status, {"error": message})
        name = self.fake.find(body["model"])
        if not name:
            return self._json(404, {"error": "model '%s' not found" % body["model"]})
        top = body.get("top_logprobs", 0)
        if self.fake.logprobs_supported and (type(top) is not int or not 0 <= top <= 20):
            return self._json(400, {"error": "top_logprobs must be between 0 and 20"})
        if body.get("raw") is True and any(body.get(k) for k in ("template", "system", "context")):
            return self._json(400, {"error": "raw mode does not support template, system, or context"})
        prompt = body.get("prompt", "")
        if body.get("_debug_render_only") is True and self.fake.render_supported:
            return self._json(200, {"model": name, "created_at": "2026-11-26T10:00:00Z", "response": "",
                                    "done": False, "_debug_info": {"rendered_template": render_template(prompt)}})
        key = json.dumps(body, sort_keys=True)
        if self.fake.burst and key in self.fake.rendered:
            return self._send_rendered(self.fake.rendered[key])
        fed = prompt if body.get("raw") is True else render_template(prompt)
        evaluated, reused, split = self.fake.evaluate(fed)
        chunks, reason, scripted, first = self.fake.generation(body, split)
        cost = evaluated * self.fake.piece_delay * self.fake.prompt_cost
        if cost:
            time.sleep(cost)
        self.evaluation = (fed, evaluated, cost, self.fake.split_shift if split else 0.0)
        thinking = self.fake.thinking.get((body["model"], prompt), "")
        thoughts = [thinking[i:i + 4] for i in range(0, len(thinking), 4)]
        logprobs = None  # per chunk: the entries of its tokens
        want_logprobs = self.fake.logprobs_supported and body.get("logprobs") is True
        if self.fake.endless and body.get("stream", True) is not False:  # generated as it is sent
            import itertools

            piece = self.fake.endless.encode("utf-8")
            limit = (body.get("options") or {}).get("num_predict")  # the one thing that stops it, as in Ollama
            count = itertools.count() if not isinstance(limit, int) or limit <= 0 else range(limit)
            return self._stream(name, prompt, [], (self.fake.endless for _ in count),
                                ([self.fake.logprobs_for(i, piece, top)] for i in itertools.count())
                                if want_logprobs else None, "length", limit or 0)
        if want_logprobs:
            index, logprobs = first, []
            for _, tokens in chunks:
                logprobs.append([self.fake.logprobs_for(index + k, t, top, scripted and scripted[index - first + k],
                                                        self.evaluation[3]) for k, t in enumerate(tokens)])
                index += len(tokens)
        count = sum(len(tokens) for _, tokens in chunks) + len(thoughts)
        if body.get("stream", True) is False:
            final = self._final(name, "".join(text for text, _ in chunks), reason, count)
            if thinking:
                final["thinking"] = thinking
            if logprobs is not None:
                final["logprobs"] = [entry for entries in logprobs for entry in entries]
            self.fake.remember(fed, final["response"], True)
            return self._json(200, final)
        if self.fake.burst:
            self.fake.rendered[key] = self._render(name, thoughts, [text for text, _ in chunks], logprobs,
                                                   reason, count)
            return self._send_rendered(self.fake.rendered[key])
        self._stream(name, prompt, thoughts, [text for text, _ in chunks], logprobs, reason, count)

    def _render(self, name, thoughts, tokens, logprobs, reason, count):
        """The whole stream of a burst, framed: one HTTP chunk per line."""
        class Sink(object):
            def __init__(self):
                self.data = bytearray()

            def write(self, data):
                self.data.extend(data)

            def flush(self):
                pass

        wfile, self.wfile = self.wfile, Sink()
        try:
            self._stream_lines(name, thoughts, tokens, logprobs, reason, count, {"sent": 0, "gate": None},
                               headers=False)
            return bytes(self.wfile.data)
        finally:
            self.wfile = wfile

    def _send_rendered(self, data):
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for i in range(0, len(data), 65536):
                self.wfile.write(data[i:i + 65536])
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            self.close_connection = True

    def _final(self, name, response, reason, count):
        # the durations of what the fake modelled: each token took piece_delay (a model at 1,000 tokens/s
        # when none is set), as Ollama times its own generation; the prompt's evaluated tokens, as it counts them
        per_token = self.fake.piece_delay or 0.001
        eval_ns = int(1e9 * per_token * max(count, 1))
        _, evaluated, cost, _ = getattr(self, "evaluation", ("", 10, 0.0, 0.0))
        prompt_ns = int(1e9 * cost) or 1000
        return {"model": name, "created_at": "2026-11-26T10:00:00Z", "response": response, "done": True,
                "done_reason": reason, "total_duration": eval_ns + prompt_ns + 1000000, "load_duration": 1000,
                "prompt_eval_count": evaluated, "prompt_eval_duration": prompt_ns, "eval_count": count,
                "eval_duration": eval_ns}

    def _stream(self, name, prompt, thoughts, tokens, logprobs, reason, count):
        fake = self.fake
        record = {"prompt": prompt, "sent": 0, "text": [], "start": time.time(), "end": None,
                  "ended": threading.Event()}
        with fake.lock:
            record["gate"] = fake.gates.get(len(fake.streams), fake.gate)
            fake.streams.append(record)
        try:
            self._stream_lines(name, thoughts, tokens, logprobs, reason, count, record)
        finally:
            # the slot holds what was generated, up to where a client that went away cancelled it (a
            # generation that ended was remembered before its last line went out, and only then)
            if "final" not in record:
                fake.remember(self.evaluation[0], "".join(record["text"]), False)
            record["end"] = time.time()
            record["ended"].set()

    def _stream_lines(self, name, thoughts, tokens, logprobs, reason, count, record, headers=True):
        fake = self.fake
        if headers:
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
        pending = bytearray()

        def send(line, final=False):
            pending.extend(line)
            size = fake.wire_chunk or len(pending)
            while len(pending) >= size > 0 or (final and pending):
                chunk, pending[:] = bytes(pending[:size]), pending[size:]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()

        try:
            for thought in thoughts:
                send(json.dumps({"model": name, "created_at": "2026-11-26T10:00:00Z", "response": "",
                                 "thinking": thought, "done": False}, ensure_ascii=False).encode("utf-8") + b"\n")
            entries = iter(logprobs) if logprobs is not None else None
            for i, token in enumerate(tokens):
                if fake.error_after and i == fake.error_after[0]:
                    send(json.dumps({"error": fake.error_after[1]}).encode() + b"\n", final=True)
                    return self.wfile.write(b"0\r\n\r\n")
                if fake.stall_after is not None and i == fake.stall_after:
                    send(b"", final=True)
                    fake.released.wait(60)
                    return
                if fake.end_after is not None and i == fake.end_after:
                    send(b"", final=True)
                    return self.wfile.write(b"0\r\n\r\n")
                if fake.inject and i == fake.inject[0]:
                    send(fake.inject[1] + b"\n")
                if fake.piece_delay:
                    time.sleep(fake.piece_delay)
                obj = {"model": name, "created_at": "2026-11-26T10:00:00Z", "response": token, "done": False}
                if logprobs is not None:
                    obj["logprobs"] = next(entries)
                send(json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n")
                record["sent"] += 1
                if "text" in record:
                    record["text"].append(token)
            if record["gate"] is not None:
                send(b"", final=True)
                record["gate"].wait(60)
            record["final"] = time.time()  # the generation is over: the client may start another
            # the slot holds it before the client hears the end (a real server's next request waits for the slot)
            if "text" in record:  # a real stream (a burst is rendered once, ahead, and remembers nothing)
                self.fake.remember(self.evaluation[0], "".join(record["text"]), True)
            send(json.dumps(self._final(name, "", reason, count)).encode() + b"\n", final=True)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away: Ollama cancels the generation
        finally:
            self.close_connection = True


# =============================================================================
# Fake wl (a real executable; the board is a JSON file)
# =============================================================================

# ---- fake wl: begin (FakeBoard copies this section into its executable) ----
# Standalone: it may use only the modules imported here, so that one fake wl
# call costs about what a real wl start does, not a whole test-module import.
import fcntl  # noqa: E402
import json  # noqa: E402,F811
import os  # noqa: E402,F811
import sys  # noqa: E402,F811
import time  # noqa: E402,F811
import zlib  # noqa: E402


def _hex_id(seed, width):
    value = zlib.crc32(seed.encode("utf-8"))
    value = (value << 32) | zlib.crc32(("~" + seed).encode("utf-8"))
    return ("%016x" % value)[:width]


_GLOBAL_VALUE_FLAGS = {"--wasteland", "--color"}
_GLOBAL_BOOL_FLAGS = {"--local-db"}
_COMMAND_FLAGS = {  # command: (flags taking a value, boolean flags, positional args)
    "post": ({"--title", "--type", "--description", "-d", "--priority", "--effort", "--project", "--tags"},
             {"--no-push"}, 0),
    "claim": (set(), {"--no-push"}, 1),
    "unclaim": (set(), {"--no-push"}, 1),
    "done": ({"--evidence"}, {"--no-push"}, 1),
    "status": (set(), set(), 1),
    "show": (set(), set(), 1),
    "browse": ({"--type", "--status", "--limit", "--project"}, {"--json", "--long"}, 0),
    "accept": ({"--quality", "--reliability", "--message", "--severity"}, {"--no-push"}, 1),
    "reject": ({"--reason"}, {"--no-push"}, 1),
}
_COMMAND_HELP = {"post": "Post a new wanted item", "claim": "Claim a wanted item", "unclaim": "Release a claim",
                 "done": "Submit completion evidence for a claimed item", "status": "Show a wanted item",
                 "show": "Show a wanted item", "browse": "Browse the wanted board",
                 "accept": "Accept a completion and stamp it", "reject": "Send a completion back to its claimer"}
_TYPES = ("feature", "bug", "design", "rfc", "docs", "inference")


def _wl_help(command):
    """What wl, a cobra program, prints for `wl COMMAND --help` (or `wl --help`), exit 0."""
    if command is None:
        return (["wl: the Wasteland CLI", "", "Usage:", "  wl [command]", "", "Available Commands:"]
                + ["  %-10s %s" % (c, _COMMAND_HELP[c]) for c in sorted(_COMMAND_FLAGS)]
                + ["", "Flags:", "  -h, --help   help for wl", "", 'Use "wl [command] --help" for more information '
                   "about a command."])
    values, flags, positional = _COMMAND_FLAGS[command]
    lines = [_COMMAND_HELP[command], "", "Usage:", "  wl %s%s [flags]" % (command, " <id>" * positional), "",
             "Flags:"]
    lines += ["      %-22s %s" % (f + " string", f[2:]) for f in sorted(values) if f != "-d"]
    lines += ["      %-22s %s" % (f, f[2:]) for f in sorted(flags)]
    lines += ["  -h, --help                   help for " + command, "", "Global Flags:",
              "      --color string           colour output: always, auto, never",
              "      --local-db               use the local Dolt clone", "      --wasteland string       org/db"]
    return lines
_EFFORTS = ("trivial", "small", "medium", "large", "epic")


class _WlHelp(Exception):
    """--help was asked: the help is the output, exit 0."""


class _WlFail(Exception):
    def __init__(self, message, hint=None):
        Exception.__init__(self, message)
        self.hint = hint


def _parse_wl_argv(argv):
    command, flags, positional = None, {}, []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token.startswith("-") and len(token) > 1:
            name, eq, value = token.partition("=")
            spec = _COMMAND_FLAGS.get(command, (set(), set(), 0))
            if name in _GLOBAL_VALUE_FLAGS or name in spec[0]:
                if not eq:  # pflag takes the next argument, whatever it is
                    if i >= len(argv):
                        raise _WlFail("flag needs an argument: %s" % name)
                    value = argv[i]
                    i += 1
                flags["--description" if name == "-d" else name] = value
            elif name in _GLOBAL_BOOL_FLAGS or name in spec[1]:
                flags[name] = value if eq else "true"
            else:
                raise _WlFail("unknown flag: %s" % name)
        elif command is None:
            if token not in _COMMAND_FLAGS:
                raise _WlFail('unknown command "%s" for "wl"' % token)
            command = token
        else:
            positional.append(token)
    if command is None:
        raise _WlFail("no command given")
    want = _COMMAND_FLAGS[command][2]
    if len(positional) != want:
        raise _WlFail("accepts %d arg(s), received %d" % (want, len(positional)))
    return command, flags, positional


class FakeWl(object):
    """The board logic of the fake wl, on a loaded state dict."""

    def __init__(self, state, rig):
        self.state, self.rig, self.out = state, rig, []

    def say(self, line=""):
        self.out.append(line)

    def resolve(self, prefix):
        items = self.state["items"]
        if prefix in items:
            return items[prefix]
        found = sorted(i for i in items if i.startswith(prefix))
        if not found:
            raise _WlFail('no wanted item matching "%s"' % prefix)
        if len(found) > 1:
            raise _WlFail('ambiguous prefix "%s" matches: %s' % (prefix, ", ".join(found)))
        return items[found[0]]

    def tick(self):
        self.state["clock"] = self.state.get("clock", 0) + 1
        return "2026-03-01 10:%02d:%02d" % divmod(self.state["clock"] % 3600, 60)

    def pr_lines(self, item, width):
        if self.state.get("mode", "pr") != "pr":
            return []
        branch = "wl/%s/%s" % (self.rig, item["id"])
        return ["  %s%s" % ("Branch:".ljust(width), branch),
                "  %s%s" % ("Branch URL:".ljust(width), "https://example.invalid/fork/tree/" + branch),
                "  %s%s" % ("PR:".ljust(width), "https://example.invalid/pulls/%d" % self.state["clock"]),
                "  Delta: 1 row changed"]

    def pushed(self, flags):
        if "--no-push" in flags:
            self.say("  changes saved locally (--no-push)")

    def check_size(self, text, column):
        if len(text.encode("utf-8")) > 65535:
            raise _WlFail("Error 1406 (22001): Data too long for column '%s' at row 1" % column)

    def cmd_post(self, flags, args):
        if "--title" not in flags:
            raise _WlFail('required flag(s) "title" not set')
        kind = flags.get("--type", "feature")
        if kind not in _TYPES:
            raise _WlFail('invalid type "%s": must be one of %s' % (kind, ", ".join(_TYPES)))
        priority = flags.get("--priority", "2")
        if not priority.isdigit() or not 0 <= int(priority) <= 4:
            raise _WlFail("invalid priority %s: must be 0-4" % priority)
        effort = flags.get("--effort", "medium")
        if effort not in _EFFORTS:
            raise _WlFail('invalid effort "%s": must be one of %s' % (effort, ", ".join(_EFFORTS)))
        description = flags.get("--description", "")
        self.check_size(description, "description")
        self.state["seq"] = self.state.get("seq", 0) + 1
        item_id = "w-" + _hex_id("%d:%s" % (self.state["seq"], flags["--title"]), 10)
        now = self.tick()
        item = {"id": item_id, "title": flags["--title"], "type": kind, "priority": int(priority),
                "effort": effort, "description": description, "posted_by": self.rig, "claimed_by": "",
                "status": "open", "project": flags.get("--project", ""), "created": now, "updated": now,
                "completion": None, "stamp": None, "order": self.state["seq"]}
        self.state["items"][item_id] = item
        self.say("✓ Posted wanted item: " + item_id)
        self.say("  Title:    " + item["title"])
        if item["project"]:
            self.say("  Project:  " + item["project"])
        self.say("  Type:     " + kind)
        self.say("  Priority: %d" % item["priority"])
        self.say("  Effort:   " + effort)
        self.say("  Posted by: " + self.rig)
        self.say()
        for line in self.pr_lines(item, 10):
            self.say(line)
        self.pushed(flags)
        self.say("  Next: others can claim this. Browse: wl browse")

    def transition(self, item, status, verb, extra):
        item["status"] = status
        item["updated"] = self.tick()
        self.say("✓ %s %s" % (verb, item["id"]))
        self.say("  Title: " + item["title"])
        self.say("  Status: " + status)
        for line in extra:
            self.say(line)
        self.say()
        for line in self.pr_lines(item, 12):
            self.say(line)

    def cmd_claim(self, flags, args):
        item = self.resolve(args[0])
        if item["status"] != "open":
            raise _WlFail('wanted item "%s" is not open or does not exist' % item["id"])
        item["claimed_by"] = self.rig
        self.transition(item, "claimed", "Claimed", ["  Claimed by: " + self.rig])
        self.pushed(flags)
        self.say("  Next: do the work, then: wl done %s --evidence <url>" % item["id"])

    def cmd_unclaim(self, flags, args):
        item = self.resolve(args[0])
        if item["status"] != "claimed":
            raise _WlFail('wanted item "%s" is not claimed or does not exist' % item["id"])
        if item["claimed_by"] != self.rig and item["posted_by"] != self.rig:
            raise _WlFail('wanted item "%s" is not claimed by "%s" or does not exist' % (item["id"], self.rig))
        item["claimed_by"] = ""
        self.transition(item, "open", "Unclaimed", [])
        self.pushed(flags)
        self.say("  Next: others can claim it again")

    def cmd_done(self, flags, args):
        if "--evidence" not in flags:
            raise _WlFail('required flag(s) "evidence" not set')
        item = self.resolve(args[0])
        if item["status"] != "claimed" or item["claimed_by"] != self.rig:
            raise _WlFail('wanted item "%s" is not claimed by "%s" or does not exist' % (item["id"], self.rig))
        self.check_size(flags["--evidence"], "evidence")
        if item["completion"] is None:  # the first completion wins
            cid = "c-" + _hex_id("c" + item["id"], 16)
            item["completion"] = {"id": cid, "evidence": flags["--evidence"], "completed_by": self.rig}
        self.transition(item, "in_review", "Completion submitted for",
                        ["  Completed by: " + self.rig, "  Evidence: " + flags["--evidence"]])
        self.pushed(flags)
        self.say("  Next: the poster reviews it: wl accept %s" % item["id"])

    def cmd_accept(self, flags, args):
        item = self.resolve(args[0])
        if item["status"] != "in_review":
            raise _WlFail('wanted item "%s" is not in review or does not exist' % item["id"])
        if item["completion"]["completed_by"] == self.rig:
            raise _WlFail("cannot accept your own completion")
        quality = flags.get("--quality", "")
        if not quality.isdigit() or not 1 <= int(quality) <= 5:
            raise _WlFail("--quality must be 1-5")
        item["stamp"] = {"id": "s-" + item["id"][2:], "quality": int(quality),
                         "reliability": int(flags.get("--reliability", quality))}
        self.transition(item, "completed", "Accepted", ["  Quality: " + quality])
        self.pushed(flags)

    def cmd_reject(self, flags, args):
        item = self.resolve(args[0])
        if item["status"] != "in_review":
            raise _WlFail('wanted item "%s" is not in review or does not exist' % item["id"])
        self.transition(item, "claimed", "Rejected", ["  Reason: " + flags.get("--reason", "")])
        self.pushed(flags)

    def cmd_status(self, flags, args):
        item = self.resolve(args[0])
        self.say("%s: %s" % (item["id"], item["title"]))
        self.say()
        self.say("  Status:      " + item["status"])
        self.say("  Type:        %-14sPriority: P%d" % (item["type"], item["priority"]))
        if item["project"]:
            self.say("  Project:     %-14sEffort:   %s" % (item["project"], item["effort"]))
        else:
            self.say("  Effort:   " + item["effort"])
        self.say("  Posted by:   " + item["posted_by"])
        self.say("  Created:     " + item["created"])
        self.say("  Updated:     " + item["updated"])
        if item["description"]:
            self.say()
            self.say("  Description:")
            self.say("    " + item["description"])
        if item["claimed_by"]:
            self.say()
            self.say("  Claimed by:  " + item["claimed_by"])
        if item["claimed_by"] and self.state.get("mode", "pr") == "pr":
            self.say()
            branch = "wl/%s/%s" % (item["claimed_by"], item["id"])
            self.say("  Branch:      " + branch)
            self.say("  PR:          https://example.invalid/pulls/1")
        if item["completion"]:
            self.say()
            self.say("  Completion:  " + item["completion"]["id"])
            self.say("    Evidence:    " + item["completion"]["evidence"])
            self.say("    Completed by: " + item["completion"]["completed_by"])
        if item["stamp"]:
            self.say()
            self.say("  Stamp:       " + item["stamp"]["id"])
            self.say("    Quality: %d  Reliability: %d  Severity: leaf"
                     % (item["stamp"]["quality"], item["stamp"]["reliability"]))

    cmd_show = cmd_status

    def cmd_browse(self, flags, args):
        items = list(self.state["items"].values())
        for key in ("--type", "--status", "--project"):
            if key in flags:
                items = [i for i in items if i[key[2:]] == flags[key]]
        items.sort(key=lambda i: (i["priority"], -i["order"]))
        items = items[:int(flags.get("--limit", "50"))]
        if "--json" not in flags:
            for i in items:
                self.say("%s  %-10s %s" % (i["id"], i["status"], i["title"]))
            return
        docs = []
        for i in items:
            doc = {"id": i["id"], "title": i["title"]}
            if "--long" in flags:
                doc["description"] = i["description"]
            doc.update({"project": i["project"], "type": i["type"], "priority": i["priority"],
                        "posted_by": i["posted_by"], "claimed_by": i["claimed_by"], "status": i["status"],
                        "effort_level": i["effort"]})
            docs.append({k: v for k, v in doc.items() if v != ""})
        self.say(json.dumps(docs or None, indent=2, ensure_ascii=False))


def _load_state(path):
    with open(path) as f:
        return json.load(f)


def _save_state(path, state):
    with open(path + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(path + ".tmp", path)


def fake_wl_main(argv, state_path):
    """The fake wl's entry point: one invocation against the board file."""
    started = time.time()
    # Like a Go program: argv and output are UTF-8 bytes whatever the locale.
    argv = [os.fsencode(arg).decode("utf-8", "replace") for arg in argv]
    rig = os.environ.get("FAKE_WL_RIG", "")
    code = 0
    with open(state_path + ".started", "a") as log:  # tests wait on this to signal a call in flight
        log.write(json.dumps({"argv": argv, "pid": os.getpid()}) + "\n")
    with open(state_path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = _load_state(state_path)
        rig = rig or state.get("rig", "alice")
        wl = FakeWl(state, rig)
        try:
            if "--help" in argv or "-h" in argv or argv[:1] in (["help"], []):
                named = [a for a in argv if a in _COMMAND_FLAGS]
                wl.out = _wl_help(named[0] if named else None)
                raise _WlHelp()
            command, flags, args = _parse_wl_argv(argv)
            fail = state.get("fail", {}).get(command)
            if fail and fail.get("skip"):  # this many calls succeed before the failure starts
                fail["skip"] -= 1
                fail = None
            if fail and fail.get("times", 1) != 0:
                if "times" in fail:
                    fail["times"] -= 1
                if fail.get("hang") or fail.get("delay"):  # a slow network; nothing is written meanwhile
                    _save_state(state_path, state)
                    fcntl.flock(lock, fcntl.LOCK_UN)
                    if fail.get("hang"):  # with a helper of its own, as wl runs dolt
                        import subprocess

                        helper = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(3600)"])
                        with open(state_path + ".helpers", "a") as log:
                            log.write("%d\n" % helper.pid)
                    time.sleep(3600 if fail.get("hang") else fail["delay"])
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    state = _load_state(state_path)
                    wl = FakeWl(state, rig)
                if fail.get("after"):  # the change is made, then wl fails (a push or a timeout after the write)
                    getattr(wl, "cmd_" + command)(flags, args)
                if "stdout" in fail:
                    wl.say(fail["stdout"])
                elif "stderr" in fail:  # a crash: raw text, no `wl:` line
                    sys.stderr.buffer.write(fail["stderr"].encode("utf-8"))
                    wl.out, code = [], fail.get("exit", 2)
                elif "message" in fail or not fail.get("delay"):
                    raise _WlFail(fail.get("message", "injected failure"), fail.get("hint"))
                else:
                    getattr(wl, "cmd_" + command)(flags, args)
            else:
                getattr(wl, "cmd_" + command)(flags, args)
        except _WlHelp:
            pass
        except _WlFail as exc:
            message = "wl: %s\n" % exc + ("\n  Hint: %s\n" % exc.hint if exc.hint else "")
            sys.stderr.buffer.write(message.encode("utf-8"))
            wl.out, code = [], 1
        _save_state(state_path, state)
    # surrogateescape: a description stored with bytes that are not UTF-8 is printed as those bytes
    sys.stdout.buffer.write("".join(line + "\n" for line in wl.out).encode("utf-8", "surrogateescape"))
    with open(state_path + ".log", "a") as log:
        log.write(json.dumps({"argv": argv, "rig": rig, "start": started, "end": time.time(), "exit": code}) + "\n")
    return code
# ---- fake wl: end ----


def _fake_wl_source():
    with open(os.path.join(HERE, "test_wl_infer.py"), encoding="utf-8") as f:
        source = f.read()
    begin = source.index("# ---- fake wl: begin")
    return source[begin:source.index("# ---- fake wl: end ----", begin)]


def _alive(pid):
    """Running (a zombie nobody reaped yet counts as gone, where /proc says so)."""
    if not os.path.isdir("/proc"):
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


_FAKE_WL = {"path": None, "lock": threading.Lock()}


def fake_wl_executable():
    """The fake wl, written once per test process; every board hard-links
    it. (Writing an executable while another thread forks lets the child
    inherit a writable descriptor to it, and running the file then fails
    with ETXTBSY, "Text file busy".) Its board is board.json beside the
    path it was run by."""
    with _FAKE_WL["lock"]:
        if _FAKE_WL["path"] is None:
            import atexit
            import shutil

            folder = tempfile.mkdtemp(prefix="fake-wl-")
            atexit.register(shutil.rmtree, folder, True)
            path = os.path.join(folder, "wl")
            with open(path, "w", encoding="utf-8") as f:
                # -S: no site import; the fake wl needs only the standard library
                f.write("#!%s -S\n# fake wl, written by test_wl_infer.fake_wl_executable\n%s\n"
                        "sys.exit(fake_wl_main(sys.argv[1:], os.path.join(os.path.dirname(os.path.abspath("
                        "sys.argv[0])), 'board.json')))\n" % (sys.executable, _fake_wl_source()))
            os.chmod(path, 0o755)
            _FAKE_WL["path"] = path
        return _FAKE_WL["path"]


def installed_copy():
    """wl_infer.py copied once per test process (for InstallTest, which runs
    it as ./wl_infer.py): writing an executable while another thread forks
    lets the child inherit a writable descriptor, and running it then fails
    with ETXTBSY, so each test links this copy instead of writing its own."""
    with _FAKE_WL["lock"]:
        if _FAKE_WL.get("installed") is None:
            import atexit
            import shutil

            folder = tempfile.mkdtemp(prefix="wl-infer-install-")
            atexit.register(shutil.rmtree, folder, True)
            path = os.path.join(folder, "wl_infer.py")
            shutil.copy2(WL_INFER, path)
            _FAKE_WL["installed"] = path
        return _FAKE_WL["installed"]


class FakeBoard(object):
    """A fake wl executable in a temp dir, with helpers to set up and read
    its board."""

    def __init__(self, folder, rig="alice", mode="pr"):
        self.folder = folder
        self.state_path = os.path.join(folder, "board.json")
        self.exe = os.path.join(folder, "wl")
        self.save({"rig": rig, "mode": mode, "items": {}, "fail": {}})
        try:
            os.link(fake_wl_executable(), self.exe)
        except OSError:  # another file system: a copy (safe where nothing forks meanwhile)
            import shutil

            shutil.copy(fake_wl_executable(), self.exe)

    def load(self):
        with open(self.state_path) as f:
            return json.load(f)

    def save(self, state):
        _save_state(self.state_path, state)

    def update(self, change):
        """Change the board under the lock the fake wl takes."""
        with open(self.state_path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.load()
            change(state)
            self.save(state)

    def set_mode(self, mode):
        """"pr" (the default: extra Branch/PR lines) or "wild-west"."""
        self.update(lambda state: state.__setitem__("mode", mode))

    def rename(self, old, new):
        """Give an item a chosen ID (to build prefix collisions)."""
        def change(state):
            state["items"][new] = dict(state["items"].pop(old), id=new)
        self.update(change)

    def fail(self, command, **spec):
        """Make `wl COMMAND` misbehave (`times` times, default always):
        fail with `message` (and `hint`); print `stdout` and exit 0; crash
        with raw `stderr` and `exit` status; `hang`;
        `delay` seconds, then run normally (or fail, given a `message`);
        with `after`, make the change and then fail; after `skip` calls
        that succeed."""
        self.update(lambda s: s["fail"].__setitem__(command, spec))

    def wl(self, *argv, rig=None):
        """Run the fake wl directly (as the poster or another rig)."""
        env = dict(os.environ, FAKE_WL_RIG=rig or "")
        return subprocess.run([self.exe] + list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env, universal_newlines=True)

    def add(self, description, title="infer: test", kind="inference", rig="poster"):
        proc = self.wl("post", "--title=" + title, "--type=" + kind, "--description=" + description, rig=rig)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split("\n")[0].split()[-1]

    def item(self, item_id):
        return self.load()["items"][item_id]

    def calls(self):
        path = self.state_path + ".log"
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f]

    def helpers_alive(self):
        """The helper processes that hanging calls started and that still run."""
        path = self.state_path + ".helpers"
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [pid for pid in (int(line) for line in f) if _alive(pid)]

    def stop_calls(self):
        """Kill every fake wl process still running (one a test left behind on purpose)."""
        path = self.state_path + ".started"
        with open(path) as f:
            for pid in [json.loads(line)["pid"] for line in f if line.endswith("\n")]:
                if _alive(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass

    def running(self):
        """The process IDs of the wl calls that still run."""
        path = self.state_path + ".started"
        if not os.path.exists(path):
            return []
        with open(path) as f:
            pids = [json.loads(line)["pid"] for line in f if line.endswith("\n")]
        return [pid for pid in pids if _alive(pid)]

    def started(self):
        """The commands of every call started so far, finished or not."""
        path = self.state_path + ".started"
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line)["argv"][0] for line in f if line.endswith("\n")]

    def commands(self, rig=None):
        """The commands of every call (or only those made as `rig`)."""
        return [c["argv"][0] for c in self.calls() if rig is None or c["rig"] == rig]


# =============================================================================
# Helpers
# =============================================================================

GO_JOB = '{"prompt":"what is \\u003cb\\u003e1+1\\u003c/b\\u003e \\u0026 why","model":"llama3.2:1b","seed":42}'
GO_EVIDENCE = ('{"output":"The answer is 2.","output_hash":"sha256:9f257ef08ce4a87bfbe460ce5a51e7d17ec4856ad13ebf5e'
               '44979318db98a8fe","model":"llama3.2:1b","seed":42}')

# Job descriptions a stranger could post, each of which must be refused
# before any claim: (description, a fragment of the error).
_SEED = '{"prompt":"what is 1+1","model":"llama3.2:1b","seed":%s}'
_PROMPT = '{"prompt":%s,"model":"llama3.2:1b","seed":42}'
_MODEL = '{"prompt":"what is 1+1","model":%s,"seed":42}'
_EXTRA = '{"prompt":"what is 1+1","model":"llama3.2:1b","seed":42,%s}'
MALFORMED_JOBS = [
    ("", "has no description"),
    ("what is 1+1", "not valid JSON"),
    ("[1,2]", "must be a JSON object, got an array"),
    ('"what is 1+1"', 'must be a JSON object, got the string "what is 1+1"'),
    ("42", "must be a JSON object, got the number 42"),
    ("null", "must be a JSON object, got null"),
    ("true", "must be a JSON object, got true"),
    (_SEED % "42} trailing", "not valid JSON"),
    (_SEED % "42,", "not valid JSON"),
    ("{'prompt':'what is 1+1','model':'llama3.2:1b','seed':42}", "not valid JSON"),
    ("\ufeff" + _SEED % "42", "not valid JSON"),
    ('{"prompt":"red \x1b[31m text","model":"llama3.2:1b","seed":42}', "not valid JSON"),
    (_SEED % "NaN", "not valid JSON"),
    (_SEED % "-Infinity", "not valid JSON"),
    (_SEED % "0x2a", "not valid JSON"),
    (_SEED % '"42"', 'job field "seed" must be an integer, got the string "42"'),
    (_SEED % "42.5", 'job field "seed" must be an integer, got the number 42.5'),
    (_SEED % "42.0", 'job field "seed" must be an integer, got the number 42.0'),
    (_SEED % "4.2e1", 'job field "seed" must be an integer, got the number 4.2e1'),
    (_SEED % "true", 'job field "seed" must be an integer, got true'),
    (_SEED % "null", 'job field "seed" must be an integer, got null'),
    (_SEED % "[42]", 'job field "seed" must be an integer, got an array'),
    (_SEED % '{"v":42}', 'job field "seed" must be an integer, got an object'),
    (_SEED % "9223372036854775808", 'job field "seed" is out of the 64-bit integer range'),
    (_SEED % "-9223372036854775809", 'job field "seed" is out of the 64-bit integer range'),
    (_SEED % ("1" * 5000), 'job field "seed" is out of the 64-bit integer range: 1111'),
    ('{"prompt":"what is 1+1","model":"llama3.2:1b"}', 'job field "seed" is missing'),
    (_SEED % '1,"Seed":"1"', 'job field "seed" must be an integer, got the string "1"'),
    (_EXTRA % '"max_tokens":-1', 'job field "max_tokens" must not be negative, got -1'),
    (_EXTRA % '"max_tokens":1.5', 'job field "max_tokens" must be an integer, got the number 1.5'),
    (_EXTRA % '"max_tokens":"100"', 'job field "max_tokens" must be an integer, got the string "100"'),
    (_EXTRA % '"max_tokens":null', 'job field "max_tokens" must be an integer, got null'),
    (_EXTRA % '"max_tokens":1e2', 'job field "max_tokens" must be an integer, got the number 1e2'),
    (_EXTRA % '"max_tokens":99999999999999999999', 'job field "max_tokens" is out of the 64-bit integer range'),
    (_PROMPT % '""', 'job field "prompt" is missing or empty'),
    ('{"model":"llama3.2:1b","seed":42}', 'job field "prompt" is missing or empty'),
    (_PROMPT % "42", 'job field "prompt" must be a string, got the number 42'),
    (_PROMPT % "null", 'job field "prompt" must be a string, got null'),
    (_PROMPT % '["what"]', 'job field "prompt" must be a string, got an array'),
    (_PROMPT % '"a\\u0000b"', 'job field "prompt" contains a NUL character'),
    (_MODEL % '""', 'job field "model" is missing or empty'),
    ('{"prompt":"what is 1+1","seed":42}', 'job field "model" is missing or empty'),
    (_MODEL % "3.2", 'job field "model" must be a string, got the number 3.2'),
    (_MODEL % '"llama 3"', 'job field "model" "llama 3" is not an Ollama model name'),
    (_MODEL % '"-rf"', 'job field "model" "-rf" is not an Ollama model name'),
    (_MODEL % '"../../etc/passwd"', "is not an Ollama model name"),
    (_MODEL % '"llama3.2:1b;rm -rf ~"', "is not an Ollama model name"),
    (_MODEL % '"\\u001b[31mllama"', '"\\u001b[31mllama" is not an Ollama model name'),
    (_MODEL % '"llama3.2:1b\\n"', "is not an Ollama model name"),
    (_MODEL % '"llama\\u0000"', 'job field "model" contains a NUL character'),
    (_MODEL % '"ll\u00e4ma"', "is not an Ollama model name"),
    (_MODEL % json.dumps("m" * 201), 'job field "model" is 201 characters long; Ollama model names have at most 200'),
    (_EXTRA % '"model_digest":"latest"', 'job field "model_digest" must be 64 hex digits'),
    (_EXTRA % '"model_digest":"sha256:%s"' % ("g" * 64), 'job field "model_digest" must be 64 hex digits'),
    (_EXTRA % '"model_digest":5', 'job field "model_digest" must be a string, got the number 5'),
    (_EXTRA % ('"x":' + "[" * 33 + "]" * 33), "job nests arrays or objects more than 32 deep"),
    (_EXTRA % ('"x":' + "[" * 30000 + "]" * 30000), "job nests arrays or objects more than 32 deep"),
    (_PROMPT % json.dumps("x" * 70000), "job is 70045 bytes, over wl's 65535-byte field limit"),
]


class FaultTally(object):
    """What the fault matrix and the malformed-input corpus tried; printed
    at the end of `make test` and by `make faults`."""

    def __init__(self):
        self.rows = {}

    def count(self, what, n=1):
        with _Result.lock:  # tests run on several threads
            self.rows[what] = self.rows.get(what, 0) + n

    ORDER = ("faults injected into run", "claims left held without saying how to release them",
             "claims left held, with the command to release them", "results lost", "Ollama faults met by verify",
             "Ollama faults met by work", "malformed jobs refused before a claim",
             "malformed evidence refused by verify without a re-run", "malformed IDs refused before wl",
             "malformed batch lines refused before a post",
             "batch faults (wl failing, crashing, hanging, a signal, a kill)",
             "reports with hostile text, free of control characters")

    def report(self):
        width = max(len(k) for k in self.rows)
        rows = sorted(self.rows.items(), key=lambda row: (self.ORDER + (row[0],)).index(row[0]))
        return "\n".join("  %s %d" % ((what + ":").ljust(width + 1), n) for what, n in rows)


FAULTS = FaultTally()

# Completion evidence that verify must refuse (exit 2, naming the problem)
# without running the model.
_EVIDENCE = GO_EVIDENCE[:-1] + ",%s}"
MALFORMED_EVIDENCE = [
    ("The answer is 2.", "evidence is not valid JSON"),
    ("[1]", "evidence must be a JSON object, got an array"),
    ('{"output":42,"output_hash":"sha256:00","model":"llama3.2:1b","seed":42}',
     'evidence field "output" must be a string, got the number 42'),
    ('{"output":"x","model":"llama3.2:1b","seed":42}', 'evidence field "output_hash" is missing or empty'),
    (_EVIDENCE % '"seed":"42"', 'evidence field "seed" must be an integer, got the string "42"'),
    (_EVIDENCE % '"eval_count":NaN', "evidence is not valid JSON"),
    (_EVIDENCE % '"tokens_per_s":1e999', 'evidence field "tokens_per_s" is out of range: 1e999'),
    (_EVIDENCE % ('"tokens_per_s":2' + "0" * 308), 'evidence field "tokens_per_s" is out of range: 2000'),
    (_EVIDENCE % ('"logprobs":[-0.5,2%s]' % ("0" * 308)), 'evidence field "logprobs" element is out of range'),
    (_EVIDENCE % '"options":{"a":{"b":1}}', 'evidence field "options" key "a" must be a number, string'),
    (_EVIDENCE % '"logprobs":[-0.1,"x"]', 'evidence field "logprobs" element must be a number'),
    (_EVIDENCE % '"token_lengths":[3,-1]', 'evidence field "token_lengths" must not contain a negative length'),
    (_EVIDENCE % ('"x":' + "[" * 33 + "]" * 33), "evidence nests arrays or objects more than 32 deep"),
    (_EVIDENCE % ('"x":' + "[" * 30000 + "]" * 30000), "evidence nests arrays or objects more than 32 deep"),
    (_EVIDENCE % ('"pad":"%s"' % ("x" * 70000)), "evidence is 70158 bytes, over wl's 65535-byte field limit"),
]

# Command-line IDs that must never reach wl.
MALFORMED_IDS = ["--help-me", "-x", "--wasteland=evil/db", "abc", "w-", "W-ABC", "w-1 2", "w-1;rm", "w-../x",
                 "w-" + "a" * 70, "w-ab\x1b[2J"]


class CliTest(unittest.TestCase):
    """Runs wl_infer.py as a child process against both fakes."""

    rig = "bob"

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.board = FakeBoard(self.tmp.name, rig=self.rig)
        self.state_home = os.path.join(self.tmp.name, "state")  # the spool, never the user's own
        self.ollama = FakeOllama().start()
        self.addCleanup(self.ollama.stop)

    def env(self, **extra):
        env = dict(os.environ, WL_BIN=self.board.exe, OLLAMA_HOST=self.ollama.address, FAKE_WL_RIG="",
                   XDG_STATE_HOME=self.state_home)
        env.pop("NO_COLOR", None)
        env.update(extra)
        return env

    def cli(self, *args, stdin=None, env=None):
        proc = subprocess.run([sys.executable, WL_INFER] + list(args), input=stdin, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env or self.env(), timeout=120)
        return proc.returncode, proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")

    def assertError(self, result, *fragments):
        """Exit 2 and exactly one `wl_infer: error:` line on stderr."""
        code, out, err = result
        self.assertEqual(code, 2, (out, err))
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("wl_infer: error: "), err)
        self.assertNotIn("Traceback", err)
        for fragment in fragments:
            self.assertIn(fragment, err)
        return err

    def job(self, prompt="what is 1+1", model="llama3.2:1b", seed=42, max_tokens=0):
        return wl_infer.encode_job(wl_infer.make_job(prompt, model, seed, max_tokens))

    def completed(self, prompt="what is 1+1", output=None, model="llama3.2:1b", evidence=None, pin="",
                  **provenance):
        """An in_review item completed by carol: the job (pinned to `pin`
        when given) and evidence claiming `output` with its hash recomputed,
        plus any provenance keys; or exactly the `evidence` text given."""
        job = wl_infer.make_job(prompt, model, model_digest=pin)
        item_id = self.board.add(wl_infer.encode_job(job))
        if output is None:
            output = default_output(model, prompt)
        if evidence is None:
            evidence = wl_infer.encode_evidence(wl_infer.make_evidence(job, output, provenance))
        self.assertEqual(self.board.wl("claim", item_id, rig="carol").returncode, 0)
        self.assertEqual(self.board.wl("done", item_id, "--evidence=" + evidence, rig="carol").returncode, 0)
        return item_id


# =============================================================================
# As a library
# =============================================================================


class LibraryTest(CliTest):
    """wl_infer imported, as a library user would: every name in __all__,
    with no command line, no argparse Namespace and no installed signals."""

    def context(self):
        settings = wl_infer.default_settings(wl=self.board.exe, ollama_urls=[self.ollama.address], quiet=True)
        self.assertIsInstance(settings, wl_infer.Settings)
        return wl_infer.Context(settings)

    def test_every_public_name_is_used_by_these_tests(self):
        import inspect
        source = inspect.getsource(LibraryTest)
        unused = [name for name in wl_infer.__all__ if "wl_infer." + name not in source]
        self.assertEqual(unused, [])

    def test_the_codec_and_a_batch_line(self):
        job = wl_infer.make_job("say hi", "llama3.2:1b", 7, 16)
        self.assertIsInstance(job, wl_infer.Job)
        self.assertEqual(wl_infer.decode_job(wl_infer.encode_job(job)), job)
        evidence = wl_infer.make_evidence(job, "hi")
        self.assertEqual(evidence["output_hash"], wl_infer.output_hash("hi"))
        self.assertEqual(wl_infer.decode_evidence(wl_infer.encode_evidence(evidence))["output"], "hi")
        fitted, encoded = wl_infer.fit_evidence(evidence)
        self.assertEqual(wl_infer.decode_evidence(encoded)["output"], fitted["output"])
        with self.assertRaises(wl_infer.JobError) as caught:
            wl_infer.decode_job("{")
        self.assertIsInstance(caught.exception, wl_infer.UserError)
        self.assertTrue(caught.exception.reason)
        defaults = wl_infer.JobDefaults("llama3.2:1b", 42, 32)
        request = wl_infer.parse_batch_line('{"prompt": "p", "custom_id": "a"}', 1, defaults)
        self.assertIsInstance(request, wl_infer.BatchRequest)
        self.assertEqual((request.custom_id, request.job.prompt, request.job.max_tokens), ("a", "p", 32))

    def test_ollama_generates_and_compares(self):
        ollama = wl_infer.Ollama(self.ollama.address)
        job = wl_infer.make_job("what is 1+1", "llama3.2:1b", max_tokens=0)
        gen = ollama.generate(job)
        self.assertIsInstance(gen, wl_infer.Generation)
        self.assertEqual(gen.text, default_output("llama3.2:1b", "what is 1+1"))
        other = ollama.compare(wl_infer.generate_request(job), "Réponse X")
        self.assertEqual(other.diverged_at, len("Réponse "))
        with self.assertRaises(wl_infer.OllamaError):
            wl_infer.Ollama("127.0.0.1:1", timeout=5).models()

    def test_a_job_is_run_submitted_and_verified_from_python(self):
        ctx = self.context()
        wl = ctx.wl
        self.assertIsInstance(wl, wl_infer.Wl)
        job = wl_infer.make_job("what is 1+1", "llama3.2:1b", max_tokens=64)
        item_id = wl.post(wl_infer.post_title(job.prompt), wl_infer.encode_job(job))
        item = wl.status(item_id)
        self.assertIsInstance(item, wl_infer.BoardItem)
        run = wl_infer.JobRun(ctx, item)
        run.check(ctx.ollama.models(), ctx.ollama.url)
        run.attempt(run.claim)
        run.attempt(run.infer, ctx.ollama, "")
        run.attempt(run.submit)
        item = wl.status(item_id)
        self.assertIsInstance(item.completion, wl_infer.Completion)
        verification = wl_infer.verify_item(item, ctx.ollama)
        self.assertIsInstance(verification, wl_infer.Verification)
        self.assertEqual((verification.verdict, verification.refuted), ("VERIFIED", False))
        self.assertIsInstance(verification.outcome, wl_infer.Outcome)
        doc = wl_infer.verification_document(verification)
        self.assertEqual((doc["id"], doc["verdict"], doc["exact"]), (item_id, "VERIFIED", True))
        submission = wl_infer.Submission.of(item)
        policy = wl_infer.Policy(sample=wl_infer.Sample(4, 8, 1))
        sampled = wl_infer.verify_submission(submission, ctx.ollama, policy)
        self.assertEqual(sampled.verdict, "VERIFIED")  # short: re-run whole, and a check says so
        self.assertIn("not sampled", " ".join(c.message for c in sampled.checks))

    def test_a_forgery_is_refuted_and_wl_errors_carry_their_data(self):
        ctx = self.context()
        item_id = self.completed(output="a forged answer")
        verification = wl_infer.verify_item(ctx.wl.status(item_id), ctx.ollama, wl_infer.Policy(tolerance=0.5))
        self.assertEqual((verification.verdict, verification.refuted, verification.cause.kind),
                         ("MISMATCH", True, "different-output"))
        with self.assertRaises(wl_infer.WlError) as caught:
            ctx.wl.claim("w-0000000000")
        error = caught.exception
        self.assertEqual((error.command, error.item_id, error.refusal, error.conflict),
                         ("claim", "w-0000000000", "no-such-item", True))
        self.assertIn(error.reason, str(error))

    def test_signals_are_passed_in_and_main_runs_in_process(self):
        import contextlib
        import io
        before = signal.getsignal(signal.SIGTERM)
        signals = wl_infer.Signals()
        ctx = wl_infer.Context(wl_infer.default_settings(wl=self.board.exe), signals)
        self.assertIs(ctx.wl.signals, signals)
        self.assertFalse(signals.aborting())
        self.assertEqual(signal.getsignal(signal.SIGTERM), before)  # nothing installed behind the user's back
        out = io.StringIO()
        with contextlib.redirect_stdout(out), self.assertRaises(SystemExit) as caught:
            wl_infer.main(["--version"])
        self.assertEqual((caught.exception.code, out.getvalue()), (0, "wl_infer %s\n" % wl_infer.__version__))


# =============================================================================
# Codec
# =============================================================================


class CodecTest(unittest.TestCase):
    def test_go_job_fixture_round_trips(self):
        job = wl_infer.decode_job(GO_JOB)
        self.assertEqual(job.document(), {"prompt": "what is <b>1+1</b> & why", "model": "llama3.2:1b",
                               "seed": 42, "max_tokens": 0, "model_digest": ""})
        self.assertEqual(wl_infer.encode_job(job), GO_JOB)

    def test_go_evidence_fixture_round_trips_and_hash_is_sha256_of_output(self):
        evidence = wl_infer.decode_evidence(GO_EVIDENCE)
        self.assertEqual(evidence["output"], "The answer is 2.")
        self.assertEqual(wl_infer.output_hash("The answer is 2."), evidence["output_hash"])
        self.assertEqual(wl_infer.encode_evidence(evidence), GO_EVIDENCE)
        self.assertEqual(wl_infer.encode_evidence(wl_infer.make_evidence(
            wl_infer.make_job("p", "llama3.2:1b"), "The answer is 2.")), GO_EVIDENCE)

    def test_job_key_order_and_max_tokens_omitted_when_zero(self):
        self.assertEqual(wl_infer.encode_job(wl_infer.make_job("p", "m", 7, 0)),
                         '{"prompt":"p","model":"m","seed":7}')
        self.assertEqual(wl_infer.encode_job(wl_infer.make_job("p", "m", 0, 64)),
                         '{"prompt":"p","model":"m","seed":0,"max_tokens":64}')

    def test_encoding_escapes_like_go(self):
        text = wl_infer.encode_go_json({"s": "a<b>&c\u2028\u2029é\n\t\x01\x7f"})
        self.assertEqual(text, '{"s":"a\\u003cb\\u003e\\u0026c\\u2028\\u2029é\\n\\t\\u0001\x7f"}')
        self.assertEqual(json.loads(text)["s"], "a<b>&c\u2028\u2029é\n\t\x01\x7f")

    def test_hash_is_over_exact_utf8_bytes(self):
        for output in ("x", " padded \n", "é", "🙂\r\n"):
            self.assertEqual(wl_infer.output_hash(output),
                             "sha256:" + hashlib.sha256(output.encode("utf-8")).hexdigest())
        self.assertNotEqual(wl_infer.output_hash("a\n"), wl_infer.output_hash("a"))

    def test_unknown_keys_ignored_and_missing_ints_are_zero(self):
        job = wl_infer.decode_job('{"prompt":"p","model":"m","seed":0,"extra":{"deep":[1,2]},"worker":"x"}')
        self.assertEqual(job.document(), {"prompt": "p", "model": "m", "seed": 0, "max_tokens": 0,
                                          "model_digest": ""})

    def test_keys_match_case_insensitively_exact_match_preferred_last_wins(self):
        self.assertEqual(wl_infer.decode_job('{"Prompt":"p","MODEL":"m","Seed":5,"Max_Tokens":9}').document(),
                         {"prompt": "p", "model": "m", "seed": 5, "max_tokens": 9, "model_digest": ""})
        # Go's simple folding: U+017F (long s) folds to s, U+212A (Kelvin) to k
        self.assertEqual(wl_infer.decode_job('{"prompt":"p","model":"m","\u017feed":3,"max_to\u212aens":4}').seed, 3)
        # Python's folding takes the dotless i for i; Go's never does, so this key pins nothing
        self.assertEqual(wl_infer.decode_job('{"prompt":"p","model":"m","seed":1,"model_d\u0131gest":"%s"}'
                                             % ("a" * 64)).model_digest, "")
        self.assertEqual(wl_infer.decode_job('{"prompt":"a","Prompt":"b","model":"m","seed":1}').prompt, "b")
        self.assertEqual(wl_infer.decode_job('{"prompt":"a","prompt":"c","model":"m","seed":1}').prompt, "c")
        self.assertEqual(wl_infer.decode_job('{"prompts":"x","prompt":"p","model":"m","seed":1}').prompt, "p")

    def test_an_integer_of_any_length_is_read_as_go_reads_it(self):
        # Python's int() refuses over 4,300 digits; Go reads the document and ignores an unknown key
        job = wl_infer.decode_job('{"prompt":"p","model":"m","seed":1,"x":%s}' % ("1" * 5000))
        self.assertEqual((job.prompt, job.seed), ("p", 1))
        with self.assertRaises(wl_infer.JobError) as ctx:
            wl_infer.decode_job('{"prompt":"p","model":"m","seed":%s}' % ("1" * 5000))
        self.assertIn('job field "seed" is out of the 64-bit integer range: 1111', str(ctx.exception))
        # one of our float keys given an integer beyond float64: Go refuses it, and so do we (no OverflowError)
        for key, value in (("tokens_per_s", "2" + "0" * 308), ("logprobs", "[-0.5,2%s]" % ("0" * 308))):
            with self.subTest(key=key), self.assertRaises(wl_infer.JobError) as ctx:
                wl_infer.decode_evidence(GO_EVIDENCE[:-1] + ',"%s":%s}' % (key, value))
            self.assertIn('evidence field "%s' % key, str(ctx.exception))
            self.assertIn("is out of range: 2000", str(ctx.exception))

    def test_bytes_that_are_not_utf8_are_one_replacement_character_each_and_counted_as_given(self):
        def from_wl(raw):  # as wl_infer reads wl's output
            return raw.decode("utf-8", "surrogateescape")

        for raw, prompt in ((b"\xe2\x82", "\ufffd\ufffd"), (b"a\xf0\x9f\x98b", "a\ufffd\ufffd\ufffdb"),
                            (b"\xc0\xaf\xed\xa0\x80\xff", "\ufffd" * 6), (b"ok \xe2\x9c\x93", "ok \u2713")):
            with self.subTest(raw=raw):
                job = wl_infer.decode_job(from_wl(b'{"prompt":"%s","model":"m","seed":1}' % raw))
                self.assertEqual(job.prompt, prompt)
        # the size limit counts the bytes wl gave, not the replacement characters (3 bytes each)
        document = b'{"prompt":"%s","model":"m","seed":1}'
        self.assertEqual(len(wl_infer.decode_job(from_wl(document % (b"\xff" * 30000))).prompt), 30000)
        over = document % (b"\xff" * (65536 - len(document) + 2))
        with self.assertRaises(wl_infer.JobError) as ctx:
            wl_infer.decode_job(from_wl(over))
        self.assertIn("job is 65536 bytes, over wl's 65535-byte field limit", str(ctx.exception))

    def test_null_leaves_zero_value_in_evidence_like_go_but_a_job_refuses_it(self):
        self.assertEqual(wl_infer.decode_evidence('{"output":"o","output_hash":"h","model":"m","seed":null}')["seed"],
                         0)
        for field in ("seed", "max_tokens", "model_digest"):
            with self.assertRaises(wl_infer.JobError) as ctx:
                wl_infer.decode_job('{"prompt":"p","model":"m","seed":1,"%s":null}' % field)
            self.assertIn('job field "%s" must be' % field, str(ctx.exception))
            self.assertIn("got null", str(ctx.exception))

    def test_integer_fields_reject_non_integers_naming_the_field(self):
        cases = [('42.0', "the number 42.0"), ('"42"', 'the string "42"'), ("true", "true"),
                 ("4e1", "the number 4e1"), ("[1]", "an array"), ('{"a":1}', "an object")]
        for value, shown in cases:
            with self.subTest(value=value):
                with self.assertRaises(wl_infer.JobError) as ctx:
                    wl_infer.decode_job('{"prompt":"p","model":"m","seed":%s}' % value)
                self.assertIn('field "seed" must be an integer', str(ctx.exception))
                self.assertIn(shown, str(ctx.exception))
        with self.assertRaises(wl_infer.JobError) as ctx:
            wl_infer.decode_job('{"prompt":"p","model":"m","max_tokens":1.5}')
        self.assertIn('"max_tokens"', str(ctx.exception))

    def test_int64_range(self):
        self.assertEqual(wl_infer.decode_job('{"prompt":"p","model":"m","seed":-9223372036854775808}').seed,
                         -2 ** 63)
        with self.assertRaises(wl_infer.JobError) as ctx:
            wl_infer.decode_job('{"prompt":"p","model":"m","seed":9223372036854775808}')
        self.assertIn("64-bit", str(ctx.exception))

    def test_string_fields_reject_other_types(self):
        for value in ("1", "true", "[]", "{}"):
            with self.assertRaises(wl_infer.JobError) as ctx:
                wl_infer.decode_job('{"prompt":%s,"model":"m","seed":1}' % value)
            self.assertIn('field "prompt" must be a string', str(ctx.exception))

    def test_required_fields(self):
        for doc, field in (('{"model":"m","seed":1}', "prompt"), ('{"prompt":"","model":"m","seed":1}', "prompt"),
                           ('{"prompt":"p","seed":1}', "model"), ('{"prompt":"p","model":"","seed":1}', "model")):
            with self.assertRaises(wl_infer.JobError) as ctx:
                wl_infer.decode_job(doc)
            self.assertIn('job field "%s" is missing or empty' % field, str(ctx.exception))
        for field in ("output", "output_hash", "model"):
            doc = json.loads(GO_EVIDENCE)
            del doc[field]
            with self.assertRaises(wl_infer.JobError) as ctx:
                wl_infer.decode_evidence(json.dumps(doc))
            self.assertIn('evidence field "%s" is missing or empty' % field, str(ctx.exception))
        self.assertEqual(wl_infer.decode_evidence('{"output":"o","output_hash":"h","model":"m"}')["seed"], 0)

    def test_provenance_keys_follow_gos_and_decode_by_type(self):
        job = wl_infer.make_job("p", "m")
        evidence = wl_infer.make_evidence(job, "out", {
            "model_digest": "ab" * 32, "ollama_version": "0.12.11", "options": {"temperature": 0, "seed": 42},
            "done_reason": "stop", "eval_count": 2, "prompt_eval_count": 7, "eval_ms": 40, "tokens_per_s": 50.0,
            "logprobs": [-0.0001, 0.0], "token_lengths": [2, 1], "thinking_hash": wl_infer.output_hash("t")})
        text = wl_infer.encode_evidence(evidence)
        go_part = wl_infer.encode_evidence(wl_infer.make_evidence(job, "out"))
        self.assertTrue(text.startswith(go_part[:-1] + ',"model_digest":'), text)
        self.assertEqual(wl_infer.decode_evidence(text), evidence)
        self.assertEqual(wl_infer.encode_evidence(wl_infer.decode_evidence(text)), text)
        for key, value, fragment in (("model_digest", "5", "must be a string, got the number 5"),
                                     ("options", "[1]", "must be an object, got an array"),
                                     ("options", '{"a":%s}' % ("[" * 20 + "]" * 20),  # no recursion
                                      'key "a" must be a number, string, boolean or array of those'),
                                     ("options", '{"a":{"b":1}}', 'key "a" must be a number, string'),
                                     ("eval_count", "1.5", "must be an integer, got the number 1.5"),
                                     ("tokens_per_s", '"fast"', 'must be a number, got the string "fast"'),
                                     ("tokens_per_s", "1e999", "is out of range: 1e999"),
                                     ("logprobs", "{}", "must be an array of numbers, got an object"),
                                     ("logprobs", "[0, true]", 'field "logprobs" element must be a number'),
                                     ("token_lengths", "[1, 2.0]", 'element must be an integer, got the number 2.0'),
                                     ("token_lengths", "[1, -1]", "must not contain a negative length"),
                                     ("token_lengths", '"3"', "must be an array of integers, got the string")):
            with self.subTest(key=key, value=value):
                with self.assertRaises(wl_infer.JobError) as ctx:
                    wl_infer.decode_evidence(go_part[:-1] + ',"%s":%s}' % (key, value))
                self.assertIn('evidence field "%s' % key, str(ctx.exception))
                self.assertIn(fragment, str(ctx.exception))
        options = '{"temperature":0,"stop":["\\n","x"],"top_p":0.5,"numa":true}'
        self.assertEqual(wl_infer.decode_evidence(go_part[:-1] + ',"options":%s}' % options)["options"],
                         {"temperature": 0, "stop": ["\n", "x"], "top_p": 0.5, "numa": True})
        absent = wl_infer.decode_evidence(go_part)  # Go's evidence: nothing recorded
        self.assertEqual((absent["model_digest"], absent["logprobs"], absent["tokens_per_s"]), ("", None, None))

    def test_pinned_job_is_go_job_plus_one_key(self):
        job = wl_infer.make_job("p", "m", 7, 0, "ab" * 32)
        self.assertEqual(wl_infer.encode_job(job),
                         '{"prompt":"p","model":"m","seed":7,"model_digest":"%s"}' % ("ab" * 32))
        self.assertEqual(wl_infer.decode_job(wl_infer.encode_job(job)), job)
        self.assertTrue(wl_infer.same_digest("sha256:" + "AB" * 32, "ab" * 32))
        self.assertFalse(wl_infer.same_digest("ab" * 32, "ab" * 31 + "ac"))

    def test_fitting_evidence_drops_logprobs_then_provenance_then_fails(self):
        job = wl_infer.make_job("p", "m")
        prov = {"model_digest": "ab" * 32, "eval_count": 1, "logprobs": [-1.5] * 8000}
        for size, dropped in ((100, ()), (40000, ("logprobs",)), (65400, ("logprobs", "model_digest", "eval_count"))):
            evidence, encoded = wl_infer.fit_evidence(wl_infer.make_evidence(job, "a" * size, prov))
            self.assertLessEqual(len(encoded), 65535)
            self.assertEqual([k for k in ("logprobs", "model_digest", "eval_count") if k not in evidence],
                             list(dropped))
            self.assertEqual(encoded, wl_infer.encode_evidence(evidence))
        with self.assertRaises(wl_infer.UserError) as ctx:
            wl_infer.fit_evidence(wl_infer.make_evidence(job, "\n" * 40000, prov))  # escapes double it
        self.assertIn("the evidence (output 40000 bytes) is 80123 bytes, over wl's 65535-byte field limit",
                      str(ctx.exception))

    def test_provenance_from_a_generation(self):
        gen = wl_infer.Generation()
        for i in range(1500):
            gen.add("x", [{"token": "x", "logprob": -0.123456 if i % 2 else -0.00001}])
        gen.thinking = "thought"
        gen.final = {"done": True, "done_reason": "length", "eval_count": 1500, "eval_duration": 3 * 10 ** 9}
        found = wl_infer.provenance(gen, "ab" * 32, "0.12.11", {"temperature": 0, "seed": 1})
        self.assertEqual(len(found["logprobs"]), 1024)  # the first 1,024 tokens only
        self.assertEqual(found["logprobs"][:2], [0, -0.1235])  # 4 decimals, and no "-0.0"
        self.assertEqual(json.dumps(found["logprobs"][:1]), "[0.0]")
        self.assertEqual((found["done_reason"], found["eval_count"], found["eval_ms"], found["tokens_per_s"]),
                         ("length", 1500, 3000, 500.0))
        self.assertEqual(found["thinking_hash"], wl_infer.output_hash("thought"))

    def test_tokens_are_placed_by_their_logprob_entries(self):
        gen = wl_infer.Generation()
        gen.add("ab", [{"token": "ab", "logprob": -0.1, "top_logprobs": [{"token": "ab", "logprob": -0.1}]}])
        self.assertEqual(gen.entry_at(0), (-0.1, [("ab", -0.1)]))
        gen.add("cdef", [{"token": "cd", "logprob": -0.2}, {"token": "ef", "logprob": -0.3}])  # two tokens
        self.assertEqual([gen.entry_at(i) for i in range(4)], [None, (-0.2, []), (-0.3, []), None])  # latest only
        gen.add("g", None)  # an older server: a piece is a token
        self.assertEqual(gen.token_ends, [2, 4, 6, 7])
        self.assertEqual([gen.token_at(i) for i in range(8)], [0, 0, 1, 1, 2, 2, 3, None])
        self.assertIsNone(gen.chosen_logprobs())  # one token has none: not comparable
        self.assertEqual(gen.chosen_logprobs(3), [-0.1, -0.2, -0.3])
        gen.add("hi", [{"token": "h", "logprob": float("nan")}, "junk"])  # malformed entries are no data
        self.assertEqual(gen.chosen[-2:], [None, None])
        self.assertEqual(gen.token_ends[-2:], [7, 9])  # the malformed entry places nothing
        self.assertEqual([gen.entry_at(4), gen.entry_at(5)], [None, None])

    def test_not_json_or_not_an_object(self):
        for text, fragment in (("", "not valid JSON"), ("hello", "not valid JSON"), ("[1]", "got an array"),
                               ('"s"', "got the string"), ("null", "got null"), ('{"prompt":"p"} x', "not valid JSON"),
                               ('{"prompt":NaN}', "not valid JSON"), ("[" * 60000, "nests arrays or objects more "
                                                                       "than 32 deep"),
                               ("[" * 70000, "70000 bytes, over wl's 65535-byte field limit")):
            with self.subTest(text=text[:20]):
                with self.assertRaises(wl_infer.JobError) as ctx:
                    wl_infer.decode_job(text)
                self.assertIn(fragment, str(ctx.exception))

    def test_malformed_job_corpus_is_refused_naming_the_problem(self):
        for description, fragment in MALFORMED_JOBS:
            with self.subTest(description=description[:60]):
                with self.assertRaises(wl_infer.JobError) as ctx:
                    wl_infer.job_of(wl_infer.BoardItem("w-1", type="inference", description=description or None))
                self.assertIn(fragment, str(ctx.exception))
        self.assertGreaterEqual(len(MALFORMED_JOBS), 40)

    def test_honest_jobs_pass_the_stricter_checks(self):
        for model in ("llama3.2:1b", "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M", "m" * 200,
                      "registry.ollama.ai/library/qwen2.5:0.5b", "Phi3"):
            job = wl_infer.make_job("a [[[ { prompt", model, -5, 7, "sha256:" + "Ab" * 32)
            self.assertEqual(wl_infer.decode_job(wl_infer.encode_job(job)), job)
        nested_text = '{"prompt":"%s","model":"m","seed":1}' % ("[{" * 40)  # brackets inside a string
        self.assertEqual(wl_infer.decode_job(nested_text).prompt, "[{" * 40)
        self.assertEqual(wl_infer.decode_job(GO_JOB).seed, 42)

    def test_unpaired_surrogate_becomes_replacement_character_like_go(self):
        job = wl_infer.decode_job('{"prompt":"a\\ud800b \\ud83d\\ude00","model":"m","seed":1}')
        self.assertEqual(job.prompt, "a\ufffdb \U0001F600")
        wl_infer.output_hash(job.prompt)  # encodable

    def test_model_name_normalisation(self):
        self.assertEqual(wl_infer.full_model_name("llama3.2"), "llama3.2:latest")
        self.assertEqual(wl_infer.full_model_name("llama3.2:1b"), "llama3.2:1b")
        self.assertEqual(wl_infer.full_model_name("localhost:5000/lib/m"), "localhost:5000/lib/m:latest")

    def test_title_is_cut_by_characters_on_one_line(self):
        self.assertEqual(wl_infer.post_title("what is 1+1"), "infer: what is 1+1")
        long = "é" * 59 + "🙂" + "tail"
        self.assertEqual(wl_infer.post_title(long), "infer: " + "é" * 59 + "🙂...")
        self.assertEqual(wl_infer.post_title("a\n\nb\x1b[31m\tc"), "infer: a b [31m c")

    def test_printable_and_preview_neutralise_control_characters(self):
        self.assertEqual(wl_infer.printable("a\x1b[2Jb\x07\x9b\n"), "a\\x1b[2Jb\\x07\\x9b\\n")
        self.assertEqual(wl_infer.printable("\u202egnp.exe\u2066x\u2069 \u200d\u05d0"),
                         "\\u202egnp.exe\\u2066x\\u2069 \u200d\u05d0")  # bidi controls; joiners and Hebrew stay
        self.assertEqual(wl_infer.preview("é" * 5 + "\x1b", 5), "ééééé…")
        self.assertEqual(wl_infer.preview("🙂" * 5, 3), "🙂🙂🙂…")
        self.assertEqual(wl_infer.preview("abc", 3), "abc")

    def test_request_body_is_the_one_go_sends(self):
        # Go's body, plus the logprobs request (ignored by servers without it)
        self.assertEqual(wl_infer.generate_request(wl_infer.make_job("p", "m", 42, 0)),
                         {"model": "m", "prompt": "p", "stream": True, "options": {"temperature": 0, "seed": 42},
                          "logprobs": True, "top_logprobs": 2})
        self.assertEqual(wl_infer.generate_request(wl_infer.make_job("p", "m", 7, 16))["options"],
                         {"temperature": 0, "seed": 7, "num_predict": 16})

    def test_source_is_python_38_syntax(self):
        import ast

        with open(WL_INFER, encoding="utf-8") as f:
            source = f.read()
        ast.parse(source, feature_version=(3, 8))
        self.assertTrue(source.startswith("#!/usr/bin/env python3\n"))  # see InstallTest
        self.assertTrue(os.access(WL_INFER, os.X_OK))
        for newer in (".removeprefix(", ".removesuffix(", "strict=True"):
            self.assertNotIn(newer, source)


class OllamaHostTest(unittest.TestCase):
    def test_ollama_host_forms(self):
        cases = {
            "": "http://127.0.0.1:11434",
            "   ": "http://127.0.0.1:11434",
            "example.com": "http://example.com:11434",
            "example.com:8080": "http://example.com:8080",
            "http://example.com": "http://example.com:80",
            "https://example.com": "https://example.com:443",
            "http://example.com:9000": "http://example.com:9000",
            "https://example.com:9443/ollama/": "https://example.com:9443/ollama",
            "http://example.com/base/path": "http://example.com:80/base/path",
            "0.0.0.0": "http://0.0.0.0:11434",
            ":11434": "http://127.0.0.1:11434",
            "::1": "http://[::1]:11434",
            "[::1]:8080": "http://[::1]:8080",
            "[::1]": "http://[::1]:11434",
            "\"example.com:1234\"": "http://example.com:1234",
            "'http://h:1'": "http://h:1",
        }
        for value, expected in cases.items():
            with self.subTest(value=value):
                self.assertEqual(wl_infer.ollama_url(value), expected)
        # Ollama warns and uses its default port; we say so, naming the value
        for value in ("example.com:notaport", "localhost:99999", "localhost:abc", "http://h:0", "[::1]:-1"):
            with self.subTest(value=value):
                with self.assertRaisesRegex(wl_infer.UserError, "Ollama address .*: port .* is not a number "
                                                                "from 1 to 65535"):
                    wl_infer.ollama_url(value)


class StatusParserTest(unittest.TestCase):
    FULL = """w-3f9a0c12be: infer: what is 1+1

  Status:      in_review
  Type:        inference     Priority: P2
  Effort:   small
  Posted by:   alice
  Tags:        a, b
  Created:     2026-03-01 10:00:00
  Updated:     2026-03-01 10:05:00

  Description:
    {"prompt":"what is 1+1","model":"llama3.2:1b","seed":42}

  Claimed by:  bob

  Branch:      wl/bob/w-3f9a0c12be
  PR:          https://example.invalid/pr/1

  Completion:  c-0123456789abcdef
    Evidence:    {"output":"2","output_hash":"sha256:x","model":"llama3.2:1b","seed":42}
    Completed by: bob

  Stamp:       s-1
    Quality: 5  Reliability: 5  Severity: leaf
"""

    def test_full_layout(self):
        item = wl_infer.parse_status(self.FULL)
        self.assertEqual(item.id, "w-3f9a0c12be")
        self.assertEqual(item.title, "infer: what is 1+1")
        self.assertEqual(item.status, "in_review")
        self.assertEqual(item.type, "inference")
        self.assertEqual(item.posted_by, "alice")
        self.assertEqual(item.claimed_by, "bob")
        self.assertEqual(item.description, '{"prompt":"what is 1+1","model":"llama3.2:1b","seed":42}')
        self.assertEqual(item.completion, wl_infer.Completion(
            "c-0123456789abcdef", "bob", '{"output":"2","output_hash":"sha256:x","model":"llama3.2:1b","seed":42}'))

    def test_multiline_description_with_blank_lines_and_label_lookalikes(self):
        description = '{\n  "prompt": "a\\n\\nb",\n\n  "model": "m"\n}\n\n  Status: fake\n  Claimed by x'
        text = ("w-1: t\n\n  Status:      open\n  Type:        inference     Priority: P2\n\n"
                "  Description:\n    " + description + "\n")
        item = wl_infer.parse_status(text)
        self.assertEqual(item.description, description)
        self.assertEqual(item.status, "open")
        self.assertIsNone(item.completion)
        with_claim = text + "\n  Claimed by:  bob\n"
        item = wl_infer.parse_status(with_claim)
        self.assertEqual(item.description, description)
        self.assertEqual(item.claimed_by, "bob")

    def test_sections_absent_and_ansi_stripped(self):
        item = wl_infer.parse_status("\x1b[1mw-2: t\x1b[0m\n\n  Status:      \x1b[32mopen\x1b[0m\n")
        self.assertEqual((item.id, item.status, item.description, item.claimed_by),
                         ("w-2", "open", None, None))

    def test_imitated_completion_is_refused(self):
        fake = "\n\n  Completion:  c-1111111111111111\n    Evidence:    {}"
        text = self.FULL.replace('"seed":42}\n\n  Claimed', '"seed":42}' + fake + "\n\n  Claimed")
        with self.assertRaises(wl_infer.WlError):
            wl_infer.parse_status(text)

    def test_lines_before_the_header_are_skipped(self):
        item = wl_infer.parse_status("Syncing with upstream...\nnote: x: y\n\n" + self.FULL)
        self.assertEqual((item.id, item.status), ("w-3f9a0c12be", "in_review"))

    def test_garbage_is_a_clear_error(self):
        for text in ("", "nonsense", "w-1: t\n  no status here\n"):
            with self.assertRaises(wl_infer.WlError):
                wl_infer.parse_status(text)

    def test_posted_id_and_error_text(self):
        self.assertEqual(wl_infer.parse_posted_id("✓ Posted wanted item: w-3f9a0c12be\n  Title: x\n"), "w-3f9a0c12be")
        with self.assertRaises(wl_infer.WlError):
            wl_infer.parse_posted_id("something else\n")
        self.assertEqual(wl_infer.wl_error_text('wl: wanted item "w-1" is not open or does not exist\n\n'
                                                "  Hint: browse with wl browse\n"),
                         'wanted item "w-1" is not open or does not exist (hint: browse with wl browse)')
        self.assertEqual(wl_infer.wl_error_text("panic: boom\n"), "panic: boom")
        self.assertIsNone(wl_infer.wl_error_text(""))


# =============================================================================
# Streaming client (in-process, against the fake server)
# =============================================================================


class OllamaClientTest(unittest.TestCase):
    """In-process client tests against a fresh fake server."""

    def setUp(self):
        self.ollama = FakeOllama().start()
        self.addCleanup(self.ollama.stop)
        self.client = wl_infer.Ollama(self.ollama.address, timeout=5)


class StreamingTest(OllamaClientTest):
    def test_pieces_split_across_http_chunks_reassemble_exactly(self):
        text = "naïve café — 日本語 🙂🙃\n  spaces  \r\nend"
        self.ollama.outputs[("llama3.2:1b", "p")] = text
        for wire_chunk in (1, 2, 3, 5, 7, None):
            for piece_chars in (1, 2, 4):
                with self.subTest(wire_chunk=wire_chunk, piece_chars=piece_chars):
                    self.ollama.wire_chunk, self.ollama.piece_chars = wire_chunk, piece_chars
                    seen = []
                    gen = self.client.generate(wl_infer.make_job("p", "llama3.2:1b"), seen.append)
                    self.assertEqual(gen.text, text)
                    self.assertEqual(gen.chunks, len(seen))
                    self.assertEqual(seen[-1], gen.chunks)
                    self.assertEqual(gen.final["done_reason"], "stop")

    def test_request_body_on_the_wire(self):
        self.client.generate(wl_infer.make_job("hi", "llama3.2:1b", 7, 5))
        self.assertEqual(self.ollama.generate_requests(), [
            {"model": "llama3.2:1b", "prompt": "hi", "stream": True,
             "options": {"temperature": 0, "seed": 7, "num_predict": 5}, "logprobs": True, "top_logprobs": 2}])

    def test_stream_equals_non_streamed_response(self):
        body = wl_infer.generate_request(wl_infer.make_job("q", "llama3.2:1b"))
        body["stream"] = False
        whole = self.client._get_json("/api/generate", body)["response"]
        self.assertEqual(self.client.generate(wl_infer.make_job("q", "llama3.2:1b")).text, whole)

    def test_models_and_tag_normalisation(self):
        self.ollama.models["mistral:latest"] = "d" * 64
        self.assertEqual(wl_infer.find_model(self.client.models(), "mistral"), "d" * 64)
        self.assertEqual(wl_infer.find_model(self.client.models(), "Llama3.2:1B"), self.ollama.models["llama3.2:1b"])
        self.assertIsNone(wl_infer.find_model(self.client.models(), "llama3.2"))

    def test_base_path_is_kept(self):
        client = wl_infer.Ollama("http://%s/prefix" % self.ollama.address, timeout=5)
        with self.assertRaises(wl_infer.OllamaError) as ctx:
            client.models()
        self.assertIn("HTTP 404", str(ctx.exception))
        self.assertEqual(self.ollama.requests[-1]["path"], "/prefix/api/tags")

    def test_failures_carry_ollama_text(self):
        job = wl_infer.make_job("p", "llama3.2:1b")
        self.ollama.fail = (500, "llama runner process has terminated: signal: killed")
        with self.assertRaises(wl_infer.OllamaError) as ctx:
            self.client.generate(job)
        self.assertIn("llama runner process has terminated: signal: killed (HTTP 500)", str(ctx.exception))
        self.ollama.fail = None
        self.ollama.error_after = (2, "out of memory")
        with self.assertRaises(wl_infer.OllamaError) as ctx:
            self.client.generate(job)
        self.assertIn("failed after 2 tokens: out of memory", str(ctx.exception))
        self.ollama.error_after = None
        self.ollama.end_after = 3
        with self.assertRaises(wl_infer.OllamaError) as ctx:
            self.client.generate(job)
        self.assertIn("without its final `done`", str(ctx.exception))

    def test_malformed_stream_lines_are_clear_errors(self):
        job = wl_infer.make_job("p", "llama3.2:1b")
        for raw, fragment in ((b"<html>oops</html>", "not a JSON object after 2 tokens: <html>oops</html>"),
                              (b'["a"]', "not a JSON object after 2 tokens"),
                              (b'{"response":"\xff\xfe","done":false}', "invalid UTF-8 after 2 tokens"),
                              (b'{"response":5,"done":false}', "`response` or `thinking` that is not a string"),
                              (b'{"response":"' + b"x" * (1 << 20) + b'"}', "stream line over 1048576 bytes")):
            with self.subTest(raw=raw[:20]):
                self.ollama.inject = (2, raw)
                with self.assertRaises(wl_infer.OllamaError) as ctx:
                    self.client.generate(job)
                self.assertIn(fragment, str(ctx.exception))

    def test_unpaired_surrogate_in_the_stream_becomes_replacement_character(self):
        self.ollama.outputs[("llama3.2:1b", "s")] = "abcdef"
        self.ollama.inject = (1, b'{"response":"\\ud83d","done":false}')
        gen = self.client.generate(wl_infer.make_job("s", "llama3.2:1b"))
        self.assertEqual(gen.text, "abc\ufffddef")
        self.assertEqual(wl_infer.output_hash(gen.text), wl_infer.output_hash("abc\ufffddef"))

    def test_stall_is_an_inactivity_timeout(self):
        self.ollama.stall_after = 2
        client = wl_infer.Ollama(self.ollama.address, timeout=0.3)
        with self.assertRaises(wl_infer.OllamaError) as ctx:
            client.generate(wl_infer.make_job("p", "llama3.2:1b"))
        self.assertIn("sent nothing for 0.3 s after 2 tokens", str(ctx.exception))

    def test_slow_but_steady_generation_is_not_cut(self):
        # total time well above the inactivity timeout, never idle that long
        self.ollama.piece_delay, self.ollama.piece_chars = 0.05, 1
        self.ollama.outputs[("llama3.2:1b", "slow")] = "x" * 12
        client = wl_infer.Ollama(self.ollama.address, timeout=0.4)
        self.assertEqual(client.generate(wl_infer.make_job("slow", "llama3.2:1b")).text, "x" * 12)


class RawServer(object):
    """One connection's worth of a server that sends exactly the bytes it is
    given (the HTTP framing included) and closes: proxies and impostors."""

    def __init__(self, response):
        import socket

        self.response = response
        self.request = b""
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.listener.accept()
        with conn:
            while b"\r\n\r\n" not in self.request:
                self.request += conn.recv(65536)
            head, _, body = self.request.partition(b"\r\n\r\n")
            length = int(([h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")]
                           or [b"0"])[0])
            while len(body) < length:
                body += conn.recv(65536)
                self.request = head + b"\r\n\r\n" + body
            conn.sendall(self.response)
        self.listener.close()


def ndjson(*objects):
    return b"".join(json.dumps(o).encode() + b"\n" for o in objects)


def chunked(data, size=7, extension=b""):
    return b"".join(b"%x%s\r\n%s\r\n" % (len(data[i:i + size]), extension, data[i:i + size])
                    for i in range(0, len(data), size))


STREAM = ndjson({"response": "Hel", "done": False}, {"response": "lo ✓", "done": False},
                {"response": "", "done": True, "done_reason": "stop", "eval_count": 2})
OK_CHUNKED = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"


class HttpWireTest(unittest.TestCase):
    """The client (http.client, with our limits and words) against exact
    bytes on the wire: proxies, impostors and broken servers."""

    job = wl_infer.make_job("p", "llama3.2:1b")

    def generate(self, response):
        server = RawServer(response)
        try:
            return wl_infer.Ollama(server.address, timeout=5).generate(self.job), server
        finally:
            server.thread.join(10)

    def fails(self, response, *fragments, call=None):
        server = RawServer(response)
        with self.assertRaises(wl_infer.OllamaError) as ctx:
            (call or (lambda ollama: ollama.generate(self.job)))(wl_infer.Ollama(server.address, timeout=5))
        server.thread.join(10)
        for fragment in fragments:
            self.assertIn(fragment, str(ctx.exception))

    def test_every_body_framing_a_proxy_may_use(self):
        for name, response in (
                ("chunked, extensions, trailers", OK_CHUNKED + chunked(STREAM, 5, b";x=1") + b"0\r\nX-T: 1\r\n\r\n"),
                ("one chunk per line", OK_CHUNKED + b"".join(chunked(line + b"\n", 1 << 20)
                                                             for line in STREAM.splitlines()) + b"0\r\n\r\n"),
                ("Content-Length", b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(STREAM) + STREAM),
                ("to the close (HTTP/1.0)", b"HTTP/1.0 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n" + STREAM),
                ("after 100 Continue", b"HTTP/1.1 100 Continue\r\n\r\n" + OK_CHUNKED + chunked(STREAM) + b"0\r\n\r\n")):
            with self.subTest(name):
                gen, _ = self.generate(response)
                self.assertEqual((gen.text, gen.chunks, gen.final["done_reason"]), ("Hello ✓", 2, "stop"))

    def test_the_request_on_the_wire(self):
        _, server = self.generate(OK_CHUNKED + chunked(STREAM) + b"0\r\n\r\n")
        head, _, body = server.request.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        self.assertEqual(lines[0], "POST /api/generate HTTP/1.1")
        self.assertIn("Host: " + server.address, lines)
        self.assertIn("Connection: close", lines)
        self.assertIn("Content-Length: %d" % len(body), lines)
        self.assertEqual(json.loads(body), wl_infer.generate_request(self.job))
        # a base path that is not ASCII goes out percent-encoded
        server = RawServer(OK_CHUNKED + chunked(STREAM) + b"0\r\n\r\n")
        wl_infer.Ollama("http://%s/b\u00fcro/" % server.address, timeout=5).generate(self.job)
        server.thread.join(10)
        self.assertTrue(server.request.startswith(b"POST /b%C3%BCro/api/generate HTTP/1.1\r\n"), server.request[:60])

    def test_https_to_a_plain_http_server_is_a_clear_error(self):
        ollama = FakeOllama().start()
        self.addCleanup(ollama.stop)
        with self.assertRaises(wl_infer.OllamaError) as ctx:
            wl_infer.Ollama("https://" + ollama.address, timeout=5).models()
        self.assertIn("cannot reach Ollama at https://%s (" % ollama.address, str(ctx.exception))
        self.assertIn("SSL", str(ctx.exception))

    def test_an_address_with_spaces_or_control_characters_is_refused(self):
        for base in ("http://127.0.0.1:11434/a b", "http://exa\tmple:1", "127.0.0.1:11434/x\r\nX-Evil: 1"):
            with self.subTest(base):
                with self.assertRaises(wl_infer.UserError) as ctx:
                    wl_infer.Ollama(base)
                self.assertIn("contains a space or a control character", str(ctx.exception))

    def test_broken_answers_are_clear_errors(self):
        body = b'{"models":[]}'
        tags = lambda ollama: ollama.models()  # noqa: E731
        self.fails(b"SSH-2.0-OpenSSH_9.2\r\n", "cannot reach Ollama at http://127.0.0.1:",
                   "the answer is not HTTP: SSH-2.0-OpenSSH_9.2")
        self.fails(b"", "the server closed the connection without answering")
        self.fails(b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n",
                   "got more than 65536 bytes when reading header line")
        self.fails(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n", "got more than 100 headers")
        self.fails(OK_CHUNKED + chunked(STREAM[:40]) + b"ff\r\nabc", "lost after",
                   "the chunked body is broken or cut short")
        for size in (b"zz", b""):
            self.fails(OK_CHUNKED + size + b"\r\n0123456789abcdef\r\n0\r\n\r\n",
                       "lost after 0 tokens: the chunked body is broken or cut short")
        for size in (b"-5", b"1_0"):  # http.client takes these as sizes; what follows is then no stream
            self.fails(OK_CHUNKED + size + b"\r\n0123456789abcdef\r\n0\r\n\r\n",
                       "sent a stream line that is not a JSON object after 0 tokens")
        server = RawServer(b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n" + body)  # "²": read to the close
        self.assertEqual(wl_infer.Ollama(server.address, timeout=5).models(), {})
        server.thread.join(10)
        self.fails(OK_CHUNKED + b"3\r\nabcd\r\n", "the chunked body is broken or cut short")
        self.fails(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + body,
                   "reading /api/tags from Ollama at http://127.0.0.1:", "the connection closed 87 bytes before "
                   "the end of the body", call=tags)
        error = b'{"error":"overloaded"}'
        self.fails(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: %d\r\n\r\n%s" % (len(error), error),
                   "Ollama at http://127.0.0.1:", ": overloaded (HTTP 503)", call=tags)


# =============================================================================
# The command line, end to end (child processes, both fakes)
# =============================================================================


class EndToEndTest(CliTest):
    def test_post_run_verify_status(self):
        code, out, err = self.cli("post", "--prompt", "what is 1+1", "--model", "llama3.2:1b", "--no-push")
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith("✓ Posted inference job: w-"), out)
        item_id = out.split("\n")[0].split()[-1]
        self.assertEqual(err.splitlines()[-1], "Next: wl_infer.py run " + item_id)  # a hint: stderr
        item = self.board.item(item_id)
        self.assertEqual(item["description"], '{"prompt":"what is 1+1","model":"llama3.2:1b","seed":42,'
                         '"model_digest":"%s"}' % self.ollama.models["llama3.2:1b"])  # pinned: it is local
        self.assertEqual((item["title"], item["type"], item["priority"], item["effort"]),
                         ("infer: what is 1+1", "inference", 2, "small"))
        self.assertEqual(self.board.calls()[-1]["argv"][-1], "--no-push")

        code, out, err = self.cli("run", item_id)
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith("✓ Inference completed for " + item_id), out)
        expected = wl_infer.output_hash(default_output("llama3.2:1b", "what is 1+1"))
        self.assertIn("    Output hash: " + expected, out)
        for fragment in ("Model digest: sha256:a80c4f17acd5", "Ollama:       0.12.11",
                         "Tokens:       18 at 1000.00 tokens/s, done: stop", "Logprobs:     18 tokens"):
            self.assertIn("\n    " + fragment + "\n", out)  # what the evidence records
        self.assertEqual(err, "Next: wl_infer.py verify %s\n" % item_id)
        item = self.board.item(item_id)
        self.assertEqual(item["status"], "in_review")
        self.assertEqual(json.loads(item["completion"]["evidence"])["output_hash"], expected)

        code, out, err = self.cli("verify", item_id)
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith("✓ VERIFIED — the re-run produced the submitted output, hashes match"), out)
        self.assertIn("Expected:  " + expected, out)
        self.assertIn("Actual:    " + expected, out)

        code, out, err = self.cli("status", item_id)
        self.assertEqual(code, 0, err)
        for fragment in ("Status:      in_review", "Posted by:   bob", "Model:       llama3.2:1b",
                         "Seed:        42", "Output hash: " + expected, "by bob"):
            self.assertIn(fragment, out)
        self.assertEqual(self.board.commands(), ["post", "status", "claim", "done", "status", "status"])

    def test_run_writes_go_evidence_byte_for_byte_then_provenance(self):
        item_id = self.board.add(GO_JOB)
        self.ollama.outputs[("llama3.2:1b", "what is <b>1+1</b> & why")] = "The answer is 2."
        code, out, err = self.cli("run", item_id, "--json")
        self.assertEqual(code, 0, err)
        written = self.board.item(item_id)["completion"]["evidence"]
        # Go's four keys exactly as Go writes them; ours follow, and Go ignores them
        self.assertTrue(written.startswith(GO_EVIDENCE[:-1] + ',"model_digest":"'), written)
        go_view, _ = wl_infer.decode_struct(written, wl_infer.GO_EVIDENCE_FIELDS, "evidence")
        self.assertEqual(wl_infer.encode_evidence(go_view), GO_EVIDENCE)
        doc = json.loads(written)
        self.assertEqual(list(doc), ["output", "output_hash", "model", "seed", "model_digest", "ollama_version",
                                     "options", "done_reason", "eval_count", "prompt_eval_count", "eval_ms",
                                     "tokens_per_s", "logprobs",
                                     "token_lengths"])
        self.assertEqual(json.loads(out), {"id": item_id, "evidence": doc, "resubmitted": False})
        request = self.ollama.generate_requests()
        self.assertEqual(request, [{"model": "llama3.2:1b", "prompt": "what is <b>1+1</b> & why", "stream": True,
                                    "options": {"temperature": 0, "seed": 42}, "logprobs": True, "top_logprobs": 2}])
        self.assertEqual(doc["options"], request[0]["options"])  # exactly what was sent
        self.assertEqual(doc["model_digest"], self.ollama.models["llama3.2:1b"])
        self.assertEqual(doc["ollama_version"], "0.12.11")
        # 16 characters in 3-character tokens; the fake takes 1 ms per token
        self.assertEqual((doc["done_reason"], doc["eval_count"], doc["eval_ms"], doc["tokens_per_s"]),
                         ("stop", 6, 6, 1000.0))
        self.assertEqual(doc["logprobs"], [0, -0.05, -0.1, -0.15, -0.2, 0])
        self.assertEqual(doc["token_lengths"], [3, 3, 3, 3, 3, 1])

    def test_thinking_is_hashed_not_submitted_and_old_servers_give_no_logprobs(self):
        self.ollama.thinking[("llama3.2:1b", "what is 1+1")] = "Let me think: one plus one."
        self.ollama.logprobs_supported = False
        item_id = self.board.add(self.job())
        code, out, err = self.cli("run", item_id, "--json")
        self.assertEqual(code, 0, err)
        evidence = json.loads(out)["evidence"]
        self.assertEqual(evidence["output"], default_output("llama3.2:1b", "what is 1+1"))
        self.assertEqual(evidence["thinking_hash"], wl_infer.output_hash("Let me think: one plus one."))
        self.assertNotIn("logprobs", evidence)
        self.assertEqual(json.loads(self.board.item(item_id)["completion"]["evidence"]), evidence)
        code, out, err = self.cli("verify", item_id, "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["checks"][-1]["ok"], None)  # logprobs: not available

    def test_go_written_evidence_verifies(self):
        prompt = "what is <b>1+1</b> & why"
        self.ollama.outputs[("llama3.2:1b", prompt)] = "The answer is 2."
        item_id = self.completed(prompt, evidence=GO_EVIDENCE)
        code, out, err = self.cli("verify", item_id, "--json")
        self.assertEqual(code, 0, err)
        doc = json.loads(out)
        self.assertEqual(doc["verdict"], "VERIFIED")
        self.assertEqual(doc["expected_hash"], doc["actual_hash"])
        self.assertEqual(doc["job"], wl_infer.decode_job(GO_JOB).document())
        self.assertEqual(doc["output"], "The answer is 2.")
        # the checks that need our keys are "not available", not failures
        self.assertEqual([(c["name"], c["ok"]) for c in doc["checks"]], [
            ("decodes", True), ("self-consistent", True), ("binding", True), ("local-model", None),
            ("rerun", True), ("logprobs", None)])
        self.assertEqual(doc["evidence"], json.loads(GO_EVIDENCE))

    def test_mismatch_exits_1(self):
        item_id = self.completed(output="a forged answer")
        code, out, err = self.cli("verify", item_id)
        self.assertEqual(code, 1, err)
        self.assertTrue(out.startswith("✗ MISMATCH — the re-run diverges at character 0 (different-output)"), out)
        self.assertIn("Expected:  " + wl_infer.output_hash("a forged answer"), out)
        self.assertIn("    submitted: ⟨here⟩a forged answer", out)
        self.assertIn("    re-run:    ⟨here⟩Rép", out)
        code, out, err = self.cli("--json", "verify", item_id)
        self.assertEqual(code, 1)
        self.assertEqual(json.loads(out)["verdict"], "MISMATCH")

    def test_forged_output_with_recomputed_hash_is_caught(self):
        honest = default_output("llama3.2:1b", "what is 1+1")
        item_id = self.completed(output=honest + " ")
        self.assertEqual(self.cli("verify", item_id)[0], 1)

    def test_max_tokens_is_sent_and_honoured(self):
        code, out, err = self.cli("post", "--prompt", "count", "--model", "llama3.2:1b", "--max-tokens", "4",
                                  "--seed", "-7", "--json", "--no-pin")
        self.assertEqual(code, 0, err)
        doc = json.loads(out)
        self.assertEqual(doc["job"], {"prompt": "count", "model": "llama3.2:1b", "seed": -7, "max_tokens": 4,
                                      "model_digest": ""})
        self.assertEqual(self.board.item(doc["id"])["description"],
                         '{"prompt":"count","model":"llama3.2:1b","seed":-7,"max_tokens":4}')
        code, out, err = self.cli("run", doc["id"], "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["evidence"]["output"], default_output("llama3.2:1b", "count")[:12])
        self.assertEqual(self.ollama.generate_requests()[-1]["options"],
                         {"temperature": 0, "seed": -7, "num_predict": 4})

    def test_wild_west_and_pr_mode_outputs(self):
        for mode in ("wild-west", "pr"):
            with self.subTest(mode=mode):
                self.board.set_mode(mode)
                code, out, err = self.cli("post", "--prompt", "p " + mode, "--model", "llama3.2:1b", "--json")
                self.assertEqual(code, 0, err)
                item_id = json.loads(out)["id"]
                self.assertEqual(self.cli("run", item_id)[0], 0)
                self.assertEqual(self.cli("verify", item_id)[0], 0)
                code, out, err = self.cli("status", item_id, "--json")
                self.assertEqual(json.loads(out)["completion"]["completed_by"], "bob")

    def test_multiline_description_with_blank_lines_runs(self):
        description = '{\n  "prompt": "line one\\n\\nline three",\n\n  "model": "llama3.2:1b",\n  "seed": 9\n}'
        item_id = self.board.add(description)
        code, out, err = self.cli("run", item_id, "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["evidence"]["seed"], 9)
        code, out, err = self.cli("status", item_id, "--json")
        doc = json.loads(out)
        self.assertEqual(doc["description"], description)
        self.assertEqual(doc["job"]["prompt"], "line one\n\nline three")

    def test_id_prefix_and_options_before_or_after_command(self):
        item_id = self.completed()
        for args in (("verify", item_id[:6], "--json", "-q"), ("--json", "-q", "verify", item_id[:6]),
                     ("--json", "verify", "--ollama", self.ollama.address, item_id[:6])):
            with self.subTest(args=args):
                code, out, err = self.cli(*args)
                self.assertEqual(code, 0, err)
                self.assertEqual(json.loads(out)["id"], item_id)

    def test_wasteland_and_local_db_are_passed_to_every_wl_call(self):
        code, out, err = self.cli("--wasteland", "org/db", "post", "--prompt", "p", "--model", "llama3.2:1b",
                                  "--local-db", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.cli("run", json.loads(out)["id"], "--wasteland=org/db", "--local-db")[0], 0)
        for call in self.board.calls():
            self.assertIn("--wasteland=org/db", call["argv"])
            self.assertIn("--local-db", call["argv"])

    def test_skip_claim_uses_the_existing_claim(self):
        item_id = self.board.add(self.job())
        self.assertEqual(self.board.wl("claim", item_id, rig="bob").returncode, 0)
        code, out, err = self.cli("run", item_id, "--skip-claim")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.board.item(item_id)["status"], "in_review")
        self.assertEqual(self.board.commands(), ["post", "claim", "status", "done"])


class PostTest(CliTest):
    def test_prompt_from_stdin_and_file_kept_exactly(self):
        code, out, err = self.cli("post", "--prompt", "-", "--model", "llama3.2:1b", "--json",
                                  stdin="multi\nline <prompt>\n\n".encode())
        self.assertEqual(code, 0, err)  # one trailing newline is echo's; the rest is the prompt's
        self.assertEqual(json.loads(out)["job"]["prompt"], "multi\nline <prompt>\n")
        self.assertEqual(json.loads(out)["title"], "infer: multi line <prompt>")
        path = os.path.join(self.tmp.name, "prompt.txt")
        with open(path, "wb") as f:
            f.write("-starts with a dash ✓".encode())
        code, out, err = self.cli("post", "--prompt-file", path, "--model", "llama3.2:1b", "--json")
        self.assertEqual(code, 0, err)
        item = self.board.item(json.loads(out)["id"])
        self.assertEqual(item["title"], "infer: -starts with a dash ✓")
        self.assertEqual(wl_infer.decode_job(item["description"]).prompt, "-starts with a dash ✓")

    def test_long_prompt_title_truncated(self):
        prompt = "🙂" * 70
        code, out, err = self.cli("post", "--prompt", prompt, "--model", "llama3.2:1b", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.board.item(json.loads(out)["id"])["title"], "infer: " + "🙂" * 60 + "...")

    def test_warns_when_model_missing_or_ollama_down_but_posts(self):
        code, out, err = self.cli("post", "--prompt", "p", "--model", "llama3.2")
        self.assertEqual(code, 0, err)
        self.assertIn("wl_infer: warning: model llama3.2 is not in the local Ollama", err)
        self.ollama.stop()
        code, out, err = self.cli("post", "--prompt", "p", "--model", "llama3.2:1b")
        self.assertEqual(code, 0, err)
        self.assertIn("could not check the model locally: cannot reach Ollama", err)
        self.assertEqual(len(self.board.load()["items"]), 2)

    def test_bad_post_arguments(self):
        self.assertError(self.cli("post", "--model", "m"), "exactly one of --prompt")
        self.assertError(self.cli("post", "--prompt", "p", "--prompt-file", "f", "--model", "m"), "exactly one")
        self.assertError(self.cli("post", "--prompt", "", "--model", "m"), "the prompt is empty")
        self.assertError(self.cli("post", "--prompt", "p"), "--model")
        self.assertError(self.cli("post", "--prompt", "p", "--model", "m", "--seed", "4.5"), "--seed")
        self.assertError(self.cli("post", "--prompt", "p", "--model", "m", "--max-tokens", "-1"), "--max-tokens")
        self.assertError(self.cli("post", "--prompt", "p", "--model", "m", "--seed", str(2 ** 63)), "--seed")
        self.assertError(self.cli("post", "--prompt-file", "/nonexistent/x", "--model", "m"),
                         "cannot read --prompt-file /nonexistent/x")
        self.assertError(self.cli("post", "--prompt", "-", "--model", "m", stdin=b"\xff\xfe"), "not valid UTF-8")
        self.assertError(self.cli("post", "--prompt", "-", "--model", "m", stdin=b"a\0b"),
                         'not posted: workers would refuse this job (job field "prompt" contains a NUL character)')
        self.assertError(self.cli("post", "--prompt", "p", "--model", "llama 3"),
                         '--model "llama 3" is not an Ollama model name')
        self.assertEqual(self.board.calls(), [])

    def test_a_prompt_most_workers_would_skip_is_warned_about(self):
        code, out, err = self.cli("-q", "post", "--prompt", "x" * 40000, "--model", "llama3.2:1b", "--max-tokens", "8")
        self.assertEqual(code, 0, err)
        self.assertEqual(err, "wl_infer: warning: the prompt is 40000 bytes, over the 32768 that workers running "
                              "`work` take by default (--max-prompt-bytes): most of them will skip it\n")

    def test_job_over_the_field_limit_is_refused(self):
        code, out, err = self.cli("post", "--prompt", "-", "--model", "llama3.2:1b", stdin=b"x" * 70000)
        self.assertError((code, out, err), "over wl's 65535-byte field limit")
        self.assertEqual(self.board.calls(), [])

    def test_wl_post_failure_carries_wl_text(self):
        self.board.fail("post", message="no wasteland joined", hint="run wl join ORG/DB")
        self.assertError(self.cli("post", "--prompt", "p", "--model", "llama3.2:1b", "--max-tokens", "8"),
                         "wl post failed: no wasteland joined (hint: run wl join ORG/DB)")


class RunRefusalTest(CliTest):
    """What run refuses before it claims anything."""

    def test_ollama_down_refuses_before_claiming(self):
        item_id = self.board.add(self.job())
        self.ollama.stop()
        self.assertError(self.cli("run", item_id), "cannot reach Ollama at http://" + self.ollama.address,
                         "ollama serve")
        self.assertEqual(self.board.commands(), ["post", "status"])
        self.assertEqual(self.board.item(item_id)["status"], "open")

    def test_model_not_local_refuses_before_claiming(self):
        item_id = self.board.add(self.job(model="llama3.2:90b"))
        self.assertError(self.cli("run", item_id), "model llama3.2:90b is not in the local Ollama",
                         "ollama pull llama3.2:90b")
        self.assertEqual(self.board.commands(), ["post", "status"])
        self.assertEqual(self.ollama.generate_requests(), [])

    def test_wrong_status_type_or_job(self):
        claimed = self.board.add(self.job())
        self.board.wl("claim", claimed, rig="carol")
        self.assertError(self.cli("run", claimed), "is claimed, not open")
        feature = self.board.add("do a thing", kind="feature")
        self.assertError(self.cli("run", feature), "is a feature item, not an inference job")
        bad = self.board.add('{"prompt":"p","model":"llama3.2:1b","seed":"42"}')
        self.assertError(self.cli("run", bad), bad + ': job field "seed" must be an integer, got the string "42"')
        self.assertEqual(self.board.commands(rig="bob"), ["status"] * 3)

    def test_skip_claim_failure_leaves_the_claim_alone(self):
        item_id = self.board.add(self.job())
        self.board.wl("claim", item_id, rig="bob")
        self.ollama.fail = (500, "boom")
        err = self.assertError(self.cli("run", item_id, "--skip-claim"), "boom (HTTP 500)")
        self.assertIn("left to its owner (--skip-claim)", err)
        self.assertEqual(self.board.item(item_id)["status"], "claimed")
        self.assertNotIn("unclaim", self.board.commands())


# -- the fault matrix ----------------------------------------------------------
# One row per way `run` can be hurt after it started: a fault in wl or Ollama,
# or a signal at a chosen moment. Each row states the exit code, what the
# user is told, where the item ends on the board, and where the computed
# result is ("none": nothing finished, "board", or "spool": kept on disk).


class Fault(object):
    def __init__(self, name, setup=None, args=(), env=None, signals=(), code=2, says=(), board="open",
                 result="none", resubmit=False, check=None):
        self.name, self.setup, self.args, self.env, self.signals = name, setup, args, env or {}, signals
        self.code, self.says, self.board, self.result = code, says, board, result
        self.resubmit, self.check = resubmit, check


def _wl_fails(command, **spec):
    return lambda t, item_id: t.board.fail(command, **dict(
        (k, v.format(id=item_id) if isinstance(v, str) else v) for k, v in spec.items()))


def _ollama(**attrs):
    def setup(t, item_id):
        for name, value in attrs.items():
            if name == "output":
                t.ollama.outputs[("llama3.2:1b", "what is 1+1")] = value
            else:
                setattr(t.ollama, name, value)
    return setup


def _both(*setups):
    def setup(t, item_id):
        for one in setups:
            one(t, item_id)
    return setup


def _generating(t):
    return t.ollama.generating.is_set()


def _started(command):
    return lambda t: command in t.board.started()


def _calls(command, n):
    def check(t, item_id, err):
        t.assertEqual(t.board.commands(rig="bob").count(command), n)
    return check


_RELEASED = "the claim on {id} was released and the job is open again"
_KEPT = "the result is kept in {spool}: submit it with `wl_infer.py run {id}`"
_STALL = _ollama(stall_after=1)
BOARD_FAULTS = [  # wl fails, before or during the claim
    Fault("wl status fails", _wl_fails("status", message="dial tcp: lookup www.dolthub.com: no such host",
                                       hint="check your network connection"),
          says=["wl status failed: dial tcp: lookup www.dolthub.com: no such host "
                "(hint: check your network connection)"]),
    Fault("wl status prints garbage", _wl_fails("status", stdout="<html><body>502 Bad Gateway</body></html>"),
          says=["wl status printed no item header; got <html>"]),
    Fault("wl status output truncated", _wl_fails("status", stdout="{id}: infer: what is 1+1\n\n  Type:"),
          says=["wl status output for {id} has no Status line"]),
    Fault("wl status hangs", _wl_fails("status", hang=True), args=["--wl-timeout", "1"],
          says=["wl status did not finish within 1 s and was stopped", "--wl-timeout"],
          check=lambda t, item_id, err: wait_for(lambda: not t.board.helpers_alive(),
                                                 "wl and what it started to be stopped")),
    Fault("wl crashes without a wl: line", _wl_fails("status", stderr="panic: runtime error: index out of range"
                                                     "\n\ngoroutine 1 [running]:\nmain.main()\n", exit=2),
          says=["wl status failed: panic: runtime error: index out of range"]),
    Fault("wl is missing", env={"WL_BIN": "/nonexistent/wl"},
          says=["wl executable /nonexistent/wl not found or not executable"]),
    Fault("item withdrawn", lambda t, item_id: t.board.update(
        lambda s: s["items"][item_id].__setitem__("status", "withdrawn")),
          board="withdrawn", says=["{id} is withdrawn, not open"]),
    Fault("wl claim refused: taken", _wl_fails("claim", message='wanted item "{id}" is not open or does not exist'),
          says=["wl claim failed: wanted item", "nothing was claimed"], check=_calls("unclaim", 0)),
    Fault("wl claim written, then wl fails", _wl_fails("claim", after=True, message="push failed: connection reset"),
          says=["wl claim failed: push failed: connection reset", _RELEASED]),
    Fault("wl claim hangs", _wl_fails("claim", hang=True), args=["--wl-timeout", "1"],
          says=["wl claim did not finish within 1 s", "no claim of ours is held on {id}"],
          check=lambda t, item_id, err: t.assertEqual(t.board.helpers_alive(), [])),
]
OLLAMA_FAULTS = [  # the generation fails: verify meets these too
    Fault("Ollama drops the connection", _ollama(drop=True),
          says=["cannot reach Ollama at http://", _RELEASED]),
    Fault("Ollama HTTP 500", _ollama(fail=(500, "llama runner process has terminated: exit status 2")),
          says=["llama runner process has terminated: exit status 2 (HTTP 500)", _RELEASED]),
    Fault("Ollama HTTP 404", _ollama(fail=(404, "model 'llama3.2:1b' not found")),
          says=["model 'llama3.2:1b' not found (HTTP 404)", "ollama pull llama3.2:1b", _RELEASED]),
    Fault("Ollama error mid-stream", _ollama(error_after=(3, "CUDA error: out of memory")),
          says=["failed after 3 tokens: CUDA error: out of memory", _RELEASED]),
    Fault("Ollama stalls", _ollama(stall_after=2), args=["--timeout", "0.5"],
          says=["sent nothing for 0.5 s after 2 tokens", _RELEASED]),
    Fault("Ollama stream cut without done", _ollama(end_after=2),
          says=["ended the stream after 2 tokens without its final `done`", _RELEASED]),
    Fault("Ollama sends a non-JSON line", _ollama(inject=(2, b"<html>proxy error</html>")),
          says=["sent a stream line that is not a JSON object after 2 tokens: <html>proxy error</html>", _RELEASED]),
    Fault("Ollama sends invalid UTF-8", _ollama(inject=(2, b'{"response":"\xff\xfe","done":false}')),
          says=["sent invalid UTF-8 after 2 tokens", _RELEASED]),
    Fault("Ollama sends a non-string response", _ollama(inject=(2, b'{"response":42,"done":false}')),
          says=["sent a `response` or `thinking` that is not a string", _RELEASED]),
    Fault("Ollama sends a giant line", _ollama(inject=(2, b'{"response":"' + b"x" * (1 << 20) + b'"}')),
          says=["sent a stream line over 1048576 bytes", _RELEASED]),
    Fault("Ollama never stops", _ollama(endless="never ending "),
          says=["the output passed 65535 bytes after 5042 tokens", "generation stopped; the job needs a smaller "
                "max_tokens", _RELEASED], check=lambda t, item_id, err: wait_for(
              t.ollama.streams[0]["ended"].is_set, "the fake to notice the client left")),
]
RESULT_FAULTS = [  # a finished result meets trouble; signals at each moment
    Fault("evidence over the field limit", _ollama(output="<" * 20000),
          says=["the evidence (output 20000 bytes) is 120133 bytes, over wl's 65535-byte field limit",
                _RELEASED, "the result is kept in {spool} for the record (`wl_infer.py spool --drop {id}` removes it)"],
          result="spool", check=lambda t, item_id, err: t.runs_again_without_claiming(
              item_id, "%s already ran this job: the evidence (output 20000 bytes) is 120133 bytes" % item_id)),
    Fault("wl done fails once", _wl_fails("done", message="push rejected: upstream changed", times=1),
          code=0, says=["wl_infer: warning: wl done failed: push rejected: upstream changed; trying again in 1 s "
                        "(attempt 2 of 3)"], board="in_review", result="board", check=_calls("done", 2)),
    Fault("wl done always fails", _wl_fails("done", message="push rejected: upstream changed"),
          says=["wl done failed: push rejected: upstream changed", _RELEASED, _KEPT], result="spool",
          resubmit=True, check=_calls("done", 3)),
    Fault("wl done refused: claim lost", _wl_fails("done", message='wanted item "{id}" is not claimed by "bob" '
                                                                 "or does not exist"),
          says=["wl done failed: wanted item", _RELEASED, _KEPT], result="spool", resubmit=True,
          check=_calls("done", 1)),
    Fault("wl done written, then wl fails", _wl_fails("done", after=True, message="push failed: connection reset",
                                                     times=1),
          code=0, says=["wl done failed: push failed: connection reset; trying again",
                        "but the completion is on the board: it was submitted"], board="in_review", result="board"),
    Fault("wl done hangs once", _wl_fails("done", hang=True, times=1), args=["--wl-timeout", "1"], code=0,
          says=["wl done did not finish within 1 s"], board="in_review", result="board"),
    Fault("wl unclaim fails too", _both(_ollama(fail=(500, "boom")),
                                        _wl_fails("unclaim", message="network is unreachable")),
          says=["boom (HTTP 500)", "releasing the claim also failed (wl unclaim failed: network is unreachable)",
                "run `wl unclaim {id}`"], board="claimed"),
    Fault("SIGINT while generating", _STALL, signals=[(signal.SIGINT, _generating)], code=130,
          says=["wl_infer: interrupted; " + _RELEASED]),
    Fault("SIGTERM while generating", _STALL, signals=[(signal.SIGTERM, _generating)], code=130,
          says=["wl_infer: interrupted; " + _RELEASED]),
    Fault("SIGHUP while generating", _STALL, signals=[(signal.SIGHUP, _generating)], code=130,
          says=["wl_infer: interrupted; " + _RELEASED]),
    Fault("SIGINT during wl claim", _wl_fails("claim", delay=1.0, times=1),
          signals=[(signal.SIGINT, _started("claim"))], code=130, says=["wl_infer: interrupted; " + _RELEASED],
          check=lambda t, item_id, err: t.assertEqual(t.ollama.generate_requests(), [])),
    Fault("SIGINT during wl done", _wl_fails("done", delay=1.0, times=1),
          signals=[(signal.SIGINT, _started("done"))], code=130,
          says=["the result was submitted before stopping: {id} is in review"], board="in_review", result="board"),
    Fault("second signal during the release", _both(_STALL, _wl_fails("unclaim", delay=60, times=1)),
          signals=[(signal.SIGINT, _generating), (signal.SIGTERM, _started("unclaim"))], code=130,
          says=["releasing the claim was interrupted, so {id} may still be claimed by you",
                "release it with `wl unclaim {id}`"], board="claimed"),
    Fault("second signal during wl done", _wl_fails("done", delay=60, times=1),
          signals=[(signal.SIGINT, _started("done")), (signal.SIGTERM, _started("done"))], code=130,
          says=["stopped during `wl done`, so the result may or may not be on the board",
                "the result is kept in {spool}: submit it with `wl_infer.py run {id} --skip-claim`"],
          board="claimed", result="spool", resubmit=True),
]
FAULT_MATRIX = BOARD_FAULTS + OLLAMA_FAULTS + RESULT_FAULTS


class FaultMatrixTest(CliTest):
    """Each row: the exit code, the message, the board state and where the
    result is. Never a claim of ours left unreported, never a result lost."""

    def run_fault(self, fault):
        item_id = self.board.add(self.job())
        if fault.setup:
            fault.setup(self, item_id)
        output = self.ollama.outputs.get(("llama3.2:1b", "what is 1+1")) or default_output("llama3.2:1b",
                                                                                             "what is 1+1")
        spool = os.path.join(self.state_home, "wl-infer", "results", item_id + ".json")
        proc = subprocess.Popen([sys.executable, WL_INFER, "run", item_id] + list(fault.args),
                                env=self.env(**fault.env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            for sig, moment in fault.signals:
                wait_for(lambda moment=moment: moment(self), "the moment to send signal %d" % sig)
                # Ctrl-C and a hangup reach the terminal's whole process group; `kill` one process
                if sig == signal.SIGTERM:
                    proc.send_signal(sig)
                else:
                    os.killpg(proc.pid, sig)
            out, err = proc.communicate(timeout=120)
        except BaseException:  # say what the process was doing, not only that the test gave up
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError("wl_infer did not end as expected; wl calls started: %s; stderr: %s"
                                 % (self.board.started(), err.decode("utf-8", "replace")))
        err = err.decode("utf-8")
        lines = err.strip("\n").split("\n")
        item = self.board.item(item_id)
        on_board = item["completion"] is not None and wl_infer.decode_evidence(
            item["completion"]["evidence"])["output"] == output
        kept = os.path.exists(spool) and wl_infer.spool_read(spool)["evidence"]["output"] == output
        held = item["status"] == "claimed" and item["claimed_by"] == self.rig
        reported = any(command in err for command in ("wl unclaim " + item_id, "run %s --skip-claim" % item_id))
        FAULTS.count("faults injected into run")
        FAULTS.count("claims left held without saying how to release them", held and not reported)
        FAULTS.count("claims left held, with the command to release them", held and reported)
        FAULTS.count("results lost", fault.result != "none" and not (on_board or kept))

        self.assertEqual(proc.returncode, fault.code, err)
        self.assertNotIn("Traceback", err)
        final = {0: "Next: wl_infer.py verify ", 2: "wl_infer: error: ", 130: "wl_infer: interrupted; "}[fault.code]
        self.assertTrue(all(line.startswith(("wl_infer: warning: ", "wl_infer: interrupted: ")) for line in lines[:-1]),
                        err)
        self.assertTrue(lines[-1].startswith(final), err)
        for fragment in fault.says:
            self.assertIn(fragment.format(id=item_id, spool=spool), err)
        self.assertEqual(item["status"], fault.board, err)
        self.assertFalse(held and not reported, err)
        self.assertEqual((on_board, kept), (fault.result == "board", fault.result == "spool"), err)
        if fault.code == 0:
            self.assertIn("✓ Inference completed for " + item_id, out.decode("utf-8"))
        if fault.check:
            fault.check(self, item_id, err)
        if fault.resubmit:
            self.resubmit(item_id, spool, output)

    def runs_again_without_claiming(self, item_id, *says):
        calls = len(self.board.commands(rig=self.rig))
        self.assertError(self.cli("run", item_id), *says)
        self.assertEqual(self.board.commands(rig=self.rig)[calls:], ["status"])

    def resubmit(self, item_id, spool, output):
        """A kept result goes to the board without generating again."""
        self.board.update(lambda state: state["fail"].clear())
        generated = len(self.ollama.generate_requests())
        args = ["--skip-claim"] if self.board.item(item_id)["status"] == "claimed" else []
        code, out, err = self.cli("run", item_id, *args)
        self.assertEqual(code, 0, err)
        self.assertIn("the result kept on", out)
        self.assertIn("submitted without generating again", out)
        item = self.board.item(item_id)
        self.assertEqual(item["status"], "in_review")
        self.assertEqual(wl_infer.decode_evidence(item["completion"]["evidence"])["output"], output)
        self.assertEqual(len(self.ollama.generate_requests()), generated)
        self.assertFalse(os.path.exists(spool))


class SignalTest(CliTest):
    def test_a_signal_ignored_at_start_stays_ignored(self):
        item_id = self.board.add(self.job())
        self.ollama.piece_delay = 0.05  # long enough to be hung up on while generating
        nohup = ("import os, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
                 "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")
        proc = subprocess.Popen([sys.executable, "-c", nohup, WL_INFER, "run", item_id], env=self.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for(self.ollama.generating.is_set, "the generate request")
        proc.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 0, err)
        self.assertEqual(self.board.item(item_id)["status"], "in_review")

    def test_a_signal_during_wl_post_is_held_until_the_job_is_posted(self):
        self.board.fail("post", delay=1.0, times=1)
        proc = subprocess.Popen([sys.executable, WL_INFER, "post", "--prompt", "p", "--model", "llama3.2:1b"],
                                env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for(lambda: "post" in self.board.started(), "wl post")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 130, err)
        [item_id] = self.board.load()["items"]
        self.assertIn(b"wl_infer: interrupted; the job was posted before stopping: " + item_id.encode(), err)


class InstallTest(CliTest):
    """`./wl_infer.py` as users run it (its `#!/usr/bin/env python3` finds
    the interpreter under test first on PATH), and through a symlink on
    PATH. Everything else in the suite runs `python3 wl_infer.py`."""

    def setUp(self):
        super(InstallTest, self).setUp()
        self.home = os.path.join(self.tmp.name, "install")
        bin_dir = os.path.join(self.tmp.name, "bin")
        os.makedirs(self.home)
        os.makedirs(bin_dir)
        self.exe = os.path.join(self.home, "wl_infer.py")
        try:  # a link to one copy written before any thread forks (see fake_wl_executable: ETXTBSY)
            os.link(installed_copy(), self.exe)
        except OSError:
            import shutil

            shutil.copy2(installed_copy(), self.exe)
        os.symlink(sys.executable, os.path.join(bin_dir, "python3"))  # the interpreter under test
        self.path = bin_dir + os.pathsep + os.environ.get("PATH", "")

    def launch(self, *args, stdin=None, cwd=None, exe=None):
        proc = subprocess.run([exe or self.exe] + list(args), input=stdin, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=self.env(PATH=self.path), cwd=cwd or self.tmp.name,
                              timeout=120)
        return proc.returncode, proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")

    def test_the_first_line_is_the_shebang_and_the_docstring_comes_next(self):
        with open(WL_INFER, encoding="utf-8") as f:
            source = f.read()
        self.assertTrue(source.startswith('#!/usr/bin/env python3\n"""wl_infer: '), source[:80])
        self.assertTrue(wl_infer.__doc__.startswith("wl_infer: "))
        self.assertEqual(self.launch("--version"), (0, "wl_infer %s\n" % wl_infer.__version__, ""))
        self.assertError(self.launch("status", "nope"), "argument ID: 'nope' is not a wl item ID")

    def test_arguments_stdin_and_exit_code_pass_through_untouched(self):
        prompt = "it's \"quoted\" $HOME `id` * ; \\n\n  two spaces ✓"
        code, out, err = self.launch("post", "--prompt", prompt, "--model", "llama3.2:1b", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(wl_infer.decode_job(self.board.item(json.loads(out)["id"])["description"]).prompt, prompt)
        code, out, err = self.launch("post", "--prompt", "-", "--model", "llama3.2:1b", "--json",
                                     stdin="from stdin\n".encode())
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["job"]["prompt"], "from stdin")
        self.assertError(self.launch("post", "--prompt", "", "--model", "llama3.2:1b"))

    def test_the_working_directory_cannot_shadow_a_standard_module(self):
        cwd = os.path.join(self.tmp.name, "cwd")
        os.makedirs(cwd)
        for name in ("json", "argparse", "subprocess"):
            with open(os.path.join(cwd, name + ".py"), "w") as f:
                f.write("raise SystemExit('the working directory was imported from')\n")
        item_id = self.board.add(self.job())
        code, out, err = self.launch("status", item_id, "--json", cwd=cwd)
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["id"], item_id)

    def test_a_symlink_without_the_py_suffix_works(self):
        link = os.path.join(self.tmp.name, "bin", "wl_infer")
        os.symlink(self.exe, link)
        self.assertEqual(self.launch("--version", exe=link), (0, "wl_infer %s\n" % wl_infer.__version__, ""))

    def test_a_signal_reaches_python_and_the_claim_is_released(self):
        item_id = self.board.add(self.job())
        self.ollama.stall_after = 2
        env = self.env(PATH=self.path)
        proc = subprocess.Popen([self.exe, "run", item_id], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        wait_for(lambda: self.ollama.streams and self.ollama.streams[0]["sent"] >= 2, "the stalled stream")
        proc.send_signal(signal.SIGINT)  # env exec'd python: the signal reaches it
        out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 130, err)
        self.assertEqual(self.board.item(item_id)["status"], "open")
        self.assertEqual(self.board.commands(), ["post", "status", "claim", "unclaim"])


class VerifyFaultTest(CliTest):
    """Each Ollama fault met by verify is an error (exit 2, Ollama's own
    text), never a verdict: a verifier's failing server must not brand an
    honest claim as forged. A server that never stops is outrun by the
    claim: the re-run is longer, so it is a MISMATCH, after a few tokens."""

    def verify_fault(self, fault):
        item_id = self.completed()
        fault.setup(self, item_id)
        code, out, err = self.cli("verify", item_id, "--json", *fault.args)
        doc = json.loads(out)
        FAULTS.count("Ollama faults met by verify")
        if fault.name == "Ollama never stops":
            self.assertEqual((code, doc["verdict"]), (1, "MISMATCH"), err)
            self.assertLess(doc["tokens_generated"], 10)
            return
        self.assertError((code, out, err), fault.says[0])
        self.assertEqual(list(doc), ["error"])


class Lines(object):
    """A child's stream read line by line on a thread, so a test can wait
    for a line while the child runs."""

    def __init__(self, stream):
        self.lines, self.stream = [], stream
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        with self.stream:
            for line in iter(self.stream.readline, b""):
                self.lines.append(line.decode("utf-8"))

    def has(self, fragment):
        return any(fragment in line for line in list(self.lines))

    def text(self):
        self.thread.join(60)
        return "".join(self.lines)


class WorkTest(CliTest):
    """`work` as a child process against both fakes."""

    def add(self, prompt="what is 1+1", model="llama3.2:1b", max_tokens=64, priority=2, description=None, **job):
        if description is None:
            description = wl_infer.encode_job(wl_infer.make_job(prompt, model, 42, max_tokens, **job))
        item_id = self.board.add(description)
        if priority != 2:
            self.board.update(lambda s: s["items"][item_id].__setitem__("priority", priority))
        return item_id

    def start(self, *args, env=None):
        """`work --interval 0.05 ARGS` running; stderr is read as it comes (proc.log)."""
        proc = subprocess.Popen([sys.executable, WL_INFER, "work", "--interval", "0.05"] + list(args),
                                env=env or self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.log, proc.out = Lines(proc.stderr), Lines(proc.stdout)
        self.addCleanup(proc.stderr.close)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        return proc

    def finish(self, proc):
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("work did not end; wl calls: %s; log: %s" % (self.board.started(), proc.log.lines))
        err = proc.log.text()
        self.assertNotIn("Traceback", err)
        return proc.returncode, proc.out.text(), err

    def work(self, *args, env=None):
        return self.finish(self.start(*args, env=env))

    def claims(self):
        return [c["argv"][1] for c in self.board.calls() if c["argv"][0] == "claim" and c["rig"] == self.rig]

    def generated(self, prompt):
        return len([b for b in self.ollama.generate_requests() if b["prompt"] == prompt])

    def status(self, item_id):
        return self.board.item(item_id)["status"]


class WorkFaultTest(WorkTest):
    """Each Ollama fault of the matrix, met by the worker: the job is
    released with Ollama's own text in the log, and the worker goes on."""

    def work_fault(self, fault):
        item_id = self.add(max_tokens=0)
        fault.setup(self, item_id)
        code, out, err = self.work("--once", "--allow-uncapped", "--json", *fault.args)
        FAULTS.count("Ollama faults met by work")
        self.assertEqual(code, 2, err)  # --once that only failed: an error, for cron
        for fragment in fault.says:
            self.assertIn(fragment.format(id=item_id), err)
        self.assertIn("failed %s: " % item_id, err)
        self.assertEqual((self.status(item_id), self.board.item(item_id)["claimed_by"]), ("open", ""))
        doc = json.loads(out)
        self.assertEqual((doc["done"], doc["failed"]), (0, 1))


def _test_name(fault):
    return "test_" + "_".join(fault.name.lower().replace(":", "").replace("-", " ").split())


for _fault in FAULT_MATRIX:
    setattr(FaultMatrixTest, _test_name(_fault), lambda self, fault=_fault: self.run_fault(fault))
for _fault in OLLAMA_FAULTS:
    setattr(VerifyFaultTest, _test_name(_fault), lambda self, fault=_fault: self.verify_fault(fault))
    setattr(WorkFaultTest, _test_name(_fault), lambda self, fault=_fault: self.work_fault(fault))


class SpoolTest(CliTest):
    """A finished result that wl did not take is kept on disk, privately,
    listed by `spool`, and submitted by the next `run` of the same job."""

    def kept_after_failed_done(self, *args, env=None, item_id=None):
        item_id = item_id or self.board.add(self.job())
        # a refusal: not tried again, so no backoff to wait for
        self.board.fail("done", message='wanted item "%s" is not claimed by "bob"' % item_id, times=1)
        code, _, err = self.cli("run", item_id, *args, env=env)
        self.assertEqual(code, 2, err)
        self.assertIn("the result is kept in ", err)
        return item_id, err

    def test_spool_is_private_atomic_and_listed(self):
        item_id, err = self.kept_after_failed_done("--wasteland=org/db")
        self.assertIn("submit it with `wl_infer.py run %s --wasteland=org/db`" % item_id, err)
        results = os.path.join(self.state_home, "wl-infer", "results")
        for folder in (results, os.path.dirname(results)):
            self.assertEqual(os.stat(folder).st_mode & 0o777, 0o700, folder)
        self.assertEqual(os.listdir(results), [item_id + ".json"])  # no temp file left behind
        path = os.path.join(results, item_id + ".json")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        code, out, err = self.cli("spool")
        self.assertEqual(code, 0)
        self.assertIn("1 kept result in %s" % self.state_home, err)
        [line] = out.splitlines()  # stdout: one line per kept result, its ID first
        self.assertTrue(line.startswith("%s  " % item_id), out)
        self.assertIn("llama3.2:1b  %d bytes  Réponse" % len(default_output("llama3.2:1b", "what is 1+1").encode()),
                      out)
        self.assertIn("Submit one with `wl_infer.py run ID`", err)
        self.assertEqual(self.cli("-q", "spool"), (0, "", ""))
        doc = json.loads(self.cli("spool", "--json")[1])
        self.assertEqual([(r["id"], r["model"], r["path"]) for r in doc["results"]], [(item_id, "llama3.2:1b", path)])
        self.assertEqual(self.cli("run", item_id, "--wasteland=org/db")[0], 0)
        self.assertEqual(self.cli("spool")[1:], ("", "No kept results in %s/wl-infer/results: every finished result "
                                                  "is on the board.\n" % self.state_home))

    def test_a_result_kept_for_another_job_or_model_is_not_used(self):
        item_id, _ = self.kept_after_failed_done()
        self.board.update(lambda s: s["items"][item_id].__setitem__("description", self.job(seed=7)))
        _, err = self.kept_after_failed_done(item_id=item_id)
        self.assertIn("was made for another job description; generating again (it will be replaced)", err)
        self.assertEqual(len(self.ollama.generate_requests()), 2)
        path = os.path.join(self.state_home, "wl-infer", "results", item_id + ".json")
        self.assertEqual(wl_infer.spool_read(path)["evidence"]["seed"], 7)
        self.ollama.models["llama3.2:1b"] = "f" * 64
        code, out, err = self.cli("run", item_id)
        self.assertEqual(code, 0, err)
        self.assertIn("was made for model sha256:a80c4f17acd5, this one is sha256:ffffffffffff; generating again", err)
        self.assertEqual(len(self.ollama.generate_requests()), 3)
        self.assertEqual(self.cli("spool", "--json")[1].count('"id"'), 0)

    def test_unreadable_entries_are_listed_and_skipped(self):
        item_id = self.board.add(self.job())
        results = os.path.join(self.state_home, "wl-infer", "results")
        os.makedirs(results)
        forged = {"version": 1, "id": "w-3", "description": "", "model_digest": "", "spooled_at": "",
                  "evidence": GO_EVIDENCE.replace("The answer is 2.", "The answer is 3.")}
        for name, content in ((item_id + ".json", "{not json"), ("w-2.json", '{"version": 99}'),
                              ("w-3.json", json.dumps(forged))):
            with open(os.path.join(results, name), "w") as f:
                f.write(content)
        code, out, err = self.cli("spool")
        self.assertEqual((code, out), (0, ""))
        self.assertIn("✗ kept result %s is unreadable (" % os.path.join(results, item_id + ".json"), err)
        self.assertIn("unknown version 99", err)
        self.assertIn("its output does not match its output_hash", err)
        code, _, err = self.cli("run", item_id)
        self.assertEqual(code, 0, err)
        self.assertIn("is unreadable", err)
        self.assertIn("generating again", err)
        self.assertFalse(os.path.exists(os.path.join(results, item_id + ".json")))  # replaced, then submitted

    def test_default_location_and_a_spool_that_cannot_be_written(self):
        home = os.path.join(self.tmp.name, "home")
        env = self.env(HOME=home, XDG_STATE_HOME="relative/ignored")
        item_id, err = self.kept_after_failed_done(env=env)
        self.assertIn(os.path.join(home, ".local", "state", "wl-infer", "results", item_id + ".json"), err)
        blocked = os.path.join(self.tmp.name, "a-file")
        open(blocked, "w").close()
        other = self.board.add(self.job(prompt="other"))
        code, out, err = self.cli("run", other, env=self.env(XDG_STATE_HOME=blocked))
        self.assertEqual(code, 0, err)  # the result still goes to the board
        self.assertIn("wl_infer: warning: could not keep the result in %s/wl-infer/results" % blocked, err)
        self.assertIn("submitting it anyway", err)
        self.assertEqual(self.board.item(other)["status"], "in_review")

    def test_drop(self):
        item_id, _ = self.kept_after_failed_done()
        self.assertError(self.cli("spool", "--drop", "w-0"), "no kept result for w-0")
        code, out, _ = self.cli("spool", "--drop", item_id)
        self.assertEqual((code, out), (0, "✓ Dropped the kept result for %s\n" % item_id))
        self.assertIn("No kept results", self.cli("spool")[2])


class MalformedInputTest(CliTest):
    """Every malformed job and command-line ID is refused with its reason,
    before any claim and before Ollama is asked to generate anything."""

    def cli_each(self, command, ids):
        """`command ID` for each ID, four at a time."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda item_id: self.cli(command, item_id), ids))

    def test_every_malformed_job_is_refused_before_claiming(self):
        ids = [self.board.add(self.job(prompt="placeholder %d" % i)) for i in range(len(MALFORMED_JOBS))]

        def plant(state):  # straight into the board: wl itself would refuse the oversized ones
            for item_id, (description, _) in zip(ids, MALFORMED_JOBS):
                state["items"][item_id]["description"] = description
        self.board.update(plant)
        results = self.cli_each("run", ids)
        for item_id, (description, fragment), result in zip(ids, MALFORMED_JOBS, results):
            with self.subTest(description=description[:60]):
                self.assertError(result, item_id, fragment)
                self.assertEqual(self.board.item(item_id)["status"], "open")
        self.assertEqual(self.board.commands(rig="bob"), ["status"] * len(ids))
        self.assertEqual(self.ollama.generate_requests(), [])
        FAULTS.count("malformed jobs refused before a claim", len(ids))

    def test_malformed_evidence_is_refused_by_verify_without_a_rerun(self):
        ids = [self.completed(output="x%d" % i) for i in range(len(MALFORMED_EVIDENCE))]

        def plant(state):  # straight into the board: wl itself would refuse the oversized one
            for item_id, (evidence, _) in zip(ids, MALFORMED_EVIDENCE):
                state["items"][item_id]["completion"]["evidence"] = evidence
        self.board.update(plant)
        results = self.cli_each("verify", ids)
        for item_id, (evidence, fragment), result in zip(ids, MALFORMED_EVIDENCE, results):
            with self.subTest(evidence=evidence[:60]):
                self.assertError(result, item_id + ": evidence does not decode: " + fragment)
        self.assertEqual(self.ollama.generate_requests(), [])
        FAULTS.count("malformed evidence refused by verify without a re-run", len(ids))

    def test_malformed_ids_never_reach_wl(self):
        for bad in MALFORMED_IDS:
            for command in ("run", "verify", "status"):
                with self.subTest(bad=bad, command=command):
                    self.assertError(self.cli(command, "--", bad), "is not a wl item ID: IDs look like w-3f9a0c12be")
        self.assertEqual(self.board.calls(), [])
        FAULTS.count("malformed IDs refused before wl", len(MALFORMED_IDS))


class ErrorTest(CliTest):
    def test_the_command_line_parses_as_one_complete_parser_would(self):
        # only the named command's options are built; a command name that is an option's value is no command
        self.assertError(self.cli("--wl", "run", "verify", "w-1"), "wl executable 'run' not found on PATH")
        code, out, err = self.cli("--help", "run")  # the top level's help, every command listed
        self.assertEqual(code, 0, err)
        for name in wl_infer.COMMAND_BY_NAME:
            self.assertIn("\n    %s " % name, out)
        code, out, err = self.cli("run", "--help")
        self.assertEqual(code, 0, err)
        self.assertIn("--skip-claim", out)
        self.assertError(self.cli("verify", "w-1", "--skip-claim"), "unrecognized arguments: --skip-claim")
        self.assertError(self.cli("--json"), "the following arguments are required: COMMAND")

    def test_missing_wl_executable(self):
        self.assertError(self.cli("status", "w-1", env=self.env(WL_BIN="", PATH="/nonexistent")),
                         "wl executable 'wl' not found on PATH")
        self.assertError(self.cli("status", "w-1", "--wl", "/no/such/wl"), "/no/such/wl not found")

    def test_wl_found_through_wl_option_and_path(self):
        item_id = self.board.add(self.job())
        no_bin = self.env(WL_BIN="")
        code, out, err = self.cli("status", item_id, "--wl", self.board.exe, env=no_bin)
        self.assertEqual(code, 0, err)
        path = self.tmp.name + os.pathsep + os.environ.get("PATH", "")
        code, out, err = self.cli("status", item_id, env=self.env(WL_BIN="", PATH=path))
        self.assertEqual(code, 0, err)
        self.assertEqual(self.board.commands(rig="bob"), ["status", "status"])

    def test_wl_errors_carry_wl_text(self):
        self.assertError(self.cli("status", "w-zz"), 'wl status failed: no wanted item matching "w-zz"')
        for wanted in ("w-ab00000001", "w-ab00000002"):
            self.board.rename(self.board.add(self.job()), wanted)
        self.assertError(self.cli("status", "w-ab"), 'ambiguous prefix "w-ab" matches: w-ab00000001, w-ab00000002')
        code, out, err = self.cli("status", "w-ab00000002", "--json")
        self.assertEqual(json.loads(out)["id"], "w-ab00000002")

    def test_wl_without_message_and_garbage_output(self):
        self.board.fail("status", message="")
        self.assertError(self.cli("status", "w-1"), "wl status failed")
        self.board.fail("status", stdout="<html>502 Bad Gateway</html>")
        self.assertError(self.cli("status", "w-1"), "wl status printed no item header; got <html>502")

    def test_wl_hang_is_bounded(self):
        self.board.fail("status", hang=True)
        self.assertError(self.cli("status", "w-1", "--wl-timeout", "0.5"),
                         "wl status did not finish within 0.5 s")

    def test_verify_without_completion(self):
        item_id = self.board.add(self.job())
        self.assertError(self.cli("verify", item_id), "has no completion evidence to verify (status open)")
        self.assertEqual(self.ollama.generate_requests(), [])

    def test_verify_undecodable_evidence(self):
        item_id = self.completed(evidence='{"output":"x","model":"llama3.2:1b"}')
        self.assertError(self.cli("verify", item_id), 'evidence field "output_hash" is missing or empty')

    def test_json_errors_go_to_stdout_too(self):
        code, out, err = self.cli("status", "w-zz", "--json")
        self.assertEqual(code, 2)
        self.assertEqual(json.loads(out), {"error": 'wl status failed: no wanted item matching "w-zz"'})
        self.assertIn("wl_infer: error:", err)
        code, out, err = self.cli("--json", "bogus")
        self.assertEqual(code, 2)
        self.assertIn("invalid choice", json.loads(out)["error"])

    def test_usage_errors_are_one_line(self):
        self.assertError(self.cli("-q"), "the following arguments are required: COMMAND")
        self.assertError(self.cli("run"), "the following arguments are required: ID")
        for bad in ("0", "-1", "inf", "nan", "soon"):
            self.assertError(self.cli("run", "w-1", "--timeout", bad), "--timeout")
        self.assertError(self.cli("run", "w-1", "--wl-timeout", "inf"), "--wl-timeout")
        self.assertError(self.cli("run", "w-1", "--frobnicate"), "unrecognized arguments: --frobnicate")

    def test_version_and_help(self):
        code, out, err = self.cli("--version")
        self.assertEqual((code, out), (0, "wl_infer %s\n" % wl_infer.__version__))
        code, out, err = self.cli("--help")
        self.assertEqual(code, 0)
        for command in ("post", "run", "verify", "status"):
            self.assertIn(command, out)


class LocaleTest(CliTest):
    def test_ascii_only_terminal_and_c_locale(self):
        env = self.env(PYTHONIOENCODING="ascii", LC_ALL="C", LANG="C")
        code, out, err = self.cli("post", "--prompt", "été ✓", "--model", "llama3.2:1b", env=env)
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith("\\u2713 Posted inference job: w-"), out)
        self.assertIn("Prompt:      \\xe9t\\xe9 \\u2713", out)
        item_id = out.split("\n")[0].split()[-1]
        self.assertEqual(wl_infer.decode_job(self.board.item(item_id)["description"]).prompt, "été ✓")
        code, out, err = self.cli("run", item_id, "--json", env=env)
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["evidence"]["output"], default_output("llama3.2:1b", "été ✓"))


class VerificationTest(CliTest):
    """The checks of `verify`, cheapest first, and the diagnosis of a mismatch."""

    PROMPT = "what is 1+1"
    HONEST = default_output("llama3.2:1b", PROMPT)  # 3-character tokens: "Rép", "ons", "e d", "e l", ...

    def verify(self, item_id, *extra, code=1):
        result = self.cli("verify", item_id, "--json", *extra)
        self.assertEqual(result[0], code, result)
        return json.loads(result[1])

    def test_inconsistent_evidence_is_refuted_without_touching_ollama(self):
        evidence = wl_infer.make_evidence(wl_infer.make_job(self.PROMPT, "llama3.2:1b"), self.HONEST)
        evidence["output_hash"] = wl_infer.output_hash("something else")
        item_id = self.completed(evidence=wl_infer.encode_evidence(evidence))
        doc = self.verify(item_id)
        self.assertEqual(doc["verdict"], "MISMATCH")
        self.assertEqual(doc["cause"]["kind"], "inconsistent-evidence")
        self.assertEqual([(c["name"], c["ok"]) for c in doc["checks"]], [("decodes", True), ("self-consistent", False)])
        self.assertEqual((doc["tokens_generated"], doc["actual_hash"], doc["diverged_at"]), (0, None, None))
        self.assertEqual(self.ollama.requests, [])  # not even /api/tags
        code, out, err = self.cli("verify", item_id)
        self.assertTrue(out.startswith("✗ MISMATCH — inconsistent-evidence, without a re-run"), out)
        self.assertIn("✗ evidence is inconsistent: output does not hash to output_hash", out)
        self.assertIn("Cost:      0 tokens generated", out)

    def test_evidence_for_another_model_seed_or_digest_is_refuted_without_a_rerun(self):
        local = self.ollama.models["llama3.2:1b"]
        for field, kwargs in (("model", {"evidence": wl_infer.encode_evidence(wl_infer.make_evidence(
                                   wl_infer.make_job(self.PROMPT, "qwen2.5:0.5b"), self.HONEST))}),
                              ("seed", {"evidence": wl_infer.encode_evidence(wl_infer.make_evidence(
                                   wl_infer.make_job(self.PROMPT, "llama3.2:1b", seed=7), self.HONEST))}),
                              ("model_digest", {"pin": local, "model_digest": "cd" * 32})):
            with self.subTest(field=field):
                del self.ollama.requests[:]
                doc = self.verify(self.completed(**kwargs))
                self.assertEqual((doc["cause"]["kind"], doc["cause"]["field"]), ("binding", field))
                self.assertIn(field.replace("_", " ") if field != "model_digest" else "model_digest",
                              doc["checks"][-1]["message"])
                self.assertEqual(self.ollama.requests, [])
        # Ollama's own normalisation is not a difference: llama3.2 is llama3.2:latest
        self.ollama.models["llama3.2:latest"] = "e" * 64
        self.ollama.outputs[("llama3.2", self.PROMPT)] = "ok"
        evidence = wl_infer.make_evidence(wl_infer.make_job(self.PROMPT, "llama3.2:latest"), "ok")
        self.verify(self.completed(model="llama3.2", evidence=wl_infer.encode_evidence(evidence)), code=0)

    def test_run_refuses_a_job_pinned_to_other_weights_before_claiming(self):
        item_id = self.board.add(wl_infer.encode_job(wl_infer.make_job(self.PROMPT, "llama3.2:1b",
                                                                       model_digest="cd" * 32)))
        self.assertError(self.cli("run", item_id), "model llama3.2:1b here is sha256:a80c4f17acd5, the job pins "
                         "sha256:cdcdcdcdcdcd; pull the pinned version or leave the job to another worker")
        self.assertEqual(self.board.commands(), ["post", "status"])  # no claim
        self.assertEqual(self.ollama.generate_requests(), [])
        self.assertEqual(self.board.item(item_id)["status"], "open")

    def test_post_pins_the_local_digest_unless_told_not_to(self):
        code, out, err = self.cli("post", "--prompt", "p", "--model", "llama3.2:1b", "--json")
        self.assertEqual(code, 0, err)
        pinned = self.board.item(json.loads(out)["id"])["description"]
        self.assertEqual(json.loads(pinned)["model_digest"], self.ollama.models["llama3.2:1b"])
        self.assertEqual(self.cli("run", json.loads(out)["id"])[0], 0)  # the pin matches here
        code, out, err = self.cli("post", "--prompt", "p", "--model", "llama3.2:1b", "--json", "--no-pin")
        self.assertEqual(self.board.item(json.loads(out)["id"])["description"],
                         '{"prompt":"p","model":"llama3.2:1b","seed":42}')
        code, out, err = self.cli("post", "--prompt", "p", "--model", "mistral:7b", "--json")
        self.assertEqual(json.loads(out)["job"]["model_digest"], "")  # not local: nothing to pin
        self.ollama.models["llama3.2:1b"] = "latest\x1b[2J"  # not a digest: a pin workers would refuse
        code, out, err = self.cli("post", "--prompt", "p", "--model", "llama3.2:1b", "--json")
        self.assertEqual((code, json.loads(out)["job"]["model_digest"]), (0, ""))
        self.assertIn('not pinned: Ollama reports the digest of llama3.2:1b as "latest\\u001b[2J"', err)

    def test_different_local_weights_are_reported_and_named_as_the_cause(self):
        theirs = "ee" * 32
        # same text from other weights: reported, but the verdict stands
        doc = self.verify(self.completed(model_digest=theirs), code=0)
        self.assertEqual(doc["checks"][3]["name"], "local-model")
        self.assertFalse(doc["checks"][3]["ok"])
        self.assertIn("sha256:eeeeeeeeeeee", doc["checks"][3]["message"])
        # different text: the digests are the likely cause
        doc = self.verify(self.completed(output=self.HONEST[:10] + "xx", model_digest=theirs))
        self.assertEqual(doc["cause"]["kind"], "model-digest")
        self.assertEqual((doc["cause"]["recorded"], doc["cause"]["local"]), (theirs, self.ollama.models["llama3.2:1b"]))

    def test_local_model_check_against_the_pin_when_the_evidence_has_no_digest(self):
        local = self.ollama.models["llama3.2:1b"]
        doc = self.verify(self.completed(pin=local), code=0)
        self.assertEqual(doc["checks"][3], {"name": "local-model", "ok": True, "message":
                                            "local model sha256:a80c4f17acd5 is the pinned one (the evidence "
                                            "records no digest)"})
        doc = self.verify(self.completed(output=self.HONEST[:10] + "xx", pin="cd" * 32))
        self.assertFalse(doc["checks"][3]["ok"])
        self.assertEqual((doc["cause"]["kind"], doc["cause"]["recorded"]), ("model-digest", "cd" * 32))

    def test_other_ollama_version_is_named_as_the_cause(self):
        local = self.ollama.models["llama3.2:1b"]
        doc = self.verify(self.completed(output=self.HONEST[:10] + "xx", model_digest=local, ollama_version="0.9.0"))
        self.assertEqual((doc["cause"]["kind"], doc["cause"]["recorded"], doc["cause"]["local"]),
                         ("ollama-version", "0.9.0", "0.12.11"))
        self.assertEqual(doc["local"], {"model_digest": local, "ollama_version": "0.12.11",
                                        "prompt_eval_count": None})  # the re-run stopped at the divergence

    def test_forged_claim_is_refuted_after_a_few_tokens(self):
        text = "abc" * 400  # 400 tokens of 3 characters
        self.ollama.outputs[("llama3.2:1b", self.PROMPT)] = text
        self.ollama.piece_delay = 0.005  # a full re-run takes 2 s
        doc = self.verify(self.completed(output=text[:6] + "X" + text[7:]))  # wrong in the 3rd token
        self.assertEqual((doc["diverged_at"]["char"], doc["diverged_at"]["token_index"]), (6, 2))
        self.assertEqual((doc["diverged_at"]["submitted"], doc["diverged_at"]["rerun"]),
                         (text[:6] + "X" + text[7:30], "abcabcabc"))  # up to 24 characters each side
        self.assertEqual((doc["tokens_generated"], doc["actual_hash"]), (4, None))  # 3, and the probe's 1
        stream = self.ollama.streams[-2]  # the re-run's (the last is the probe's)
        wait_for(stream["ended"].is_set, "the fake to notice the closed connection")
        self.assertLess(stream["sent"], 20)  # of 400: the client hung up and the server stopped

    def test_truncated_claim_and_claim_with_extra_text(self):
        text = "abc" * 50
        self.ollama.outputs[("llama3.2:1b", self.PROMPT)] = text
        # shorter claim: the re-run is longer, so stop as soon as it passes the claim's end
        doc = self.verify(self.completed(output=text[:30]))
        self.assertEqual((doc["diverged_at"]["char"], doc["diverged_at"]["token_index"], doc["tokens_generated"]),
                         (30, 10, 12))  # 11, and the probe's 1
        self.assertEqual(doc["diverged_at"]["submitted"], text[6:30])
        # longer claim: the re-run ends first; it ran in full, so its hash is known
        doc = self.verify(self.completed(output=text + "and more"))
        self.assertEqual((doc["diverged_at"]["char"], doc["diverged_at"]["token_index"]), (150, 50))
        self.assertEqual(doc["actual_hash"], wl_infer.output_hash(text))
        self.assertEqual(doc["cause"]["kind"], "unknown")
        self.assertIn("the re-run ended where the submitted output goes on", doc["cause"]["message"])

    def test_divergence_at_a_near_tie_and_at_a_clear_winner(self):
        forged = self.HONEST[:9] + "XYZ" + self.HONEST[12:]  # token 3 is "e l"
        item_id = self.completed(output=forged)
        for near_tie, kind, margin in ((("XYZ", 2.0), "near-tie", 2.0),  # the claim took the runner-up
                                       (("e!", 0.3), "near-tie", 0.3),  # a close call either way
                                       (("e!", 0.6), "different-output", 0.6),
                                       (None, "different-output", 3.0)):
            with self.subTest(near_tie=near_tie):
                self.ollama.near_ties = {3: near_tie} if near_tie else {}
                doc = self.verify(item_id)
                self.assertEqual((doc["diverged_at"]["char"], doc["diverged_at"]["token_index"]), (9, 3))
                self.assertEqual((doc["cause"]["kind"], doc["cause"]["margin"], doc["cause"]["rerun_token_text"]),
                                 (kind, margin, "e l"))
        code, out, err = self.cli("verify", item_id)
        self.assertIn("Cause:     different-output: at token 3 the re-run chose \"e l\" over \"~\" by 3.00 nats "
                      "where the submitted output has \"XYZ\"", out)
        self.assertIn("    submitted: Réponse d⟨here⟩XYZ", out)
        self.ollama.near_ties = {3: ("e l", 0.1)}  # the only candidate listed is the chosen token
        self.assertIn("list no runner-up", self.verify(item_id)["cause"]["message"])
        self.ollama.logprobs_supported = False  # without logprobs a near-tie cannot be told apart
        doc = self.verify(item_id)
        self.assertEqual(doc["cause"]["kind"], "unknown")
        self.assertIn("this Ollama returned no candidates (logprobs) at the divergence", doc["cause"]["message"])

    def test_byte_tokens_sent_as_whole_characters(self):
        # é and ü are two byte tokens each, sent as one chunk with two logprob entries
        self.ollama.byte_tokens = True
        self.ollama.outputs[("llama3.2:1b", self.PROMPT)] = "é1é2é3"  # tokens: é é 1 é é 2 é é 3
        item_id = self.board.add(self.job())
        code, out, err = self.cli("run", item_id, "--json")
        self.assertEqual(code, 0, err)
        evidence = json.loads(out)["evidence"]
        self.assertEqual((evidence["eval_count"], len(evidence["logprobs"]), evidence["token_lengths"]),
                         (9, 9, [1, 0, 1, 1, 0, 1, 1, 0, 1]))  # a character is placed at its first byte token
        self.assertEqual(self.verify(item_id, "--strict", code=0)["logprob_max_diff"], 0.0)
        # token indexes count byte tokens where logprobs place them (--strict asks for them on every token);
        # without them, a chunk of byte tokens counts as one
        for claim, char, token, strict in (("é1é2éX", 5, 8, True), ("é1ü2é3", 2, 3, True), ("é1é2éX", 5, 5, False)):
            with self.subTest(claim=claim, strict=strict):
                where = self.verify(self.completed(output=claim), *["--strict"] * strict)["diverged_at"]
                self.assertEqual((where["char"], where["token_index"]), (char, token))
        self.ollama.near_ties = {3: ("ü", 0.1)}  # the first byte token of the second é
        doc = self.verify(self.completed(output="é1ü2é3"), "--strict")
        self.assertEqual((doc["cause"]["kind"], doc["cause"]["token_index"]), ("near-tie", 3))

    def test_same_text_with_different_logprobs(self):
        item_id = self.board.add(self.job())
        self.assertEqual(self.cli("run", item_id)[0], 0)  # evidence with logprobs
        self.ollama.logprob_shift = -0.3
        doc = self.verify(item_id, code=0)  # logprobs are compared only by --strict, which asks for them
        self.assertEqual((doc["verdict"], doc["logprob_max_diff"], doc["checks"][-1]["ok"]), ("VERIFIED", None, None))
        self.assertIn("--strict compares them", doc["checks"][-1]["message"])
        self.ollama.logprob_shift = 0.05  # within the tolerance
        doc = self.verify(item_id, "--strict", code=0)
        self.assertEqual((doc["verdict"], doc["logprob_max_diff"], doc["checks"][-1]["ok"]), ("VERIFIED", 0.05, True))
        self.ollama.logprob_shift = -0.3
        doc = self.verify(item_id, "--strict")
        self.assertEqual((doc["verdict"], doc["cause"]["kind"], doc["logprob_max_diff"]),
                         ("MISMATCH", "different-numerics", 0.3))
        code, out, err = self.cli("verify", item_id, "--strict")
        self.assertTrue(out.startswith("✗ MISMATCH — same text, different numerics (--strict)"), out)

    def test_verify_json_document(self):
        item_id = self.board.add(self.job())
        self.assertEqual(self.cli("run", item_id)[0], 0)
        doc = self.verify(item_id, code=0)
        self.assertEqual(set(doc), {"id", "verdict", "refuted", "exact", "tolerance", "forced", "checks", "cause",
                                    "diverged_at", "tokens_generated", "logprob_max_diff", "expected_hash",
                                    "actual_hash", "job", "output", "evidence", "local", "sampled", "windows",
                                    "tokens_checked", "submitted_tokens", "coverage", "sample_seed"})
        self.assertEqual((doc["verdict"], doc["exact"], doc["tolerance"], doc["forced"]), ("VERIFIED", True, 0, []))
        self.assertEqual((doc["sampled"], doc["windows"], doc["coverage"]), (False, None, None))
        self.assertEqual([c["name"] for c in doc["checks"]],
                         ["decodes", "self-consistent", "binding", "local-model", "rerun", "logprobs"])
        self.assertTrue(all(c["ok"] is True and c["message"] for c in doc["checks"][:-1]), doc["checks"])
        self.assertEqual((doc["cause"], doc["diverged_at"], doc["tokens_generated"], doc["logprob_max_diff"]),
                         (None, None, 18, None))
        self.assertEqual(doc["evidence"], json.loads(self.board.item(item_id)["completion"]["evidence"]))

    def test_evidence_too_large_drops_logprobs_then_provenance(self):
        self.ollama.piece_chars = 10
        for size, kept in ((60000, "model_digest"), (65400, None)):
            with self.subTest(size=size):
                self.ollama.outputs[("llama3.2:1b", "big %d" % size)] = "a" * size
                item_id = self.board.add(self.job("big %d" % size))
                code, out, err = self.cli("run", item_id, "--json")
                self.assertEqual(code, 0, err)
                written = self.board.item(item_id)["completion"]["evidence"]
                self.assertLessEqual(len(written.encode()), 65535)
                doc = json.loads(written)
                self.assertNotIn("logprobs", doc)
                self.assertEqual(kept in doc, kept is not None)
                self.assertEqual(doc, json.loads(out)["evidence"])  # the report shows what was submitted
                self.assertEqual(err, "wl_infer: warning: submitted without %s: the evidence would not fit "
                                 "wl's 65535-byte field with %s (verifiers will see them as not available)\n"
                                 % (("logprobs, token_lengths", "them") if kept else
                                    ("model_digest, ollama_version, options, done_reason, eval_count, "
                                     "prompt_eval_count, eval_ms, "
                                     "tokens_per_s, logprobs, token_lengths", "them")))
                self.verify(item_id, code=0)

    def test_malformed_provenance_is_an_error_naming_the_field(self):
        evidence = wl_infer.encode_evidence(wl_infer.make_evidence(wl_infer.make_job(self.PROMPT, "llama3.2:1b"),
                                                                   self.HONEST))
        item_id = self.completed(evidence=evidence[:-1] + ',"logprobs":["x"]}')
        self.assertError(self.cli("verify", item_id), 'evidence field "logprobs" element must be a number')
        code, out, err = self.cli("status", item_id)
        self.assertIn('✗ evidence does not decode: evidence field "logprobs" element must be a number', out)


class TolerantVerificationTest(CliTest):
    """verify/audit --tolerance: near-ties forced, everything else decided
    by the model. The claims are made by `run` on "other hardware": the same
    scripted model taking the runner-up at chosen near-ties."""

    PROMPT = "tell me a story"
    TEXT = "Once upon a time a small robot walked to the sea, and the waves sang back to it all night long. "

    def claim(self, ties, flips, max_tokens=0, prompt=PROMPT):
        """An in_review item whose evidence carol's `run` made with `flips` taken."""
        self.ollama.scripts[("llama3.2:1b", prompt)] = ScriptedModel(self.TEXT, ties)
        item_id = self.board.add(self.job(prompt, max_tokens=max_tokens))
        self.ollama.flips = set(flips)
        try:
            code, out, err = self.cli("run", item_id, "--json", env=self.env(FAKE_WL_RIG="carol"))
        finally:
            self.ollama.flips = set()
        self.assertEqual(code, 0, err)
        return item_id, json.loads(out)["evidence"]

    def verify(self, item_id, *extra, code=1):
        result = self.cli("verify", item_id, "--json", *extra)
        self.assertEqual(result[0], code, result)
        return json.loads(result[1])

    def generated(self, since=0):
        return [b for b in self.ollama.generate_requests()[since:] if not b.get("_debug_render_only")]

    def test_honest_claim_from_other_hardware_is_verified_within_the_tolerance(self):
        item_id, evidence = self.claim({5: 0.2, 12: 0.3}, {5, 12})
        claim = evidence["output"]
        self.assertNotEqual(claim, self.TEXT)  # the flips led elsewhere
        exact = self.verify(item_id)
        where = exact["diverged_at"]["token_index"]
        self.assertEqual((exact["verdict"], exact["exact"], exact["cause"]["kind"], where),
                         ("MISMATCH", None, "near-tie", 5))
        before = len(self.ollama.generate_requests())
        doc = self.verify(item_id, "--tolerance", "0.5", code=0)
        self.assertEqual((doc["verdict"], doc["exact"], doc["tolerance"], doc["cause"]), ("VERIFIED", False, 0.5, None))
        self.assertEqual([(s["token_index"], s["gap"]) for s in doc["forced"]], [(5, 0.2), (12, 0.3)])
        main = ScriptedModel(self.TEXT).main
        self.assertEqual(doc["forced"][0]["rerun_token_text"], main[5])
        self.assertEqual(doc["forced"][0]["submitted_token_text"], main[5].swapcase())  # the runner-up the claim took
        self.assertEqual(doc["actual_hash"], evidence["output_hash"])
        self.assertEqual(doc["tokens_generated"], len(main) + 2)  # each diverging token replaced a forced one; 2 probes
        requests = self.ollama.generate_requests()[before:]
        # the re-run, the render (asked once), then at each divergence a probe of one token with the
        # candidates, and the continuation after the forced token: logprobs only where needed
        self.assertEqual([("render" if r.get("_debug_render_only") else "probe" if r.get("logprobs") else
                           "raw" if r.get("raw") else "rerun") for r in requests],
                         ["rerun", "render", "probe", "raw", "probe", "raw"])
        self.assertNotIn("logprobs", requests[0])
        self.assertEqual(requests[1], {"model": "llama3.2:1b", "prompt": self.PROMPT, "stream": False,
                                       "options": {"temperature": 0, "seed": 42, "num_predict": 1},
                                       "_debug_render_only": True})
        head = render_template(self.PROMPT)
        for probe, forced in zip((requests[2], requests[4]), doc["forced"]):
            self.assertEqual(probe, dict(requests[0], prompt=head + claim[:forced["char"]], raw=True,
                                         options=dict(requests[0]["options"], num_predict=1),
                                         logprobs=True, top_logprobs=5))
        through = [claim[:doc["forced"][n]["char"] + len(doc["forced"][n]["submitted_token_text"])] for n in (0, 1)]
        for request, text in zip((requests[3], requests[5]), through):
            self.assertEqual(request, dict(requests[0], prompt=head + text, raw=True))
        code, out, err = self.cli("verify", item_id, "--tolerance", "0.5")
        self.assertEqual(code, 0, err)
        lines = out.splitlines()
        self.assertEqual(lines[0], "✓ VERIFIED (within tolerance 0.5 nats: 2 near-tie steps)")
        self.assertIn('  Forced:    token 5: the submitted "%s", where the re-run chose "%s" (0.20 nats)'
                      % (main[5].swapcase(), main[5]), lines)
        self.assertTrue(any(ln.strip().startswith("token 12: the submitted") for ln in lines), out)
        self.assertIn("✓ re-run produced the submitted output (%d tokens, forcing 2 near-tie steps)" % len(main), out)

    def test_a_forged_token_is_a_mismatch_even_with_tolerance(self):
        main = ScriptedModel(self.TEXT).main
        self.ollama.scripts[("llama3.2:1b", self.PROMPT)] = ScriptedModel(self.TEXT, {7: 0.1})
        # "#4" is one of the model's candidates, but the sixth: outside the top 5
        for forged in ("zzzz", "#4"):
            with self.subTest(forged=forged):
                output = "".join(main[:7]) + forged + "".join(main[8:])
                doc = self.verify(self.completed(self.PROMPT, output=output), "--tolerance", "0.5")
                cause = doc["cause"]
                self.assertEqual((doc["verdict"], cause["kind"], cause["token_index"], cause["gap"]),
                                 ("MISMATCH", "different-output", 7, None))
                self.assertIn("none of the model's top 5 candidates", doc["cause"]["message"])
                self.assertEqual(doc["forced"], [])

    def test_a_runner_up_two_nats_down_is_a_mismatch(self):
        item_id, _ = self.claim({7: 2.0}, {7})
        doc = self.verify(item_id, "--tolerance", "0.5")
        self.assertEqual((doc["cause"]["kind"], doc["cause"]["token_index"], doc["cause"]["gap"]),
                         ("different-output", 7, 2.0))
        self.assertIn("2.00 nats below the model's choice", doc["cause"]["message"])
        self.assertEqual(self.verify(item_id, "--tolerance", "2", code=0)["forced"][0]["gap"], 2.0)

    def test_a_divergence_right_after_a_forced_token_is_not_a_refutation(self):
        # a raw continuation re-reads the forced text, which a real tokenizer may split otherwise than
        # the worker's model made it (seen on llama.cpp: " anaknya" generated as one token): right
        # after a forced token, a claim the model does not follow is unexplained, not refuted
        self.ollama.scripts[("llama3.2:1b", self.PROMPT)] = ScriptedModel(self.TEXT, {5: 0.2})
        flipped = "".join(t for t, _, _ in ScriptedModel(self.TEXT, {5: 0.2}).generate("", {5}, -1)[0])
        at = sum(len(t) for t in ScriptedModel(self.TEXT).main[:5]) + 4  # the forced token, then one more
        for where, kind, refuted in ((at + 4, "unknown", False), (at + 40, "different-output", True)):
            with self.subTest(where=where):
                claim = flipped[:where] + "QQQQ" + flipped[where + 4:]
                doc = self.verify(self.completed(self.PROMPT, output=claim), "--tolerance", "0.5")
                self.assertEqual((doc["cause"]["kind"], doc["refuted"], len(doc["forced"])), (kind, refuted, 1))
                self.assertEqual("right after a forced token" in doc["cause"]["message"], kind == "unknown")

    def test_more_near_ties_than_max_forced_is_a_mismatch(self):
        ties = dict((i, 0.1) for i in range(2, 20, 2))  # 9 of them
        item_id, _ = self.claim(ties, set(ties))
        doc = self.verify(item_id, "--tolerance", "0.5")  # --max-forced defaults to 8
        self.assertEqual((doc["cause"]["kind"], doc["cause"]["near_ties"], doc["cause"]["token_index"],
                          doc["diverged_at"]["token_index"], len(doc["forced"])),
                         ("too-many-divergences", 9, 18, 18, 8))
        self.assertIn("at token 18 the submitted output takes a near-tie (0.10 nats) for the 9th time, "
                      "more than --max-forced 8 allows", doc["cause"]["message"])
        doc = self.verify(item_id, "--tolerance", "0.5", "--max-forced", "9", code=0)
        self.assertEqual(len(doc["forced"]), 9)
        before = len(self.ollama.generate_requests())
        doc = self.verify(item_id, "--tolerance", "0.5", "--max-forced", "0")
        self.assertEqual((doc["cause"]["kind"], doc["diverged_at"]["token_index"], doc["forced"]),
                         ("too-many-divergences", 2, []))
        # the re-run, the render and one probe for the candidates there; no continuation
        self.assertEqual(len(self.ollama.generate_requests()), before + 3)

    def test_ollama_failing_in_a_continuation_is_an_error_with_its_text(self):
        item_id, evidence = self.claim({5: 0.2}, {5})
        main = ScriptedModel(self.TEXT).main
        raw = render_template(self.PROMPT) + "".join(main[:5]) + main[5].swapcase()
        self.ollama.fail_prompts[raw] = (500, "llama runner process has terminated: signal: killed")
        self.assertError(self.cli("verify", item_id, "--tolerance", "0.5"),
                         "llama runner process has terminated: signal: killed (HTTP 500)")
        self.assertEqual(self.generated()[-1]["prompt"], raw)

    def test_a_server_that_cannot_render_gives_the_exact_verdict_with_a_note(self):
        item_id, _ = self.claim({5: 0.2}, {5})
        self.ollama.render_supported = False  # older than 0.11.5: the field is ignored
        before = len(self.ollama.generate_requests())
        doc = self.verify(item_id, "--tolerance", "0.5")
        rerun, render, probe = self.ollama.generate_requests()[before:]
        # the candidates at the divergence: the job's request again, up to that token, with logprobs
        self.assertEqual(probe, dict(rerun, options=dict(rerun["options"], num_predict=6), logprobs=True,
                                     top_logprobs=5))
        self.assertEqual((doc["verdict"], doc["cause"]["kind"], doc["forced"]), ("MISMATCH", "near-tie", []))
        note = next(c for c in doc["checks"] if c["name"] == "tolerance")
        self.assertIsNone(note["ok"])
        self.assertIn("does not render prompts (`_debug_render_only`, Ollama 0.11.5 and later)", note["message"])
        self.assertIn("the verdict is the exact one", note["message"])
        self.assertEqual((render["_debug_render_only"], render["stream"], render["options"]["num_predict"]),
                         (True, False, 1))  # the old server generated: one token, not the whole answer
        code, out, err = self.cli("verify", item_id, "--tolerance", "0.5")
        self.assertEqual(code, 1, err)
        self.assertIn("– tolerance not applied: this Ollama does not render prompts", out)

    def test_the_token_budget_holds_across_forced_steps(self):
        item_id, evidence = self.claim({5: 0.2, 12: 0.3}, {5, 12}, max_tokens=15)
        self.assertEqual((evidence["eval_count"], evidence["done_reason"]), (15, "length"))
        before = len(self.ollama.generate_requests())
        doc = self.verify(item_id, "--tolerance", "0.5", code=0)
        self.assertEqual(doc["tokens_generated"], 15 + 2)  # and a probe of 1 token at each near-tie
        self.assertEqual([r["options"].get("num_predict") for r in self.generated(before)], [15, 1, 9, 1, 2])
        # the last token forced: the budget is spent, nothing more is asked (num_predict 0 has no limit)
        item_id, evidence = self.claim({14: 0.2}, {14}, max_tokens=15, prompt="the end")
        before = len(self.ollama.generate_requests())
        doc = self.verify(item_id, "--tolerance", "0.5", code=0)
        self.assertEqual(([s["token_index"] for s in doc["forced"]], len(self.generated(before))), ([14], 2))  # +probe
        # a claim that goes on past the budget is refuted
        main = ScriptedModel(self.TEXT).main
        job = wl_infer.make_job("the end", "llama3.2:1b", max_tokens=15)
        longer = wl_infer.encode_evidence(wl_infer.make_evidence(job, evidence["output"] + main[15]))
        item_id = self.board.add(wl_infer.encode_job(job))
        self.board.wl("claim", item_id, rig="carol")
        self.board.wl("done", item_id, "--evidence=" + longer, rig="carol")
        doc = self.verify(item_id, "--tolerance", "0.5")
        self.assertEqual((doc["verdict"], doc["diverged_at"]["char"]), ("MISMATCH", len(evidence["output"])))

    def test_a_claim_that_ends_for_another_reason_is_a_mismatch(self):
        item_id, evidence = self.claim({5: 0.2}, {5})
        job = wl_infer.decode_job(self.board.item(item_id)["description"])
        evidence = wl_infer.decode_evidence(json.dumps(evidence))
        evidence["done_reason"] = "length"
        other = self.board.add(wl_infer.encode_job(job))
        self.board.wl("claim", other, rig="carol")
        self.board.wl("done", other, "--evidence=" + wl_infer.encode_evidence(evidence), rig="carol")
        doc = self.verify(other, "--tolerance", "0.5")
        self.assertEqual(doc["cause"]["kind"], "different-ending")
        self.assertIn('for another reason ("stop", the evidence says "length")', doc["cause"]["message"])

    def test_reject_only_refutes_a_near_tie_stays_in_review_and_the_tolerant_audit_settles_it(self):
        honest, _ = self.claim({5: 0.2}, {5})  # an honest worker whose hardware flipped a near-tie
        forged = self.completed("forged", output="a forged answer")
        code, out, err = self.cli("audit", "--accept", "--reject")
        self.assertEqual(code, 1, err)
        rows = dict((ln.split()[0], ln.split(None, 5)[2:]) for ln in out.splitlines()[1:])
        self.assertEqual(rows[honest][:2], ["MISMATCH", "near-tie"])
        self.assertEqual(rows[honest][-1], "kept in review (not a refutation)")
        self.assertEqual(rows[forged][:2], ["MISMATCH", "different-output"])
        self.assertEqual(rows[forged][-1], "rejected")
        self.assertIn("1 MISMATCH not refuted outright (%s): it is kept in review, never rejected; re-check with "
                      "`wl_infer.py audit --tolerance 0.5`" % honest, err)
        self.assertEqual((self.board.item(honest)["status"], self.board.item(forged)["status"]),
                         ("in_review", "claimed"))  # wl reject: back to its claimer
        self.assertNotIn(["reject", honest], [c["argv"][:2] for c in self.board.calls()])
        doc = self.verify(honest)
        self.assertEqual((doc["verdict"], doc["refuted"]), ("MISMATCH", False))
        self.assertIn("  Refuted:   no: this can be an honest worker's output", self.cli("verify", honest)[1])
        code, out, err = self.cli("audit", "--tolerance", "0.5", "--accept", "--reject")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.board.item(honest)["status"], "completed")

    def test_audit_uses_the_same_verification(self):
        honest, _ = self.claim({5: 0.2, 12: 0.3}, {5, 12}, prompt="honest")
        forged, _ = self.claim({7: 2.0}, {7}, prompt="forged")
        code, out, err = self.cli("audit", "--tolerance", "0.5", "--json")
        self.assertEqual(code, 1, err)
        docs = dict((d["id"], d) for d in json.loads(out))
        for item_id, code in ((honest, 0), (forged, 1)):
            alone = self.verify(item_id, "--tolerance", "0.5", code=code)
            self.assertEqual(dict(docs[item_id], action=None, error=None), dict(alone, action=None, error=None))
        self.assertEqual((docs[honest]["exact"], len(docs[honest]["forced"])), (False, 2))
        code, out, err = self.cli("audit", "--tolerance", "0.5")
        row = next(ln for ln in out.splitlines() if ln.startswith(honest)).split()
        self.assertEqual(row[2:6], ["VERIFIED", "tolerance:", "2", "forced"])
        self.assertIn("Audited 2 completions in review: 1 verified, 1 mismatched, 0 errors", err)
        code, out, err = self.cli("audit", "--tolerance", "0.5", "--accept")
        accept = next(c["argv"] for c in self.board.calls() if c["argv"][:2] == ["accept", honest])
        self.assertIn("--message=verified by wl_infer within tolerance 0.5 nats (2 near-tie steps): "
                      + docs[honest]["expected_hash"], accept)
        self.assertEqual(self.board.item(honest)["status"], "completed")

    def test_options_are_checked(self):
        item_id, _ = self.claim({5: 0.2}, {5})
        self.assertError(self.cli("verify", item_id, "--max-forced", "3"), "--max-forced needs --tolerance")
        self.assertError(self.cli("audit", "--max-forced", "3"), "--max-forced needs --tolerance")
        for bad in ("-0.5", "nan", "inf", "lots"):
            self.assertError(self.cli("verify", item_id, "--tolerance", bad), "--tolerance",
                             "non-negative number of nats")
        self.assertError(self.cli("verify", item_id, "--tolerance", "1", "--max-forced", "-1"), "--max-forced")

    def test_the_claims_own_token_boundaries_choose_among_candidates(self):
        gen = wl_infer.Generation()
        gen.add("Hi", [{"token": "Hi", "logprob": 0.0}])
        gen.add("Help", [{"token": "Help", "logprob": -0.1, "top_logprobs": [
            {"token": "Help", "logprob": -0.1}, {"token": "Hell", "logprob": -0.2},
            {"token": "Hello", "logprob": -0.3}, {"token": "Hx", "logprob": -0.05}]}])
        gen.text, gen.diverged_at = "HiHelp", 5
        step = wl_infer.near_tie_step(gen, "HiHello world", [], 0.5)
        self.assertEqual(step.kind, wl_infer.FORCE)
        forced = step.forced
        self.assertEqual((forced.token_index, forced.submitted_token_text, forced.rerun_token_text, forced.gap),
                         (1, "Hello", "Help", 0.25))
        # the worker's tokens: "Hi", "Hell", "o"
        step = wl_infer.near_tie_step(gen, "HiHello world", [2, 4, 1], 0.5)
        self.assertEqual(step.forced.submitted_token_text, "Hell")
        # boundaries that do not agree are ignored
        self.assertEqual(wl_infer.near_tie_step(gen, "HiHello world", [3, 4], 0.5).forced.submitted_token_text, "Hello")
        self.assertEqual(wl_infer.near_tie_step(gen, "HiHello world", [], 0.2).cause.details["gap"], 0.25)
        gen.thinking = "hmm"
        self.assertIn("cannot include its thinking", wl_infer.near_tie_step(gen, "HiHello world", [], 0.5).why)


class PromptCacheTest(CliTest):
    """Ollama's prompt cache, as every real Ollama has it: what a user meets
    on one box and across boxes. A story with a near-tie at token 5; where
    the scripted numerics say so, a prompt evaluated in other batches than a
    fresh one (served from the cache beyond the template's opening) takes
    the runner-up there."""

    PROMPT = "Tell me a story."

    def setUp(self):
        CliTest.setUp(self)
        self.worker = FakeOllama().start()  # the worker's own box; self.ollama is the verifier's
        self.addCleanup(self.worker.stop)
        for fake in (self.ollama, self.worker):
            fake.scripts[("llama3.2:1b", self.PROMPT)] = ScriptedModel(TolerantVerificationTest.TEXT, {5: 0.21})

    def run_job(self, prompt=PROMPT, server=None, rig="carol"):
        item_id = self.board.add(self.job(prompt, max_tokens=64))
        code, out, err = self.cli("run", item_id, env=self.env(FAKE_WL_RIG=rig,
                                                               OLLAMA_HOST=(server or self.worker).address))
        self.assertEqual(code, 0, err)
        return item_id

    def verify(self, item_id, *extra, code=0):
        result = self.cli("--json", "verify", item_id, *extra)
        self.assertEqual(result[0], code, result)
        return json.loads(result[1])

    def evidence(self, item_id):
        return wl_infer.decode_evidence(self.board.item(item_id)["completion"]["evidence"])

    def test_the_fake_reuses_prefixes_and_saved_states_as_llama_server_does(self):
        fake = self.ollama
        client = wl_infer.Ollama(fake.address)
        tokens = fake.tokens(render_template(self.PROMPT))
        opening = len(TEMPLATE_OPENING) // fake.piece_chars

        def counts(prompt, **job):
            gen = client.generate(wl_infer.make_job(prompt, "llama3.2:1b", **job), top=None)
            return gen.final["prompt_eval_count"]
        self.assertEqual(fake.evaluate(render_template("new"))[2], False)  # fresh: only the opening was reused
        self.assertEqual(fake.evaluate(render_template("new"))[2], True)  # the same prompt again: split
        self.assertEqual(counts(self.PROMPT), tokens)  # a fresh server: the whole prompt
        self.assertEqual(counts(self.PROMPT), 1)  # the same prompt again: only its last token
        self.assertEqual(counts("Another story, please."),
                         fake.tokens(render_template("Another story, please.")) - opening)  # the opening is shared
        # the first prompt again: restored from the saved state of its first request (it keeps over a quarter of it)
        self.assertEqual(counts(self.PROMPT), 1)
        fake.scripts[("llama3.2:1b", "long")] = ScriptedModel("word " * 200)
        counts("long")
        counts("something else")
        self.assertEqual(counts("long", max_tokens=1), fake.tokens(render_template("long")) - opening,
                         "a state the prompt keeps under a quarter of is not restored")
        fake.cache_prompt = False
        self.assertEqual((counts(self.PROMPT), counts(self.PROMPT)), (tokens, tokens))

    def test_a_cut_generation_leaves_in_the_slot_only_what_it_generated(self):
        fake, text = self.ollama, TolerantVerificationTest.TEXT
        fake.piece_delay = 0.05  # 25 tokens in 1.25 s: the server notices the client gone long before the end
        claim = text[:8] + "forged from here on"
        job = wl_infer.make_job(self.PROMPT, "llama3.2:1b")
        wl_infer.Ollama(fake.address).compare(wl_infer.generate_request(job, None), claim)
        wait_for(lambda: fake.streams[-1]["ended"].is_set(), "the cut stream's end")
        rendered = render_template(self.PROMPT)
        self.assertTrue(fake.slot.startswith(rendered + text[:12]) and (rendered + text).startswith(fake.slot))
        self.assertLess(len(fake.slot), len(rendered + text))
        self.assertEqual(list(fake.saved), [])  # a cancelled request is not saved as a state

    def test_a_worker_that_ran_other_jobs_first_is_verified_by_a_fresh_server(self):
        for fake in (self.ollama, self.worker):
            fake.split_ties = {5}
        self.run_job("Name a colour.")
        item_id = self.run_job()  # the prompt shares only the template's opening with the job before it
        evidence = self.evidence(item_id)
        self.assertEqual(evidence["prompt_eval_count"], self.worker.tokens(render_template(self.PROMPT))
                         - len(TEMPLATE_OPENING) // self.worker.piece_chars)
        doc = self.verify(item_id)
        self.assertEqual((doc["verdict"], doc["exact"]), ("VERIFIED", True))

    def test_run_then_verify_on_one_box(self):
        item_id = self.run_job(server=self.ollama)
        self.assertEqual(self.verify(item_id)["verdict"], "VERIFIED")  # the numerics agree
        self.ollama.split_ties = {5}  # they do not: the re-run's prompt came from the cache of the run
        doc = self.verify(item_id, code=1)
        self.assertEqual((doc["cause"]["kind"], doc["refuted"]), ("near-tie", False))
        self.assertEqual(self.verify(item_id, "--tolerance", "0.5")["verdict"], "VERIFIED")

    def test_a_request_between_two_checks_does_not_make_the_second_a_fresh_one(self):
        self.ollama.split_ties = {5}
        item_id = self.run_job()
        self.assertEqual(self.verify(item_id)["verdict"], "VERIFIED")
        # a request that shares only the template's opening, as measured on llama.cpp (make realmodel): the
        # server that evaluated the prompt once evaluates it otherwise after, whatever came between
        wl_infer.Ollama(self.ollama.address).generate(wl_infer.make_job("Something else.", "llama3.2:1b"), top=None)
        doc = self.verify(item_id, code=1)
        self.assertEqual((doc["cause"]["kind"], doc["refuted"]), ("near-tie", False))

    def test_verify_twice_in_a_row_and_the_cause_says_how_each_server_evaluated_the_prompt(self):
        self.ollama.split_ties = {5}
        item_id = self.run_job()
        first = self.verify(item_id)
        total = self.ollama.tokens(render_template(self.PROMPT))
        self.assertEqual((first["verdict"], first["local"]["prompt_eval_count"]), ("VERIFIED", total))
        second = self.verify(item_id, code=1)  # the first check left the prompt in the cache
        self.assertEqual((second["cause"]["kind"], second["refuted"]), ("near-tie", False))
        self.assertIsNone(second["local"]["prompt_eval_count"])  # the re-run stopped before Ollama counts
        worker_count = second["evidence"]["prompt_eval_count"]
        self.assertEqual(worker_count, total)
        self.assertEqual((second["cause"]["worker_prompt_eval_count"], second["cause"]["prompt_tokens_estimated"]),
                         (worker_count, int(len(render_template(self.PROMPT)) / 4)))
        self.assertIn("the worker's server evaluated %d tokens of the prompt, as a fresh one does: if this server "
                      "has run or checked this job before, the prompt came from its cache" % total,
                      second["cause"]["message"])
        self.assertEqual(self.verify(item_id, "--tolerance", "0.5")["verdict"], "VERIFIED")
        code, out, err = self.cli("audit", "--reject")
        self.assertEqual(code, 1, err)
        self.assertIn("kept in review (not a refutation)", out)  # a cache split is never refuted
        self.assertEqual(self.board.item(item_id)["status"], "in_review")

    def test_an_audit_over_many_items_on_one_server(self):
        ids = [self.run_job("job %d" % n) for n in range(3)]  # default answers: no near-tie to flip
        self.worker.split_ties = {5}
        client = wl_infer.Ollama(self.worker.address)
        client.generate(wl_infer.make_job(self.PROMPT, "llama3.2:1b", max_tokens=64), top=None)  # its history
        split = self.run_job()  # its server had the prompt cached: the runner-up at the near-tie
        evidence = self.evidence(split)
        self.assertEqual(evidence["prompt_eval_count"], 1)
        code, out, err = self.cli("--json", "audit", "--reject")
        docs = dict((d["id"], d) for d in json.loads(out))
        self.assertEqual(code, 1, err)
        self.assertEqual([docs[i]["verdict"] for i in ids], ["VERIFIED"] * 3)
        cause = docs[split]["cause"]
        self.assertEqual((docs[split]["verdict"], cause["kind"], docs[split]["action"]),
                         ("MISMATCH", "near-tie", "kept in review (not a refutation)"))
        self.assertIn("the worker's server evaluated 1 token of the prompt's about %d (the rest came from its "
                      "prompt cache" % int(len(render_template(self.PROMPT)) / 4), cause["message"])
        code, out, err = self.cli("--json", "audit", "--tolerance", "0.5", "--accept")
        self.assertEqual(code, 0, err)
        self.assertEqual(sorted(d["verdict"] for d in json.loads(out)), ["VERIFIED"] * 4)


class SampledVerificationTest(CliTest):
    """verify/audit --sample K --window L: K windows re-generated instead of
    the whole output; VERIFIED with a coverage, never exact."""

    PROMPT = "count to two hundred"
    WORDS = "".join(" w%03d" % i for i in range(200))  # 200 tokens of " w000" (5 characters)

    def setUp(self):
        super(SampledVerificationTest, self).setUp()
        self.ollama.piece_chars = 5
        self.ollama.outputs[("llama3.2:1b", self.PROMPT)] = self.WORDS

    def honest(self, max_tokens=0, *run_args):
        item_id = self.board.add(self.job(self.PROMPT, max_tokens=max_tokens))
        code, out, err = self.cli("run", item_id, "--json", *run_args, env=self.env(FAKE_WL_RIG="carol"))
        self.assertEqual(code, 0, err)
        return item_id, json.loads(out)["evidence"]

    def verify(self, item_id, *extra, code=0):
        result = self.cli("verify", item_id, "--json", *extra)
        self.assertEqual(result[0], code, result)
        return json.loads(result[1])

    def forged(self, output, lengths, max_tokens=0):
        """A completion whose token_lengths agree with its (forged) output."""
        job = wl_infer.make_job(self.PROMPT, "llama3.2:1b", max_tokens=max_tokens)
        evidence = dict(wl_infer.make_evidence(job, output), token_lengths=lengths)
        return self.completed(self.PROMPT, evidence=wl_infer.encode_evidence(evidence))

    def test_windows_are_first_last_and_random_reproducible_with_a_seed(self):
        item_id, evidence = self.honest()
        self.assertEqual(len(evidence["token_lengths"]), 200)
        before = len(self.ollama.generate_requests())
        doc = self.verify(item_id, "--sample", "4", "--window", "8", "--sample-seed", "7")
        self.assertEqual((doc["verdict"], doc["sampled"], doc["exact"], doc["sample_seed"]),
                         ("VERIFIED", True, False, 7))
        windows = doc["windows"]
        starts = [w["start_token_index"] for w in windows]
        self.assertEqual(len(windows), 4)
        self.assertEqual((starts[0], starts[-1] + windows[-1]["tokens"]), (0, 200))  # the start and the end
        self.assertEqual([w["tokens"] for w in windows], [8, 8, 8, 8])
        self.assertEqual(starts, sorted(starts))
        self.assertTrue(all(b - a >= 8 for a, b in zip(starts, starts[1:])), starts)  # no overlap
        self.assertEqual([w["start_char"] for w in windows], [5 * t for t in starts])
        self.assertEqual((doc["tokens_checked"], doc["submitted_tokens"], doc["coverage"]), (32, 200, 0.16))
        self.assertEqual((doc["actual_hash"], doc["output"]), (None, None))
        # the requests: the render, then one per window, raw from the output before it; no logprobs anywhere
        requests = self.ollama.generate_requests()[before:]
        self.assertFalse(any(r.get("logprobs") for r in requests), requests)
        windows_asked = [r for r in requests if not r.get("_debug_render_only")]
        self.assertEqual([r["options"].get("num_predict") for r in windows_asked], [8, 8, 8, None])
        head = render_template(self.PROMPT)
        self.assertEqual([r.get("raw", False) and r["prompt"][len(head):] for r in windows_asked],
                         [False] + [self.WORDS[:w["start_char"]] for w in windows[1:]])
        self.assertEqual(self.verify(item_id, "--sample", "4", "--window", "8", "--sample-seed", "7")["windows"],
                         windows)  # anyone can re-check the same windows
        other = self.verify(item_id, "--sample", "4", "--window", "8", "--sample-seed", "8")["windows"]
        self.assertNotEqual([w["start_token_index"] for w in other], starts)
        drawn = self.verify(item_id, "--sample", "4", "--window", "8")
        self.assertIsInstance(drawn["sample_seed"], int)  # drawn from the system's CSPRNG, and told
        code, out, err = self.cli("verify", item_id, "--sample", "4", "--window", "8", "--sample-seed", "7")
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith("✓ VERIFIED by sampling (4 windows, 32 of 200 tokens checked, coverage "
                                       "16.0%)"), out)
        self.assertIn("not an exact verification", out)
        self.assertIn("--sample 4 --window 8 --sample-seed 7", out)
        self.assertIn("  Windows:   tokens 0-8, ", out)

    def test_an_edit_inside_a_window_is_caught_and_one_outside_every_window_is_not_seen(self):
        item_id, evidence = self.honest()
        windows = self.verify(item_id, "--sample", "3", "--window", "8", "--sample-seed", "3")["windows"]
        inside = windows[1]["start_token_index"] + 4
        starts = [w["start_token_index"] for w in windows]
        gap = next(t for t in range(8, 200) if all(not start <= t < start + 8 for start in starts))
        for token, verdict in ((inside, "MISMATCH"), (gap, "VERIFIED")):
            with self.subTest(token=token):
                edited = self.WORDS[:5 * token] + " x999" + self.WORDS[5 * token + 5:]
                doc = self.verify(self.forged(edited, evidence["token_lengths"]), "--sample", "3", "--window", "8",
                                  "--sample-seed", "3", code=0 if verdict == "VERIFIED" else 1)
                self.assertEqual(doc["verdict"], verdict)
        # inside: the window re-generates the token and differs from it there; outside: each later
        # window's prompt holds the edit, but this model (like a real one, often) goes on as before, so
        # it is not seen, and the coverage counts only the windows' own tokens
        self.assertEqual((doc["coverage"], doc["tokens_checked"]), (0.12, 24))
        mismatch = self.verify(self.forged(self.WORDS[:5 * inside] + " x999" + self.WORDS[5 * inside + 5:],
                                           evidence["token_lengths"]), "--sample", "3", "--window", "8",
                               "--sample-seed", "3", code=1)
        self.assertEqual((mismatch["diverged_at"]["char"], mismatch["diverged_at"]["token_index"]),
                         (5 * inside + 1, inside))
        rerun = next(c for c in mismatch["checks"] if c["name"] == "rerun")
        self.assertIn("in window 2 of the sample", rerun["message"])

    def test_the_end_is_checked_a_claim_cut_short_is_refuted(self):
        item_id, evidence = self.honest(max_tokens=200)
        self.assertEqual(evidence["done_reason"], "length")
        before = len(self.ollama.generate_requests())
        doc = self.verify(item_id, "--sample", "4", "--window", "8", "--sample-seed", "5")
        last = [r for r in self.ollama.generate_requests()[before:] if not r.get("_debug_render_only")][-1]
        budget_left = 200 - doc["windows"][-1]["start_token_index"]
        self.assertEqual(last["options"]["num_predict"], budget_left)
        cut = self.forged(self.WORDS[:600], evidence["token_lengths"][:120], max_tokens=200)  # 60%, consistent
        doc = self.verify(cut, "--sample", "4", "--window", "8", code=1)
        self.assertEqual((doc["diverged_at"]["char"], doc["refuted"]), (600, True))  # the model goes on
        pasted = self.WORDS[:500] + "".join(" z%03d" % i for i in range(100))
        doc = self.verify(self.forged(pasted, evidence["token_lengths"], max_tokens=200), "--sample", "4",
                          "--window", "8", code=1)
        self.assertEqual(doc["verdict"], "MISMATCH")  # the last window re-generates the end

    def test_go_evidence_is_sampled_by_words_unless_its_end_cannot_be_checked(self):
        go = wl_infer.encode_go_json({"output": self.WORDS, "output_hash": wl_infer.output_hash(self.WORDS),
                                      "model": "llama3.2:1b", "seed": 42})
        item_id = self.completed(self.PROMPT, evidence=go)
        doc = self.verify(item_id, "--sample", "4", "--window", "8", "--sample-seed", "1")
        self.assertEqual((doc["verdict"], doc["sampled"]), ("VERIFIED", True))
        self.assertEqual([w["start_token_index"] for w in doc["windows"]], [None] * 4)  # no token count in the evidence
        self.assertEqual(doc["windows"][0]["start_char"], 0)
        self.assertTrue(all(self.WORDS[w["start_char"]] == " " for w in doc["windows"]))  # before a space
        self.assertEqual(doc["submitted_tokens"], 200)  # estimated from the last window's characters per token
        capped = wl_infer.make_job(self.PROMPT, "llama3.2:1b", max_tokens=200)
        item_id = self.board.add(wl_infer.encode_job(capped))
        self.assertEqual(self.board.wl("claim", item_id, rig="carol").returncode, 0)
        self.assertEqual(self.board.wl("done", item_id, "--evidence=" + go, rig="carol").returncode, 0)
        doc = self.verify(item_id, "--sample", "4")
        self.assertEqual((doc["verdict"], doc["sampled"], doc["exact"]), ("VERIFIED", False, True))
        note = next(c for c in doc["checks"] if c["name"] == "sample")
        self.assertIn("not sampled: the output may end at max_tokens, and the evidence gives no token count",
                      note["message"])
        short = self.verify(self.completed("short"), "--sample", "4")  # 18 tokens: cheaper whole
        self.assertIn("the output is short", next(c for c in short["checks"] if c["name"] == "sample")["message"])

    def test_tolerance_applies_inside_windows(self):
        text = TolerantVerificationTest.TEXT * 3
        ties = dict((i, 0.2) for i in range(3, 75, 10))
        self.ollama.scripts[("llama3.2:1b", "other")] = ScriptedModel(text, ties)
        item_id = self.board.add(self.job("other"))
        self.ollama.flips = set(ties)  # "other hardware"
        code, out, err = self.cli("run", item_id, env=self.env(FAKE_WL_RIG="bob"))
        self.ollama.flips = set()
        self.assertEqual(code, 0, err)
        args = ("--sample", "3", "--window", "12", "--sample-seed", "2")
        exact = self.verify(item_id, *args, code=1)
        self.assertEqual((exact["cause"]["kind"], exact["refuted"]), ("near-tie", False))
        doc = self.verify(item_id, *args, "--tolerance", "0.5")
        self.assertEqual((doc["verdict"], doc["sampled"], doc["exact"]), ("VERIFIED", True, False))
        self.assertTrue(doc["forced"], doc)
        starts = [(w["start_token_index"], w["start_token_index"] + w["tokens"]) for w in doc["windows"]]
        for step in doc["forced"]:  # tokens of the whole output, inside a window
            self.assertIn(step["token_index"], ties)
            self.assertTrue(any(a <= step["token_index"] < b for a, b in starts), (step, starts))

    def test_audit_samples_and_says_so_when_it_accepts(self):
        item_id, _ = self.honest()
        code, out, err = self.cli("audit", "--sample", "4", "--window", "8", "--sample-seed", "9", "--accept")
        self.assertEqual(code, 0, err)
        row = next(ln for ln in out.splitlines() if ln.startswith(item_id)).split()
        self.assertEqual(row[2:5], ["VERIFIED", "sampled:", "16%"])
        accept = next(c["argv"] for c in self.board.calls() if c["argv"][:2] == ["accept", item_id])
        self.assertIn("--message=verified by wl_infer by sampling (4 windows, 16.0% coverage, --sample-seed 9): "
                      "sha256:", " ".join(accept))

    def test_logprobs_are_asked_only_where_they_are_needed(self):
        before = len(self.ollama.generate_requests())
        item_id, evidence = self.honest()
        run, = self.ollama.generate_requests()[before:]
        self.assertEqual((run["logprobs"], run["top_logprobs"]), (True, 2))  # run records them by default
        item_id, evidence = self.honest(0, "--no-logprobs")
        self.assertNotIn("logprobs", self.ollama.generate_requests()[-1])
        self.assertNotIn("logprobs", evidence)
        self.assertEqual(len(evidence["token_lengths"]), 200)  # one chunk per token: the boundaries are known
        before = len(self.ollama.generate_requests())
        self.verify(item_id)
        self.verify(item_id, "--sample", "4")
        self.assertFalse(any(r.get("logprobs") for r in self.ollama.generate_requests()[before:]))
        self.verify(self.honest()[0], "--strict")
        self.assertTrue(self.ollama.generate_requests()[-1]["logprobs"])  # --strict compares them

    def test_option_errors(self):
        item_id, _ = self.honest()
        self.assertError(self.cli("verify", item_id, "--window", "8"), "--window and --sample-seed need --sample K")
        self.assertError(self.cli("verify", item_id, "--sample-seed", "1"), "need --sample K")
        self.assertError(self.cli("verify", item_id, "--sample", "4", "--strict"), "cannot be sampled")
        self.assertError(self.cli("verify", item_id, "--sample", "1"), "at least 2 windows")
        self.assertError(self.cli("audit", "--sample", "0"), "--sample")


class StatusCommandTest(CliTest):
    def test_status_json_document(self):
        item_id = self.completed()
        code, out, err = self.cli("status", item_id, "--json")
        self.assertEqual(code, 0, err)
        doc = json.loads(out)
        self.assertEqual(set(doc), {"id", "title", "status", "type", "posted_by", "claimed_by", "job",
                                    "description", "completion"})
        self.assertEqual((doc["status"], doc["type"], doc["posted_by"], doc["claimed_by"]),
                         ("in_review", "inference", "poster", "carol"))
        self.assertEqual(doc["job"]["model"], "llama3.2:1b")
        self.assertEqual(doc["completion"]["completed_by"], "carol")
        self.assertEqual(doc["completion"]["evidence"]["output"], default_output("llama3.2:1b", "what is 1+1"))
        self.assertEqual(json.loads(doc["completion"]["raw"]), doc["completion"]["evidence"])
        self.assertEqual([(c["name"], c["ok"]) for c in doc["completion"]["checks"]],
                         [("decodes", True), ("self-consistent", True), ("binding", True)])
        self.assertEqual(self.ollama.requests, [])  # status never touches the model

    def test_status_shows_provenance_and_the_cheap_checks(self):
        item_id = self.board.add(self.job())
        self.assertEqual(self.cli("run", item_id)[0], 0)
        del self.ollama.requests[:]
        code, out, err = self.cli("status", item_id)
        self.assertEqual(code, 0, err)
        for fragment in ("Model digest: sha256:a80c4f17acd5", "Ollama:       0.12.11",
                         "Tokens:       18 at 1000.00 tokens/s, done: stop", "Logprobs:     18 tokens",
                         "Checks (without running the model):", "✓ output hashes to output_hash",
                         "✓ model and seed match the job"):
            self.assertIn(fragment, out)
        evidence = wl_infer.make_evidence(wl_infer.make_job("what is 1+1", "llama3.2:1b", 7), "forged")
        evidence["output_hash"] = wl_infer.output_hash("other")
        code, out, err = self.cli("status", self.completed(evidence=wl_infer.encode_evidence(evidence)))
        self.assertIn("Provenance:  none recorded (evidence in the Go wl infer format)", out)
        self.assertIn("✗ evidence is inconsistent: output does not hash to output_hash", out)
        code, out, err = self.cli("status", self.completed(evidence=wl_infer.encode_evidence(
            wl_infer.make_evidence(wl_infer.make_job("what is 1+1", "llama3.2:1b", 7), "forged"))))
        self.assertIn("✗ the evidence is not for this job: evidence seed 7, job seed 42", out)
        self.assertEqual(self.ollama.requests, [])  # never the model

    def test_status_of_an_open_item_and_an_undecodable_one(self):
        item_id = self.board.add("not json at all")
        code, out, err = self.cli("status", item_id)
        self.assertEqual(code, 0, err)
        self.assertIn("does not decode (%s: job is not valid JSON" % item_id, out)
        self.assertIn("Description: not json at all", out)
        code, out, err = self.cli("status", item_id, "--json")
        doc = json.loads(out)
        self.assertEqual((doc["job"], doc["completion"], doc["description"]), (None, None, "not json at all"))


class WorkerTest(WorkTest):
    def test_eligible_jobs_run_by_priority_the_rest_skipped_with_reasons_never_claimed(self):
        older = self.add("older, priority 2")
        urgent = self.add("urgent", priority=1)
        newer = self.add("newer, priority 2")
        low = self.add("low", priority=3)
        skipped = {
            self.add(description="what is 1+1"): "job is not valid JSON",
            self.add("absent model", model="mistral:7b"): "model mistral:7b not available",
            self.add("other model", model="qwen2.5:0.5b"): "model qwen2.5:0.5b is not in --models",
            self.add("pinned", model_digest="f" * 64): "model llama3.2:1b here is not the pinned sha256:ffffffffffff",
            self.add("uncapped", max_tokens=0): "max_tokens 0 (the model's default) could run for hours; "
                                                "--allow-uncapped takes it",
            self.add("long", max_tokens=5000): "max_tokens 5000 is over --max-tokens-cap 4096",
            self.add("x" * 101): "prompt of 101 bytes is over --max-prompt-bytes 100",
        }
        code, out, err = self.work("--once", "--models", "llama3.2:1b,mistral:7b", "--max-prompt-bytes", "100",
                                   "--json")
        self.assertEqual(code, 0, err)
        claims = self.claims()  # within a priority, in this worker's own order (workers spread)
        self.assertEqual((claims[0], set(claims[1:3]), claims[3:]), (urgent, {older, newer}, [low]))
        for item_id in (urgent, older, newer, low):
            self.assertEqual(self.status(item_id), "in_review")
            self.assertIn("done %s " % item_id, err)
        for item_id, reason in skipped.items():
            self.assertIn("skipped %s (%s" % (item_id, reason), err)
            self.assertEqual(self.status(item_id), "open")
        # the floor: one browse per poll, then claim and done per job (no wl status)
        self.assertEqual(sorted(self.board.commands(rig=self.rig)), ["browse"] + ["claim"] * 4 + ["done"] * 4)
        doc = json.loads(out)
        self.assertEqual([doc[k] for k in ("done", "failed", "skipped", "lost")], [4, 0, 7, 0])
        self.assertEqual([j["result"] for j in doc["jobs"]], ["done"] * 4)
        self.assertEqual(doc["servers"][0]["jobs"], 4)

    def test_a_claim_lost_to_another_worker_is_logged_and_the_next_job_taken(self):
        first, second = self.add("first"), self.add("second")
        self.board.fail("claim", message='wanted item "w-0" is not open or does not exist', times=1)
        code, out, err = self.work("--once", "--json")
        self.assertEqual(code, 0, err)
        lost = next(c["argv"][1] for c in self.board.calls() if c["argv"][0] == "claim")
        self.assertIn("lost %s to another worker (wl claim failed: wanted item \"w-0\" is not open or does not "
                      "exist); looking at the board again" % lost, err)
        # not the next item of a stale list: one fresh browse, then the other job (the lost one is another
        # worker's, even where this board still lists it as open)
        self.assertEqual(self.board.commands(rig=self.rig)[:4], ["browse", "claim", "browse", "claim"])
        other = second if lost == first else first
        self.assertEqual((self.status(lost), self.status(other)), ("open", "in_review"))
        self.assertNotIn("unclaim", self.board.commands())
        self.assertEqual(json.loads(out)["lost"], 1)

    def test_a_board_that_keeps_listing_a_lost_job_as_open_does_not_keep_the_worker_looking(self):
        ids = [self.add("first"), self.add("second")]
        self.board.fail("claim", message='wanted item "w-0" is not open or does not exist')  # every claim, always
        code, out, err = self.work("--once", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["lost"], 2)
        # one fresh look after each loss, each without the jobs already lost; then --once ends
        self.assertEqual(self.board.commands(rig=self.rig), ["browse", "claim", "browse", "claim", "browse"])
        self.assertEqual(sorted(self.claims()), sorted(ids))

    def test_a_poison_job_is_tried_three_times_with_growing_delay_then_left_alone(self):
        poison, good = self.add("poison"), self.add("good")
        self.ollama.fail_prompts["poison"] = (500, "llama runner process has terminated: signal: segmentation fault")
        proc = self.start()
        try:
            gave_up = "skipped %s (failed 3 times; not tried again by workers on this box)" % poison
            wait_for(lambda: proc.log.has(gave_up),
                     "the worker to give up on the poison job")
        except AssertionError:
            raise AssertionError("no give-up; wl calls %s; log %s" % (self.board.started(), proc.log.lines))
        proc.send_signal(signal.SIGTERM)
        code, out, err = self.finish(proc)
        self.assertEqual(code, 0, err)
        self.assertEqual(self.generated("poison"), 3)
        self.assertEqual(self.generated("good"), 1)
        self.assertEqual(self.claims().count(poison), 3)
        self.assertEqual(err.count("failed %s: Ollama at" % poison), 3, err)
        self.assertIn("segmentation fault (HTTP 500); the claim on %s was released" % poison, err)
        self.assertEqual((self.status(poison), self.status(good)), ("open", "in_review"))
        # each retry waits longer than the one before: --interval x 2, then x 4
        for fragment in ("failure 1 of 3: tried again in 0.1 s at the earliest",
                         "failure 2 of 3: tried again in 0.2 s at the earliest",
                         "failure 3 of 3: not tried again by workers on this box"):
            self.assertEqual(err.count(fragment), 1, err)

    def test_under_cron_each_run_remembers_failures_and_skips_from_the_last(self):
        poison, uncapped = self.add("poison"), self.add("uncapped", max_tokens=0)
        self.ollama.fail_prompts["poison"] = (500, "model runner crashed")
        memory = os.path.join(self.state_home, "wl-infer", "work.json")
        errs = []
        for failure in (1, 2, 3):
            code, out, err = self.work("--once")
            self.assertEqual(code, 2, err)  # it failed every job it took: cron hears of it
            self.assertIn("failed %s: Ollama at " % poison, err)
            self.assertIn("failure %d of 3" % failure, err)
            self.assertIn("work --once: every job it took failed (exit 2)", err)
            errs.append(err)
            wait_for(lambda: wl_infer.WorkerMemory(memory).failed(poison)[1] == 0,
                     "the poison job's next try to be due")
        self.assertEqual([e.count("skipped %s (max_tokens 0" % uncapped) for e in errs], [1, 0, 0])
        code, out, err = self.work("--once")
        self.assertEqual(code, 0, err)  # nothing taken, nothing failed
        self.assertIn("skipped %s (failed 3 times; not tried again by workers on this box)" % poison, err)
        code, out, err = self.work("--once")
        self.assertNotIn("skipped %s" % poison, err)  # said once per job, not once per run
        self.assertIn("work: 0 done, 0 failed, 2 skipped", err)
        self.assertEqual(self.claims().count(poison), 3)

    def test_at_start_an_ignored_sigint_and_models_no_server_has_are_said(self):
        self.add()
        ignored = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                   "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")
        proc = subprocess.run([sys.executable, "-c", ignored, WL_INFER, "work", "--once"], env=self.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertRegex(proc.stderr.splitlines()[0], r"SIGINT is ignored \(a shell does that to `work &` in a "
                                                      r"script\), so Ctrl-C and kill -INT do nothing: stop this "
                                                      r"worker with SIGTERM \(kill \d+\)")
        self.assertNotIn("SIGINT is ignored", self.work("--once")[2])
        calls = len(self.board.calls())
        self.assertError(self.cli("work", "--models", "nosuch:7b,other:1b"),
                         "none of --models is in an Ollama here: nosuch:7b, other:1b; http://%s has llama3.2:1b, "
                         "qwen2.5:0.5b (pull one with `ollama pull nosuch:7b`)" % self.ollama.address)
        self.assertEqual(len(self.board.calls()), calls)  # refused before any wl call
        code, out, err = self.work("--once", "--models", "nosuch:7b,llama3.2:1b")
        self.assertEqual(code, 0, err)
        self.assertIn("--models: no Ollama here (http://%s) has nosuch:7b; its jobs are skipped" % self.ollama.address,
                      err)

    def test_the_log_and_the_status_line_give_the_same_rate_and_say_which_it_is(self):
        item_id = self.add("count to twenty", max_tokens=20)
        self.ollama.piece_delay = 0.02
        code, out, err = self.work("--once")
        self.assertEqual(code, 0, err)
        found = re.search(r"done %s (\d+) tokens in ([\d.]+) s \(([\d.]+) tok/s received\)" % item_id, err)
        self.assertIsNotNone(found, err)
        tokens, rate = int(found.group(1)), float(found.group(3))
        [stream] = [x for x in self.ollama.streams if x["prompt"] == "count to twenty"]
        self.assertEqual(tokens, stream["sent"])
        # received since the request: never faster than the stream the fake sent, whatever the machine's load
        self.assertLessEqual(rate, tokens / (stream["final"] - stream["start"]))
        evidence = wl_infer.decode_evidence(self.board.item(item_id)["completion"]["evidence"])
        self.assertEqual(evidence["tokens_per_s"], 50.0)  # Ollama's own rate: 20 tokens in its 0.4 s of generation

    def test_a_result_wl_would_not_take_is_kept_and_submitted_next_time_without_generating(self):
        item_id = self.add()
        self.board.fail("done", message='wanted item "%s" is not claimed by "bob" or does not exist' % item_id,
                        times=1)
        code, out, err = self.work("--max-jobs", "2", "--json")
        self.assertEqual(code, 0, err)
        self.assertIn("failed %s: wl done failed: wanted item" % item_id, err)
        self.assertIn("the result is kept in", err)
        self.assertIn("done %s (the kept result, submitted without generating again)" % item_id, err)
        self.assertEqual(self.status(item_id), "in_review")
        self.assertEqual(self.generated("what is 1+1"), 1)
        self.assertEqual([j["result"] for j in json.loads(out)["jobs"]], ["failed", "done"])

    def test_wl_failing_for_a_while_is_backed_off_and_said_then_work_resumes(self):
        item_id = self.add()
        self.board.fail("browse", message="dial tcp: lookup www.dolthub.com: no such host", times=2)
        code, out, err = self.work("--max-jobs", "1")
        self.assertEqual(code, 0, err)
        self.assertIn("wl is failing (wl browse failed: dial tcp: lookup www.dolthub.com: no such host); "
                      "trying again in 0.1 s", err)
        self.assertIn("trying again in 0.2 s", err)
        self.assertIn("wl works again", err)
        self.assertEqual(self.status(item_id), "in_review")

    def test_once_with_wl_or_ollama_unusable_is_an_error(self):
        self.add()
        self.board.fail("browse", message="dial tcp: lookup www.dolthub.com: no such host", times=1)
        self.assertError(self.work("--once"), "wl browse failed: dial tcp: lookup www.dolthub.com: no such host")
        self.assertError(self.work("--once", env=self.env(OLLAMA_HOST="127.0.0.1:9")),
                         "cannot reach Ollama at http://127.0.0.1:9")
        self.assertNotIn("claim", self.board.commands())

    def test_first_signal_finishes_the_job_in_flight_and_releases_the_one_claimed_ahead(self):
        ids = [self.add("first"), self.add("second")]
        self.ollama.gate = threading.Event()  # the first generation waits for it before it ends
        proc = self.start()
        wait_for(lambda: len(self.claims()) == 2 and self.ollama.generating.is_set(),
                 "the first job generating and the second claimed ahead")
        first, second = self.claims()  # in the worker's own order
        self.assertEqual(set(ids), {first, second})
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: proc.log.has("stopping: no new jobs"), "the worker to say it stops")
        self.ollama.gate.set()
        code, out, err = self.finish(proc)
        self.assertEqual(code, 0, err)
        self.assertEqual((self.status(first), self.status(second)), ("in_review", "open"))
        self.assertIn("released %s: the claim on %s was released" % (second, second), err)
        self.assertEqual(self.generated("second" if second == ids[1] else "first"), 0)
        self.assertIn("work: 1 done, 0 failed", err)

    def test_second_signal_aborts_the_job_in_flight_and_releases_its_claim(self):
        item_id = self.add()
        self.ollama.stall_after = 2  # a generation that would go on for the whole --timeout
        proc = self.start()
        wait_for(self.ollama.generating.is_set, "the generation")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: proc.log.has("stopping: no new jobs"), "the first signal to be taken")
        proc.send_signal(signal.SIGINT)
        code, out, err = self.finish(proc)
        self.assertEqual(code, 130, err)
        self.assertIn("aborting: stopping the generation in flight", err)
        self.assertIn("released %s, stopped by the signal: " % item_id, err)  # not a failure of the job
        self.assertNotIn("failed %s" % item_id, err)
        self.assertIn("the claim on %s was released and the job is open again" % item_id, err)
        self.assertEqual(self.status(item_id), "open")
        self.assertIn("work: 0 done, 0 failed", err)
        self.assertEqual(wl_infer.WorkerMemory(os.path.join(self.state_home, "wl-infer", "work.json")).failed(item_id),
                         (0, 0.0))  # nothing counted against the job

    def test_a_third_signal_exits_at_once_naming_the_claims_that_may_be_held(self):
        item_id = self.add()
        self.ollama.stall_after = 2
        self.board.fail("unclaim", delay=60, times=1)  # the release after the abort hangs
        self.addCleanup(self.board.stop_calls)  # wl_infer leaves it running, as it says
        proc = self.start()
        wait_for(self.ollama.generating.is_set, "the generation")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: proc.log.has("stopping: no new jobs"), "the first signal to be taken")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "unclaim" in self.board.started(), "the release")
        proc.send_signal(signal.SIGTERM)
        code, out, err = self.finish(proc)
        self.assertEqual(code, 130, err)
        self.assertIn("wl_infer: interrupted; stopped at once: jobs that may still be claimed by you: %s; "
                      "check them with `wl status ID` and release them with `wl unclaim ID`" % item_id, err)

    def test_two_servers_each_generate_one_job_at_a_time(self):
        other = FakeOllama().start()
        self.addCleanup(other.stop)
        for flags, env in ((["--ollama", self.ollama.address, "--ollama", other.address], None),
                           ([], self.env(OLLAMA_HOST="%s,%s" % (self.ollama.address, other.address)))):
            for ollama in (self.ollama, other):
                ollama.gate = threading.Event()  # each server's first job holds until both have one
            ids = [self.add("job %d" % i) for i in range(4)]
            before = [len(o.streams) for o in (self.ollama, other)]
            proc = self.start("--once", "--json", *flags, env=env)
            wait_for(lambda before=before: all(len(o.streams) > n and not o.streams[n]["ended"].is_set()
                                               for o, n in zip((self.ollama, other), before)),
                     "a generation on each server at once")
            for ollama in (self.ollama, other):
                ollama.gate.set()
            code, out, err = self.finish(proc)
            self.assertEqual(code, 0, err)
            self.assertEqual([self.status(i) for i in ids], ["in_review"] * 4)
            self.assertEqual(sum(s["jobs"] for s in json.loads(out)["servers"]), 4)
        for ollama in (self.ollama, other):
            streams = sorted(ollama.streams, key=lambda s: s["start"])
            for a, b in zip(streams, streams[1:]):
                self.assertLessEqual(a["end"], b["start"], "two generations at once on one server")

    def test_board_calls_overlap_generation_with_at_most_one_job_claimed_ahead(self):
        self.ollama.gates = {0: threading.Event(), 1: threading.Event()}
        ids = [self.add("job %d" % i) for i in range(4)]
        proc = self.start("--once", "--json")
        # job 1 is claimed while job 0 is still generating ...
        wait_for(lambda: len(self.claims()) == 2 and len(self.ollama.streams) == 1, "a claim during a generation")
        self.ollama.gates[0].set()
        # ... and job 0 is submitted while job 1 generates (in the worker's own order)
        wait_for(lambda: self.status(self.claims()[0]) == "in_review", "a submission during a generation")
        self.assertEqual((len(self.ollama.streams), self.ollama.streams[1]["ended"].is_set()), (2, False))
        self.ollama.gates[1].set()
        code, out, err = self.finish(proc)
        self.assertEqual(code, 0, err)
        self.assertEqual([self.status(i) for i in ids], ["in_review"] * 4)
        calls = [c for c in self.board.calls() if c["argv"][0] == "claim"]
        for call in calls:  # when a claim ends, every job claimed before it is generating already
            claimed = len([c for c in calls if c["end"] <= call["end"]])
            # a generation has started when its request reaches the server (its stream begins a little later)
            asked = [r["start"] for r in self.ollama.requests if r["path"] == "/api/generate"]
            started = len([t for t in asked if t <= call["end"]])
            self.assertLessEqual(claimed - started, 1, "more than one job claimed ahead")


class FleetTest(WorkTest):
    """Several `work --once` processes (distinct rigs) on one board; every
    count comes from the fake wl's call log, never from timings."""

    def fleet(self, rigs, wl_delay=0.1):
        """Run one `work --once --json` per rig at once, each wl call taking `wl_delay`
        seconds: {rig: its --json summary}."""
        for command in ("browse", "claim", "done", "unclaim", "status"):
            self.board.fail(command, delay=wl_delay)  # and then runs normally: a slow board
        self.ollama.piece_delay = 0.01  # a job generates for about 0.2 s
        procs = dict((rig, self.start("--once", "--json", env=self.env(FAKE_WL_RIG=rig))) for rig in rigs)
        found = {}
        for rig, proc in procs.items():
            code, out, err = self.finish(proc)
            self.assertEqual(code, 0, err)
            found[rig] = json.loads(out)
        return found

    def test_every_job_once_few_lost_races_fair_shares_and_a_fresh_look_after_a_loss(self):
        ids = [self.add("job %d" % n) for n in range(16)]
        rigs = ["w%d" % n for n in range(4)]
        docs = self.fleet(rigs)
        calls = [c for c in self.board.calls() if c["rig"] in rigs]
        done = [c["argv"][1] for c in calls if c["argv"][0] == "done" and c["exit"] == 0]
        self.assertEqual(sorted(done), sorted(ids))  # every job done, exactly once
        self.assertTrue(all(self.status(i) == "in_review" for i in ids))
        self.assertNotIn("unclaim", [c["argv"][0] for c in calls])  # no claim left to release
        claims = [c for c in calls if c["argv"][0] == "claim"]
        self.assertLessEqual(len(claims), 2 * len(ids), "claim attempts")
        # the calls in all, by their causes (how many races are lost depends on the machine's load): a done
        # per job, a claim per job and per race lost, and a browse per worker and per race lost (a fresh look)
        by_command = collections.Counter(c["argv"][0] for c in calls)
        lost = len([c for c in claims if c["exit"] != 0])
        self.assertEqual(set(by_command), {"browse", "claim", "done"})
        self.assertEqual((by_command["done"], by_command["claim"]), (len(ids), len(ids) + lost))
        self.assertLessEqual(by_command["browse"], len(rigs) + lost, by_command)
        shares = dict((rig, docs[rig]["done"]) for rig in rigs)
        self.assertEqual(sum(shares.values()), len(ids))
        self.assertTrue(all(n >= 1 for n in shares.values()) and max(shares.values()) <= 2 * len(ids) // len(rigs),
                        shares)  # nobody idle while another takes more than twice its fair share
        self.assertEqual(sum(d["lost"] for d in docs.values()), len([c for c in claims if c["exit"] != 0]))
        for rig in rigs:  # each reports its own wl calls, and per job
            own = [c for c in calls if c["rig"] == rig]
            self.assertEqual((docs[rig]["wl_calls"], docs[rig]["wl_calls_per_job"]),
                             (len(own), round(len(own) / shares[rig], 2)))
            looks = sorted((c for c in own if c["argv"][0] in ("browse", "claim")), key=lambda c: c["start"])
            for before, after in zip(looks, looks[1:]):  # after a lost race: one fresh browse, not a stale item
                if before["argv"][0] == "claim" and before["exit"] != 0:
                    self.assertEqual(after["argv"][0], "browse", [c["argv"][:2] for c in looks])

    def test_urgent_jobs_are_claimed_first(self):
        urgent = [self.add("urgent %d" % n, priority=0) for n in range(4)]
        normal = [self.add("normal %d" % n, priority=3) for n in range(8)]
        rigs = ["w%d" % n for n in range(4)]
        self.fleet(rigs)
        won = [c["argv"][1] for c in self.board.calls() if c["argv"][0] == "claim" and c["exit"] == 0]
        self.assertEqual(set(won[:4]), set(urgent), won)  # every urgent job before any other
        self.assertEqual(set(won[4:]), set(normal))


class PipelineTest(CliTest):
    """stdout is data and -q leaves only what a pipeline needs; stdout and
    stderr are captured apart."""

    def test_quiet_prints_the_id_the_ids_the_status_or_nothing(self):
        code, out, err = self.cli("-q", "post", "--prompt", "what is 1+1", "--model", "llama3.2:1b",
                                  "--max-tokens", "64")
        self.assertEqual((code, err), (0, ""))
        item_id = out.strip()
        self.assertTrue(wl_infer.is_item_id(item_id) and out == item_id + "\n", out)
        self.assertEqual(self.cli("-q", "status", item_id), (0, "open\n", ""))
        other = self.board.add(self.job("other", max_tokens=8))
        self.assertEqual(self.cli("-q", "list"), (0, "%s\n%s\n" % (other, item_id), ""))
        self.assertEqual(self.cli("run", "-q", item_id), (0, "", ""))
        self.assertEqual(self.cli("-q", "verify", item_id), (0, "", ""))
        forged = self.completed("forged", output="a forged answer")
        self.assertEqual(self.cli("-q", "verify", forged), (1, "", ""))
        self.assertEqual(self.cli("-q", "audit"), (1, "", ""))
        self.assertEqual(self.cli("-q", "spool"), (0, "", ""))
        self.assertEqual(self.cli("-q", "list", "--status", "completed"), (0, "", ""))
        code, out, err = self.cli("-q", "--json", "status", item_id)  # --json wins over -q
        self.assertEqual((code, json.loads(out)["status"], err), (0, "in_review", ""))
        self.assertError(self.cli("-q", "verify", "w-0"), "wl status failed")

    def test_quiet_post_still_warns_and_errors_stay_one_line(self):
        code, out, err = self.cli("-q", "post", "--prompt", "p", "--model", "llama3.2:1b")
        self.assertEqual(code, 0, err)
        self.assertTrue(wl_infer.is_item_id(out.strip()), out)
        self.assertEqual(err, "wl_infer: warning: no --max-tokens: the job runs to the model's own limit, and "
                         "workers running `work` skip such jobs unless they pass --allow-uncapped; post with "
                         "--max-tokens N to have it taken\n")
        self.assertError(self.cli("-q", "post", "--prompt", "p", "--model", "nope:1b", "--wl", "/nonexistent"),
                         "/nonexistent")

    def test_stdout_of_list_is_the_table_and_its_rows_start_with_ids(self):
        ids = [self.board.add(self.job("job %d" % n, max_tokens=8)) for n in range(3)]
        proc = subprocess.run("%s %s list | awk 'NR>1{print $1}'" % (shlex.quote(sys.executable),
                                                                     shlex.quote(WL_INFER)),
                              shell=True, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertEqual(sorted(proc.stdout.decode().split()), sorted(ids))
        self.assertEqual(proc.stderr.decode(), "3 open inference jobs\n")
        proc = subprocess.run("%s %s list --status in_review | awk 'NR>1{print $1}'" % (
            shlex.quote(sys.executable), shlex.quote(WL_INFER)), shell=True, env=self.env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertEqual((proc.stdout, proc.stderr), (b"", b"No in_review inference jobs on the board.\n"))

    def test_quiet_work_logs_only_failures(self):
        done = self.board.add(self.job("fine", max_tokens=8))
        uncapped = self.board.add(self.job("uncapped"))  # skipped: logged without -q only
        self.ollama.fail_prompts["poison"] = (500, "model runner crashed")
        poison = self.board.add(self.job("poison", max_tokens=8))
        code, out, err = self.cli("-q", "work", "--once")
        self.assertEqual((code, out), (0, ""), err)
        [line] = err.splitlines()
        self.assertIn("failed %s: Ollama at " % poison, line)
        self.assertEqual(self.board.item(done)["status"], "in_review")
        code, out, err = self.cli("work", "--once")  # the poison job waits for its next try (in the state folder)
        self.assertIn("skipped %s (max_tokens 0" % uncapped, err)  # not told under -q, so told now
        self.assertIn("work: 0 done, 0 failed, 1 skipped", err)  # the summary: stderr, for people
        self.assertEqual(out, "")

    def test_the_readmes_xargs_line_says_which_item_failed(self):
        [line] = [c for b in readme_blocks() for c, _ in b.commands if "xargs" in c]
        self.completed("one")
        bad = self.completed("two", output="forged")
        folder = os.path.join(self.tmp.name, "bin")  # wl_infer.py on PATH, as installed
        os.makedirs(folder)
        os.symlink(WL_INFER, os.path.join(folder, "wl_infer.py"))
        env = self.env(PATH=folder + os.pathsep + os.environ.get("PATH", ""))
        proc = subprocess.run(["sh", "-c", line], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=60)
        self.assertEqual((proc.returncode, proc.stdout), (0, "%s: exit 1\n" % bad), proc.stderr)

    def test_prompt_on_stdin_loses_one_trailing_newline_and_a_dash_value_gets_a_hint(self):
        proc = subprocess.run("echo 'Name a prime.' | %s %s --json post --prompt - --model llama3.2:1b "
                              "--max-tokens 8" % (shlex.quote(sys.executable), shlex.quote(WL_INFER)),
                              shell=True, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertEqual(json.loads(proc.stdout)["job"]["prompt"], "Name a prime.")
        self.assertError(self.cli("post", "--prompt", "-q", "--model", "llama3.2:1b"),
                         "argument --prompt: expected one argument; for a value that starts with -, "
                         "write --prompt=VALUE")
        code, out, err = self.cli("--json", "post", "--prompt=-q", "--model", "llama3.2:1b", "--max-tokens", "8")
        self.assertEqual((code, json.loads(out)["job"]["prompt"]), (0, "-q"), err)


# =============================================================================
# Posters: a file of prompts in, a file of verified answers out
# =============================================================================


def openai_line(custom_id, url="/v1/completions", method="POST", **body):
    """One request line of an OpenAI batch file."""
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def chat_line(custom_id, content, *more, **body):
    messages = [{"role": "user", "content": content}] + list(more)
    return openai_line(custom_id, "/v1/chat/completions", messages=messages, **body)


class BatchTest(CliTest):
    """Batch files, posted and collected through the command line."""

    def write(self, lines, name="prompts.jsonl"):
        path = os.path.join(self.tmp.name, name)
        with open(path, "wb") as f:
            f.write(b"".join((x if isinstance(x, bytes) else x.encode("utf-8")) + b"\n" for x in lines))
        return path

    def prompts(self, n, name="prompts.jsonl", **job):
        return self.write([json.dumps(dict({"prompt": "question %d" % i}, **job)) for i in range(n)], name)

    def post_batch(self, path, *extra, code=0):
        result = self.cli("post", "--batch", path, "--model", "llama3.2:1b", "--max-tokens", "32", *extra)
        self.assertEqual(result[0], code, result)
        return result

    def posted(self):
        """{custom_id: [item IDs]} of the batch jobs on the board."""
        found = {}
        for item in self.board.load()["items"].values():
            job = wl_infer.decode_job(item["description"])
            found.setdefault(job.custom_id, []).append(item["id"])
        return found

    def ledger_of(self, name="prompts"):
        with open(os.path.join(self.state_home, "wl-infer", "batches", name + ".jsonl")) as f:
            return [json.loads(line) for line in f]

    def do(self, item_id, output=None, rig="carol", **provenance):
        """A worker `rig` submits `output` for the job (default: the model's own answer)."""
        item = self.board.item(item_id)
        job = wl_infer.decode_job(item["description"])
        if output is None:  # what the fake model generates for the job
            chunks, _ = self.ollama.chunks_for(job.model, job.prompt, wl_infer.ollama_options(job))
            output = "".join(text for text, _ in chunks)
        evidence = wl_infer.encode_evidence(wl_infer.make_evidence(job, output, provenance))
        self.assertEqual(self.board.wl("claim", item_id, rig=rig).returncode, 0)
        self.assertEqual(self.board.wl("done", item_id, "--evidence=" + evidence, rig=rig).returncode, 0)

    def results(self, *args, code=0):
        code_, out, err = self.cli("results", *args)
        self.assertEqual(code_, code, (out, err))
        self.assertNotIn("Traceback", err)
        return [json.loads(line) for line in out.splitlines()], err


class PostBatchTest(BatchTest):
    def test_our_lines_and_openai_lines_each_post_one_job_that_go_workers_run_as_is(self):
        path = self.write([
            json.dumps({"prompt": "Name a colour.", "custom_id": "colour"}),
            json.dumps({"prompt": "Name a fruit.", "model": "qwen2.5:0.5b", "seed": 7, "max_tokens": 9}),
            "",
            openai_line("comp", prompt="2+2=", model="llama3.2:1b", max_tokens=8, seed=3, temperature=0),
            chat_line("chat", "Say hi.", model="llama3.2:1b", max_completion_tokens=16, temperature=0.0, n=1,
                      top_p=0.9, user="u1"),
            chat_line("parts", [{"type": "text", "text": "Hello?"}], stream=False, stop=None),
        ])
        code, out, err = self.post_batch(path)
        rows = [line.split("  ") for line in out.splitlines()]
        self.assertEqual([r[1] for r in rows], ["colour", "2", "comp", "chat", "parts"], out)
        self.assertTrue(all(wl_infer.is_item_id(r[0]) for r in rows), out)
        self.assertEqual(self.board.commands().count("post"), 5)  # one wl call per job, and no other
        self.assertEqual(len(self.board.commands()), 5)
        jobs = dict((r[1], wl_infer.decode_job(self.board.item(r[0])["description"])) for r in rows)
        self.assertEqual([(j.prompt, j.model, j.seed, j.max_tokens) for j in jobs.values()], [
            ("Name a colour.", "llama3.2:1b", 42, 32), ("Name a fruit.", "qwen2.5:0.5b", 7, 9),
            ("2+2=", "llama3.2:1b", 3, 8), ("Say hi.", "llama3.2:1b", 42, 16), ("Hello?", "llama3.2:1b", 42, 32)])
        [batch] = set(j.batch for j in jobs.values())
        self.assertTrue(batch.startswith("prompts."), batch)
        description = self.board.item(rows[0][0])["description"]
        # Go's keys first, as Go writes them; ours after them, which Go's decoder ignores
        self.assertTrue(description.startswith('{"prompt":"Name a colour.","model":"llama3.2:1b","seed":42,'
                                               '"max_tokens":32,"model_digest":"a80c4f17acd5'), description)
        self.assertTrue(description.endswith(',"batch":"%s","custom_id":"colour"}' % batch), description)
        fields, _ = wl_infer.decode_struct(description, wl_infer.JOB_FIELDS[:4], "job")
        self.assertEqual(fields["prompt"], "Name a colour.")
        self.assertIn("Batch prompts: 5 jobs, 5 posted now", err)
        code, out, err = self.cli("run", rows[3][0])  # a worker runs a batch job as any other
        self.assertEqual(code, 0, err)
        self.assertEqual(self.cli("-q", "verify", rows[3][0])[0], 0)

    def test_quiet_prints_the_ids_and_json_one_document(self):
        path = self.prompts(3)
        code, out, err = self.post_batch(path, "-q")
        ids = out.split()
        self.assertEqual((len(ids), err), (3, ""))
        code, out, err = self.post_batch(path, "--json")  # again: nothing new is posted
        doc = json.loads(out)
        self.assertEqual([j["id"] for j in doc["jobs"]], ids)
        self.assertEqual((doc["batch"], doc["posted"], doc["posted_before"]), ("prompts", 0, 3))
        self.assertEqual([j["custom_id"] for j in doc["jobs"]], ["1", "2", "3"])
        self.assertEqual(len(self.board.load()["items"]), 3)

    def test_a_batch_is_checked_whole_first_and_every_line_that_is_not_a_job_is_named(self):
        hostile = [
            json.dumps({"prompt": "fine"}),
            "not json",
            json.dumps({"prompt": 42}),
            json.dumps({"prompt": "x" * 70000}),
            json.dumps({"prompt": "a\u0000b"}),
            json.dumps({"prompt": "dup", "custom_id": "a"}),
            json.dumps({"prompt": "dup again", "custom_id": "a"}),
            chat_line("sys", "hi", model="llama3.2:1b") .replace('[{"role": "user"', '[{"role": "system", '
                                                                '"content": "be nice"}, {"role": "user"'),
            chat_line("turns", "hi", {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}),
            openai_line("hot", prompt="hi", temperature=0.7),
            openai_line("many", prompt="hi", n=2),
            openai_line("stops", prompt="hi", stop=["\n"]),
            chat_line("tools", "hi", tools=[{"type": "function"}]),
            chat_line("json", "hi", response_format={"type": "json_object"}),
            openai_line("get", prompt="hi", method="GET"),
            openai_line("embed", url="/v1/embeddings", input="hi"),
            json.dumps({"prompt": "hi", "max_token": 5}),
            b"\xff\xfe not utf-8",
            json.dumps({"prompt": "y" * (1 << 20)}),
            json.dumps({"prompt": "no model", "model": "llama 3"}),
            '{"prompt": "twice", "prompt": "again"}',
            json.dumps({"prompt": "hi", "seed": 1.5}),
            openai_line("list", prompt=["a", "b"]),
        ]
        path = self.write(hostile)
        code, out, err = self.post_batch(path, code=2)
        lines = err.splitlines()
        self.assertTrue(all(line.startswith("wl_infer: error: ") for line in lines), err)
        self.assertEqual(lines[-1], "wl_infer: error: 21 of 23 lines of %s are not jobs that can be posted; "
                                    "nothing was posted" % path)
        self.assertEqual(lines[-2], "wl_infer: error: ... and 1 more line refused (--json lists them all)")
        said = dict((int(re.match(r"wl_infer: error: line (\d+): ", line).group(1)), line) for line in lines[:-2])
        expected = {2: "not valid JSON", 3: 'key "prompt" must be a string, got the number 42',
                    4: "over wl's 65535-byte field limit", 5: 'contains a NUL character',
                    7: 'custom_id "a" is also on line 6', 8: "a system message cannot be expressed",
                    9: "3 messages cannot be expressed", 10: 'body "temperature" is the number 0.7',
                    11: 'body "n" is the number 2', 12: 'body "stop" is an array', 13: 'body "tools" is an array',
                    14: 'body "response_format" is an object', 15: '"method" must be "POST", got the string "GET"',
                    16: '"url" must be /v1/completions or /v1/chat/completions',
                    17: 'key "max_token" is not one of a job line\'s', 18: "not UTF-8",
                    19: "over 1048576 bytes", 20: '"llama 3" is not an Ollama model name',
                    21: 'gives "prompt" twice', 22: 'key "seed" must be an integer, got the number 1.5'}
        self.assertEqual(sorted(said), sorted(expected), err)  # the first 20
        for number, fragment in expected.items():
            self.assertIn(fragment, said[number])
        self.assertEqual(self.board.calls(), [])  # nothing was posted, wl never ran
        self.assertFalse(os.path.exists(os.path.join(self.state_home, "wl-infer", "batches", "prompts.jsonl")))
        FAULTS.count("malformed batch lines refused before a post", len(expected) + 1)
        code, out, err = self.cli("--json", "post", "--batch", path, "--model", "llama3.2:1b")
        refused = json.loads(out)["lines_refused"]
        self.assertEqual([e["line"] for e in refused], sorted(said) + [23])
        self.assertIn('body "prompt" must be one string, got an array', refused[-1]["error"])

    def test_a_job_without_max_tokens_or_with_a_long_prompt_is_warned_about_once_for_the_batch(self):
        path = self.write([json.dumps({"prompt": "p%d" % i}) for i in range(3)]
                          + [json.dumps({"prompt": "z" * 40000, "max_tokens": 8})])
        code, out, err = self.cli("post", "--batch", path, "--model", "llama3.2:1b")
        self.assertEqual(code, 0, err)
        self.assertIn("wl_infer: warning: 3 jobs without max_tokens (lines 1, 2, 3) run to the model's own limit", err)
        self.assertIn("wl_infer: warning: 1 prompt (line 4) is over the 32768 bytes that workers running `work` "
                      "take by default", err)

    def test_standard_input_needs_a_name_and_the_same_name_resumes_it(self):
        lines = "\n".join(json.dumps({"prompt": "q%d" % i}) for i in range(3)).encode()
        self.assertError(self.cli("post", "--batch", "-", "--model", "llama3.2:1b", stdin=lines), "needs --name")
        for _ in range(2):
            code, out, err = self.cli("post", "--batch", "-", "--name", "night-run", "--model", "llama3.2:1b",
                                      "--max-tokens", "8", stdin=lines)
            self.assertEqual(code, 0, err)
        self.assertEqual(sorted(self.posted()), ["1", "2", "3"])
        self.assertIn("0 posted now, 3 posted before", err)
        self.assertError(self.cli("post", "--batch", "-", "--name", "../x", "--model", "m", stdin=lines),
                         "is not a batch name")

    def test_wl_failing_half_way_and_again_posts_what_is_missing_and_nothing_twice(self):
        path = self.prompts(6)
        self.board.fail("post", message="push rejected: upstream changed", skip=2, times=1)
        code, out, err = self.post_batch(path, code=2)
        self.assertEqual(len(out.splitlines()), 2)  # the two posted before the failure, each said at once
        self.assertError((code, out, err), "wl post failed: push rejected: upstream changed; 2 of 6 jobs of batch "
                         "prompts are posted (2 by this run); run the same command again to post the rest "
                         "(line 3 is looked up on the board first")
        self.board.fail("post", message="timeout", skip=1, times=1)
        self.post_batch(path, code=2)
        self.board.fail("post", stderr="panic: runtime error: invalid memory address\n", exit=2, times=1)  # a crash
        self.assertError(self.post_batch(path, code=2), "wl post failed: panic: runtime error", "3 of 6 jobs")
        code, out, err = self.post_batch(path)
        self.assertEqual(len(out.splitlines()), 6)
        self.assertEqual(sorted(self.posted()), ["1", "2", "3", "4", "5", "6"])
        self.assertTrue(all(len(ids) == 1 for ids in self.posted().values()), self.posted())
        # each cut-off line is looked up with one browse, before it is posted again
        self.assertEqual(self.board.commands().count("browse"), 3)
        FAULTS.count("batch faults (wl failing, crashing, hanging, a signal, a kill)")

    def test_a_post_that_happened_although_wl_said_it_failed_is_found_not_posted_again(self):
        path = self.prompts(3)
        self.board.fail("post", message="push failed after the write", after=True, skip=1, times=1)
        self.post_batch(path, code=2)
        self.assertEqual(len(self.board.load()["items"]), 2)
        code, out, err = self.post_batch(path)
        self.assertIn("1 posted now, 1 found on the board, 1 posted before", err)
        self.assertEqual(sorted((k, len(v)) for k, v in self.posted().items()), [("1", 1), ("2", 1), ("3", 1)])
        FAULTS.count("batch faults (wl failing, crashing, hanging, a signal, a kill)")

    def test_a_hung_post_is_stopped_and_the_next_run_finds_it_was_never_made(self):
        path = self.prompts(3)
        self.board.fail("post", hang=True, skip=1, times=1)
        self.assertError(self.cli("--wl-timeout", "1", "post", "--batch", path, "--model", "llama3.2:1b",
                                  "--max-tokens", "32"), "did not finish within 1 s", "1 of 3 jobs")
        self.assertEqual(self.board.helpers_alive(), [])
        self.post_batch(path)
        self.assertEqual(sorted((k, len(v)) for k, v in self.posted().items()), [("1", 1), ("2", 1), ("3", 1)])
        FAULTS.count("batch faults (wl failing, crashing, hanging, a signal, a kill)")

    def test_killed_during_a_post_the_next_run_finds_the_job_on_the_board(self):
        path = self.prompts(4)
        self.board.fail("post", delay=1.0, skip=2, times=1)  # the third post is slow: the kill lands in it
        proc = subprocess.Popen([sys.executable, WL_INFER, "post", "--batch", path, "--model", "llama3.2:1b",
                                 "--max-tokens", "32"], env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for(lambda: self.board.started().count("post") == 3, "the third wl post")
        proc.kill()  # a crash: no handler runs
        proc.communicate(timeout=60)
        # the cut-off wl post runs on in its own session and writes the job (then fails to print its report)
        wait_for(lambda: len(self.board.load()["items"]) == 3, "the cut-off wl post to write the job")
        ledger = self.ledger_of()
        self.assertEqual([r.get("id") is not None for r in ledger[1:]], [False, True, False, True, False])
        code, out, err = self.post_batch(path)
        self.assertIn("1 posted now, 1 found on the board, 2 posted before", err)
        self.assertEqual(sorted((k, len(v)) for k, v in self.posted().items()),
                         [("1", 1), ("2", 1), ("3", 1), ("4", 1)])
        FAULTS.count("batch faults (wl failing, crashing, hanging, a signal, a kill)")

    def test_a_signal_during_a_post_lets_it_finish_records_it_and_stops(self):
        path = self.prompts(4)
        self.board.fail("post", delay=1.0, skip=1, times=1)
        proc = subprocess.Popen([sys.executable, WL_INFER, "post", "--batch", path, "--model", "llama3.2:1b",
                                 "--max-tokens", "32"], env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for(lambda: self.board.started().count("post") == 2, "the second wl post")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 130, err)
        self.assertIn(b"interrupted; 2 of 4 jobs of batch prompts are posted (2 by this run); run the same command "
                      b"again to post the rest", err)
        self.assertEqual(len(out.splitlines()), 2)
        code, out, err = self.post_batch(path)
        self.assertIn("2 posted now, 2 posted before", err)
        self.assertNotIn("browse", self.board.commands())  # every ID was recorded: nothing to look up
        self.assertEqual(len(self.board.load()["items"]), 4)
        FAULTS.count("batch faults (wl failing, crashing, hanging, a signal, a kill)")

    def test_a_line_changed_after_it_was_posted_is_refused_and_one_batch_posts_at_a_time(self):
        path = self.prompts(2)
        self.post_batch(path)
        self.write([json.dumps({"prompt": "question 0"}), json.dumps({"prompt": "another question"})])
        code, out, err = self.post_batch(path, code=2)
        self.assertTrue(err.startswith('wl_infer: error: line 2: custom_id "2" was posted in batch prompts as w-'), err)
        self.assertIn("with another job; give this batch another --name", err)
        self.post_batch(path, "--name", "prompts-2")
        self.assertEqual(len(self.board.load()["items"]), 4)
        self.board.fail("post", delay=1.0, times=1)
        other = self.prompts(2, "other.jsonl")
        proc = subprocess.Popen([sys.executable, WL_INFER, "post", "--batch", other, "--model", "llama3.2:1b"],
                                env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        wait_for(lambda: "post" in self.board.started()[4:], "the first post of the other batch")
        self.assertError(self.post_batch(other, code=2), "batch other is being posted by another wl_infer.py")
        self.assertEqual(proc.wait(60), 0)

    def test_option_errors(self):
        path = self.prompts(1)
        self.assertError(self.cli("post", "--batch", path, "--prompt", "p"), "do not go together")
        self.assertError(self.cli("post", "--batch", path, "--wait"), "post --batch does not wait")
        self.assertError(self.cli("post", "--prompt", "p"), "post needs --model TAG")
        self.assertError(self.cli("post", "--prompt", "p", "--model", "m", "--name", "n"), "--name names a batch")
        self.assertError(self.cli("post", "--batch", os.path.join(self.tmp.name, "none.jsonl")), "cannot read --batch")
        self.assertError(self.cli("post", "--batch", self.write([""], "empty.jsonl"), "--model", "m"), "has no jobs")
        self.assertError(self.cli("post", "--prompt", "p", "--model", "m", "--tolerance", "0.5"),
                         "--tolerance is for waiting: it needs --wait")


class ResultsTest(BatchTest):
    def batch(self, n=4, name="prompts.jsonl", **job):
        path = self.prompts(n, name, **job)
        out = self.post_batch(path)[1]
        return path, [line.split()[0] for line in out.splitlines()]

    def test_each_job_once_in_input_order_checked_with_exit_codes_for_every_outcome(self):
        path, ids = self.batch(5)
        self.do(ids[0])
        self.do(ids[1], rig="dave")
        self.do(ids[2], output="a forged answer", rig="mallory")
        self.do(ids[4])
        lines, err = self.results(path, code=1)
        self.assertEqual([(x["custom_id"], x["id"], x["line"]) for x in lines],
                         [(str(i + 1), ids[i], i + 1) for i in range(5)])
        self.assertEqual([(x["status"], x["worker"], x["checked"], x["verdict"], x["refuted"]) for x in lines], [
            ("in_review", "carol", True, "VERIFIED", False), ("in_review", "dave", True, "VERIFIED", False),
            ("in_review", "mallory", True, "MISMATCH", True), ("open", None, False, None, None),
            ("in_review", "carol", True, "VERIFIED", False)])
        self.assertEqual(lines[0]["output"], default_output("llama3.2:1b", "question 0"))
        self.assertEqual(lines[0]["output_hash"], wl_infer.output_hash(lines[0]["output"]))
        self.assertEqual(lines[2]["cause"]["kind"], "different-output")
        self.assertIsNone(lines[3]["output"])
        self.assertIn("Results of batch prompts: 5 jobs: 3 verified, 1 MISMATCH (1 refuted), 0 not checked, 1 not "
                      "done by a worker, 0 errors", err)
        calls = [c["argv"] for c in self.board.calls()][5:]  # after the 5 posts
        self.assertEqual([c[0] for c in calls].count("browse"), 1)
        self.assertEqual(sorted(c[1] for c in calls if c[0] == "status"), sorted(ids[:3] + ids[4:]))
        self.assertNotIn("--long", calls[0])  # the browse needs no descriptions
        self.do(ids[3])
        self.board.wl("reject", ids[2], "--reason=forged", rig="poster")  # back to mallory, who does it again
        self.board.update(lambda s: s["items"][ids[2]].__setitem__("status", "in_review"))
        self.board.update(lambda s: s["items"][ids[2]]["completion"].__setitem__("evidence", wl_infer.encode_evidence(
            wl_infer.make_evidence(wl_infer.decode_job(s["items"][ids[2]]["description"]),
                                   default_output("llama3.2:1b", "question 2")))))
        lines, err = self.results(path, code=0)
        self.assertEqual([x["verdict"] for x in lines], ["VERIFIED"] * 5)
        lines, err = self.results(path, "--no-verify", code=0)
        self.assertEqual([(x["checked"], x["verdict"]) for x in lines], [(False, None)] * 5)
        self.board.fail("status", message="connection refused", skip=2, times=1)
        lines, err = self.results(path, "--no-verify", code=2)
        self.assertEqual(sum(1 for x in lines if x["error"]), 1)
        self.assertIn("wl_infer: error: w-", err)

    def test_wait_looks_at_the_board_once_a_poll_and_reads_each_done_job_once(self):
        path, ids = self.batch(3)
        proc = subprocess.Popen([sys.executable, WL_INFER, "results", path, "--wait", "--interval", "0.1"],
                                env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        for item_id in ids:
            polls = self.board.commands().count("browse")
            wait_for(lambda polls=polls: self.board.commands().count("browse") >= polls + 2, "two more polls")
            self.do(item_id)
        out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 0, err)
        self.assertEqual([json.loads(x)["verdict"] for x in out.splitlines()], ["VERIFIED"] * 3)
        calls = [c["argv"] for c in self.board.calls() if c["rig"] == self.rig][3:]
        self.assertEqual(sorted(c[1] for c in calls if c[0] == "status"), sorted(ids))
        self.assertGreaterEqual([c[0] for c in calls].count("browse"), 7)
        self.assertEqual(set(c[0] for c in calls), {"browse", "status"})
        code, out, err = self.cli("results", path, "--wait", "--wait-timeout", "0")
        self.assertEqual(code, 0, err)
        path, ids = self.batch(2, "short.jsonl", max_tokens=4)
        self.do(ids[1])
        code, out, err = self.cli("results", ids[0], ids[1], "--wait", "--interval", "0.05", "--wait-timeout", "0.3")
        self.assertEqual(code, 3, err)
        self.assertEqual([json.loads(x)["status"] for x in out.splitlines()], ["open", "in_review"])
        self.assertIn("1 job not done by a worker yet", err)

    def test_a_signal_while_waiting_stops_and_says_what_was_written(self):
        path, ids = self.batch(2)
        self.do(ids[0])
        proc = subprocess.Popen([sys.executable, WL_INFER, "results", path, "--wait", "--interval", "0.05"],
                                env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        out = Lines(proc.stdout)
        wait_for(lambda: out.lines, "the first line")
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(60), 130)
        self.assertIn(b"interrupted; 1 of 2 results were handed on; the same command collects them again",
                      proc.stderr.read())
        proc.stderr.close()
        # a wl call of a reader thread, in its own session, ends on its own: before the board is removed
        wait_for(lambda: not self.board.running(), "the last wl call's end")

    def test_as_completed_writes_a_line_as_soon_as_it_is_final(self):
        path, ids = self.batch(2)
        self.do(ids[1])
        proc = subprocess.Popen([sys.executable, WL_INFER, "results", path, "--wait", "--as-completed",
                                 "--interval", "0.05"], env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        out = Lines(proc.stdout)
        wait_for(lambda: out.lines, "the first line")
        self.assertEqual(json.loads(out.lines[0])["id"], ids[1])
        self.assertIsNone(proc.poll())
        self.do(ids[0])
        self.assertEqual(proc.wait(60), 0, proc.stderr.read())
        self.assertEqual([json.loads(x)["id"] for x in out.text().splitlines()], [ids[1], ids[0]])

    def test_spot_checks_a_share_of_each_worker_at_least_one_and_all_of_a_worker_once_refuted(self):
        path, ids = self.batch(10, max_tokens=8)
        for item_id in ids[:6]:
            self.do(item_id, rig="carol")
        for item_id in ids[6:]:  # mallory forges every answer
            self.do(item_id, output="forged", rig="mallory")
        before = len(self.ollama.generate_requests())
        lines, err = self.results(path, "--spot-check", "0.000001", code=1)
        carol = [x for x in lines if x["worker"] == "carol"]
        mallory = [x for x in lines if x["worker"] == "mallory"]
        self.assertEqual(sum(x["checked"] for x in carol), 1, lines)
        self.assertEqual([(x["checked"], x["refuted"]) for x in mallory], [(True, True)] * 4)
        self.assertEqual([x["verdict"] for x in carol if not x["checked"]], [None] * 5)
        self.assertIn("carol: 1 of 6 results checked, none refuted; had carol forged 1 of 6 / 3 of 6, the chance "
                      "it went unchecked: 83% / 50%", err)
        self.assertIn("mallory: 4 of 4 results refuted, so every one was checked", err)
        reruns = [b for b in self.ollama.generate_requests()[before:] if not b.get("_debug_render_only")]
        self.assertEqual(len([b for b in reruns if b.get("raw") is not True]), 5)  # 1 of carol's, all 4 of mallory's
        code, out, err = self.cli("--json", "results", path, "--spot-check", "100%")
        doc = json.loads(out)
        self.assertEqual([r["checked"] for r in doc["results"]], [True] * 10)
        self.assertEqual([(w["worker"], w["checked"], w["unchecked_chance"]["1"]) for w in doc["workers"]],
                         [("carol", 6, 0.0), ("mallory", 4, 0.0)])
        self.assertEqual(wl_infer.unchecked_chance(10, 3, 1), 0.7)

    def test_openai_output_lines(self):
        path = self.write([
            openai_line("c1", prompt="2+2=", model="llama3.2:1b", max_tokens=8),
            chat_line("c2", "Say hi.", model="llama3.2:1b", max_tokens=8),
            chat_line("c3", "Forge me.", model="llama3.2:1b", max_tokens=8),
            chat_line("c4", "Nobody does me.", model="llama3.2:1b", max_tokens=8)])
        ids = [line.split()[0] for line in self.post_batch(path)[1].splitlines()]
        self.do(ids[0], eval_count=3, done_reason="length")
        self.do(ids[1])
        self.do(ids[2], output="forged", rig="mallory")
        lines, err = self.results(path, "--format", "openai", code=1)
        self.assertEqual([(x["custom_id"], x["id"]) for x in lines], list(zip(["c1", "c2", "c3", "c4"], ids)))
        text, chat = lines[0]["response"]["body"], lines[1]["response"]["body"]
        self.assertEqual((lines[0]["response"]["status_code"], lines[0]["error"]), (200, None))
        choice = text["choices"][0]
        self.assertEqual((text["object"], text["model"], choice["text"], choice["finish_reason"],
                          text["usage"]["completion_tokens"]),
                         ("text_completion", "llama3.2:1b", self.cli("output", ids[0])[1], "length", 3))
        self.assertEqual(wl_infer.output_hash(text["choices"][0]["text"]), lines[0]["wl_infer"]["output_hash"])
        self.assertTrue(text["id"].startswith("cmpl-"))
        self.assertEqual((chat["object"], chat["choices"][0]["message"]),
                         ("chat.completion", {"role": "assistant", "content": self.cli("output", ids[1])[1]}))
        self.assertEqual(lines[1]["wl_infer"]["verdict"], "VERIFIED")
        self.assertEqual((lines[2]["response"], lines[2]["error"]["code"]), (None, "refuted"))
        self.assertIn("different-output", lines[2]["error"]["message"])
        self.assertEqual((lines[3]["response"], lines[3]["error"]["code"]), (None, "unfinished"))
        self.assertTrue(all(set(x) == {"id", "custom_id", "response", "error", "wl_infer"} for x in lines))

    def test_accept_and_reject_act_on_this_batchs_items_only(self):
        path, ids = self.batch(3)
        self.do(ids[0])
        self.do(ids[1], output="forged", rig="mallory")
        self.do(ids[2], rig=self.rig)  # our own: wl forbids accepting it
        other = self.completed("not in the batch", output="forged too")
        lines, err = self.results(path, "--accept", "--reject", code=1)
        self.assertEqual([x["action"] for x in lines], [
            "accepted", "rejected", "not accepted: completed by this rig (wl forbids accepting your own)"])
        self.assertEqual([self.board.item(i)["status"] for i in ids], ["completed", "claimed", "in_review"])
        self.assertEqual(self.board.item(other)["status"], "in_review")
        self.assertIn("On the board: accepted 1, not accepted: completed by this rig", err)
        lines, err = self.results(path, "--accept", code=3)  # the rejected one is not done any more
        self.assertEqual([x["status"] for x in lines], ["completed", "claimed", "in_review"])
        self.assertError(self.cli("results", path, "--accept", "--no-verify"), "--accept accepts only verified")

    def test_ids_an_ids_file_and_a_ledger_name_as_the_batch(self):
        path, ids = self.batch(2)
        for item_id in ids:
            self.do(item_id)
        posted = self.write(["%s  %d" % (item_id, n) for n, item_id in enumerate(ids, 1)], "posted.txt")
        self.assertEqual([x["id"] for x in self.results("--ids", posted)[0]], ids)
        self.assertEqual([x["id"] for x in self.results(ids[1][:8], ids[0])[0]], [ids[1], ids[0]])
        self.assertEqual([x["custom_id"] for x in self.results("prompts")[0]], ["1", "2"])
        code, out, err = self.cli("results", "--ids", "-", stdin=("\n".join(ids) + "\n").encode())
        self.assertEqual((code, len(out.splitlines())), (0, 2), err)
        self.assertError(self.cli("results", "nosuch"), "no batch nosuch here")
        self.assertError(self.cli("-q", "results", "w-00000000ff")[:1] + ("", self.cli("results", "w-00000000ff")[2]
                                                                    .splitlines()[0] + "\n"),
                         "w-00000000ff: w-00000000ff is not on the board")
        self.assertError(self.cli("results", "--ids", self.write(["not-an-id"], "bad.txt")), "is not an item ID")
        self.assertError(self.cli("results"), "results needs a batch")

    def test_checks_are_spread_over_servers_one_at_a_time_on_each(self):
        second = FakeOllama().start()
        self.addCleanup(second.stop)
        for fake in (self.ollama, second):
            fake.piece_delay = 0.02
        path, ids = self.batch(6, max_tokens=8)
        for item_id in ids:
            self.do(item_id)
        lines, err = self.results(path, "--ollama", self.ollama.address, "--ollama", second.address)
        self.assertEqual([x["verdict"] for x in lines], ["VERIFIED"] * 6)
        for fake in (self.ollama, second):
            streams = sorted((s["start"], s["final"]) for s in fake.streams)
            self.assertGreater(len(streams), 0)
            self.assertTrue(all(a[1] <= b[0] for a, b in zip(streams, streams[1:])), streams)
        self.assertEqual(len(self.ollama.streams) + len(second.streams), 6)

    def test_sampled_and_tolerant_checks_in_results(self):
        text = TolerantVerificationTest.TEXT
        self.ollama.scripts[("llama3.2:1b", "question 0")] = ScriptedModel(text, {5: 0.21})
        path, ids = self.batch(1)
        self.ollama.flips = {5}  # the worker's hardware takes the runner-up at a near-tie
        code, out, err = self.cli("run", ids[0])
        self.assertEqual(code, 0, err)
        self.ollama.flips = set()
        lines, err = self.results(path, code=1)
        self.assertEqual((lines[0]["verdict"], lines[0]["cause"]["kind"], lines[0]["refuted"]),
                         ("MISMATCH", "near-tie", False))
        lines, err = self.results(path, "--tolerance", "0.5")
        self.assertEqual((lines[0]["verdict"], lines[0]["exact"]), ("VERIFIED", False))
        lines, err = self.results(path, "--tolerance", "0.5", "--sample", "2", "--window", "4", "--sample-seed", "3")
        self.assertEqual((lines[0]["verdict"], lines[0]["sampled"]), ("VERIFIED", True))
        self.assertGreater(lines[0]["coverage"], 0)


class PostWaitTest(BatchTest):
    def start_wait(self, *args, stdin=None):
        proc = subprocess.Popen([sys.executable, WL_INFER, "post", "--model", "llama3.2:1b", "--max-tokens", "32",
                                 "--wait", "--interval", "0.05"] + list(args), env=self.env(),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        if stdin is not None:
            proc.stdin.write(stdin)
        proc.stdin.close()
        proc.stdin = None  # communicate() must not flush it
        wait_for(lambda: self.board.load()["items"], "the job on the board")
        [item_id] = self.board.load()["items"]
        return proc, item_id

    def test_one_job_as_a_filter_prints_exactly_the_answer(self):
        prompt = "Summarise: the sky is blue\n\n"
        self.ollama.outputs[("llama3.2:1b", prompt[:-1])] = "The sky is blue.\n  "
        proc, item_id = self.start_wait("--prompt", "-", stdin=prompt.encode())
        self.do(item_id)
        out, err = proc.communicate(timeout=60)
        self.assertEqual((proc.returncode, out), (0, "The sky is blue.\n  ".encode()), err)
        self.assertIn(b"VERIFIED answer to %s (completed by carol)" % item_id.encode(), err)

    def test_a_forged_answer_is_not_printed_and_a_deadline_is_exit_3(self):
        proc, item_id = self.start_wait("--prompt", "p")
        self.do(item_id, output="forged", rig="mallory")
        out, err = proc.communicate(timeout=60)
        self.assertEqual((proc.returncode, out), (1, b""), err)
        self.assertIn(b"is a MISMATCH (different-output, refuted), so it is not printed", err)
        code, out, err = self.cli("-q", "post", "--prompt", "q", "--model", "llama3.2:1b", "--max-tokens", "8",
                                  "--wait", "--interval", "0.05", "--wait-timeout", "0.2")
        self.assertEqual((code, out), (3, ""), err)
        self.assertIn("within 0.2 s; it stays posted: collect its answer with `wl_infer.py results w-", err)

    def test_no_verify_and_json(self):
        proc, item_id = self.start_wait("--prompt", "p", "--no-verify", "--json")
        self.do(item_id, output="whatever carol says")
        out, err = proc.communicate(timeout=60)
        doc = json.loads(out)
        self.assertEqual((proc.returncode, doc["id"], doc["result"]["output"], doc["result"]["checked"]),
                         (0, item_id, "whatever carol says", False), err)
        self.assertEqual(len([b for b in self.ollama.generate_requests()]), 0)


class OutputTest(BatchTest):
    def test_outputs_exactly_as_submitted_several_and_nul_separated(self):
        path, ids = ResultsTest.batch(self, 2)
        self.do(ids[0], output="two\nlines")
        self.do(ids[1], output="tab\tand \x1b[2J escape")
        code, out, err = self.cli("output", ids[0])
        self.assertEqual((code, out, err), (0, "two\nlines", ""))
        self.assertEqual(self.cli("output", ids[0], ids[1])[1], "two\nlines\ntab\tand \x1b[2J escape\n")
        self.assertEqual(self.cli("output", "-z", ids[0], ids[1])[1], "two\nlines\0tab\tand \x1b[2J escape\0")
        doc = [json.loads(d) for d in re.split(r"(?<=\n})\n", self.cli("--json", "output", ids[0], ids[1])[1]) if d]
        self.assertEqual([d["output"] for d in doc], ["two\nlines", "tab\tand \x1b[2J escape"])
        self.board.update(lambda s: s["items"][ids[0]]["completion"].__setitem__(
            "evidence", s["items"][ids[0]]["completion"]["evidence"].replace("two", "TWO")))
        code, out, err = self.cli("output", ids[0])
        self.assertEqual((code, out), (0, "TWO\nlines"))
        self.assertIn("wl_infer: warning: %s: the output is refuted without a re-run (inconsistent-evidence)" % ids[0],
                      err)
        open_item = self.board.add(self.job())
        self.assertError(self.cli("output", ids[1], open_item), "has no completion, so no output (status open)")


    def test_on_a_terminal_control_characters_are_shown_as_escapes(self):
        import pty

        item_id = self.completed("p", output="red \x1b[31m text \u202e")
        master, slave = pty.openpty()
        proc = subprocess.Popen([sys.executable, WL_INFER, "output", item_id], env=self.env(), stdout=slave,
                                stderr=subprocess.PIPE)
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        proc.communicate(timeout=60)
        os.close(master)
        self.assertEqual(seen.decode(), "red \\x1b[31m text \\u202e")


class SeveralIdsTest(CliTest):
    def test_verify_and_status_take_several_ids_and_exit_with_the_worst(self):
        good = self.completed("one")
        bad = self.completed("two", output="forged")
        code, out, err = self.cli("verify", good, bad)
        self.assertEqual(code, 1, err)
        self.assertEqual(out.count("VERIFIED"), 1)
        self.assertEqual(out.count("✗ MISMATCH"), 1)
        self.assertIn("\n\n✗ MISMATCH", out)
        code, out, err = self.cli("--json", "verify", good, bad, "w-0000000000")
        self.assertEqual(code, 2, err)
        docs = [json.loads(d) for d in re.split(r"(?<=\n})\n", out) if d]
        self.assertEqual([d.get("verdict") for d in docs], ["VERIFIED", "MISMATCH", None])
        self.assertIn("no wanted item matching", docs[2]["error"])
        code, out, err = self.cli("verify", good, "w-0000000000")
        self.assertEqual(code, 2)
        self.assertEqual(err.splitlines(), ['wl_infer: error: w-0000000000: wl status failed: no wanted item matching '
                                            '"w-0000000000"'])
        code, out, err = self.cli("-q", "status", good, bad)
        self.assertEqual((code, out), (0, "in_review\nin_review\n"))


class ReadmeBlock(object):
    """A fenced block of README.md: the section it is in, its language
    ("sh": commands to run; "text": a usage form; "": a sample output),
    its lines, and for "sh" its commands (a here-document with its lines),
    each with the exit status its comment gives ("exits N"), else 0."""

    def __init__(self, section, language, lines):
        self.section, self.language, self.lines = section, language, lines
        self.commands = []
        while lines and language == "sh":
            line, lines = lines[0], lines[1:]
            heredoc = re.search(r"<<'?(\w+)'?", line)
            if heredoc:  # the here-document's lines belong to its command
                end = lines.index(heredoc.group(1)) + 1
                line, lines = "\n".join([line] + lines[:end]), lines[end:]
            code = re.search(r"#[^\n']*\bexits (\d+)", line.split("\n")[0])
            self.commands.append((line, int(code.group(1)) if code else 0))


def readme_blocks():
    """Every fenced block of README.md, in order."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    blocks, section = [], None
    for part in re.split(r"^(```\w*\n.*?^```)\n", readme, flags=re.S | re.M):
        if part.startswith("```"):
            language, _, body = part[3:-3].partition("\n")
            blocks.append(ReadmeBlock(section, language, body.rstrip("\n").split("\n")))
        else:
            headings = re.findall(r"^#+ (.+)$", part, re.M)
            section = headings[-1] if headings else section
    return blocks


def matches_sample(sample, output):
    """Whether a README sample is what a command printed: line for line, a
    line "  ..." standing for any lines."""
    lines, at = output.splitlines(), 0
    for line in sample:
        if line.strip() == "...":
            continue
        try:
            at = lines.index(line, at) + 1
        except ValueError:
            return False
    return True


class SandboxTest(unittest.TestCase):
    def test_the_readme_runs_as_written_in_the_sandbox_and_its_samples_are_what_it_prints(self):
        env = dict(os.environ)
        for name in ("WL_BIN", "OLLAMA_HOST", "XDG_STATE_HOME"):
            env.pop(name, None)
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "test_wl_infer.py"), "sandbox"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(proc.stderr.close)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        out = Lines(proc.stdout)
        wait_for(lambda: out.has("# Ctrl-C here"), "the sandbox", deadline=60)
        [export] = [line for line in out.lines if line.startswith("export ")]
        folder = re.search(r"fake wl board in (\S+),", out.lines[0]).group(1)
        blocks = readme_blocks()
        sections = [b.section for b in blocks]
        # every command block from the Quick start to Development, in order, in one shell and one folder
        runnable = [b for b in blocks[sections.index("Quick start"):sections.index("Development")]
                    if b.language == "sh"]
        commands = [c for b in runnable for c in b.commands]
        here = self.empty_folder()
        script = "\n".join([export, "cd %s" % shlex.quote(here)] + [
            '%s\nrc=$?; echo "exit: $rc"; echo "exit: $rc" >&2' % command for command, _ in commands])
        shell = subprocess.run(["sh", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True, timeout=120)
        exits = [int(code) for code in re.findall(r"^exit: (\d+)$", shell.stdout, re.M)]
        self.assertEqual(exits, [code for _, code in commands], shell.stdout + shell.stderr)
        self.assertNotIn("Traceback", shell.stderr)
        # what each command printed, by the marks after them
        printed = dict(zip([c for c, _ in commands], zip(re.split(r"^exit: \d+\n", shell.stdout, flags=re.M),
                                                         re.split(r"^exit: \d+\n", shell.stderr, flags=re.M))))

        def printed_by(fragment):
            [found] = [o for command, o in printed.items() if fragment in command]
            return found

        with open(os.path.join(here, "answers.jsonl")) as f:
            answers = [json.loads(line) for line in f]
        self.assertEqual([(a["custom_id"], a["verdict"]) for a in answers],
                         [("colour", "VERIFIED"), ("2", "VERIFIED"), ("hi", "VERIFIED")])
        with open(os.path.join(here, "output.jsonl")) as f:
            output = [json.loads(line) for line in f]
        self.assertEqual([o["response"]["body"]["object"] for o in output],
                         ["text_completion", "text_completion", "chat.completion"])
        self.assertEqual(os.path.getsize(os.path.join(here, "summary.txt")), 0)
        self.assertIn("verified\n", printed_by('then echo "verified"')[0])
        self.assertEqual(printed_by("xargs")[0], "")  # everything in review there verifies (PipelineTest: a forgery)
        # the samples: the audit table and the verify report are the sandbox's, the worker's log its shape
        samples = dict((b.section, b.lines) for b in blocks if b.language == "")
        audit = printed_by("audit --tolerance 0.5")[0]
        self.assertTrue(matches_sample(samples["audit"], audit), audit)
        verify = subprocess.run(["sh", "-c", "%s\nwl_infer.py verify w-b42c0bc5b4" % export], env=env,
                                stdout=subprocess.PIPE, universal_newlines=True).stdout
        self.assertTrue(matches_sample(samples["verify"], verify), verify)

        def shape(text):  # a log's lines without their times, rates and port, in order
            text = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "TIME", text)
            text = re.sub(r"127\.0\.0\.1:\d+|\d+\.\d+|\d+%", "N", text)
            return sorted(line for line in text.splitlines() if line.strip())
        self.assertEqual(shape("\n".join(samples["Running a worker"])), shape(printed_by("work --once")[1]))
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(60), 0, proc.stderr.read())
        self.assertFalse(os.path.exists(folder))
        self.assertIn("# sandbox stopped; %s deleted" % folder, out.text())

    def test_the_install_lines_work_without_a_bin_folder(self):
        [install] = [b for b in readme_blocks() if b.section == "Install"]
        home = self.empty_folder()
        shell = subprocess.run(["sh", "-c", "\n".join(c for c, _ in install.commands)], cwd=HERE,
                               env=dict(os.environ, HOME=home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True, timeout=60)
        self.assertEqual((shell.returncode, shell.stdout), (0, "wl_infer %s\n" % wl_infer.__version__), shell.stderr)
        self.assertTrue(os.access(os.path.join(home, "bin", "wl_infer.py"), os.X_OK))

    def empty_folder(self):

        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        return folder


class HelpTest(CliTest):
    def test_a_bare_call_lists_the_commands_and_exits_2(self):
        code, out, err = self.cli()
        self.assertEqual((code, out), (2, ""))
        lines = err.splitlines()
        self.assertEqual(lines[0], "usage: wl_infer.py [options] COMMAND [options]")
        width = max(len(command.name) for command in wl_infer.COMMANDS)
        for command in wl_infer.COMMANDS:
            self.assertIn("  %s  %s" % (command.name.ljust(width), command.help), lines)

    def test_each_command_says_what_it_does_lists_its_own_options_first_and_ends_with_examples(self):
        for command in wl_infer.COMMANDS:
            code, out, err = self.cli(command.name, "--help", env=self.env(COLUMNS="200"))
            self.assertEqual((code, err), (0, ""))
            lines = out.splitlines()
            self.assertEqual(lines[0], "usage: wl_infer.py %s %s" % (command.name, command.usage))
            self.assertEqual(lines[2], command.help[0].upper() + command.help[1:] + ".")
            own = re.search(r"\n(options|optional arguments):\n", out).start()  # Python 3.8-3.9 says the latter
            shared = out.index("\noptions for every command, before or after its name (--wasteland, --local-db, "
                               "--wl,\n--ollama, --timeout, --wl-timeout, --json, -q): see `wl_infer.py --help`\n")
            self.assertLess(own, shared)
            self.assertNotIn("--wasteland ORG/DB", out)  # the shared options are listed once, by the top help
            self.assertNotIn("--wl-timeout SECONDS", out)
            examples = out[out.index("\nexamples:\n"):].splitlines()[2:]
            self.assertTrue(2 <= len(examples) <= 3 and all("wl_infer.py " in e for e in examples), examples)
            self.assertGreater(out.index("\nexamples:\n"), shared)
        out = self.cli("verify", "--help", env=self.env(COLUMNS="200"))[1]
        self.assertIn("  ID  ", out.replace("   ", "  "))
        self.assertIn("the item's ID on the board, e.g. w-3f9a0c12be", out)
        self.assertIn("--tolerance NATS", out[:out.index("options for every command")])
        top = self.cli("--help", env=self.env(COLUMNS="200"))[1]
        for option in ("--wasteland ORG/DB", "--local-db", "--wl PATH", "--ollama URL", "--timeout SECONDS",
                       "--wl-timeout SECONDS", "--json", "-q, --quiet"):
            self.assertIn("  " + option, top[top.index("\noptions for every command:\n"):])

    def test_errors_and_usage_name_the_program_the_same_way(self):
        err = self.assertError(self.cli("run"), "the following arguments are required: ID")
        self.assertIn("(see `wl_infer.py run --help`)", err)
        self.assertTrue(self.cli("--help")[1].startswith("usage: wl_infer.py "))


class ListTest(CliTest):
    def test_table_and_json_show_every_job_and_undecodable_ones_as_such(self):
        plain = self.board.add(self.job(max_tokens=64))
        broken = self.board.add("what is \x1b[2J 1+1")
        other = self.board.add(self.job("bonjour", "qwen2.5:0.5b"))
        self.assertEqual(self.board.wl("claim", other, rig="carol").returncode, 0)
        code, out, err = self.cli("list")
        self.assertEqual(code, 0, err)
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["ID", "STATUS", "MODEL", "SEED", "MAX", "PROMPT"])
        self.assertEqual(len(lines), 3)  # stdout is the table; the count is for people, on stderr
        self.assertEqual(err, "2 open inference jobs\n")
        row = next(line for line in lines if line.startswith(plain))
        self.assertEqual(row.split(), [plain, "open", "llama3.2:1b", "42", "64", "what", "is", "1+1"])
        self.assertIn("(does not decode: job is not valid JSON", next(ln for ln in lines if ln.startswith(broken)))
        self.assertNotIn("\x1b", out)
        self.assertNotIn(other, out)
        code, out, err = self.cli("list", "--status", "all", "--model", "qwen2.5:0.5b", "--json")
        [doc] = json.loads(out)
        self.assertEqual((doc["id"], doc["status"], doc["claimed_by"], doc["job"]["prompt"], doc["posted_by"]),
                         (other, "claimed", "carol", "bonjour", "poster"))
        docs = json.loads(self.cli("list", "--json")[1])
        self.assertEqual([d["job"] is None for d in docs], [True, False])  # wl's order: newest first
        self.assertIn("not valid JSON", docs[0]["job_error"])
        self.assertEqual(self.board.commands(rig=self.rig), ["browse"] * 3)

    def test_a_job_that_does_not_decode_shows_its_whole_reason(self):
        long_name = self.board.add('{"prompt":"p","model":"llama 3 with a name long enough to be cut","seed":1}')
        empty = self.board.add("")  # a reason of its own, without any ": " to cut at
        lines = self.cli("list")[1].splitlines()
        self.assertTrue(next(x for x in lines if x.startswith(long_name)).endswith(
            '(does not decode: job field "model" "llama 3 with a name long enough to be cut" is not an Ollama '
            'model name (letters, digits and . _ / : -, starting with a letter or digit))'), lines)
        self.assertTrue(next(x for x in lines if x.startswith(empty)).endswith(
            "(does not decode: it has no description, so no job to run)"), lines)
        worker = self.cli("work", "--once")[2]
        self.assertIn("skipped %s (it has no description, so no job to run)" % empty, worker)
        self.assertIn('skipped %s (job field "model" "llama 3 with a name long enough to be cut" is not an Ollama '
                      'model name' % long_name, worker)

    def test_limit_status_and_an_empty_board(self):
        self.assertEqual(self.cli("list")[1:], ("", "No open inference jobs on the board.\n"))
        for _ in range(3):
            self.board.add(self.job())
        self.assertEqual(len(json.loads(self.cli("list", "--limit", "2", "--json")[1])), 2)
        code, out, err = self.cli("list", "--limit", "2")
        self.assertEqual((code, len(out.splitlines()), err), (0, 3, "showing 2 of 3 open inference jobs (--limit 2)\n"))
        self.assertEqual(self.cli("list", "--limit", "3")[2], "3 open inference jobs\n")
        self.assertEqual(self.cli("list", "--status", "in_review")[1:],
                         ("", "No in_review inference jobs on the board.\n"))
        self.assertError(self.cli("list", "--status", "done"), "invalid choice: 'done'")

    def test_a_board_longer_than_wl_lists_is_said_to_have_at_least_that_many(self):
        description = self.job(max_tokens=8)

        def fill(state):
            for n in range(1001):
                item_id = "w-%010x" % n
                state["items"][item_id] = {
                    "id": item_id, "title": "infer: %d" % n, "type": "inference", "priority": 2, "effort": "small",
                    "description": description, "posted_by": "poster", "claimed_by": "", "status": "open",
                    "project": "", "created": "", "updated": "", "completion": None, "stamp": None, "order": n}
        self.board.update(fill)
        code, out, err = self.cli("list", "--limit", "3")
        self.assertEqual((code, err), (0, "showing 3 of at least 1000 open inference jobs (--limit 3)\n"))

    def test_wl_failures_and_entries_that_are_not_items(self):
        self.board.fail("browse", message="dial tcp: i/o timeout", times=1)
        self.assertError(self.cli("list"), "wl browse failed: dial tcp: i/o timeout")
        self.board.fail("browse", stdout="<html>502 Bad Gateway</html>", times=1)
        self.assertError(self.cli("list"), "wl browse --json printed something that is not JSON: <html>")
        odd = [1, "w-1", {"id": "../etc"}, {"id": "w-0123456789", "title": 5, "priority": "high",
                                             "description": {"prompt": "x"}, "status": "open", "type": "inference"}]
        self.board.fail("browse", stdout=json.dumps(odd), times=1)
        code, out, err = self.cli("list", "--json")
        self.assertEqual(code, 0, err)
        [doc] = json.loads(out)
        self.assertEqual((doc["id"], doc["title"], doc["priority"], doc["job"]), ("w-0123456789", "", None, None))
        self.assertIn("has no description", doc["job_error"])


class AuditTest(CliTest):
    def own_completion(self, prompt):
        item_id = self.board.add(self.job(prompt))
        self.assertEqual(self.cli("run", item_id)[0], 0)
        return item_id

    def test_forged_honest_inconsistent_and_own_completions(self):
        honest = self.completed("honest")
        forged = self.completed("forged", output="a forged answer")
        job = wl_infer.make_job("inconsistent", "llama3.2:1b")
        bad_hash = dict(wl_infer.make_evidence(job, "x"), output_hash="sha256:" + "0" * 64)
        inconsistent = self.completed("inconsistent", evidence=wl_infer.encode_evidence(bad_hash))
        own = self.own_completion("own")
        requests = len(self.ollama.generate_requests())
        code, out, err = self.cli("audit", "--json")
        self.assertEqual(code, 1, err)
        docs = dict((d["id"], d) for d in json.loads(out))
        self.assertEqual(dict((i, d["verdict"]) for i, d in docs.items()),
                         {honest: "VERIFIED", forged: "MISMATCH", inconsistent: "MISMATCH", own: "VERIFIED"})
        self.assertEqual(docs[inconsistent]["cause"]["kind"], "inconsistent-evidence")
        self.assertEqual(docs[forged]["cause"]["kind"], "different-output")
        self.assertLess(docs[forged]["tokens_generated"], 3)
        self.assertEqual(docs[honest]["evidence"]["output_hash"], docs[honest]["actual_hash"])
        # cheapest first: the inconsistent claim is never re-run; the shortest claim is re-run first
        prompts = [b["prompt"] for b in self.ollama.generate_requests()[requests:]
                   if not b.get("raw") and not b.get("_debug_render_only")]  # the re-runs, not probe or render
        self.assertEqual(prompts[0], "forged")
        self.assertEqual(sorted(prompts), ["forged", "honest", "own"])
        # the table
        code, out, err = self.cli("audit")
        self.assertIn("Audited 4 completions in review: 2 verified, 2 mismatched, 0 errors", err)
        self.assertEqual(next(ln for ln in out.splitlines() if ln.startswith(forged)).split()[2:5],
                         ["MISMATCH", "different-output", "2"])  # the first token, and the probe's
        self.assertEqual([ln.split()[0] for ln in out.splitlines()], ["ID", own, inconsistent, forged, honest])
        self.assertIn("%s: inconsistent-evidence: the output does not hash to output_hash" % inconsistent, err)

        code, out, err = self.cli("audit", "--accept", "--reject", "--json")
        self.assertEqual(code, 1, err)
        actions = dict((d["id"], d["action"]) for d in json.loads(out))
        self.assertEqual(actions, {honest: "accepted", forged: "rejected", inconsistent: "rejected",
                                   own: "not accepted: completed by this rig (wl forbids accepting your own)"})
        self.assertEqual([self.board.item(i)["status"] for i in (honest, forged, inconsistent, own)],
                         ["completed", "claimed", "claimed", "in_review"])
        accept = next(c["argv"] for c in self.board.calls() if c["argv"][:2] == ["accept", honest])
        self.assertIn("--message=verified by wl_infer: " + docs[honest]["expected_hash"], accept)
        self.assertIn("--quality=5", accept)
        reject = next(c["argv"] for c in self.board.calls() if c["argv"][:2] == ["reject", forged])
        self.assertTrue(any(a.startswith("--reason=wl_infer audit: MISMATCH, different-output: at token 0")
                            for a in reject), reject)
        # only the rig's own completion is left in review, and it verifies
        code, out, err = self.cli("audit", "--accept")
        self.assertEqual(code, 0, err)
        self.assertIn("Audited 1 completion in review: 1 verified, 0 mismatched, 0 errors", err)

    def test_a_limit_that_cuts_the_audit_is_said(self):
        for prompt in ("one", "two", "three"):
            self.completed(prompt)
        code, out, err = self.cli("audit", "--limit", "2")
        self.assertEqual(code, 0, err)
        self.assertEqual(len(out.splitlines()), 3)
        self.assertEqual(err.splitlines()[1], "showing 2 of 3 completions in review (--limit 2); the rest were not "
                                              "audited")

    def test_errors_are_listed_and_exit_2_and_only_accept_and_reject_write(self):
        honest = self.completed("honest")
        broken = self.completed("broken", evidence="The answer is 2.")
        other = self.completed("bonjour", model="qwen2.5:0.5b")
        del self.ollama.models["qwen2.5:0.5b"]
        code, out, err = self.cli("audit", "--json")
        self.assertEqual(code, 2, err)
        docs = dict((d["id"], d) for d in json.loads(out))
        self.assertEqual(docs[honest]["verdict"], "VERIFIED")
        self.assertEqual(docs[broken], {"id": broken, "verdict": "ERROR",
                                        "error": "%s: evidence does not decode: evidence is not valid JSON "
                                                 "(Expecting value: line 1 column 1 (char 0))" % broken})
        self.assertIn("model qwen2.5:0.5b is not in the local Ollama", docs[other]["error"])
        code, out, err = self.cli("audit", "--model", "llama3.2:1b")
        self.assertIn("Audited 2 completions in review: 1 verified, 0 mismatched, 1 error", err)
        self.assertIn("%s: error: %s: evidence does not decode" % (broken, broken), err)
        self.assertEqual(set(self.board.commands(rig=self.rig)), {"browse", "status"})
        self.assertEqual(self.cli("audit", "--model", "mistral:7b")[1:], ("", "No inference completions in review.\n"))


class GoDecodingTest(CliTest):
    """Bytes from wl that are not UTF-8, read through the real command line
    as Go's wl infer reads them."""

    def plant(self, item_id, **fields):
        """Set an item's description or evidence to text with such bytes
        (surrogateescape: the fake wl prints them back as the raw bytes)."""
        def change(state):
            item = state["items"][item_id]
            if "description" in fields:
                item["description"] = fields["description"].decode("utf-8", "surrogateescape")
            if "evidence" in fields:
                item["completion"]["evidence"] = fields["evidence"].decode("utf-8", "surrogateescape")
        self.board.update(change)

    def test_each_byte_that_is_not_utf8_is_one_replacement_character(self):
        item_id = self.board.add(self.job())
        self.plant(item_id, description=b'{"prompt":"\xe2\x82","model":"llama3.2:1b","seed":1}')
        code, out, err = self.cli("status", item_id, "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["job"]["prompt"], "\ufffd\ufffd")
        # the size limit counts the bytes wl printed: 30,000 of them are 90,000 after replacement
        self.plant(item_id, description=b'{"prompt":"%s","model":"llama3.2:1b","seed":1}' % (b"\xff" * 30000))
        code, out, err = self.cli("status", item_id, "--json")
        self.assertEqual(json.loads(out)["job"]["prompt"], "\ufffd" * 30000)
        # evidence hashed over such bytes does not hold together as Go reads it: refuted without a re-run
        item_id = self.completed()
        output = b"a\xf0\x9f\x98b"
        self.plant(item_id, evidence=b'{"output":"%s","output_hash":"sha256:%s","model":"llama3.2:1b","seed":42}'
                   % (output, hashlib.sha256(output).hexdigest().encode()))
        code, out, err = self.cli("verify", item_id, "--json")
        self.assertEqual(code, 1, err)
        doc = json.loads(out)
        self.assertEqual((doc["cause"]["kind"], doc["evidence"]["output"]), ("inconsistent-evidence", "a\ufffd" * 1
                                                                             + "\ufffd\ufffdb"))
        self.assertEqual(self.ollama.generate_requests(), [])


class TerminalSafetyTest(CliTest):
    """Prompts, outputs, titles and error texts come from strangers: no
    report may carry a control character (ESC, C1, CR, BEL, DEL, ...) or a
    bidi override to the terminal, while --json keeps the exact text."""

    EVIL = "\x1b]0;pwned\x07\x1b[2J\x9b31m\x08\r\x7f\u202egnp.exe"

    def assertSafe(self, text):
        self.assertEqual([ch for ch in text if ch != "\n" and wl_infer._is_control(ch)], [], text)

    def cli_safe(self, *args, code=0):
        result = self.cli(*args)
        self.assertEqual(result[0], code, result)
        self.assertSafe(result[1] + result[2])
        FAULTS.count("reports with hostile text, free of control characters")
        return result

    def test_prompt_output_and_title_in_every_report(self):
        prompt, output = "p" + self.EVIL, "out" + self.EVIL
        self.ollama.outputs[("llama3.2:1b", prompt)] = output
        _, out, _ = self.cli_safe("post", "--prompt", prompt, "--model", "llama3.2:1b")
        self.assertIn("\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\x08\\r\\x7f\\u202egnp.exe", out)
        item_id = out.split("\n")[0].split()[-1]
        self.board.update(lambda s: s["items"][item_id].__setitem__("title", "infer: " + self.EVIL))
        for args in (("run", item_id), ("verify", item_id), ("status", item_id)):
            with self.subTest(args=args):
                self.assertIn("\\x1b]0;pwned", self.cli_safe(*args)[1])
        status = json.loads(self.cli("status", item_id, "--json")[1])
        self.assertEqual((status["job"]["prompt"], status["title"]), (prompt, "infer: " + self.EVIL))
        self.ollama.outputs[("llama3.2:1b", prompt)] = "out" + self.EVIL[::-1]  # a mismatch shows excerpts
        self.assertIn("submitted: ", self.cli_safe("verify", item_id, code=1)[1])

    def test_error_texts_from_wl_and_ollama(self):
        item_id = self.board.add(self.job())
        self.board.fail("status", message="boom" + self.EVIL, hint=self.EVIL, times=1)
        self.assertIn("boom\\x1b]0;pwned", self.cli_safe("status", item_id, code=2)[2])
        self.ollama.fail = (500, "llama runner " + self.EVIL)
        self.assertIn("llama runner \\x1b]0;pwned", self.cli_safe("run", item_id, code=2)[2])
        self.ollama.fail = None
        self.ollama.outputs[("llama3.2:1b", "what is 1+1")] = "kept" + self.EVIL
        self.board.fail("done", message="push " + self.EVIL)
        self.cli_safe("run", item_id, code=2)
        self.assertIn("kept\\x1b]0;pwned", self.cli_safe("spool")[1])
        bad = self.board.add(_MODEL % json.dumps("llama" + self.EVIL))
        self.assertIn("is not an Ollama model name", self.cli_safe("run", bad, code=2)[2])


    def test_board_wide_commands_list_work_and_audit(self):
        prompt = "p" + self.EVIL
        self.ollama.outputs[("llama3.2:1b", prompt)] = "out" + self.EVIL
        run = self.board.add(wl_infer.encode_job(wl_infer.make_job(prompt, "llama3.2:1b", max_tokens=64)))
        self.board.add(_MODEL % json.dumps("llama" + self.EVIL))  # skipped by work, listed as undecodable
        self.board.add("not json " + self.EVIL)
        self.board.add(wl_infer.encode_job(wl_infer.make_job("q", "m" + "\u202e" * 3, max_tokens=64)))
        self.assertIn("\\x1b]0;pwned", self.cli_safe("list")[1])
        self.assertIn('"llama\\u001b]0;pwned', self.cli_safe("work", "--once")[2])
        self.assertEqual(self.board.item(run)["status"], "in_review")
        self.board.fail("status", message="boom" + self.EVIL, times=1)
        self.assertIn("boom\\x1b]0;pwned", self.cli_safe("audit", code=2)[2])


class FeedbackTest(CliTest):
    """What a person sees while waiting: a status line on a terminal (never
    on a pipe, never with -q), and at once after a signal, what is happening."""

    def on_terminal(self, *args, env=None):
        """Run with stderr on a pseudo-terminal: (exit code, stdout, all that the terminal was sent)."""
        import pty

        master, slave = pty.openpty()
        proc = subprocess.Popen([sys.executable, WL_INFER] + list(args), env=env or self.env(),
                                stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        out, _ = proc.communicate(timeout=60)
        os.close(master)
        return proc.returncode, out.decode(), seen.decode()

    def test_run_shows_its_tokens_and_a_slow_wl_call_on_a_terminal_only(self):
        item_id = self.board.add(self.job(max_tokens=64))
        self.ollama.piece_chars, self.ollama.piece_delay = 2, 0.01
        self.board.fail("claim", delay=1.2, times=1)
        code, out, seen = self.on_terminal("run", item_id)
        self.assertEqual(code, 0, seen)
        self.assertIn("\r\x1b[Kwaiting for `wl claim %s` (1 s)" % item_id, seen)
        self.assertRegex(seen, r"\r\x1b\[Krunning %s with llama3\.2:1b: \d+ of 64 tokens, [\d.]+ tok/s" % item_id)
        self.assertNotIn("tok/s", out)
        self.assertTrue(seen.endswith("\r\x1b[KNext: wl_infer.py verify %s\r\n" % item_id), seen[-200:])
        item_id = self.board.add(self.job(prompt="again"))
        self.board.fail("claim", delay=1.2, times=1)
        code, out, err = self.cli("run", item_id)  # stderr is a pipe: no status line
        self.assertEqual((code, err), (0, "Next: wl_infer.py verify %s\n" % item_id))

    def test_verify_audit_and_work_say_what_they_wait_for(self):
        self.ollama.piece_delay = 0.02
        first, second = self.completed("one", eval_count=24), self.completed("two", eval_count=24)
        code, out, seen = self.on_terminal("verify", first)
        self.assertEqual(code, 0, seen)
        self.assertRegex(seen, r"verifying %s: \d+ of 24 tokens" % first)  # the evidence's eval_count
        code, out, seen = self.on_terminal("audit")
        self.assertEqual(code, 0, seen)
        for n, item_id in ((1, second), (2, first)):  # newest first, as wl lists them
            self.assertIn("%d of 2: reading %s" % (n, item_id), seen)
        self.assertRegex(seen, r"1 of 2: verifying w-[0-9a-f]+: \d+ of 24 tokens")
        self.assertRegex(seen, r"2 of 2: verifying w-[0-9a-f]+: \d+ of 24 tokens")
        job = self.board.add(self.job("three", max_tokens=64))
        code, out, seen = self.on_terminal("work", "--once")
        self.assertEqual(code, 0, seen)
        self.assertRegex(seen, r"work: %s \d+ tokens, [\d.]+ tok/s received; 0 done" % job)
        code, out, seen = self.on_terminal("-q", "verify", first)
        self.assertEqual((code, out, seen), (0, "", ""))

    def test_a_batch_says_how_far_its_posting_and_its_results_are(self):
        path = os.path.join(self.tmp.name, "b.jsonl")
        with open(path, "w") as f:
            f.write("".join(json.dumps({"prompt": "q%d" % n}) + "\n" for n in range(3)))
        code, out, seen = self.on_terminal("post", "--batch", path, "--model", "llama3.2:1b", "--max-tokens", "8")
        self.assertEqual((code, len(out.splitlines())), (0, 3), seen)
        self.assertRegex(seen, r"\r\x1b\[Kposting batch b: 2 of 3, [\d.]+ jobs/s, [\d.]+ s left")
        code, out, seen = self.on_terminal("results", "b", "--wait", "--interval", "0.1", "--wait-timeout", "0.5")
        self.assertEqual(code, 3, seen)
        self.assertRegex(seen, r"\r\x1b\[Kresults: 0 of 3 final, 3 not done yet; next poll in \d s")

    def test_a_signal_says_at_once_that_the_claim_is_being_released(self):
        item_id = self.board.add(self.job(max_tokens=64))
        self.ollama.stall_after = 2
        self.board.fail("unclaim", delay=30, times=1)  # a board that takes its time
        proc = subprocess.Popen([sys.executable, WL_INFER, "run", item_id], env=self.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        err = Lines(proc.stderr)
        wait_for(self.ollama.generating.is_set, "the generation")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: err.has("releasing the claim"), "the feedback")
        self.assertEqual(self.board.item(item_id)["status"], "claimed")  # said before wl unclaim has ended
        self.assertEqual(err.lines[0], "wl_infer: interrupted: releasing the claim on %s; press Ctrl-C again to "
                         "stop waiting, and the claim may stay held\n" % item_id)
        wait_for(lambda: "unclaim" in self.board.started(), "wl unclaim")
        proc.send_signal(signal.SIGINT)  # the impatient second one: wl is stopped, and we say what is left
        self.assertEqual(proc.wait(60), 130)
        self.assertIn("releasing the claim was interrupted, so %s may still be claimed by you" % item_id, err.text())

    def test_a_signal_during_a_wl_claim_says_it_waits_for_it(self):
        item_id = self.board.add(self.job(max_tokens=64))
        self.board.fail("claim", delay=30, times=1)
        proc = subprocess.Popen([sys.executable, WL_INFER, "run", item_id], env=self.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        err = Lines(proc.stderr)
        wait_for(lambda: "claim" in self.board.started(), "wl claim")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: err.has("interrupted"), "the feedback")
        self.assertEqual(err.lines[0], "wl_infer: interrupted: letting `wl claim %s` finish first, so that what it "
                         "did is known; press Ctrl-C again to stop it now (it may or may not have happened)\n"
                         % item_id)
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(60), 130)
        self.assertIn("stopped during `wl claim`, so %s may be claimed by you" % item_id, err.text())


# =============================================================================
# The fakes themselves: pinned to the contracts, so they cannot drift kinder
# =============================================================================


class FakeWlContractTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.board = FakeBoard(self.tmp.name, rig="alice", mode="wild-west")

    def test_post_report_and_no_push_hint(self):
        proc = self.board.wl("post", "--title", "infer: x", "--type=inference", "-d", "{}", "--priority=1",
                             "--effort=small", "--no-push")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        lines = proc.stdout.split("\n")
        self.assertRegex(lines[0], r"^✓ Posted wanted item: w-[0-9a-f]{10}$")
        self.assertEqual(lines[1:6], ["  Title:    infer: x", "  Type:     inference", "  Priority: 1",
                                      "  Effort:   small", "  Posted by: alice"])
        self.assertIn("  changes saved locally (--no-push)", lines)

    def test_status_layout_exact_spacing(self):
        item_id = self.board.add('{"prompt":"p"}', rig="alice")
        self.board.wl("claim", item_id)
        self.board.wl("done", item_id, "--evidence", "E")
        lines = self.board.wl("status", item_id).stdout.split("\n")
        self.assertEqual(lines[0], item_id + ": infer: test")
        self.assertIn("  Type:        inference     Priority: P2", lines)
        at = lines.index("  Description:")
        self.assertEqual(lines[at + 1:at + 5], ['    {"prompt":"p"}', "", "  Claimed by:  alice", ""])
        self.assertIn("  Completion:  " + self.board.item(item_id)["completion"]["id"], lines)
        self.assertRegex(self.board.item(item_id)["completion"]["id"], r"^c-[0-9a-f]{16}$")
        self.assertIn("    Evidence:    E", lines)
        self.assertIn("    Completed by: alice", lines)

    def test_help_for_every_command_as_cobra_prints_it(self):
        for command in ("post", "claim", "browse", "status"):
            for argv in ((command, "--help"), (command, "-h"), ("help", command)):
                proc = self.board.wl(*argv)
                self.assertEqual((proc.returncode, proc.stderr), (0, ""), argv)
                self.assertIn("Usage:\n  wl %s" % command, proc.stdout)
                self.assertIn("-h, --help", proc.stdout)
        self.assertIn("--description string", self.board.wl("post", "--help").stdout)
        self.assertIn("Available Commands:", self.board.wl("--help").stdout)
        self.assertEqual(self.board.load()["items"], {})  # help changes nothing

    def test_errors_exit_1_with_a_wl_line(self):
        item_id = self.board.add("{}")
        for argv, message in ((("frob",), 'wl: unknown command "frob" for "wl"'),
                              (("post", "--type=inference"), 'wl: required flag(s) "title" not set'),
                              (("claim", item_id, "--bogus"), "wl: unknown flag: --bogus"),
                              (("claim",), "wl: accepts 1 arg(s), received 0"),
                              (("done", item_id, "--evidence=x"), 'is not claimed by "alice" or does not exist'),
                              (("unclaim", item_id), "is not claimed or does not exist"),
                              (("status", "w-zz"), 'wl: no wanted item matching "w-zz"'),
                              (("post", "--title=t", "--type=chore"), 'wl: invalid type "chore"')):
            with self.subTest(argv=argv):
                proc = self.board.wl(*argv)
                self.assertEqual((proc.returncode, proc.stdout), (1, ""))
                self.assertTrue(proc.stderr.startswith("wl: "), proc.stderr)
                self.assertIn(message, proc.stderr)

    def test_lifecycle_accept_reject_and_own_completion(self):
        item_id = self.board.add("{}", rig="alice")
        self.assertEqual(self.board.wl("claim", item_id).returncode, 0)
        self.assertIn('is not open', self.board.wl("claim", item_id, rig="bob").stderr)
        self.board.wl("done", item_id, "--evidence=E1")
        self.assertIn("cannot accept your own completion", self.board.wl("accept", item_id, "--quality=5").stderr)
        self.assertEqual(self.board.wl("reject", item_id, "--reason=no", rig="carol").returncode, 0)
        self.assertEqual(self.board.item(item_id)["status"], "claimed")
        self.board.wl("done", item_id, "--evidence=E2")
        self.assertEqual(self.board.item(item_id)["completion"]["evidence"], "E1")  # the first one wins
        proc = self.board.wl("accept", item_id, "--quality=4", rig="carol")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(self.board.item(item_id)["status"], "completed")
        self.assertIn("  Stamp:       s-", self.board.wl("status", item_id).stdout)

    def test_browse_json(self):
        self.assertEqual(self.board.wl("browse", "--json").stdout.strip(), "null")
        first = self.board.add("d1")
        second = self.board.add("d2")
        self.board.wl("post", "--title=urgent", "--type=bug", "--priority=0")
        docs = json.loads(self.board.wl("browse", "--json", "--type", "inference", "--status=open").stdout)
        self.assertEqual([d["id"] for d in docs], [second, first])  # same priority: newest first
        self.assertNotIn("description", docs[0])
        self.assertNotIn("claimed_by", docs[0])  # empty strings are omitted
        docs = json.loads(self.board.wl("browse", "--json", "--long", "--limit=1").stdout)
        self.assertEqual((len(docs), docs[0]["title"]), (1, "urgent"))
        self.assertEqual(json.loads(self.board.wl("browse", "--json", "--long").stdout)[1]["description"], "d2")

    def test_pr_mode_lines_and_injected_failures(self):
        self.board.set_mode("pr")
        item_id = self.board.add("{}", rig="alice")
        out = self.board.wl("claim", item_id).stdout
        self.assertIn("  Branch:     wl/alice/" + item_id, out)
        self.assertIn("  Branch:      wl/alice/" + item_id, self.board.wl("status", item_id).stdout)
        self.board.fail("unclaim", message="push failed", hint="check your network", times=1)
        proc = self.board.wl("unclaim", item_id)
        self.assertEqual((proc.returncode, proc.stderr), (1, "wl: push failed\n\n  Hint: check your network\n"))
        self.assertEqual(self.board.wl("unclaim", item_id).returncode, 0)
        self.assertEqual([c["exit"] for c in self.board.calls()][-2:], [1, 0])

    def test_slow_and_after_the_write_failures(self):
        item_id = self.board.add("{}", rig="alice")
        self.board.fail("claim", delay=0.2, times=1)
        self.assertEqual(self.board.wl("claim", item_id).returncode, 0)  # slow, then done
        self.assertEqual(self.board.item(item_id)["status"], "claimed")
        self.board.fail("done", after=True, message="push failed: connection reset", times=1)
        proc = self.board.wl("done", item_id, "--evidence=e")
        self.assertEqual((proc.returncode, proc.stdout), (1, ""))
        self.assertEqual(self.board.item(item_id)["status"], "in_review")  # written all the same
        self.assertIn("is not claimed by", self.board.wl("done", item_id, "--evidence=e").stderr)
        self.assertEqual(self.board.started(), ["post", "claim", "done", "done"])


class FakeOllamaContractTest(OllamaClientTest):
    def test_version_show_and_errors(self):
        self.assertEqual(self.client._get_json("/api/version"), {"version": "0.12.11"})
        self.assertIn("details", self.client._get_json("/api/show", {"model": "llama3.2:1b"}))
        for path, body, fragment in (("/api/show", {"model": "nope"}, "model 'nope' not found (HTTP 404)"),
                                     ("/api/generate", {"prompt": "p"}, "model is required (HTTP 400)"),
                                     ("/api/nothing", None, "404 page not found (HTTP 404)")):
            with self.assertRaises(wl_infer.OllamaError) as ctx:
                self.client._get_json(path, body)
            self.assertIn(fragment, str(ctx.exception))

    def test_tags_document(self):
        models = self.client._get_json("/api/tags")["models"]
        self.assertEqual(sorted(m["name"] for m in models), ["llama3.2:1b", "qwen2.5:0.5b"])
        self.assertTrue(all(len(m["digest"]) == 64 for m in models))

    def test_final_object_and_length_limit(self):
        body = wl_infer.generate_request(wl_infer.make_job("p", "llama3.2:1b", 42, 2))
        body["stream"] = False
        doc = self.client._get_json("/api/generate", body)
        self.assertEqual((doc["done"], doc["done_reason"], doc["eval_count"]), (True, "length", 2))
        self.assertEqual(doc["response"], default_output("llama3.2:1b", "p")[:6])


    def test_rendering_raw_prompts_and_a_scripted_model(self):
        self.ollama.scripts[("llama3.2:1b", "s")] = ScriptedModel("abcdefghijkl", {1: 0.25}, piece_chars=3)
        render = wl_infer.render_request(wl_infer.make_job("s", "llama3.2:1b"))
        doc = self.client._get_json("/api/generate", render)
        self.assertEqual(doc, {"model": "llama3.2:1b", "created_at": "2026-11-26T10:00:00Z", "response": "",
                               "done": False, "_debug_info": {"rendered_template": render_template("s")}})
        self.assertEqual(self.client.rendered_prompt(wl_infer.make_job("s", "llama3.2:1b")), render_template("s"))
        self.ollama.render_supported = False  # an older server ignores the field and generates
        doc = self.client._get_json("/api/generate", render)
        self.assertEqual((doc["response"], doc["done_reason"], "_debug_info" in doc), ("abc", "length", False))
        self.assertIsNone(self.client.rendered_prompt(wl_infer.make_job("s", "llama3.2:1b")))
        body = dict(wl_infer.generate_request(wl_infer.make_job("s", "llama3.2:1b"), 5), stream=False)
        doc = self.client._get_json("/api/generate", body)
        self.assertEqual((doc["response"], doc["done_reason"]), ("abcdefghijkl", "stop"))
        self.assertEqual([(t["token"], t["logprob"]) for t in doc["logprobs"][1]["top_logprobs"]],
                         [("def", -0.05), ("DEF", -0.3), ("#1", -1.3), ("#2", -2.3), ("#3", -3.3)])
        # raw: the rendered prompt and the same text continue alike; a runner-up leads elsewhere
        raw = dict(body, raw=True, prompt=render_template("s") + "abc")
        self.assertEqual(self.client._get_json("/api/generate", raw)["response"], "defghijkl")
        raw["prompt"] = render_template("s") + "abcDEF"
        other = self.client._get_json("/api/generate", raw)["response"]
        self.assertEqual(len(other), 14)
        self.assertTrue(set(other.split()) <= set(w.strip() for w in BRANCH_WORDS), other)
        raw["options"] = dict(raw["options"], num_predict=2)  # exactly the tokens left: still "length"
        self.assertEqual(self.client._get_json("/api/generate", raw)["done_reason"], "length")
        with self.assertRaises(wl_infer.OllamaError) as ctx:
            self.client._get_json("/api/generate", dict(raw, system="be brief"))
        self.assertIn("raw mode does not support template, system, or context (HTTP 400)", str(ctx.exception))

    def test_byte_tokens_are_held_back_until_the_character_is_whole(self):
        self.ollama.byte_tokens = True
        self.ollama.outputs[("llama3.2:1b", "b")] = "a答"
        body = wl_infer.generate_request(wl_infer.make_job("b", "llama3.2:1b"))
        body["stream"] = False
        doc = self.client._get_json("/api/generate", body)
        self.assertEqual((doc["response"], doc["eval_count"]), ("a答", 4))
        self.assertEqual([(e["token"], e["bytes"]) for e in doc["logprobs"]],
                         [("a", [97]), ("\ufffd", [0xe7]), ("\ufffd", [0xad]), ("\ufffd", [0x94])])
        body["options"]["num_predict"] = 3  # the limit falls inside 答: nothing of it is sent
        doc = self.client._get_json("/api/generate", body)
        self.assertEqual((doc["response"], doc["done_reason"]), ("a", "length"))
        gen = self.client.generate(wl_infer.make_job("b", "llama3.2:1b"))
        self.assertEqual((gen.text, gen.chunks, gen.token_ends), ("a答", 2, [1, 2, 2, 2]))

    def test_logprobs_thinking_and_older_servers(self):
        self.ollama.thinking[("llama3.2:1b", "p")] = "hmm, let me see"
        body = wl_infer.generate_request(wl_infer.make_job("p", "llama3.2:1b", 42, 3))
        body["stream"] = False
        doc = self.client._get_json("/api/generate", body)
        self.assertEqual(doc["thinking"], "hmm, let me see")
        self.assertEqual(len(doc["logprobs"]), 3)  # one per answer token
        entry = doc["logprobs"][1]
        self.assertEqual(set(entry), {"token", "logprob", "bytes", "top_logprobs"})
        self.assertEqual(entry["bytes"], list(entry["token"].encode("utf-8")))
        self.assertEqual([t["token"] for t in entry["top_logprobs"]], [entry["token"], "~"])
        self.assertEqual(entry["top_logprobs"][0]["logprob"], entry["logprob"])
        # streamed: thinking pieces first (empty response), then one entry per answer chunk
        gen = self.client.generate(wl_infer.make_job("p", "llama3.2:1b", 42, 3))
        self.assertEqual((gen.thinking, gen.text), ("hmm, let me see", doc["response"]))
        self.assertEqual(gen.chosen_logprobs(), [e["logprob"] for e in doc["logprobs"]])
        for top in (-1, 21, "2"):
            body["top_logprobs"] = top
            with self.assertRaises(wl_infer.OllamaError) as ctx:
                self.client._get_json("/api/generate", body)
            self.assertIn("top_logprobs must be between 0 and 20 (HTTP 400)", str(ctx.exception))
        self.ollama.logprobs_supported = False  # older servers ignore the fields
        self.assertNotIn("logprobs", self.client._get_json("/api/generate", body))
        self.assertIsNone(self.client.generate(wl_infer.make_job("p", "llama3.2:1b")).chosen_logprobs())


# =============================================================================
# Demo: the whole flow against the fakes (`make demo`)
# =============================================================================


def demo():
    ollama = FakeOllama()
    ollama.piece_delay = 0.01
    ollama.outputs[("llama3.2:1b", "What is 1+1? Answer in one sentence.")] = "1 + 1 equals 2."
    ollama.start()
    with tempfile.TemporaryDirectory() as folder:
        board = FakeBoard(folder, rig="alice", mode="wild-west")
        base_env = dict(os.environ, WL_BIN=board.exe, OLLAMA_HOST=ollama.address,
                        XDG_STATE_HOME=os.path.join(folder, "state"))  # the spool, in the temp folder

        def step(rig, comment, *args):
            print("\n# %s (as %s)" % (comment, rig))
            print("$ wl_infer.py " + " ".join(_shell_quote(a) for a in args))
            sys.stdout.flush()
            proc = subprocess.run([sys.executable, WL_INFER] + list(args), env=dict(base_env, FAKE_WL_RIG=rig),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                                  cwd=folder)
            sys.stdout.write(proc.stdout)  # stdout and stderr in one pipe: in order, as a terminal shows them
            print("[exit %d]" % proc.returncode)
            return proc.stdout

        print("wl_infer demo: a fake Ollama at %s and a fake wl board in %s" % (ollama.address, folder))
        out = step("alice", "a poster puts a job on the board", "post", "--prompt",
                   "What is 1+1? Answer in one sentence.", "--model", "llama3.2:1b", "--max-tokens", "64")
        item_id = re.search(r"Posted inference job: (w-[0-9a-f]+)", out).group(1)
        step("bob", "a worker claims it, runs it on its Ollama and submits the evidence", "run", item_id)
        step("carol", "anyone re-runs it and compares the hashes", "verify", item_id)
        step("alice", "the poster looks at the item", "status", item_id)
        completion = board.item(item_id)["completion"]

        def forge(**changes):
            evidence = dict(wl_infer.decode_evidence(completion["evidence"]), **changes)
            evidence["output_hash"] = changes.get("output_hash") or wl_infer.output_hash(evidence["output"])
            board.update(lambda s: s["items"][item_id]["completion"].__setitem__(
                "evidence", wl_infer.encode_evidence(evidence)))

        forge(output="1 + 1 equals 3.")
        step("carol", "a forged output with its hash recomputed: refuted after a few tokens", "verify", item_id)
        forge(output="1 + 1 equals 3.", output_hash="sha256:" + "0" * 64)
        step("carol", "an output that does not match its own hash: refuted without the model", "verify", item_id)
        forge(output="1 + 1 equals 2.")
        ollama.near_ties[4] = (" 2.", 0.2)  # the claim's token was the runner-up
        ollama.outputs[("llama3.2:1b", "What is 1+1? Answer in one sentence.")] = "1 + 1 equals 3."
        step("carol", "an honest worker whose hardware flipped a near-tie: a MISMATCH, diagnosed", "verify", item_id)

        story = "Tell me a story."
        ollama.scripts[("llama3.2:1b", story)] = ScriptedModel(TolerantVerificationTest.TEXT, {5: 0.21, 12: 0.34})
        out = step("alice", "a longer job", "post", "--prompt", story, "--model", "llama3.2:1b", "--max-tokens", "64")
        story_id = re.search(r"Posted inference job: (w-[0-9a-f]+)", out).group(1)
        ollama.flips = {5, 12}  # bob's hardware takes the runner-up at two near-ties
        step("bob", "a worker on other hardware runs it", "run", story_id)
        ollama.flips = set()
        step("carol", "exact verification on carol's hardware: a MISMATCH at the first near-tie", "verify", story_id)
        step("carol", "tolerant verification: the near-ties are taken, the rest must follow from the model",
             "verify", story_id, "--tolerance", "0.5")
        step("carol", "sampled verification: three windows of four tokens instead of the whole output",
             "verify", story_id, "--tolerance", "0.5", "--sample", "3", "--window", "4", "--sample-seed", "1")

        out = step("alice", "another job", "post", "--prompt", "Name a prime number.", "--model", "llama3.2:1b",
                   "--max-tokens", "32")
        item_id = re.search(r"Posted inference job: (w-[0-9a-f]+)", out).group(1)
        board.fail("done", message="push rejected: upstream changed (non-fast-forward)", times=3)
        step("bob", "the board refuses the submission three times: the claim is released, the result kept",
             "run", item_id)
        step("bob", "what is kept on this box", "spool")
        step("bob", "the next run claims again and submits the kept result, without generating again",
             "run", item_id)

        ollama.near_ties.clear()  # back to the worker's own hardware
        ollama.outputs[("llama3.2:1b", "What is 1+1? Answer in one sentence.")] = "1 + 1 equals 2."
        for prompt, model, max_tokens in (("Name a colour.", "llama3.2:1b", 32), ("Say hi.", "llama3.2:1b", 16),
                                          ("Bonjour ?", "mistral:7b", 32), ("Write a novel.", "llama3.2:1b", 0)):
            job = wl_infer.encode_job(wl_infer.make_job(prompt, model, max_tokens=max_tokens))
            board.wl("post", "--title=infer: " + prompt, "--type=inference", "--description=" + job, rig="alice")
        step("bob", "the open jobs on the board", "list")
        step("bob", "a worker takes every job it can do (one poll, for cron; `work` alone runs forever)",
             "work", "--once")
        step("alice", "the poster verifies every completion in review, tolerant of near-ties from other hardware: "
             "accepts the verified, rejects the refuted", "audit", "--tolerance", "0.5", "--accept", "--reject")

        lines = [json.dumps({"prompt": "Translate to French: %s" % w, "custom_id": w}) for w in ("cat", "dog", "bird")]
        lines += [openai_line("sum", prompt="2+2=", model="llama3.2:1b", max_tokens=8),
                  chat_line("hello", "Say hello.", model="llama3.2:1b", max_tokens=16)]
        with open(os.path.join(folder, "prompts.jsonl"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n# the poster's file of five prompts: our lines and OpenAI batch requests\n$ cat prompts.jsonl")
        print("\n".join(lines))
        out = step("alice", "the poster posts them all, each line once", "post", "--batch", "prompts.jsonl",
                   "--model", "llama3.2:1b", "--max-tokens", "32")
        dog = out.splitlines()[1].split()[0]
        job = wl_infer.decode_job(board.item(dog)["description"])
        board.wl("claim", dog, rig="mallory")
        board.wl("done", dog, "--evidence=" + wl_infer.encode_evidence(wl_infer.make_evidence(job, "chien, probably")),
                 rig="mallory")
        print("\n# (mallory claims the dog job and submits a made-up answer)")
        step("bob", "a worker takes the rest", "work", "--once")
        step("alice", "the poster collects the answers as OpenAI's Batch API writes them, each re-run before it is "
             "trusted: the forged one is an error line", "results", "prompts.jsonl", "--wait", "--format", "openai")
        step("alice", "and acts on them: the verified accepted, the refuted rejected (back to mallory)", "results",
             "prompts.jsonl", "--accept", "--reject")
    ollama.stop()


def sandbox():
    """`make sandbox`: the fake Ollama and the fake wl on a fresh board, for
    trying the README's commands by hand. Prints the lines to paste into
    another shell, then runs until Ctrl-C (or SIGTERM) and deletes the board.
    The board starts with work from other rigs: an open job, an honest
    completion, one from other hardware (a near-tie) and a forged one."""

    ollama = FakeOllama()
    ollama.piece_delay = 0.02  # slow enough to watch the progress line
    story = "Tell me a story."
    ollama.scripts[("llama3.2:1b", story)] = ScriptedModel(TolerantVerificationTest.TEXT, {5: 0.21, 12: 0.34})
    ollama.start()
    folder = tempfile.mkdtemp(prefix="wl-infer-sandbox-")
    stop = threading.Event()
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        signal.signal(getattr(signal, name), lambda *_: stop.set())
    try:
        board = FakeBoard(folder, rig="you", mode="wild-west")
        os.symlink(WL_INFER, os.path.join(folder, "wl_infer.py"))  # on PATH, as after the install
        env = dict(os.environ, PATH=folder + os.pathsep + os.environ.get("PATH", ""), OLLAMA_HOST=ollama.address,
                   XDG_STATE_HOME=os.path.join(folder, "state"))

        def as_rig(rig, *args):
            proc = subprocess.run([sys.executable, WL_INFER] + list(args), env=dict(env, FAKE_WL_RIG=rig),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
            assert proc.returncode == 0, proc.stderr
            return proc.stdout.strip()

        honest = as_rig("alice", "-q", "post", "--prompt", "Name a colour.", "--model", "llama3.2:1b",
                        "--max-tokens", "32")
        as_rig("carol", "-q", "run", honest)
        near_tie = as_rig("alice", "-q", "post", "--prompt", story, "--model", "llama3.2:1b", "--max-tokens", "64")
        ollama.flips = {5, 12}  # dave's hardware takes the runner-up at two near-ties
        as_rig("dave", "-q", "run", near_tie)
        ollama.flips = set()
        forged = as_rig("alice", "-q", "post", "--prompt", "Say hi.", "--model", "llama3.2:1b", "--max-tokens", "16")
        job = wl_infer.make_job("Say hi.", "llama3.2:1b", max_tokens=16)
        board.wl("claim", forged, rig="mallory")
        board.wl("done", forged, "--evidence=" + wl_infer.encode_evidence(wl_infer.make_evidence(
            job, "Hi! (typed by hand, not by the model)")), rig="mallory")
        as_rig("alice", "-q", "post", "--prompt", "Name a prime number.", "--model", "llama3.2:1b",
               "--max-tokens", "32")
        print("# wl_infer sandbox: a fake Ollama at %s (models: %s) and a fake wl board in %s, where you are "
              "rig 'you'.\n# Paste this line into another shell, then try the README's Quick start there:\n"
              "export PATH=%s:\"$PATH\" OLLAMA_HOST=%s XDG_STATE_HOME=%s\n"
              "# Ctrl-C here stops the sandbox and deletes the board."
              % (ollama.address, ", ".join(sorted(ollama.models)), folder, _shell_quote(folder), ollama.address,
                 _shell_quote(env["XDG_STATE_HOME"])), flush=True)
        stop.wait()
    finally:
        ollama.stop()
        shutil.rmtree(folder, ignore_errors=True)
    print("# sandbox stopped; %s deleted" % folder, flush=True)


def _shell_quote(arg):
    import shlex

    return shlex.quote(arg)


# =============================================================================
# Entry point
# =============================================================================


FAULT_TESTS = (FaultMatrixTest, VerifyFaultTest, WorkFaultTest, SignalTest, MalformedInputTest, SpoolTest,
               TerminalSafetyTest, PostBatchTest)


class _Result(unittest.TestResult):
    """One worker's results; progress marks go to stderr as tests end."""

    lock = threading.Lock()

    def _mark(self, char):
        with self.lock:
            sys.stderr.write(char)
            sys.stderr.flush()

    def addSuccess(self, test):
        unittest.TestResult.addSuccess(self, test)
        self._mark(".")

    def addFailure(self, test, err):
        unittest.TestResult.addFailure(self, test, err)
        self._mark("F")

    def addError(self, test, err):
        unittest.TestResult.addError(self, test, err)
        self._mark("E")

    def addSkip(self, test, reason):
        unittest.TestResult.addSkip(self, test, reason)
        self._mark("s")

    def addSubTest(self, test, subtest, err):
        unittest.TestResult.addSubTest(self, test, subtest, err)
        if err is not None:
            self._mark("F")


def _tests(suite):
    for test in suite:
        if isinstance(test, unittest.TestSuite):
            yield from _tests(test)
        else:
            yield test


def run_suite(classes=None):
    """Run every test (or those classes) on a few threads: the tests spend
    most of their time waiting on child processes, and each has its own
    board and Ollama. End with the fault tally and `N passed, N failed`.
    TEST_JOBS=1 runs them one at a time."""
    import queue

    loader = unittest.defaultTestLoader
    suite = (unittest.TestSuite(loader.loadTestsFromTestCase(c) for c in classes) if classes
             else loader.loadTestsFromModule(sys.modules[__name__]))
    pending = queue.Queue()
    # the longest first (the sandbox runs the whole README), so that it does not end the run alone
    for test in sorted(_tests(suite), key=lambda t: not isinstance(t, SandboxTest)):
        pending.put(test)
    jobs = int(os.environ.get("TEST_JOBS") or min(6, 3 * (os.cpu_count() or 1)))
    results = [_Result() for _ in range(jobs)]

    def worker(result):
        while True:
            try:
                test = pending.get_nowait()
            except queue.Empty:
                return
            test(result)

    fake_wl_executable()  # written before any thread can fork
    installed_copy()
    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sys.stderr.write("\n")
    problems = [(kind, test, text) for r in results
                for kind, found in (("FAIL", r.failures), ("ERROR", r.errors)) for test, text in found]
    for kind, test, text in problems:
        sys.stderr.write("=" * 70 + "\n%s: %s\n" % (kind, test) + "-" * 70 + "\n" + text + "\n")
    ran = sum(r.testsRun for r in results)
    skipped = sum(len(r.skipped) for r in results)
    failed = len(set(test.id() for _, test, _ in problems))
    print("Ran %d tests in %.1fs on %d threads" % (ran, time.monotonic() - started, jobs))
    if FAULTS.rows:
        print("faults and hostile input (%s):\n%s" % ("all passed" if not failed else "SOME FAILED", FAULTS.report()))
    print("tests: %d passed, %d failed, %d skipped" % (ran - failed - skipped, failed, skipped))
    return 0 if failed == 0 and ran > 0 else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["demo"]:
        demo()
    elif sys.argv[1:2] == ["sandbox"]:
        sandbox()
    elif sys.argv[1:2] == ["faults"]:
        sys.exit(run_suite(FAULT_TESTS))
    elif sys.argv[1:2] == ["fake-wl"]:
        sys.exit(fake_wl_main(sys.argv[3:], sys.argv[2]))
    else:
        sys.exit(run_suite())
