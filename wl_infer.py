#!/usr/bin/env python3
"""wl_infer: verifiable LLM inference jobs on the Wasteland wanted board.

Posters put inference jobs (prompt, model, seed, max tokens) on the board,
workers run them on their own Ollama with deterministic settings and submit
the output with its SHA-256, and anyone can re-run a job and compare hashes.
Jobs and evidence are byte-compatible with the Go `wl infer`.

One file, Python 3.8+ standard library only: copy it anywhere and run it.
Sections, in order: errors and exit codes; text safety; job/evidence codec;
Ollama client; wl driver; commands; command line.
"""

import os
import sys

__version__ = "0.1.0"

# Heavy modules (json, hashlib, http.client, subprocess, argparse) are
# imported inside the functions that need them: start-up time is what a
# user feels in a shell loop over the board.

# =============================================================================
# Errors and exit codes
# =============================================================================

EXIT_OK = 0  # success; for verify: VERIFIED
EXIT_MISMATCH = 1  # verify: the hashes differ
EXIT_ERROR = 2  # usage, bad job, wrong type or status, wl or Ollama failure
EXIT_INTERRUPTED = 130  # SIGINT / SIGTERM


class UserError(Exception):
    """An error a user can cause or meet: one line on stderr, exit 2."""


class JobError(UserError):
    """A job description or completion evidence that does not decode."""


class WlError(UserError):
    """wl failed; the message carries wl's own error text."""


class OllamaError(UserError):
    """Ollama failed or could not be reached; carries Ollama's own text."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the message says what was cleaned up."""


# =============================================================================
# Text safety: everything from the board or the model is untrusted
# =============================================================================

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _is_control(ch):
    o = ord(ch)
    return o < 0x20 or 0x7F <= o <= 0x9F


def printable(text, keep_newlines=False):
    """Replace control characters (C0, DEL, C1, so ESC too) with visible
    escapes, so untrusted text cannot drive the operator's terminal."""
    out = []
    for ch in text:
        if not _is_control(ch) or (keep_newlines and ch in "\n\t"):
            out.append(ch)
        else:
            out.append(_ESCAPES.get(ch) or "\\x%02x" % ord(ch))
    return "".join(out)


def preview(text, limit=80):
    """A one-line, terminal-safe excerpt, cut by characters (never inside a
    multi-byte character) with an ellipsis when shortened."""
    cut = text[:limit]
    return printable(cut) + ("…" if len(text) > limit else "")


# =============================================================================
# Job / evidence codec (no I/O here)
# =============================================================================
#
# Wire format, identical to the Go `wl infer`:
#   job (item description): {"prompt":s,"model":s,"seed":i,"max_tokens":i}
#       compact, max_tokens omitted when 0, seed always present.
#   evidence (completion):   {"output":s,"output_hash":"sha256:<hex>","model":s,"seed":i}
# Decoding follows Go's encoding/json rules so both sides accept exactly the
# same documents.

DEFAULT_SEED = 42
FIELD_LIMIT = 65535  # bytes: wl's description and evidence are TEXT columns
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1

JOB_FIELDS = (("prompt", str), ("model", str), ("seed", int), ("max_tokens", int))
EVIDENCE_FIELDS = (("output", str), ("output_hash", str), ("model", str), ("seed", int))


class _JsonFloat(str):
    """A JSON number with a fraction or exponent, kept as its source text so
    an error can show exactly what the document said (42.0 is not an int)."""


class _JsonObject(list):
    """A JSON object as its (key, value) pairs, in document order."""


def _reject_constant(name):
    # Python accepts NaN/Infinity; Go's decoder (and JSON) does not.
    raise ValueError("invalid JSON value %s" % name)


def _loads(text):
    import json

    return json.loads(
        text,
        object_pairs_hook=_JsonObject,
        parse_float=_JsonFloat,
        parse_constant=_reject_constant,
    )


def _go_string(value):
    """Go's decoder turns unpaired UTF-16 surrogate escapes (\\ud800) into
    U+FFFD; Python keeps them, and they cannot even be UTF-8 encoded."""
    if any("\ud800" <= ch <= "\udfff" for ch in value):
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in value)
    return value


def _folds_to(key, name):
    """Go matches a JSON key to a struct field by exact name, else by
    Unicode simple case folding (so "Prompt" and "ſeed" match)."""
    if len(key) != len(name):
        return False
    return all(k == n or k.lower().upper() == n.upper() for k, n in zip(key, name))


def _describe_json(value):
    if isinstance(value, _JsonObject):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, _JsonFloat):
        return "the number %s" % value
    if isinstance(value, int):
        return "the number %d" % value
    if isinstance(value, str):
        return "the string %s" % preview(_dumps(value), 40)
    return "null"


def decode_struct(text, fields, what):
    """Decode `text` into the given (name, type) fields exactly as Go's
    json.Unmarshal into a struct: unknown keys ignored, case-insensitive key
    match when there is no exact one, last duplicate wins, null leaves the
    zero value, integers must be integer literals within int64."""
    try:
        doc = _loads(text)
    except RecursionError:
        raise JobError("%s is not valid JSON: nested too deeply" % what)
    except ValueError as exc:
        raise JobError("%s is not valid JSON (%s)" % (what, exc))
    if not isinstance(doc, _JsonObject):
        raise JobError("%s must be a JSON object, got %s" % (what, _describe_json(doc)))
    result = {name: ("" if kind is str else 0) for name, kind in fields}
    names = [name for name, _ in fields]
    for key, value in doc:
        name = key if key in names else next((n for n in names if _folds_to(key, n)), None)
        if name is None or value is None:
            continue
        kind = dict(fields)[name]
        if kind is str:
            if not isinstance(value, str) or isinstance(value, _JsonFloat):
                raise JobError('%s field "%s" must be a string, got %s' % (what, name, _describe_json(value)))
            result[name] = _go_string(value)
        else:
            if type(value) is not int:
                raise JobError('%s field "%s" must be an integer, got %s' % (what, name, _describe_json(value)))
            if not INT64_MIN <= value <= INT64_MAX:
                raise JobError('%s field "%s" is out of the 64-bit integer range: %d' % (what, name, value))
            result[name] = value
    return result


def decode_job(text):
    job = decode_struct(text, JOB_FIELDS, "job")
    for name in ("prompt", "model"):
        if not job[name]:
            raise JobError('job field "%s" is missing or empty' % name)
    return job


def decode_evidence(text):
    evidence = decode_struct(text, EVIDENCE_FIELDS, "evidence")
    for name in ("output", "output_hash", "model"):
        if not evidence[name]:
            raise JobError('evidence field "%s" is missing or empty' % name)
    return evidence


def _dumps(obj):
    import json

    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def encode_go_json(obj):
    """Compact JSON exactly as Go's json.Marshal writes it: UTF-8 kept,
    and <, >, &, U+2028, U+2029 escaped (those characters only ever occur
    inside strings, so replacing them everywhere is safe)."""
    text = _dumps(obj)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def make_job(prompt, model, seed=DEFAULT_SEED, max_tokens=0):
    return {"prompt": prompt, "model": model, "seed": seed, "max_tokens": max_tokens}


def encode_job(job):
    doc = {"prompt": job["prompt"], "model": job["model"], "seed": job["seed"]}
    if job["max_tokens"]:
        doc["max_tokens"] = job["max_tokens"]
    return encode_go_json(doc)


def output_hash(output):
    """sha256 of the output's UTF-8 bytes, exactly as Ollama returned it."""
    import hashlib

    return "sha256:" + hashlib.sha256(output.encode("utf-8")).hexdigest()


def make_evidence(job, output):
    return {"output": output, "output_hash": output_hash(output),
            "model": job["model"], "seed": job["seed"]}


def encode_evidence(evidence):
    return encode_go_json({name: evidence[name] for name, _ in EVIDENCE_FIELDS})


def check_field_size(text, what, advice):
    size = len(text.encode("utf-8"))
    if size > FIELD_LIMIT:
        raise UserError("%s is %d bytes, over wl's %d-byte field limit; %s"
                        % (what, size, FIELD_LIMIT, advice))


def ollama_options(job):
    """The options Go sends, so both implementations produce the same text."""
    options = {"temperature": 0, "seed": job["seed"]}
    if job["max_tokens"] > 0:
        options["num_predict"] = job["max_tokens"]
    return options


def generate_request(job):
    return {"model": job["model"], "prompt": job["prompt"], "stream": True,
            "options": ollama_options(job)}


def full_model_name(name):
    """Ollama names always carry a tag: `llama3.2` means `llama3.2:latest`."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else name + ":latest"


def post_title(prompt, limit=60):
    """`infer: <first 60 characters>[...]`, on one line: whitespace runs and
    control characters become single spaces so wl's header stays one line."""
    flat = " ".join("".join(" " if _is_control(c) else c for c in prompt).split())
    return "infer: " + flat[:limit] + ("..." if len(flat) > limit else "")


# =============================================================================
# Ollama client (HTTP API over http.client, streaming NDJSON)
# =============================================================================

DEFAULT_OLLAMA = "http://127.0.0.1:11434"
MAX_LINE = 1 << 20  # one NDJSON line; anything longer is not a real token


def parse_ollama_host(value):
    """Interpret OLLAMA_HOST exactly as Ollama's envconfig.Host() does.
    Returns (scheme, host, port, base_path)."""
    s = (value or "").strip().strip("\"'").strip()
    default_port = 11434
    if "://" in s:
        scheme, hostport = s.split("://", 1)
        if scheme == "http":
            default_port = 80
        elif scheme == "https":
            default_port = 443
    else:
        scheme, hostport = "http", s
    hostport, _, path = hostport.partition("/")
    host, port = None, None
    if hostport.startswith("["):  # [v6]:port
        end = hostport.find("]")
        if end > 0 and hostport[end + 1:end + 2] == ":":
            host, port = hostport[1:end], hostport[end + 2:]
    elif hostport.count(":") == 1:
        host, port = hostport.split(":")
    if port is None:
        host, port = "127.0.0.1", str(default_port)
        if hostport:
            host = hostport.strip("[]")
    if not port.isdigit() or int(port) > 65535:
        port = str(default_port)  # Ollama warns and uses the default
    return scheme, host or "127.0.0.1", int(port), ("/" + path.strip("/")) if path.strip("/") else ""


def ollama_url(value):
    return _format_url(*parse_ollama_host(value))


def _format_url(scheme, host, port, path):
    shown = "[%s]" % host if ":" in host else host
    return "%s://%s:%d%s" % (scheme, shown, port, path)


class Generation(object):
    """What one generate call produced."""

    def __init__(self, text, tokens, final):
        self.text = text
        self.tokens = tokens  # stream pieces received (one per token)
        self.final = final  # the closing `done: true` object

    @property
    def eval_count(self):
        count = self.final.get("eval_count")
        return count if type(count) is int else self.tokens


class Ollama(object):
    def __init__(self, base, timeout=300.0):
        self.scheme, self.host, self.port, self.path = parse_ollama_host(base)
        self.url = _format_url(self.scheme, self.host, self.port, self.path)
        self.timeout = timeout
        if self.scheme not in ("http", "https"):
            raise UserError("Ollama address %s: scheme %r is not http or https" % (self.url, self.scheme))

    def _open(self, method, path, body=None):
        """Send one request; return (connection, response) with a 2xx status,
        else raise OllamaError carrying Ollama's own error text."""
        import http.client
        import socket

        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=self.timeout)
        try:
            data = None if body is None else _dumps(body).encode("utf-8")
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, self.path + path, body=data, headers=headers)
            resp = conn.getresponse()
        except socket.timeout:
            conn.close()
            raise OllamaError("Ollama at %s did not answer within %g s (--timeout); is it overloaded?"
                              % (self.url, self.timeout))
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise OllamaError("cannot reach Ollama at %s (%s); start it with `ollama serve` "
                              "or point --ollama / OLLAMA_HOST at it" % (self.url, _reason(exc)))
        if not 200 <= resp.status < 300:
            try:
                raw = resp.read(65536)
            except (OSError, http.client.HTTPException):
                raw = b""
            conn.close()
            raise OllamaError(self._http_error(resp.status, raw, body))
        return conn, resp

    def _http_error(self, status, raw, body):
        message = raw.decode("utf-8", "replace").strip()
        found = (_json_object(message) or {}).get("error")
        if isinstance(found, str):
            message = found
        text = "Ollama at %s: %s (HTTP %d)" % (self.url, message or "no error text", status)
        if status == 404 and body and "model" in body:
            text += "; pull the model with `ollama pull %s`" % body["model"]
        return text

    def _get_json(self, path, body=None):
        import http.client

        conn, resp = self._open("POST" if body is not None else "GET", path, body)
        try:
            raw = resp.read(16 << 20)
        except (OSError, http.client.HTTPException) as exc:
            raise OllamaError("reading %s from Ollama at %s failed: %s" % (path, self.url, _reason(exc)))
        finally:
            conn.close()
        doc = _json_object(raw.decode("utf-8", "replace"))
        if doc is None:
            raise OllamaError("Ollama at %s sent a response to %s that is not a JSON object" % (self.url, path))
        return doc

    def models(self):
        """Local models: {full name: digest}."""
        found = {}
        models = self._get_json("/api/tags").get("models")
        for entry in models if isinstance(models, list) else []:
            entry = entry if isinstance(entry, dict) else {}
            name = entry.get("name") or entry.get("model")
            if isinstance(name, str):
                digest = entry.get("digest")
                found[full_model_name(name)] = digest if isinstance(digest, str) else ""
        return found

    def find_model(self, name):
        """The local digest of model `name`, or None when it is not pulled."""
        wanted = full_model_name(name).lower()  # Ollama names are case-insensitive
        for have, digest in self.models().items():
            if have.lower() == wanted:
                return digest
        return None

    def generate(self, job, on_token=None):
        """Run the job, streaming; return a Generation. `on_token(n)` is
        called after each streamed token."""
        import http.client
        import socket

        conn, resp = self._open("POST", "/api/generate", generate_request(job))
        pieces, tokens, final = [], 0, None
        try:
            while final is None:
                line = resp.readline(MAX_LINE + 1)
                if not line:
                    break
                if len(line) > MAX_LINE:
                    raise OllamaError("Ollama at %s sent a stream line over %d bytes; "
                                      "this is not an Ollama server" % (self.url, MAX_LINE))
                obj = self._stream_object(line, tokens)
                if obj is None:
                    continue
                piece = obj.get("response", "")
                if not isinstance(piece, str):
                    raise OllamaError("Ollama at %s sent a `response` that is not a string" % self.url)
                pieces.append(piece)
                if obj.get("done") is True:
                    final = obj
                else:
                    tokens += 1
                    if on_token:
                        on_token(tokens)
        except socket.timeout:
            raise OllamaError("Ollama at %s sent nothing for %g s after %s (inactivity "
                              "timeout, --timeout); the server may be hung or overloaded"
                              % (self.url, self.timeout, _tokens(tokens)))
        except (OSError, http.client.HTTPException) as exc:
            raise OllamaError("connection to Ollama at %s lost after %s: %s"
                              % (self.url, _tokens(tokens), _reason(exc)))
        finally:
            conn.close()  # mid-stream, this cancels the generation on the server
        if final is None:
            raise OllamaError("Ollama at %s ended the stream after %s without its final "
                              "`done` message; the generation did not finish" % (self.url, _tokens(tokens)))
        # once over the whole text, not per token: a lone surrogate escape
        # becomes U+FFFD as Go decodes it (Python never merges adjacent ones)
        return Generation(_go_string("".join(pieces)), tokens, final)

    def _stream_object(self, line, tokens):
        line = line.strip()
        if not line:
            return None
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise OllamaError("Ollama at %s sent invalid UTF-8 after %s" % (self.url, _tokens(tokens)))
        obj = _json_object(text)
        if obj is None:
            raise OllamaError("Ollama at %s sent a stream line that is not a JSON object after %s: %s"
                              % (self.url, _tokens(tokens), preview(text, 60)))
        if "error" in obj:
            raise OllamaError("Ollama at %s failed after %s: %s"
                              % (self.url, _tokens(tokens), obj["error"]))
        return obj


def _tokens(n):
    return "1 token" if n == 1 else "%d tokens" % n


def _json_object(text):
    """A JSON object from a server's response as a dict, or None. (Jobs and
    evidence use the Go-compatible decoder above; this is for Ollama.)"""
    import json

    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _reason(exc):
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text if str(text).strip() else type(exc).__name__


class Progress(object):
    """A single updating line on stderr while generating (terminals only)."""

    def __init__(self, enabled, label):
        import time

        self.enabled = enabled
        self.label = label
        self.clock = time.monotonic
        self.start = self.clock()
        self.shown = 0.0

    def __call__(self, tokens):
        now = self.clock()
        if not self.enabled or now - self.shown < 0.1:
            return
        self.shown = now
        elapsed = now - self.start
        rate = tokens / elapsed if elapsed > 0 else 0.0
        sys.stderr.write("\r\x1b[K%s: %d tokens, %.1f tok/s, %.1fs" % (self.label, tokens, rate, elapsed))
        sys.stderr.flush()

    def clear(self):
        if self.enabled and self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


# =============================================================================
# wl driver (wl is always a child process; its output is parsed here)
# =============================================================================

DEFAULT_WL_TIMEOUT = 600.0
_ANSI_RE = None


def strip_ansi(text):
    global _ANSI_RE
    if _ANSI_RE is None:
        import re

        _ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
    return _ANSI_RE.sub("", text)


def find_executable(name):
    """Resolve the wl executable like a shell would, or say what was looked for."""
    if os.sep in name:
        if os.path.isfile(name) and os.access(name, os.X_OK):
            return name
        raise UserError("wl executable %s not found or not executable; set --wl or WL_BIN" % name)
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(folder or ".", name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise UserError("wl executable %r not found on PATH; install wl or set --wl PATH or WL_BIN" % name)


def wl_error_text(stderr, stdout=""):
    """wl's own failure message: the `wl: ...` line plus its `Hint:`."""
    lines = [ln.strip() for ln in strip_ansi(stderr).splitlines() if ln.strip()]
    message = next((ln[3:].strip() for ln in lines if ln.startswith("wl:")), None)
    if message is None:
        others = lines or [ln.strip() for ln in strip_ansi(stdout).splitlines() if ln.strip()]
        message = others[-1] if others else None
    hint = next((ln[5:].strip() for ln in lines if ln.startswith("Hint:")), None)
    if message and hint:
        message += " (hint: %s)" % hint
    return message


# Sections of `wl status` that may follow the description, in wl's order.
_STATUS_SECTIONS = ("  Claimed by:", "  Branch:", "  Completion:", "  Stamp:")


def parse_status(text):
    """Parse `wl status ID`. Returns a dict with id, title, status, type,
    posted_by, claimed_by, description (None when absent) and completion
    (None, or {id, completed_by, evidence_raw})."""
    lines = strip_ansi(text).replace("\r\n", "\n").split("\n")
    # The header `<id>: <title>` is the first line that starts with an ID
    # (a notice printed before it, e.g. about syncing, is skipped).
    while lines and not is_item_id(lines[0].partition(": ")[0]):
        lines.pop(0)
    if not lines:
        raise WlError("wl status printed no item header; got %s" % preview(text, 60))
    item_id, _, title = lines[0].partition(": ")
    item = {"id": item_id.strip(), "title": title, "status": None, "type": None,
            "posted_by": None, "claimed_by": None, "description": None, "completion": None}
    i = 1
    while i < len(lines):
        line = lines[i]
        if line == "  Description:":
            i, item["description"] = _status_description(lines, i + 1)
            continue
        value = line.partition(":")[2].strip()
        if line.startswith("  Status:"):
            item["status"] = value
        elif line.startswith("  Type:"):
            item["type"] = value.split()[0] if value else ""
        elif line.startswith("  Posted by:"):
            item["posted_by"] = value
        elif line.startswith("  Claimed by:"):
            item["claimed_by"] = value
        elif line.startswith("  Completion:"):
            if item["completion"] is not None:
                raise WlError("wl status output for %s has two Completion sections; the description "
                              "imitates wl's own output, refusing to guess" % item["id"])
            item["completion"] = {"id": value, "completed_by": None, "evidence_raw": None}
        elif line.startswith("    Evidence:") and item["completion"] is not None:
            item["completion"]["evidence_raw"] = line[len("    Evidence:"):].lstrip(" ")
        elif line.startswith("    Completed by:") and item["completion"] is not None:
            item["completion"]["completed_by"] = value
        i += 1
    if not item["status"]:
        raise WlError("wl status output for %s has no Status line; is this wl version supported?" % item["id"])
    return item


def _status_description(lines, start):
    """The description runs from after `  Description:` to the blank line
    before the next known section (or the end). Its first line carries four
    spaces of indent; continuation lines are printed raw."""
    end = len(lines)
    for j in range(start, len(lines) - 1):
        if lines[j] == "" and lines[j + 1].startswith(_STATUS_SECTIONS):
            end = j
            break
    body = lines[start:end]
    if end == len(lines):  # at the end of the output: drop the final newline(s)
        while body and body[-1] == "":
            body.pop()
    if body and body[0].startswith("    "):
        body[0] = body[0][4:]
    return end, "\n".join(body)


def parse_posted_id(text):
    """The new ID is the last word of `✓ Posted wanted item: w-...`."""
    for line in strip_ansi(text).splitlines():
        if "Posted wanted item:" in line and line.split():
            candidate = line.split()[-1]
            if is_item_id(candidate):
                return candidate
    raise WlError("wl post succeeded but printed no item ID; got %s" % preview(text, 80))


def is_item_id(text):
    """A wl item ID or unique prefix (w-3f9a0c12be, w-3f9)."""
    return (len(text) > 2 and text.startswith("w-") and len(text) <= 64
            and all(c in "0123456789abcdefghijklmnopqrstuvwxyz" for c in text[2:]))


class Wl(object):
    """Runs wl as a child process: argument lists only, values as --opt=value,
    NO_COLOR set, ANSI stripped, every failure carrying wl's own message."""

    def __init__(self, exe, wasteland=None, local_db=False, timeout=DEFAULT_WL_TIMEOUT, no_push=False):
        self.exe = exe
        self.global_args = (["--wasteland=" + wasteland] if wasteland else []) + (["--local-db"] if local_db else [])
        self.timeout = timeout
        self.no_push = no_push

    def call(self, command, *args, mutating=False):
        import subprocess

        argv = [self.exe, command] + list(args) + self.global_args
        if mutating and self.no_push:
            argv.append("--no-push")
        env = dict(os.environ, NO_COLOR="1")
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise WlError("wl %s did not finish within %g s and was stopped; the board may be "
                          "unreachable (raise the limit with --wl-timeout)" % (command, self.timeout))
        except OSError as exc:
            raise WlError("cannot run wl (%s): %s" % (self.exe, _reason(exc)))
        out = proc.stdout.decode("utf-8", "replace")
        if proc.returncode != 0:
            err = wl_error_text(proc.stderr.decode("utf-8", "replace"), out)
            raise WlError("wl %s failed: %s" % (command, err or "exit status %d and no message" % proc.returncode))
        return out

    def post(self, title, description):
        return parse_posted_id(self.call(
            "post", "--title=" + title, "--type=inference", "--priority=2", "--effort=small",
            "--description=" + description, mutating=True))

    def status(self, item_id):
        return parse_status(self.call("status", item_id))

    def claim(self, item_id):
        self.call("claim", item_id, mutating=True)

    def unclaim(self, item_id):
        self.call("unclaim", item_id, mutating=True)

    def done(self, item_id, evidence):
        self.call("done", item_id, "--evidence=" + evidence, mutating=True)


# =============================================================================
# Commands
# =============================================================================


class Context(object):
    """What a command works with: the parsed options, and the wl driver and
    Ollama client, each created on first use (status never touches Ollama)."""

    def __init__(self, args):
        self.args = args
        self._wl = None
        self._ollama = None

    @property
    def wl(self):
        if self._wl is None:
            a = self.args
            self._wl = Wl(find_executable(a.wl), a.wasteland, a.local_db, a.wl_timeout,
                          getattr(a, "no_push", False))
        return self._wl

    @property
    def ollama(self):
        if self._ollama is None:
            self._ollama = Ollama(self.args.ollama, self.args.timeout)
        return self._ollama

    def progress(self, label):
        return Progress(not self.args.quiet and sys.stderr.isatty(), label)

    def warn(self, message):
        sys.stderr.write("wl_infer: warning: %s\n" % printable(message))


class Report(object):
    """A command's result: exit code, the --json document, the human text."""

    def __init__(self, code, doc, text):
        self.code, self.doc, self.text = code, doc, text


def require_inference(item):
    if item["type"] != "inference":
        raise UserError("%s is a %s item, not an inference job" % (item["id"], item["type"] or "untyped"))


def job_of(item):
    """The decoded job of an item read with `wl status`."""
    require_inference(item)
    if item["description"] is None:
        raise JobError("%s has no description, so no job to run" % item["id"])
    try:
        return decode_job(item["description"])
    except JobError as exc:
        raise JobError("%s: %s" % (item["id"], exc))


def generate(ctx, job):
    """Run a job on the local Ollama with the progress line."""
    progress = ctx.progress("generating with %s" % printable(job["model"]))
    try:
        return ctx.ollama.generate(job, progress)
    finally:
        progress.clear()


def require_local_model(ctx, model):
    """Never claim work this box cannot do."""
    if ctx.ollama.find_model(model) is None:
        raise UserError("model %s is not in the local Ollama at %s; pull it with `ollama pull %s` "
                        "or leave the job to another worker" % (model, ctx.ollama.url, model))


def release_claim(ctx, item_id):
    """Give a claim back; returns a sentence saying how that went."""
    try:
        ctx.wl.unclaim(item_id)
        return "the claim on %s was released and the job is open again" % item_id
    except UserError as exc:
        return "releasing the claim also failed (%s); run `wl unclaim %s`" % (exc, item_id)


def run_job(ctx, item_id, skip_claim=False):
    """Read, check, claim, generate, submit. Returns (item, job, generation,
    evidence). Every way out after the claim either submits or releases."""
    item = ctx.wl.status(item_id)
    item_id = item["id"] or item_id
    allowed = ("open", "claimed") if skip_claim else ("open",)
    require_inference(item)
    if item["status"] not in allowed:
        raise UserError("%s is %s, not %s; %s" % (
            item_id, item["status"], " or ".join(allowed),
            "with --skip-claim the item must already be claimed" if skip_claim
            else "only open jobs can be claimed (use --skip-claim if you claimed it yourself)"))
    job = job_of(item)
    require_local_model(ctx, job["model"])
    if not skip_claim:
        ctx.wl.claim(item_id)
    try:
        gen = generate(ctx, job)
        evidence = make_evidence(job, gen.text)
        encoded = encode_evidence(evidence)
        check_field_size(encoded, "the evidence", "the job needs a smaller max_tokens")
        ctx.wl.done(item_id, encoded)
    except UserError as exc:
        if skip_claim:
            raise
        raise UserError("%s; %s" % (exc, release_claim(ctx, item_id)))
    except KeyboardInterrupt:
        raise Interrupted(release_claim(ctx, item_id) if not skip_claim
                          else "the claim on %s was left to its owner (--skip-claim)" % item_id)
    return item, job, gen, evidence


def verify_item(ctx, item):
    """Re-run an item's job and compare with its completion evidence.
    Returns a result dict; verdict is VERIFIED or MISMATCH."""
    job = job_of(item)
    completion = item["completion"]
    if completion is None or not completion["evidence_raw"]:
        raise UserError("%s has no completion evidence to verify (status %s)" % (item["id"], item["status"]))
    try:
        evidence = decode_evidence(completion["evidence_raw"])
    except JobError as exc:
        raise JobError("%s: %s" % (item["id"], exc))
    gen = generate(ctx, job)
    actual = output_hash(gen.text)
    return {"id": item["id"], "verdict": "VERIFIED" if actual == evidence["output_hash"] else "MISMATCH",
            "expected_hash": evidence["output_hash"], "actual_hash": actual,
            "job": job, "output": gen.text, "evidence": evidence, "completed_by": completion["completed_by"]}


def _job_lines(job, indent="  "):
    return [
        indent + "Model:       " + printable(job["model"]),
        indent + "Seed:        %d" % job["seed"],
        indent + "Max tokens:  " + ("%d" % job["max_tokens"] if job["max_tokens"] > 0 else "model default"),
        indent + "Prompt:      " + preview(job["prompt"]),
    ]


def cmd_post(ctx, args):
    prompt = read_prompt(args)
    job = make_job(prompt, args.model, args.seed, args.max_tokens)
    description = encode_job(job)
    check_field_size(description, "the job", "shorten the prompt")
    try:
        if ctx.ollama.find_model(job["model"]) is None:
            ctx.warn("model %s is not in the local Ollama at %s; the job is posted anyway, but "
                     "you cannot verify results until you `ollama pull %s`"
                     % (job["model"], ctx.ollama.url, job["model"]))
    except OllamaError as exc:
        ctx.warn("could not check the model locally: %s" % exc)
    title = post_title(prompt)
    item_id = ctx.wl.post(title, description)
    text = ["✓ Posted inference job: " + item_id] + _job_lines(job) + [
        "", "  Next: wl_infer.py run " + item_id]
    return Report(EXIT_OK, {"id": item_id, "title": title, "job": job}, text)


def read_prompt(args):
    given = [x for x in (args.prompt, args.prompt_file) if x is not None]
    if len(given) != 1:
        raise UserError("post needs exactly one of --prompt TEXT, --prompt - (stdin) or --prompt-file PATH")
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise UserError("cannot read --prompt-file %s: %s" % (args.prompt_file, _reason(exc)))
        source = "--prompt-file " + args.prompt_file
    elif args.prompt == "-":
        raw, source = sys.stdin.buffer.read(), "the prompt on stdin"
    else:
        raw, source = args.prompt.encode("utf-8", "surrogateescape"), "--prompt"
    try:
        prompt = raw.decode("utf-8")  # exact bytes: the prompt is part of what is hashed
    except UnicodeDecodeError:
        raise UserError("%s is not valid UTF-8 text" % source)
    if not prompt:
        raise UserError("the prompt is empty (%s)" % source)
    return prompt


def cmd_run(ctx, args):
    item, job, gen, evidence = run_job(ctx, args.id, args.skip_claim)
    item_id = item["id"]
    text = ["✓ Inference completed for " + item_id] + _job_lines(job) + [
        "  Tokens:      %d" % gen.eval_count,
        "  Output hash: " + evidence["output_hash"],
        "  Output:      " + preview(gen.text),
        "", "  Next: wl_infer.py verify " + item_id]
    return Report(EXIT_OK, {"id": item_id, "evidence": evidence}, text)


def cmd_verify(ctx, args):
    result = verify_item(ctx, ctx.wl.status(args.id))
    ok = result["verdict"] == "VERIFIED"
    text = ["✓ VERIFIED — hashes match" if ok else "✗ MISMATCH — hashes differ",
            "  Item:      %s (completed by %s)" % (result["id"], printable(result["completed_by"] or "unknown")),
            "  Expected:  " + printable(result["expected_hash"]),
            "  Actual:    " + result["actual_hash"],
            "  Output:    " + preview(result["output"])]
    if not ok:
        text.append("  Claimed:   " + preview(result["evidence"]["output"]))
    doc = dict((k, result[k]) for k in ("id", "verdict", "expected_hash", "actual_hash", "job", "output", "evidence"))
    return Report(EXIT_OK if ok else EXIT_MISMATCH, doc, text)


def cmd_status(ctx, args):
    item = ctx.wl.status(args.id)
    job, job_error = None, None
    try:
        job = job_of(item)
    except UserError as exc:
        job_error = str(exc)
    completion, evidence, evidence_error = item["completion"], None, None
    if completion is not None:
        try:
            evidence = decode_evidence(completion["evidence_raw"] or "")
        except JobError as exc:
            evidence_error = str(exc)
    text = ["%s: %s" % (item["id"], printable(item["title"])),
            "  Status:      " + printable(item["status"]),
            "  Type:        " + printable(item["type"] or "unknown"),
            "  Posted by:   " + printable(item["posted_by"] or "unknown")]
    if item["claimed_by"]:
        text.append("  Claimed by:  " + printable(item["claimed_by"]))
    if job is not None:
        text += ["  Job:"] + _job_lines(job, "    ")
    else:
        text += ["  Job:         does not decode (%s)" % printable(job_error),
                 "  Description: " + preview(item["description"] or "", 200)]
    if completion is not None:
        text += ["  Completion:  %s by %s" % (printable(completion["id"]),
                                              printable(completion["completed_by"] or "unknown"))]
        if evidence is not None:
            text += ["    Output hash: " + printable(evidence["output_hash"]),
                     "    Output:      " + preview(evidence["output"])]
        else:
            text += ["    Evidence does not decode (%s)" % printable(evidence_error)]
    doc = {"id": item["id"], "title": item["title"], "status": item["status"], "type": item["type"],
           "posted_by": item["posted_by"], "claimed_by": item["claimed_by"], "job": job,
           "description": item["description"],
           "completion": None if completion is None else {
               "id": completion["id"], "completed_by": completion["completed_by"],
               "evidence": evidence, "raw": completion["evidence_raw"]}}
    return Report(EXIT_OK, doc, text)


COMMANDS = {"post": cmd_post, "run": cmd_run, "verify": cmd_verify, "status": cmd_status}


# =============================================================================
# Command line
# =============================================================================


def _item_id(text):
    if not is_item_id(text):
        import argparse

        raise argparse.ArgumentTypeError("%r is not a wl item ID: IDs look like w-3f9a0c12be "
                                         "(any unique prefix, e.g. w-3f9a)" % text)
    return text


def _seed(text):
    value = int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(text)
    return value


def _max_tokens(text):
    value = int(text)
    if not 0 <= value <= INT64_MAX:
        raise ValueError(text)
    return value


def _positive(text):
    value = float(text)
    if not 0 < value < float("inf"):  # also refuses nan
        raise ValueError(text)
    return value


_seed.__name__ = "64-bit integer seed"
_max_tokens.__name__ = "non-negative integer"
_positive.__name__ = "positive number of seconds"


def build_parser():
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, our prefix, exit 2 (see main)
            raise UserError("%s (see `wl_infer.py %s--help`)"
                            % (message, (self.prog.split(" ", 1)[1] + " ") if " " in self.prog else ""))

    # Shared options are accepted before and after the command name: they are
    # on both parsers with SUPPRESS defaults, and defaults are filled in later.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--wasteland", metavar="ORG/DB", help="wasteland to use (passed to every wl call)")
    common.add_argument("--local-db", action="store_true", help="use wl's local Dolt clone (passed to wl)")
    common.add_argument("--wl", metavar="PATH", help="wl executable (default: $WL_BIN, else wl on PATH)")
    common.add_argument("--ollama", metavar="URL",
                        help="Ollama server (default: $OLLAMA_HOST, else %s)" % DEFAULT_OLLAMA)
    common.add_argument("--timeout", type=_positive, metavar="SECONDS",
                        help="Ollama inactivity timeout: no byte for this long (default 300); "
                             "a long generation is never cut for being long")
    common.add_argument("--wl-timeout", type=_positive, metavar="SECONDS",
                        help="limit for one wl call (default %g)" % DEFAULT_WL_TIMEOUT)
    common.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    parser = Parser(prog="wl_infer", parents=[common],
                    description="Verifiable LLM inference jobs on the Wasteland wanted board.",
                    epilog="Exit codes: 0 success/VERIFIED, 1 MISMATCH, 2 error, 130 interrupted.")
    parser.add_argument("--version", action="version", version="wl_infer " + __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("post", parents=[common], help="post an inference job")
    p.add_argument("--prompt", metavar="TEXT", help="the prompt; - reads it from stdin")
    p.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a file")
    p.add_argument("--model", required=True, metavar="TAG", help="Ollama model, e.g. llama3.2:1b")
    p.add_argument("--seed", type=_seed, default=DEFAULT_SEED, help="seed (default 42)")
    p.add_argument("--max-tokens", type=_max_tokens, default=0, metavar="N",
                   help="token limit (default 0: the model's default)")
    p.add_argument("--no-push", action="store_true", help="commit locally, do not push (wl --no-push)")

    p = sub.add_parser("run", parents=[common], help="claim a job, run it on the local Ollama, submit the result")
    p.add_argument("id", type=_item_id, metavar="ID")
    p.add_argument("--skip-claim", action="store_true", help="the item is already claimed (by you or a claimer)")
    p.add_argument("--no-push", action="store_true", help="commit locally, do not push (wl --no-push)")

    p = sub.add_parser("verify", parents=[common], help="re-run a completed job and compare hashes")
    p.add_argument("id", type=_item_id, metavar="ID")

    p = sub.add_parser("status", parents=[common], help="show a job, its claim and its completion")
    p.add_argument("id", type=_item_id, metavar="ID")
    return parser


def parse_args(argv):
    args = build_parser().parse_args(argv)
    defaults = {"wasteland": None, "local_db": False, "wl": os.environ.get("WL_BIN") or "wl",
                "ollama": None, "timeout": 300.0, "wl_timeout": DEFAULT_WL_TIMEOUT,
                "json": False, "quiet": False}
    for name, value in defaults.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    if args.ollama is None:
        args.ollama = os.environ.get("OLLAMA_HOST") or DEFAULT_OLLAMA
    return args


def _emit(stream, text):
    try:
        stream.write(text)
        stream.flush()
    except BrokenPipeError:  # `| head`: the reader is gone, nothing to report
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        except (OSError, ValueError):
            pass


def _json_text(doc):
    import json

    # UTF-8 as is; on any other stdout encoding, \u escapes (still valid JSON,
    # where the stream's backslashreplace fallback would corrupt it)
    utf8 = (getattr(sys.stdout, "encoding", "") or "").lower().replace("-", "") == "utf8"
    return json.dumps(doc, ensure_ascii=not utf8, indent=2) + "\n"


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt  # one path for both signals: clean up, exit 130


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # never die on a non-UTF-8 terminal
            stream.reconfigure(errors="backslashreplace")
    want_json = "--json" in argv
    try:
        import signal

        signal.signal(signal.SIGTERM, _on_sigterm)
        args = parse_args(argv)
        report = COMMANDS[args.command](Context(args), args)
    except UserError as exc:
        message = printable(str(exc))
        if want_json:
            _emit(sys.stdout, _json_text({"error": str(exc)}))
        _emit(sys.stderr, "wl_infer: error: %s\n" % message)
        return EXIT_ERROR
    except Interrupted as exc:
        _emit(sys.stderr, "\nwl_infer: interrupted; %s\n" % printable(str(exc)))
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        _emit(sys.stderr, "\nwl_infer: interrupted\n")
        return EXIT_INTERRUPTED
    _emit(sys.stdout, _json_text(report.doc) if args.json else "\n".join(report.text) + "\n")
    return report.code


if __name__ == "__main__":
    sys.exit(main())
