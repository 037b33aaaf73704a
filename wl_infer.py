#!/usr/bin/env python3
"""wl_infer: verifiable LLM inference jobs on the Wasteland wanted board.

Posters put inference jobs (prompt, model, seed, max tokens) on the board,
workers run them on their own Ollama with deterministic settings (temperature
0, the job's seed) and submit the output with its SHA-256, and anyone can
re-run a job and compare: VERIFIED or MISMATCH. Jobs and evidence are
byte-compatible with the Go `wl infer`, read and written as its
encoding/json does. One file, Python 3.8+ standard library only: copy it
anywhere and run it.

The flow:
  post    encode a Job, `wl post` it as an item of type inference.
  run     `wl status` the item, decode its Job, check it can run here, `wl
          claim`, generate on Ollama (streamed), keep the result on disk,
          `wl done` with the evidence. A JobRun does these steps; every way
          out after the claim either submits or releases it.
  work    the same JobRun steps for every eligible job, polling `wl browse`;
          claiming and submitting overlap generation.
  verify  read the completion as a Submission (the evidence decoded, the
          checks that need no model), plan the re-run (a Plan: the whole
          output, or with --sample windows of it, each a raw request from
          the output before it), then a Rerun streams it, comparing as it
          goes and stopping at the first character that differs (with
          --tolerance, a Step at each divergence forces a near-tie), and
          returns one Outcome. A Verification is the Submission and its
          Outcome; the rendering section turns it into the report and the
          --json document. `audit` and `results` verify the same way.
  post --batch  check every line of a file of jobs (ours or OpenAI's batch
          requests), then post each line once: a Ledger on disk records it
          before and after its `wl post`, so running it again resumes.
  results a Collector polls `wl browse`, reads each finished job once (`wl
          status`), verifies it as `verify` does on each Ollama server (or a
          spot check of each worker's), and writes a JSON line per job.

Output: stdout is data (a command's Report: its text, its -q lines or its
--json document); stderr is for people (notes, warnings, errors, and on a
terminal one status line saying what the command waits for).

Sections, in reading order: errors, exit codes and signals; text safety;
job/evidence codec; batch files; Ollama client; wl driver; state on disk
(the result spool, the batch ledgers); what every command works with;
running a job; verification; rendering a verification; the worker;
batches (posting, collecting results); commands; command line.

As a library (names in __all__): decode_job/encode_job and
decode_evidence/encode_evidence, make_job and make_evidence, output_hash,
parse_batch_line (a line of a batch file as a BatchRequest);
Ollama (models, generate, compare) and Wl (status, browse, claim, done,
...); Context(default_settings(...)) with the Signals you pass (none are
installed but by main()), and JobRun (check, claim, infer, submit);
verify_item(item, ollama) or verify_submission(Submission.of(item), ollama,
policy), which return a Verification, and verification_document. Errors
are UserError and its subclasses, their data in fields (WlError: command,
item_id, reason, refusal, conflict, item_status); only main() writes to
stdout. Decisions with several outcomes are one value with a `kind`: a
tolerant re-run's Step at a divergence, the worker's Eligibility of a job.
"""

__all__ = [
    # the codec: jobs and evidence as the Go `wl infer` reads and writes them
    "Job", "make_job", "decode_job", "encode_job", "make_evidence", "decode_evidence",
    "encode_evidence",
    "fit_evidence", "output_hash", "generate_request", "post_title",
    # batch files
    "parse_batch_line", "BatchRequest", "JobDefaults",
    # Ollama and wl
    "Ollama", "Generation", "Wl", "BoardItem", "Completion",
    # what a command works with, and running a job
    "Settings", "default_settings", "Context", "Signals", "JobRun",
    # verification
    "Policy", "Sample", "Submission", "Outcome", "Verification", "verify_item",
    "verify_submission",
    "verification_document",
    # errors, and the command line
    "UserError", "JobError", "WlError", "OllamaError", "main",
]

import argparse
import bisect
import collections
import fcntl
import hashlib
import json
import math
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

__version__ = "0.2.0"

# =============================================================================
# Errors, exit codes and signals
# =============================================================================

EXIT_OK = 0  # success; for verify: VERIFIED
EXIT_MISMATCH = 1  # verify: the hashes differ
EXIT_ERROR = 2  # usage, bad job, wrong type or status, wl or Ollama failure
EXIT_INTERRUPTED = 130  # SIGINT, SIGTERM or SIGHUP


class UserError(Exception):
    """An error a user can cause or meet: one line on stderr, exit 2.
    `lines`: what it sums up, one line each before it (a batch file's
    refused lines); `details`: more keys for the --json error document."""

    def __init__(self, message, lines=(), **details):
        Exception.__init__(self, message)
        self.lines, self.details = list(lines), details


class JobError(UserError):
    """A job description or completion evidence that does not decode:
    `reason` says what is wrong, and `item_id` (when known) where."""

    def __init__(self, reason, item_id=None):
        UserError.__init__(self, "%s: %s" % (item_id, reason) if item_id else reason)
        self.reason, self.item_id = reason, item_id


class WlError(UserError):
    """wl failed; the message carries wl's own error text. Its data, set
    where it is raised: `command` (wl's), `item_id` (the item the call was
    about, or None), `reason` (wl's own text), `refusal` (a short name
    from WL_REFUSALS when the board refused the request as made, else
    None), `conflict` (refused: trying again cannot help), `item_status`
    (the item's status read back after the failure, if known)."""

    def __init__(self, message, command=None, item_id=None, reason=None, refusal=None):
        UserError.__init__(self, message)
        self.command, self.item_id, self.refusal = command, item_id, refusal
        self.reason = reason or message
        self.conflict = refusal is not None
        self.item_status = None


def refused(exc):
    """True when `exc` is the board refusing a wl request as made."""
    return isinstance(exc, WlError) and exc.conflict


class OllamaError(UserError):
    """Ollama failed or could not be reached; carries Ollama's own text."""


class Interrupted(Exception):
    """A signal arrived; the message says what was cleaned up and what is left."""


class Signals(object):
    """SIGINT, SIGTERM and SIGHUP. A signal normally raises KeyboardInterrupt
    at once: a generation is aborted and the claim released. Inside
    `protected()` (a wl call that changes the board) the first signal is
    held until the call has finished, so we know whether the claim or the
    submission happened; callers act on it with `check()`. A second signal
    is never held: the user wants out, and we report what is left undone.
    `graceful` (the worker): signals are only counted; the first one asks
    to stop taking jobs, the second aborts (`aborting()`, `check()`)."""

    def __init__(self, graceful=False):
        self.received = 0
        self.holding = []  # what a first signal waits for: "`wl claim w-1`"
        self.graceful = graceful
        self.ignored = []  # the names of those we found ignored

    def install(self):
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            number = getattr(signal, name, None)
            if number is None:
                continue
            # it stays ignored (nohup, `cmd &` in a script)
            if signal.getsignal(number) is signal.SIG_IGN:
                self.ignored.append(name)
            else:
                signal.signal(number, self._handle)

    def _handle(self, signum, frame):
        self.received += 1
        if self.graceful:
            return
        if not (self.holding and self.received == 1):
            raise KeyboardInterrupt
        # said at once, and with os.write: the handler may have interrupted a write to sys.stderr
        _say_now("interrupted: letting %s finish first, so that what it did is known; press "
                 "Ctrl-C again to stop it now (it may or may not have happened)"
                 % self.holding[-1])

    def protected(self, what):
        """Hold a first signal while `what` runs (a wl call that changes
        the board); None: nothing is held."""
        return _Holding(self, what)

    def aborting(self):
        return self.received >= (2 if self.graceful else 1)

    def check(self):
        """Act on a held signal, now that it is safe to."""
        if self.aborting():
            raise KeyboardInterrupt


class _Holding(object):
    def __init__(self, signals, what):
        self.signals, self.what = signals, what

    def __enter__(self):
        if self.what:
            self.signals.holding.append(self.what)

    def __exit__(self, *exc):
        if self.what:
            self.signals.holding.pop()


def _say_now(message):
    """A line on stderr for a person who has just pressed Ctrl-C (on a
    terminal, over the status line or the ^C it echoed)."""
    try:
        os.write(2, ("%swl_infer: %s\n" % ("\r\x1b[K" if os.isatty(2) else "",
                                           message)).encode("utf-8", "replace"))
    except OSError:
        pass




# =============================================================================
# Text safety: everything from the board or the model is untrusted
# =============================================================================

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _is_control(ch):
    """C0, DEL and C1 (ESC and the one-byte CSI among them) drive a terminal;
    the bidi overrides and isolates reorder what is shown around them."""
    o = ord(ch)
    return o < 0x20 or 0x7F <= o <= 0x9F or 0x202A <= o <= 0x202E or 0x2066 <= o <= 0x2069


def printable(text):
    """Replace control characters with visible escapes (\\x1b, \\u202e), so
    untrusted text can neither drive the operator's terminal nor disguise
    what it shows."""
    out = []
    for ch in text:
        if not _is_control(ch):
            out.append(ch)
        else:
            out.append(_ESCAPES.get(ch) or ("\\x%02x" if ord(ch) < 0x100 else "\\u%04x") % ord(ch))
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
# Wire format, identical to the Go `wl infer` for its keys:
#   job (item description): {"prompt":s,"model":s,"seed":i,"max_tokens":i}
#       compact, max_tokens omitted when 0, seed always present.
#   evidence (completion):   {"output":s,"output_hash":"sha256:<hex>","model":s,"seed":i}
# Our additions come after Go's keys, and Go's decoder ignores them: a job may
# pin "model_digest" and, posted from a batch file, name its "batch" and
# "custom_id"; evidence carries provenance (PROVENANCE_FIELDS).
# Decoding follows Go's encoding/json rules so both sides accept exactly the
# same documents.

DEFAULT_SEED = 42
FIELD_LIMIT = 65535  # bytes: wl's description and evidence are TEXT columns
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
MAX_NESTING = 32  # JSON depth refused beyond this: no honest job or evidence needs more than 2
MODEL_NAME_MAX = 200  # characters; Ollama names are far shorter
LOGPROB_TOKENS = 1024  # evidence keeps the logprobs of the first this many tokens
TOP_LOGPROBS = 2  # asked of Ollama: the chosen token and its runner-up, enough to see a near-tie
TOLERANT_TOP_LOGPROBS = 5  # asked by tolerant verification: where to look for the submitted token
MAX_TOP_LOGPROBS = 20  # Ollama's own limit: candidates beyond it are a server's garbage

# model_digest, batch and custom_id are ours (a pin; where a batch file put the job)
JOB_FIELDS = (("prompt", str), ("model", str), ("seed", int), ("max_tokens", int),
              ("model_digest", str),
              ("batch", str), ("custom_id", str))
GO_EVIDENCE_FIELDS = (("output", str), ("output_hash", str), ("model", str), ("seed", int))
PROVENANCE_FIELDS = (("model_digest", str), ("ollama_version", str), ("options", dict),
                     ("done_reason", str),
                     ("eval_count", int), ("prompt_eval_count", int), ("eval_ms", int),
                     ("tokens_per_s", float),
                     ("logprobs", list), ("token_lengths", "lengths"), ("thinking_hash", str))
EVIDENCE_FIELDS = GO_EVIDENCE_FIELDS + PROVENANCE_FIELDS
_ZERO = {str: "", int: 0, float: None, dict: None, list: None, "lengths": None}  # absent / null


class _JsonNumber(str):
    """A JSON number kept as its source text, so an error can show exactly
    what the document said."""


class _JsonFloat(_JsonNumber):
    """A number with a fraction or exponent (42.0 is not an int)."""


class _JsonBigInt(_JsonNumber):
    """An integer too long for any int64 field. Python's int() refuses
    over 4,300 digits, where Go reads the document (and ignores the key)."""


class _JsonObject(list):
    """A JSON object as its (key, value) pairs, in document order."""


def _reject_constant(name):
    # Python accepts NaN/Infinity; Go's decoder (and JSON) does not.
    raise ValueError("invalid JSON value %s" % name)


def _json_int(digits):
    return int(digits) if len(digits) <= 20 else _JsonBigInt(digits)  # int64: 19 digits and a sign


def _loads(text):
    return json.loads(text, object_pairs_hook=_JsonObject, parse_float=_JsonFloat,
                      parse_int=_json_int,
                      parse_constant=_reject_constant)


def _go_string(value):
    """A string as Go holds it. wl's output is read with surrogateescape,
    one lone surrogate per byte that is not UTF-8, and JSON's \\ud800
    escapes decode to lone surrogates too; Go turns each of both into one
    U+FFFD (Python's "replace" would give one for a truncated sequence)."""
    try:
        value.encode("utf-8")  # fails on a surrogate: a scan at C speed
        return value
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in value)


# Go matches a key to a field by exact name, else by folding: ASCII case,
# and the two non-ASCII letters whose fold reaches ASCII (ſ for s, K for k).
# Python's case folding would also take the dotless ı for i; Go's does not.
_GO_FOLDS = {"\u017f": "s", "\u212a": "k"}


def _folds_to(key, name):
    """Whether JSON key `key` selects our (ASCII) field `name` as Go's decoder would."""
    if len(key) != len(name):
        return False
    return all(k == n or (k.isascii() and k.lower() == n.lower()) or _GO_FOLDS.get(k) == n.lower()
               for k, n in zip(key, name))


def _describe_json(value):
    if isinstance(value, _JsonObject):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, _JsonNumber):
        return "the number %s" % preview(value, 40)
    if isinstance(value, int):
        return "the number %d" % value
    if isinstance(value, str):
        return "the string %s" % preview(_dumps(value), 40)
    return "null"


def decode_struct(text, fields, what, null_allowed=True, limit=FIELD_LIMIT):
    """Decode `text` into the given (name, type) fields exactly as Go's
    json.Unmarshal into a struct: unknown keys ignored, case-insensitive key
    match when there is no exact one, last duplicate wins, null leaves the
    zero value, integers must be integer literals within int64. Text is
    untrusted: over the field limit or nested deeper than MAX_NESTING, it is
    refused before parsing (`limit` None: text we wrote ourselves). With
    null_allowed False, null is an error.
    Returns (the fields, the set of names the document gives)."""
    if limit is not None and _size(text) > limit:
        raise JobError("%s is %d bytes, over wl's %d-byte field limit"
                       % (what, _size(text), limit))
    if _nesting(text) > MAX_NESTING:
        raise JobError("%s nests arrays or objects more than %d deep" % (what, MAX_NESTING))
    try:
        doc = _loads(text)
    except ValueError as exc:
        raise JobError("%s is not valid JSON (%s)" % (what, exc))
    if not isinstance(doc, _JsonObject):
        raise JobError("%s must be a JSON object, got %s" % (what, _describe_json(doc)))
    result = {name: _ZERO[kind] for name, kind in fields}
    names = [name for name, _ in fields]
    given = set()
    for key, value in doc:
        name = key if key in names else next((n for n in names if _folds_to(key, n)), None)
        if name is None:
            continue
        given.add(name)
        if value is None and null_allowed:  # like Go: null leaves the field as it is
            continue
        result[name] = _decode_value(value, dict(fields)[name], '%s field "%s"' % (what, name))
    return result, given


def _nesting(text):
    """How deep arrays and objects nest, counting only brackets outside
    strings (a prompt may well contain "[[[")."""
    if text.count("[") + text.count("{") <= MAX_NESTING:
        return 0  # the usual case, without scanning
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _option_scalar(value, what):
    """A number, string or boolean of an evidence's options, as Go reads it."""
    if isinstance(value, _JsonNumber):
        return _finite(value, what)
    if isinstance(value, str):
        return _go_string(value)
    return value


def _decode_value(value, kind, what):
    if kind is str:
        if not isinstance(value, str) or isinstance(value, _JsonFloat):
            raise JobError("%s must be a string, got %s" % (what, _describe_json(value)))
        return _go_string(value)
    if kind is int:
        if isinstance(value, _JsonBigInt):
            raise JobError("%s is out of the 64-bit integer range: %s"
                           % (what, preview(value, 40)))
        if type(value) is not int:
            raise JobError("%s must be an integer, got %s" % (what, _describe_json(value)))
        if not INT64_MIN <= value <= INT64_MAX:
            raise JobError("%s is out of the 64-bit integer range: %d" % (what, value))
        return value
    if kind is float:
        if type(value) is not int and not isinstance(value, _JsonNumber):
            raise JobError("%s must be a number, got %s" % (what, _describe_json(value)))
        return _finite(value, what)
    if kind is dict:  # Ollama options: flat, values scalars or arrays of scalars (`stop`)
        if not isinstance(value, _JsonObject):
            raise JobError("%s must be an object, got %s" % (what, _describe_json(value)))
        options = {}
        for key, item in value:
            is_array = isinstance(item, list) and not isinstance(item, _JsonObject)
            items = item if is_array else [item]
            if any(isinstance(x, list) for x in items):
                raise JobError("%s key %s must be a number, string, boolean or array of those"
                               % (what, preview(_dumps(key), 40)))
            scalars = [_option_scalar(x, what) for x in items]
            options[_go_string(key)] = scalars if items is item else scalars[0]
        return options
    # list: of numbers (logprobs); "lengths": of non-negative integers (token_lengths)
    element = int if kind == "lengths" else float
    if not isinstance(value, list) or isinstance(value, _JsonObject):
        raise JobError("%s must be an array of %s, got %s" % (
            what, "integers" if element is int else "numbers", _describe_json(value)))
    values = [_decode_value(v, element, what + " element") for v in value]
    if element is int and any(v < 0 for v in values):
        raise JobError("%s must not contain a negative length" % what)
    return values


def _finite(value, what):
    """A JSON number as a float, refused as Go refuses it beyond float64's range."""
    try:
        number = float(value)  # a _JsonNumber's text beyond range reads as inf
    except OverflowError:  # an int beyond range raises instead
        number = float("inf")
    if number in (float("inf"), float("-inf")):
        raise JobError("%s is out of range: %s" % (what, preview(str(value), 40)))
    return number


def decode_job(text):
    """A job as Go decodes it, then held to what an honest job looks like
    (jobs are written by strangers; every rule here is one Go's `wl infer
    post` always satisfies): a seed given, max_tokens not negative, a
    plausible Ollama model name, no NUL, no null, a well-formed pin."""
    fields, given = decode_struct(text, JOB_FIELDS, "job", null_allowed=False)
    job = Job(**fields)
    for name in ("prompt", "model"):
        if not fields[name]:
            raise JobError('job field "%s" is missing or empty' % name)
        if "\0" in fields[name]:
            raise JobError('job field "%s" contains a NUL character' % name)
    if "seed" not in given:
        raise JobError('job field "seed" is missing; a job must fix its seed (Go\'s wl infer '
                       'always writes one)')
    if job.max_tokens < 0:
        raise JobError('job field "max_tokens" must not be negative, got %d' % job.max_tokens)
    check_model_name(job.model, 'job field "model"')
    pin = job.model_digest
    if pin and not _is_digest(pin):
        raise JobError('job field "model_digest" must be 64 hex digits (optionally after '
                       '"sha256:"), got %s'
                       % preview(_dumps(pin), 40))
    return job


_MODEL_FIRST = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_MODEL_CHARS = _MODEL_FIRST | frozenset("._/:-")


def check_model_name(name, what):
    """Ollama names: [a-zA-Z0-9][a-zA-Z0-9._/:-]*, at most MODEL_NAME_MAX
    characters. Anything else is not a model, and must never reach a
    command line or a report raw."""
    if len(name) > MODEL_NAME_MAX:
        raise JobError("%s is %d characters long; Ollama model names have at most %d"
                       % (what, len(name), MODEL_NAME_MAX))
    if name[:1] not in _MODEL_FIRST or not set(name) <= _MODEL_CHARS:
        raise JobError("%s %s is not an Ollama model name (letters, digits and . _ / : -, "
                       "starting with a letter or digit)" % (what, preview(_dumps(name), 60)))


def _is_digest(text):
    hex_part = text[7:] if text.startswith("sha256:") else text
    return len(hex_part) == 64 and all(c in "0123456789abcdefABCDEF" for c in hex_part)


def decode_evidence(text, limit=FIELD_LIMIT):
    evidence, _ = decode_struct(text, EVIDENCE_FIELDS, "evidence", limit=limit)
    for name in ("output", "output_hash", "model"):
        if not evidence[name]:
            raise JobError('evidence field "%s" is missing or empty' % name)
    return evidence


def _dumps(obj):
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


class Job(collections.namedtuple("Job", [name for name, _ in JOB_FIELDS])):
    """An inference job: what a worker runs and a verifier re-runs.
    max_tokens 0 is the model's default; model_digest "" pins nothing;
    batch and custom_id "": not posted from a batch file."""

    __slots__ = ()

    def document(self):
        """For --json: every field, but batch and custom_id only when set
        (as in the description)."""
        doc = self._asdict()
        for name in ("batch", "custom_id"):
            if not doc[name]:
                del doc[name]
        return dict(doc)


def make_job(prompt, model, seed=DEFAULT_SEED, max_tokens=0, model_digest="", batch="",
             custom_id=""):
    return Job(prompt, model, seed, max_tokens, model_digest, batch, custom_id)


def encode_job(job):
    doc = {"prompt": job.prompt, "model": job.model, "seed": job.seed}
    if job.max_tokens:
        doc["max_tokens"] = job.max_tokens
    for name in ("model_digest", "batch", "custom_id"):  # ours, after Go's, only when set
        if getattr(job, name):
            doc[name] = getattr(job, name)
    return encode_go_json(doc)


def output_hash(output):
    """sha256 of the output's UTF-8 bytes, exactly as Ollama returned it."""
    return "sha256:" + hashlib.sha256(output.encode("utf-8")).hexdigest()


def make_evidence(job, output, provenance=None):
    evidence = {"output": output, "output_hash": output_hash(output), "model": job.model,
                "seed": job.seed}
    evidence.update(provenance or {})
    return evidence


def provenance(gen, model_digest, ollama_version, options):
    """The evidence keys we add after Go's: where and how the output was made."""
    found = {"model_digest": model_digest or "", "ollama_version": ollama_version or "",
             "options": options,
             "done_reason": gen.final.get("done_reason")
             if isinstance(gen.final.get("done_reason"), str) else "",
             "eval_count": gen.eval_count}
    prompt_tokens = gen.final.get("prompt_eval_count")
    # evaluated, not served from the prompt cache
    if type(prompt_tokens) is int and prompt_tokens >= 0:
        found["prompt_eval_count"] = prompt_tokens
    ns = gen.final.get("eval_duration")
    if type(ns) is int and ns > 0:
        found["eval_ms"] = int(round(ns / 1e6))
        found["tokens_per_s"] = round(gen.eval_count / (ns / 1e9), 2)
    chosen = gen.chosen_logprobs()
    if chosen is not None:
        found["logprobs"] = [round(lp, 4) + 0.0 for lp in chosen]  # + 0.0: no "-0.0"
    ends = gen.token_ends
    # one end per token the server counted: the boundaries are exact
    if ends and len(ends) == gen.eval_count:
        # where each token ends: verifiers cut windows and count tokens with them
        found["token_lengths"] = [end - start for start, end in zip([0] + ends, ends)]
    if gen.thinking:
        found["thinking_hash"] = output_hash(gen.thinking)
    return found


def evidence_document(evidence):
    """Go's four keys first, then ours that have a value (like Go's omitempty)."""
    pairs = [(name, evidence[name]) for name, _ in GO_EVIDENCE_FIELDS]
    pairs += [(name, evidence[name]) for name, _ in PROVENANCE_FIELDS if evidence.get(name)]
    return dict(pairs)


def encode_evidence(evidence):
    """Go's four keys byte for byte as Go writes them, then ours."""
    return encode_go_json(evidence_document(evidence))


def fit_evidence(evidence):
    """The evidence as submitted, within wl's field limit: logprobs (with
    token_lengths) go first, then the rest of our additions; when Go's four
    keys alone are too big the run fails rather than submit something wl
    would truncate or refuse."""
    encoded = encode_evidence(evidence)
    for drop in (("logprobs", "token_lengths"), [name for name, _ in PROVENANCE_FIELDS]):
        if _size(encoded) <= FIELD_LIMIT:
            break
        evidence = dict((k, v) for k, v in evidence.items() if k not in drop)
        encoded = encode_evidence(evidence)
    check_field_size(encoded, "the evidence (output %d bytes)" % _size(evidence["output"]),
                     "the job needs a smaller max_tokens")
    return evidence, encoded


def _size(text):
    """Bytes on the wire: a lone surrogate from surrogateescape is the one byte wl gave."""
    try:
        return len(text.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:  # a surrogate from a JSON escape: never on the wire raw
        return len(text.encode("utf-8", "surrogatepass"))


def check_field_size(text, what, advice):
    size = _size(text)
    if size > FIELD_LIMIT:
        raise UserError("%s is %d bytes, over wl's %d-byte field limit; %s"
                        % (what, size, FIELD_LIMIT, advice))


def ollama_options(job):
    """The options Go sends, so both implementations produce the same text."""
    options = {"temperature": 0, "seed": job.seed}
    if job.max_tokens > 0:
        options["num_predict"] = job.max_tokens
    return options


def generate_request(job, top=TOP_LOGPROBS, budget=None):
    """Go's request, streamed; with `top`, also each token's logprob and its
    `top` candidates (which do not change the text, but cost time: servers
    that do not know the fields ignore them). `budget`: tokens at most, in
    place of the job's max_tokens."""
    request = {"model": job.model, "prompt": job.prompt, "stream": True,
               "options": ollama_options(job)}
    if budget is not None:
        request["options"] = dict(request["options"], num_predict=budget)
    if top:
        request.update(logprobs=True, top_logprobs=top)
    return request


def continuation_request(job, rendered, text, budget, top=None):
    """The job's request continued after `text`: the prompt as the server
    rendered it (its chat template applied) plus the text so far, sent raw
    so that the model sees the same tokens; `budget`: tokens left (None: the
    job sets no max)."""
    return dict(generate_request(job, top, budget), prompt=rendered + text, raw=True)


def render_request(job):
    """Asks for the rendered prompt only (Ollama 0.11.5+). An older server
    ignores the field and generates: at most one token, unstreamed."""
    return {"model": job.model, "prompt": job.prompt, "stream": False,
            "options": dict(ollama_options(job), num_predict=1), "_debug_render_only": True}


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
# Batch files: one job per line, ours or OpenAI's Batch API (no I/O here)
# =============================================================================
#
# Our line:  {"prompt": s, "model": s, "seed": i, "max_tokens": i, "custom_id": s}
#            (only the prompt is needed: post's --model, --seed and --max-tokens
#            give the rest, and custom_id is the line number; "model_digest" pins)
# OpenAI's:  {"custom_id": s, "method": "POST", "url": "/v1/completions",
#             "body": {"model": s, "prompt": s, "max_tokens": i, "seed": i, "temperature": 0}}
#            or "url": "/v1/chat/completions" with "messages": [{"role": "user",
#            "content": s}] (Ollama renders a prompt as one user turn) and
#            max_tokens or max_completion_tokens.
# A line that a job cannot express exactly is refused with the reason. Keys
# are matched exactly and once: a batch file is written by its own poster,
# and a typo must not pass as Go's case folding would let it.

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
# bytes; a job is at most 65,535, even with every character escaped it fits
BATCH_LINE_MAX = 1 << 20
CUSTOM_ID_MAX = 256  # characters
OUR_LINE_KEYS = (("prompt", str), ("model", str), ("seed", int), ("max_tokens", int),
                 ("custom_id", str),
                 ("model_digest", str))
# OpenAI body keys a job takes as they are: labels, or no effect on greedy decoding (top_p keeps
# the best token)
_INERT_BODY_KEYS = ("user", "metadata", "store", "service_tier", "top_p")
# and those it takes at their neutral values only, with what a job always does instead
_NEUTRAL_BODY_VALUES = {
    "temperature": ((0,), "every job runs at temperature 0 (greedy decoding)"),
    "n": ((1,), "a job has one answer"),
    "best_of": ((1,), "a job has one answer"),
    "presence_penalty": ((0,), "a job runs without penalties"),
    "frequency_penalty": ((0,), "a job runs without penalties"),
    "stream": ((False,), "results are collected with `wl_infer.py results`"),
    "echo": ((False,), "an answer never repeats its prompt"),
    "logprobs": ((False, None), "answers come without logprobs"),
    "top_logprobs": ((0, None), "answers come without logprobs"),
    "stop": ((None, "", []), "a job stops where the model does, or at max_tokens"),
    "suffix": ((None, ""), "a job has no suffix"),
    "logit_bias": ((None, {}), "a job runs without biases"),
    "tools": ((None, []), "a job has no tools"),
    "tool_choice": ((None, "none"), "a job has no tools"),
    "parallel_tool_calls": ((None,), "a job has no tools"),
    "functions": ((None, []), "a job has no tools"),
    "function_call": ((None, "none"), "a job has no tools"),
    "response_format": ((None, {"type": "text"}), "a job's answer is plain text"),
    "stream_options": ((None,), "results are collected with `wl_infer.py results`"),
}


class BatchRequest(collections.namedtuple("BatchRequest", "line custom_id url job")):
    """One line of a batch file: its line number, its custom_id, the OpenAI
    endpoint it was written for ("" for our own line) and its Job (batch
    and custom_id not yet set)."""

    __slots__ = ()


class JobDefaults(collections.namedtuple("JobDefaults", "model seed max_tokens")):
    """What post's own options give a batch line that leaves them out (model None: none)."""

    __slots__ = ()


def parse_batch_line(text, number, defaults):
    """A BatchRequest from line `number` of a batch file; JobError with the
    reason when it is not a job, or not one a job can express exactly."""
    if _nesting(text) > MAX_NESTING:
        raise JobError("it nests arrays or objects more than %d deep" % MAX_NESTING)
    try:
        doc = _loads(text)
    except ValueError as exc:
        raise JobError("it is not valid JSON (%s)" % exc)
    fields = _batch_object(doc, "the line")
    if any(key in fields for key in ("method", "url", "body")):
        return _openai_request(fields, number, defaults)
    return _our_request(fields, number, defaults)


def _batch_object(value, what):
    """A JSON object of a batch line as a dict; a key given twice is
    refused (which one counts?)."""
    if not isinstance(value, _JsonObject):
        raise JobError("%s must be a JSON object, got %s" % (what, _describe_json(value)))
    found = {}
    for key, item in value:
        if key in found:
            raise JobError("%s gives %s twice" % (what, preview(_dumps(key), 40)))
        found[key] = item
    return found


def _batch_value(fields, key, kind, what):
    """fields[key] held to `kind` (str or int), or None when absent; null counts as absent."""
    value = fields.get(key)
    if value is None:
        return None
    return _decode_value(value, kind, '%s "%s"' % (what, key))


def _our_request(fields, number, defaults):
    known = [name for name, _ in OUR_LINE_KEYS]
    unknown = [key for key in fields if key not in known]
    if unknown:
        raise JobError('key %s is not one of a job line\'s (%s), and the line is not an OpenAI '
                       'batch request (method, url, body)'
                       % (preview(_dumps(unknown[0]), 40), ", ".join(known)))
    values = dict((name, _batch_value(fields, name, kind, "key")) for name, kind in OUR_LINE_KEYS)
    if not values["prompt"]:
        raise JobError('key "prompt" is missing or empty')
    return _batch_request(number, values["custom_id"], "", values["prompt"], values["model"],
                          values["seed"],
                          values["max_tokens"], values["model_digest"], defaults)


def _openai_request(fields, number, defaults):
    unknown = [key for key in fields if key not in ("custom_id", "method", "url", "body")]
    if unknown:
        raise JobError("key %s is not one of an OpenAI batch request's (custom_id, method, url, "
                       "body)"
                       % preview(_dumps(unknown[0]), 40))
    custom_id = _batch_value(fields, "custom_id", str, "key")
    if custom_id is None:
        raise JobError('an OpenAI batch request needs its "custom_id"')
    method = fields.get("method")
    if method != "POST":
        raise JobError('"method" must be "POST", got %s' % _describe_json(method))
    url = fields.get("url")
    if url not in (COMPLETIONS, CHAT):
        raise JobError('"url" must be %s or %s (only a text generation can be a job), got %s'
                       % (COMPLETIONS, CHAT, _describe_json(url)))
    body = _batch_object(fields.get("body"), '"body"')
    text_key = "prompt" if url == COMPLETIONS else "messages"
    known = ("model", "seed", "max_tokens", text_key) + (("max_completion_tokens",) if url == CHAT
                                                         else ())
    for key, value in body.items():
        if key in known or key in _INERT_BODY_KEYS:
            continue
        if key not in _NEUTRAL_BODY_VALUES:
            raise JobError('body key %s cannot be expressed as a job (a job is a prompt, a model, '
                           'a seed and max_tokens, run greedily)' % preview(_dumps(key), 40))
        allowed, why = _NEUTRAL_BODY_VALUES[key]
        if not any(_same_json(value, a) for a in allowed):
            raise JobError('body "%s" is %s: %s' % (key, _describe_json(value), why))
    if url == COMPLETIONS:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or isinstance(prompt, _JsonNumber):
            raise JobError('body "prompt" must be one string, got %s (a list of prompts or of '
                           'token IDs is not one job)' % _describe_json(prompt))
        prompt = _go_string(prompt)
    else:
        prompt = _one_user_message(body.get("messages"))
    limits = [v for v in (_batch_value(body, k, int, "body") for k
                          in ("max_tokens", "max_completion_tokens"))
              if v is not None]
    if len(set(limits)) > 1:
        raise JobError('body "max_tokens" and "max_completion_tokens" differ (%d and %d)'
                       % tuple(limits))
    if limits and limits[0] < 1:
        raise JobError('body "max_tokens" must be at least 1, got %d' % limits[0])
    if not prompt:
        raise JobError("the prompt is empty")
    return _batch_request(number, custom_id, url, prompt, _batch_value(body, "model", str, "body"),
                          _batch_value(body, "seed", int, "body"), limits[0] if limits else None,
                          None, defaults)


def _one_user_message(messages):
    """The text of a chat request's one user message (a job is one user turn)."""
    if not isinstance(messages, list) or isinstance(messages, _JsonObject):
        raise JobError('body "messages" must be an array, got %s' % _describe_json(messages))
    roles = [dict(m).get("role") if isinstance(m, _JsonObject) else None for m in messages]
    if "system" in roles or "developer" in roles:
        raise JobError("a %s message cannot be expressed: a job is one user message, rendered by "
                       "the model's "
                       "own template" % ("system" if "system" in roles else "developer"))
    if len(messages) != 1:
        raise JobError("%d messages cannot be expressed: a job is one user message (one turn)"
                       % len(messages))
    message = _batch_object(messages[0], "the message")
    if message.get("role") != "user":
        raise JobError('the message\'s "role" must be "user", got %s'
                       % _describe_json(message.get("role")))
    extra = [key for key in message if key not in ("role", "content", "name")]
    if extra:
        raise JobError("the message's key %s cannot be expressed as a job"
                       % preview(_dumps(extra[0]), 40))
    content = message.get("content")
    if isinstance(content, list) and not isinstance(content, _JsonObject) and len(content) == 1:
        part = _batch_object(content[0], "the content part")
        if part.get("type") != "text" or set(part) != {"type", "text"}:
            raise JobError("only a text part can be a job's prompt, got %s" % preview(_dumps(
                {k: (v if isinstance(v, str) else "...") for k, v in part.items()}), 60))
        content = part.get("text")
    if not isinstance(content, str) or isinstance(content, _JsonNumber):
        raise JobError('the message\'s "content" must be a string (or one text part), got %s'
                       % _describe_json(content))
    return _go_string(content)


def _same_json(value, allowed):
    """A decoded JSON value equals `allowed`, kind for kind (false is not 0, 0.0 is 0)."""
    if isinstance(allowed, bool) or isinstance(value, bool) or allowed is None or value is None:
        return type(value) is type(allowed) and value == allowed
    if isinstance(allowed, (int, float)):
        return (type(value) is int or isinstance(value, _JsonNumber)) and _number(value) == allowed
    if isinstance(allowed, str):
        return isinstance(value, str) and not isinstance(value, _JsonNumber) and value == allowed
    if isinstance(allowed, list):
        return isinstance(value, list) and not isinstance(value, _JsonObject) and value == allowed
    return isinstance(value, _JsonObject) and len(value) == len(allowed) and all(
        k in allowed and _same_json(v, allowed[k]) for k, v in value)


def _number(value):
    try:
        return float(value)
    except (ValueError, OverflowError):
        return None


def _batch_request(number, custom_id, url, prompt, model, seed, max_tokens, model_digest,
                   defaults):
    if custom_id is None:
        custom_id = str(number)
    if not custom_id or len(custom_id) > CUSTOM_ID_MAX or any(_is_control(c) for c in custom_id):
        raise JobError("custom_id must be 1 to %d characters without control characters, got %s"
                       % (CUSTOM_ID_MAX, preview(_dumps(custom_id), 40)))
    model = model or defaults.model
    if not model:
        raise JobError('the line names no model, and post has no --model to give it one')
    if max_tokens is not None and max_tokens < 0:
        raise JobError('"max_tokens" must not be negative, got %d' % max_tokens)
    job = make_job(prompt, model, defaults.seed if seed is None else seed,
                   defaults.max_tokens if max_tokens is None else max_tokens, model_digest or "")
    return BatchRequest(number, custom_id, url, job)


# =============================================================================
# Ollama client (http.client, streaming NDJSON)
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
    if not (port.isdigit() and 0 < int(port) <= 65535):
        # Ollama warns and uses its default port; a client that did would talk to another server
        # than meant
        raise UserError("Ollama address %s: port %s is not a number from 1 to 65535"
                        % (preview(value or "", 80), preview(_dumps(port), 20)))
    base = ("/" + path.strip("/")) if path.strip("/") else ""
    return scheme, host or "127.0.0.1", int(port), base


def ollama_url(value):
    return _format_url(*parse_ollama_host(value))


def _format_url(scheme, host, port, path):
    shown = "[%s]" % host if ":" in host else host
    return "%s://%s:%d%s" % (scheme, shown, port, path)


class Generation(object):
    """What one generate call produced. `text` is the answer; when the call
    compared the stream with an expected text and it diverged, `diverged_at`
    is the first differing character, `final` is None and the text stops
    with the token that diverged. `too_long`: stopped at a byte limit.

    Per token it keeps where the token ends; logprobs only for the first
    LOGPROB_TOKENS tokens (all that evidence records) and the candidates only
    for the latest piece (where a divergence is): a long answer streamed a
    token at a time must not cost a parsed object per token.

    Tolerant verification continues a generation over several requests
    (force(), then generate(..., into=gen)): `earlier` counts the tokens the
    earlier requests generated."""

    def __init__(self):
        self.pieces = []
        self.text = ""
        self.chunks = 0  # stream objects received before the final one (of the latest request)
        self.earlier = 0  # tokens generated by earlier requests of this generation
        self.token_ends = []  # character offset after each answer token
        # the chosen token's logprob (None: not sent), first LOGPROB_TOKENS tokens
        self.chosen = []
        # the latest piece: the index of its first token, its raw logprob entries
        self.latest = (0, [])
        # (token index, entry): candidates learned by another request (Ollama.candidates)
        self.probed = None
        self.thinking_pieces = []
        self.thinking = ""
        self.final = None
        self.diverged_at = None
        self.too_long = False

    @property
    def eval_count(self):
        count = (self.final or {}).get("eval_count")
        return self.earlier + (count if type(count) is int else self.chunks)

    def add(self, piece, logprobs):
        """One answer piece and the logprob entries that came with it (a
        piece is normally one token; an entry's token text places it)."""
        start = self.token_ends[-1] if self.token_ends else 0
        first = len(self.token_ends)
        entries = logprobs if type(logprobs) is list and logprobs else [None]
        if len(entries) == 1:
            self.token_ends.append(start + len(piece))
        else:  # several tokens in one piece (byte fallback)
            end = start
            for entry in entries[:-1]:
                parsed = _logprob_entry(entry)
                if parsed is not None:
                    end = min(end + len(parsed[2]), start + len(piece))
                self.token_ends.append(end)
            self.token_ends.append(start + len(piece))
        for entry in entries[:max(0, LOGPROB_TOKENS - first)]:
            logprob = entry.get("logprob") if type(entry) is dict else None
            self.chosen.append(float(logprob) if _is_number(logprob) else None)
        self.latest = (first, entries)
        self.pieces.append(piece)

    def token_at(self, offset):
        """The index of the answer token holding character `offset` (None past the end)."""
        index = bisect.bisect_right(self.token_ends, offset)
        return index if index < len(self.token_ends) else None

    def token_start(self, index):
        return self.token_ends[index - 1] if index else 0

    def entry_at(self, index):
        """(logprob, [(candidate, logprob), ...]) of token `index` when it is
        in the latest piece and the server sent a well-formed entry (or a
        probe placed it), else None."""
        if self.probed is not None and self.probed[0] == index:
            return self.probed[1]
        first, entries = self.latest
        if index is None or not first <= index < first + len(entries):
            return None
        parsed = _logprob_entry(entries[index - first])
        return parsed and parsed[:2]

    def force(self, index, token_text, logprob):
        """Put `token_text` (with its logprob) at token `index` in place of
        what was generated there and after it: the next request continues
        from it."""
        self.earlier = self.eval_count
        start = self.token_start(index)
        self.pieces = [self.text[:start]] if start else []
        del self.token_ends[index:], self.chosen[index:]
        self.chunks, self.final, self.diverged_at, self.probed = 0, None, None, None
        self.add(token_text, [{"token": token_text, "logprob": logprob}])
        self.text = "".join(self.pieces)

    def compare_end(self, expected):
        """Once the generation has ended without diverging: where it leaves
        `expected` if that goes on past its end."""
        if self.diverged_at is None and self.text != expected:
            self.diverged_at = _common_prefix(self.text, expected)

    def chosen_logprobs(self, limit=LOGPROB_TOKENS):
        """The chosen tokens' logprobs (of the first `limit` tokens), or None
        when the server left any out."""
        chosen = self.chosen[:limit]
        if not chosen or None in chosen:
            return None
        return chosen


def _logprob_entry(entry):
    """(logprob, [(token, logprob), ...], token) from one server entry, or None when malformed."""
    if not isinstance(entry, dict) or not _is_number(entry.get("logprob")):
        return None
    tops = entry.get("top_logprobs")
    top = [(t["token"], float(t["logprob"])) for t in (tops if isinstance(tops, list) else [])
           if isinstance(t, dict) and isinstance(t.get("token"), str)
           and _is_number(t.get("logprob"))]
    token = entry.get("token")
    return float(entry["logprob"]), top[:MAX_TOP_LOGPROBS], token if isinstance(token, str) else ""


def _is_number(value):
    return type(value) in (int, float) and value == value and abs(value) != float("inf")


class Ollama(object):
    """One Ollama server over HTTP: its models and version, and streamed
    generations read as they arrive. Every failure is an OllamaError that
    carries Ollama's own text, or says what the connection did."""

    def __init__(self, base, timeout=300.0):
        self.scheme, self.host, self.port, self.path = parse_ollama_host(base)
        self.url = _format_url(self.scheme, self.host, self.port, self.path)
        self.timeout = timeout
        self.active = None  # the socket of the generation in flight, for cancel()
        if self.scheme not in ("http", "https"):
            raise UserError("Ollama address %s: scheme %r is not http or https"
                            % (self.url, self.scheme))
        if any(c <= " " or c == "\x7f" for c in self.host + self.path):
            raise UserError("Ollama address %s contains a space or a control character"
                            % printable(self.url))
        try:
            self.host.encode("idna")
        except UnicodeError:
            raise UserError("Ollama address %s: %s is not a valid host name"
                            % (self.url, self.host))
        if not self.path.isascii():
            self.path = urllib.parse.quote(self.path, safe="/%")

    def _open(self, method, path, body=None, track=False):
        """Send one request; return the response if its status is 2xx,
        else raise OllamaError carrying Ollama's own error text. `track`: the
        generation that cancel() stops."""
        # here, not at the top: it takes ~20 ms, and status, list and spool never talk to Ollama
        import http.client

        if self.scheme == "https":
            kind = http.client.HTTPSConnection
        else:
            kind = http.client.HTTPConnection
        conn = kind(self.host, self.port, timeout=self.timeout)
        headers = {"User-Agent": "wl_infer/" + __version__, "Connection": "close"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, self.path + path, None if body is None
                         else _dumps(body).encode("utf-8"), headers)
            if track:
                self.active = conn.sock
            resp = conn.getresponse()  # with Connection: close the response owns the socket
        except socket.timeout:
            conn.close()
            raise OllamaError("Ollama at %s did not answer within %g s (--timeout); is it "
                              "overloaded?"
                              % (self.url, self.timeout))
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise OllamaError("cannot reach Ollama at %s (%s); start it with `ollama serve` "
                              "or point --ollama / OLLAMA_HOST at it"
                              % (self.url, _http_reason(exc)))
        if not 200 <= resp.status < 300:
            try:
                raw = _read_body(resp, 65536)
            except (OSError, http.client.HTTPException):
                raw = b""
            resp.close()
            raise OllamaError(self._http_error(resp.status, raw, body))
        return resp

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
        resp = self._open("POST" if body is not None else "GET", path, body)
        import http.client  # loaded already by _open

        try:
            raw = _read_body(resp, 16 << 20)
        except (OSError, http.client.HTTPException) as exc:
            raise OllamaError("reading %s from Ollama at %s failed: %s"
                              % (path, self.url, _http_reason(exc)))
        finally:
            resp.close()
        doc = _json_object(raw.decode("utf-8", "replace"))
        if doc is None:
            raise OllamaError("Ollama at %s sent a response to %s that is not a JSON object"
                              % (self.url, path))
        return doc

    def version(self):
        """The server's version string, or "" when it does not say."""
        version = self._get_json("/api/version").get("version")
        return version if isinstance(version, str) else ""

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

    def generate(self, job, on_token=None, max_bytes=None, top=TOP_LOGPROBS):
        """Run the job, streaming; return its Generation. `on_token(n)` is
        called after each streamed token. Reading stops once the output
        passes `max_bytes` (gen.too_long): a server that never stops costs
        at most that much. `top`: candidates asked per token (None: no
        logprobs at all)."""
        return self._stream(generate_request(job, top), Generation(), on_token,
                            max_bytes=max_bytes)

    def candidates(self, request, token_index):
        """Stream `request` to token `token_index` (its budget must end
        there) and return that token's (logprob, [(candidate, logprob)]), or
        None when the server sent none. A verification asks this only where
        it needs it, at a divergence: logprobs on every token cost time."""
        gen = self._stream(request, Generation(), None, max_bytes=FIELD_LIMIT)
        if len(gen.token_ends) <= token_index:
            return None
        return gen.entry_at(token_index)

    def compare(self, request, expected, on_token=None, into=None):
        """Stream `request` against the `expected` text and stop at the
        first character that differs (closing the connection cancels the
        generation on the server): a false output is refuted in the time of
        a few tokens. `into`: the Generation this request continues (a
        tolerant re-run), whose tokens come first."""
        return self._stream(request, into or Generation(), on_token, expected=expected)

    def _stream(self, request, gen, on_token, expected=None, max_bytes=None):
        import http.client  # for its exception types; loaded once (see _open)

        resp = self._open("POST", "/api/generate", request, track=True)
        # characters of `expected` confirmed so far
        matched = gen.token_ends[-1] if gen.token_ends else 0
        size = 0  # bytes of output so far
        try:
            for line in self._lines(resp):
                obj = self._stream_object(line, gen.chunks)
                if obj is None:
                    continue
                piece = obj.get("response", "")
                thinking = obj.get("thinking", "")
                if not isinstance(piece, str) or not isinstance(thinking, str):
                    raise OllamaError("Ollama at %s sent a `response` or `thinking` that is not a "
                                      "string" % self.url)
                if thinking:
                    gen.thinking_pieces.append(thinking)
                if piece:
                    gen.add(piece, obj.get("logprobs"))
                if obj.get("done") is True:
                    gen.final = obj
                    break
                gen.chunks += 1
                if on_token:
                    on_token(gen.earlier + gen.chunks)
                # counted only when there is a limit (run, not verify)
                if max_bytes is not None and piece:
                    size += len(piece.encode("utf-8", "surrogatepass"))
                    if size > max_bytes:
                        gen.too_long = True
                        break
                if expected is not None and piece:
                    if not expected.startswith(piece, matched):
                        piece = _go_string(piece)  # a lone surrogate may still match
                    if not expected.startswith(piece, matched):
                        gen.diverged_at = matched + _common_prefix(piece, expected[matched:matched
                                                                                   + len(piece)])
                        break
                    matched += len(piece)
        except socket.timeout:
            raise OllamaError("Ollama at %s sent nothing for %g s after %s (inactivity "
                              "timeout, --timeout); the server may be hung or overloaded"
                              % (self.url, self.timeout, _tokens(gen.chunks)))
        except (OSError, http.client.HTTPException) as exc:
            raise OllamaError("connection to Ollama at %s lost after %s: %s"
                              % (self.url, _tokens(gen.chunks), _http_reason(exc)))
        finally:
            resp.close()  # mid-stream, this cancels the generation on the server
            self.active = None
        if gen.final is None and gen.diverged_at is None and not gen.too_long:
            raise OllamaError("Ollama at %s ended the stream after %s without its final "
                              "`done` message; the generation did not finish"
                              % (self.url, _tokens(gen.chunks)))
        # once over the whole text, not per token: a lone surrogate escape
        # becomes U+FFFD as Go decodes it (Python never merges adjacent ones)
        gen.text = _go_string("".join(gen.pieces))
        gen.thinking = _go_string("".join(gen.thinking_pieces))
        if expected is not None:
            gen.compare_end(expected)
        return gen

    def rendered_prompt(self, job):
        """The exact text this server feeds the model for the job's prompt,
        or None when it cannot say (older than 0.11.5)."""
        info = self._get_json("/api/generate", render_request(job)).get("_debug_info")
        rendered = info.get("rendered_template") if isinstance(info, dict) else None
        return rendered if isinstance(rendered, str) and rendered else None

    def _lines(self, resp):
        """The stream's lines, without their newline, read a block at a time
        (an HTTP chunk: Ollama sends one per token) and split here. This loop
        is the ceiling on how fast a model can be read (make bench)."""
        pending = bytearray()  # the start of a line not yet ended
        while True:
            data = resp.read1(65536)
            if not data:
                break
            start, end = 0, data.find(b"\n")
            while end >= 0:
                if pending:
                    pending += data[start:end]
                    line, pending = bytes(pending), bytearray()
                else:
                    line = data[start:end]
                if len(line) > MAX_LINE:
                    pending = line
                    break
                yield line
                start, end = end + 1, data.find(b"\n", end + 1)
            else:
                pending += data[start:]
            if len(pending) > MAX_LINE:
                raise OllamaError("Ollama at %s sent a stream line over %d bytes; "
                                  "this is not an Ollama server" % (self.url, MAX_LINE))
        if pending:
            yield bytes(pending)

    def cancel(self):
        """Stop the generation in flight, from another thread: its socket is
        shut down, so its read fails at once (and Ollama cancels it)."""
        sock = self.active
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed
                pass

    def _stream_object(self, line, tokens):
        line = line.strip()
        if not line:
            return None
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise OllamaError("Ollama at %s sent invalid UTF-8 after %s"
                              % (self.url, _tokens(tokens)))
        obj = _json_object(text)
        if obj is None:
            raise OllamaError("Ollama at %s sent a stream line that is not a JSON object after "
                              "%s: %s"
                              % (self.url, _tokens(tokens), preview(text, 60)))
        if "error" in obj:
            raise OllamaError("Ollama at %s failed after %s: %s"
                              % (self.url, _tokens(tokens), obj["error"]))
        return obj


def _common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _tokens(n):
    return "1 token" if n == 1 else "%d tokens" % n


def _json_object(text):
    """A JSON object from a server's response as a dict, or None. (Jobs and
    evidence use the Go-compatible decoder above; this is for Ollama.)"""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _read_body(resp, limit):
    """A response's body, or its first `limit` bytes. http.client's read1
    says nothing when a body with a Content-Length ends early: we do."""
    parts, size = [], 0
    while size < limit:
        data = resp.read1(limit - size)
        if not data:
            break
        parts.append(data)
        size += len(data)
    if size < limit and resp.length:
        import http.client  # loaded already: a response exists

        raise http.client.IncompleteRead(b"".join(parts), resp.length)
    return b"".join(parts)


def _http_reason(exc):
    """What went wrong on the connection, in words: http.client's own
    messages name its internals (IncompleteRead(0 bytes read, 3 more expected))."""
    name = type(exc).__name__
    if name == "BadStatusLine" and str(exc).strip("'\" "):
        return "the answer is not HTTP: %s" % preview(str(exc).strip(), 60)
    if name in ("BadStatusLine", "RemoteDisconnected"):
        return "the server closed the connection without answering"
    if name == "IncompleteRead":
        return ("the connection closed %d bytes before the end of the body" % exc.expected
                if exc.expected
                else "the chunked body is broken or cut short")
    return _reason(exc)  # LineTooLong and the rest say it well: "got more than 100 headers"


def _reason(exc):
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text if str(text).strip() else type(exc).__name__


# =============================================================================
# wl driver (wl is always a child process; its output is parsed here)
# =============================================================================

DEFAULT_WL_TIMEOUT = 600.0
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def strip_ansi(text):
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
    raise UserError("wl executable %r not found on PATH; install wl or set --wl PATH or WL_BIN"
                    % name)


def wl_error_text(stderr, stdout=""):
    """wl's own failure message: the `wl: ...` line plus its `Hint:`; else
    the line of a Go panic or a fatal error; else the last line."""
    lines = [ln.strip() for ln in strip_ansi(stderr).splitlines() if ln.strip()]
    message = next((ln[3:].strip() for ln in lines if ln.startswith("wl:")), None)
    if message is None:
        others = lines or [ln.strip() for ln in strip_ansi(stdout).splitlines() if ln.strip()]
        message = next((ln for ln in others if ln.startswith(("panic:", "fatal error:",
                                                              "Error:"))),
                       others[-1] if others else None)
    hint = next((ln[5:].strip() for ln in lines if ln.startswith("Hint:")), None)
    if message and hint:
        message += " (hint: %s)" % hint
    return message


# wl's messages for a request the board refuses as made (trying again cannot
# help), and the short name a WlError carries for each.
WL_REFUSALS = (
    ("is not claimed", "not-claimed"),
    ("is not open", "not-open"),
    ("is not in review", "not-in-review"),
    ("does not exist", "no-such-item"),
    ("no wanted item matching", "no-such-item"),
    ("ambiguous prefix", "ambiguous-prefix"),
    ("cannot accept your own completion", "own-completion"),
    ("Data too long", "too-long"),
    ("required flag", "usage"),
    ("unknown flag", "usage"),
    ("unknown command", "usage"),
)


def wl_refusal(text):
    """The WL_REFUSALS name of wl's error text, or None."""
    return next((name for words, name in WL_REFUSALS if words in text), None)


# Sections of `wl status` that may follow the description, in wl's order.
_STATUS_SECTIONS = ("  Claimed by:", "  Branch:", "  Completion:", "  Stamp:")


class Completion(collections.namedtuple("Completion", "id completed_by evidence")):
    """A completion on an item: `evidence` exactly as wl printed it (the
    codec reads it), or None."""

    __slots__ = ()


class BoardItem(collections.namedtuple("BoardItem",
                                       "id title status type posted_by claimed_by description "
                                                    "priority completion")):
    """A wanted item as wl shows it (`wl status` or `wl browse`); absent
    fields are None. The description and the evidence are kept as wl gave
    them, bytes that are not UTF-8 included (the codec reads them as Go
    does); the other text fields are as Go holds them."""

    __slots__ = ()

    def __new__(cls, id, title="", status=None, type=None, posted_by=None, claimed_by=None,
                description=None,
                priority=None, completion=None):
        def text(value):
            return _go_string(value) if value else value
        return super(BoardItem, cls).__new__(cls, id, text(title), status, type, text(posted_by),
                                             text(claimed_by),
                                              description, priority, completion)


def parse_status(text):
    """Parse `wl status ID` into a BoardItem (priority None)."""
    # Structure is read from lines without colour codes; the description and
    # evidence are taken from the raw lines, byte for byte (a raw ESC inside
    # a JSON string makes it invalid JSON, as Go sees it; stripping it would
    # turn it into a different, valid job).
    raw = text.split("\n")
    lines = [strip_ansi(line).rstrip("\r") for line in raw]
    # The header `<id>: <title>` is the first line that starts with an ID
    # (a notice printed before it, e.g. about syncing, is skipped).
    while lines and not is_item_id(lines[0].partition(": ")[0]):
        lines.pop(0)
        raw.pop(0)
    if not lines:
        raise WlError("wl status printed no item header; got %s" % preview(_go_string(text), 60))
    item_id, _, title = lines[0].partition(": ")
    item_id = item_id.strip()
    if raw[0].startswith(item_id + ": "):  # the title exactly as posted
        title = raw[0][len(item_id) + 2:].rstrip("\r")
    found = {}  # BoardItem's fields, as met
    completion = None  # [id, completed_by, evidence]
    i = 1
    while i < len(lines):
        line = lines[i]
        if line == "  Description:":
            i, found["description"] = _status_description(lines, raw, i + 1)
            continue
        value = line.partition(":")[2].strip()
        if line.startswith("  Status:"):
            found["status"] = value
        elif line.startswith("  Type:"):
            found["type"] = value.split()[0] if value else ""
        elif line.startswith("  Posted by:"):
            found["posted_by"] = value
        elif line.startswith("  Claimed by:"):
            found["claimed_by"] = value
        elif line.startswith("  Completion:"):
            if completion is not None:
                raise WlError("wl status output for %s has two Completion sections; the "
                              "description imitates wl's own output, refusing to guess" % item_id)
            completion = [value, None, None]
        elif line.startswith("    Evidence:") and completion is not None:
            exact = raw[i] if raw[i].startswith("    Evidence:") else line
            completion[2] = exact[len("    Evidence:"):].lstrip(" ")
        elif line.startswith("    Completed by:") and completion is not None:
            completion[1] = _go_string(value)
        i += 1
    if not found.get("status"):
        raise WlError("wl status output for %s has no Status line; is this wl version supported?"
                      % item_id)
    return BoardItem(item_id, title, completion=completion and Completion(*completion), **found)


def _status_description(lines, raw, start):
    """The description runs from after `  Description:` to the blank line
    before the next known section (or the end). Its first line carries four
    spaces of indent; continuation lines are printed raw."""
    end = len(lines)
    for j in range(start, len(lines) - 1):
        if lines[j] == "" and lines[j + 1].startswith(_STATUS_SECTIONS):
            end = j
            break
    body = raw[start:end]
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


# items asked of wl browse when we filter or order them ourselves (wl's default is 50)
BROWSE_LIMIT = 1000


def parse_browse(text):
    """Parse `wl browse --json --long`: BoardItems (completion None), in
    wl's order. An entry that is not an object with an item ID is left
    out: nothing can be done with it."""
    try:
        doc = json.loads(text, parse_int=_json_int)
    except (ValueError, RecursionError):
        raise WlError("wl browse --json printed something that is not JSON: %s"
                      % preview(text, 60))
    if doc is None:  # wl prints null for an empty board
        return []
    if not isinstance(doc, list):
        raise WlError("wl browse --json printed a JSON %s, not a list of items"
                      % type(doc).__name__)
    items = []
    for entry in doc:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"),
                                                         str) or not is_item_id(entry["id"]):
            continue
        # empty fields are omitted by wl; anything but a string is not wl's
        field = dict((k, v if isinstance(v, str) and v else None) for k, v in entry.items())
        priority = entry.get("priority")
        items.append(BoardItem(entry["id"], field.get("title") or "", field.get("status"),
                               field.get("type"),
                               field.get("posted_by"), field.get("claimed_by"),
                               field.get("description"),
                               priority if type(priority) is int else None))
    return items


def is_item_id(text):
    """A wl item ID or unique prefix (w-3f9a0c12be, w-3f9)."""
    return (len(text) > 2 and text.startswith("w-") and len(text) <= 64
            and all(c in "0123456789abcdefghijklmnopqrstuvwxyz" for c in text[2:]))


def _stop_group(proc, grace=2.0):
    """Stop a child and everything it started (wl may run dolt, which holds
    the database lock): SIGTERM to its process group, SIGKILL after `grace`."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever ignored SIGTERM
    except OSError:  # nothing left in the group
        pass
    try:
        proc.communicate(timeout=grace)  # reap; a daemon that left the group may hold the pipes
    except subprocess.TimeoutExpired:
        pass


class _NoLock(object):
    def __enter__(self):
        pass

    def __exit__(self, *exc):
        pass


class Wl(object):
    """Runs wl as a child process: argument lists only, values as --opt=value,
    NO_COLOR set, ANSI stripped, every failure carrying wl's own message."""

    def __init__(self, exe, wasteland=None, local_db=False, timeout=DEFAULT_WL_TIMEOUT,
                 no_push=False,
                 status_line=None, turn=None, signals=None):
        self.exe = exe
        self.global_args = (["--wasteland=" + wasteland] if wasteland else []) + (["--local-db"]
                                                                                  if local_db
                                                                                  else [])
        self.timeout = timeout
        self.no_push = no_push
        # a lock when calls must not overlap (--local-db, on several threads)
        self.turn = turn or _NoLock()
        self.signals = signals or Signals()  # main()'s, installed; a library user's own, or inert
        # shows a slow call; None: calls are not shown (work's threads)
        self.status_line = status_line
        self.calls = 0  # wl processes started (the worker reports them per job)
        self.counting = threading.Lock()

    def call(self, command, *args, mutating=False):
        argv = [self.exe, command] + list(args) + self.global_args
        if mutating and self.no_push:
            argv.append("--no-push")
        env = dict(os.environ, NO_COLOR="1")
        item_id = next((a for a in args[:1] if is_item_id(a)), None)
        what = "`wl %s`" % " ".join([command] + ([item_id] if item_id else []))
        with self.counting:
            self.calls += 1
        with self.turn, self.signals.protected(what if mutating
                                               # from before wl starts until it has ended
                                               else None):
            try:
                # Its own session: a Ctrl-C at the terminal reaches us, not wl,
                # so a claim or a submission is never cut half-way by the terminal.
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env=env, start_new_session=True)
            except OSError as exc:
                raise WlError("cannot run wl (%s): %s" % (self.exe, _reason(exc)), command,
                              item_id, _reason(exc))
            try:
                stdout, stderr = self._wait(proc, command, item_id, what)
            # a signal that is not held, or the time limit: stop wl and what it started
            except BaseException:
                _stop_group(proc)
                raise
        # bytes that are not UTF-8 are kept (surrogateescape): a field's size
        # is what wl gave, and the codec turns each into U+FFFD as Go does
        out = stdout.decode("utf-8", "surrogateescape")
        if proc.returncode != 0:
            err = wl_error_text(stderr.decode("utf-8", "replace"), _go_string(out))
            reason = err or "exit status %d and no message" % proc.returncode
            raise WlError("wl %s failed: %s" % (command, reason), command, item_id, reason,
                          wl_refusal(err or ""))
        return out

    def _wait(self, proc, command, item_id, what):
        """wl's output, waiting in slices: CPython runs a signal handler only
        between bytecodes, so a signal landing just as a long wait resumes
        would otherwise go unnoticed until wl ends (a second Ctrl-C ignored
        for the whole call). A call still running after a slice is shown."""
        start = time.monotonic()
        deadline = start + self.timeout
        try:
            while True:
                try:
                    return proc.communicate(timeout=max(0.0, min(0.5, deadline
                                                                 - time.monotonic())))
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        reason = "did not finish within %g s and was stopped" % self.timeout
                        raise WlError("wl %s %s; the board may be unreachable (raise the limit "
                                      "with --wl-timeout)" % (command, reason), command, item_id,
                                      reason)
                    if self.status_line:
                        self.status_line.show("waiting for %s (%.0f s)"
                                              % (what, time.monotonic() - start))
        finally:
            if self.status_line and time.monotonic() - start >= 0.5:
                self.status_line.clear()

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

    def browse(self, status=None, limit=BROWSE_LIMIT, descriptions=True):
        """Inference items (with their descriptions unless told not to:
        they can be long); status None: every status."""
        return parse_browse(self.call("browse", "--json", *(["--long"] if descriptions else []),
                                      "--type=inference", "--limit=%d" % limit,
                                      *(["--status=" + status] if status else [])))

    def accept(self, item_id, message):
        self.call("accept", item_id, "--quality=5", "--message=" + message, mutating=True)

    def reject(self, item_id, reason):
        self.call("reject", item_id, "--reason=" + reason, mutating=True)


# =============================================================================
# State on disk: the result spool and the batch ledgers
# =============================================================================
#
# $XDG_STATE_HOME/wl-infer/ (default ~/.local/state/wl-infer), folders 0700,
# files 0600.
# results/<id>.json: a finished result is on disk before wl is asked to take
# it, written atomically (temp file, fsync, rename), and removed once wl has
# it. `run` submits a kept result instead of generating again when the job
# description (byte for byte) and the local model digest are the ones it was
# made with.
# batches/<name>.jsonl: what `post --batch` posted (a Ledger).

SPOOL_VERSION = 1


def state_dir(*parts):
    base = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec: relative paths are ignored
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "wl-infer", *parts)


def private_dir(folder):
    """Make `folder` (under the state folder) and keep it and its parent private."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    for path in (folder, os.path.dirname(folder)):  # makedirs' mode is masked by umask
        os.chmod(path, 0o700)
    return folder


def spool_dir():
    return state_dir("results")


def spool_path(item_id):
    return os.path.join(spool_dir(), item_id + ".json")  # item IDs are [w-0-9a-z] only


def spool_write(item, model_digest, evidence):
    """Keep a finished result; returns its path."""
    folder = private_dir(spool_dir())
    doc = {"version": SPOOL_VERSION, "id": item.id, "description": item.description,
           "model_digest": model_digest, "spooled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                     time.gmtime()),
           "evidence": encode_evidence(evidence)}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f)  # ASCII: \u escapes keep the bytes wl gave that are not UTF-8
            f.flush()
            os.fsync(f.fileno())
        path = spool_path(item.id)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _sync_dir(folder)
    return path


def spool_read(path):
    """A kept result: the spool document with its evidence decoded. Raises
    UserError when the file is not one we wrote."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if doc.get("version") != SPOOL_VERSION:
            raise ValueError("unknown version %r" % doc.get("version"))
        for key in ("id", "description", "model_digest", "spooled_at", "evidence"):
            if not isinstance(doc.get(key), str):
                raise ValueError("no %s" % key)
        if not is_item_id(doc["id"]):
            raise ValueError("bad item ID")
        doc["evidence"] = decode_evidence(doc["evidence"], limit=None)  # may be too big to submit
        if output_hash(doc["evidence"]["output"]) != doc["evidence"]["output_hash"]:
            raise ValueError("its output does not match its output_hash")
    except (OSError, ValueError, AttributeError, JobError) as exc:
        raise UserError("kept result %s is unreadable (%s)" % (path, _reason(exc)))
    return doc


def spool_list():
    """(path, document or the UserError) of every kept result, oldest first."""
    folder = spool_dir()
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".json")
                       and not n.startswith("."))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise UserError("cannot list kept results in %s: %s" % (folder, _reason(exc)))
    found = []
    for name in names:
        path = os.path.join(folder, name)
        try:
            found.append((path, spool_read(path)))
        except UserError as exc:
            found.append((path, exc))
    found.sort(key=lambda entry: entry[1]["spooled_at"] if isinstance(entry[1], dict) else "")
    return found


def _remove(path):
    try:
        os.unlink(path)
    except OSError:
        pass


LEDGER_VERSION = 1
_BATCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")


def batch_name(source, name=None):
    """A batch's name: `name` (--name), else the batch file's name without
    its extension; standard input needs --name, so that the same command
    run again finds the same ledger."""
    if name is None:
        if source == "-":
            raise UserError("a batch on standard input needs --name NAME, so that running the "
                            "command again resumes it instead of posting it again")
        name = os.path.basename(source).split(".")[0]
        name = re.sub(r"[^A-Za-z0-9._-]", "-", name).lstrip("._-")[:100] or "batch"
    if not _BATCH_NAME.match(name):
        raise UserError("--name %s is not a batch name: 1 to 100 letters, digits and . _ -, "
                        "starting with a letter or digit" % preview(_dumps(name), 60))
    return name


def job_key(job):
    """What identifies a batch line's job across runs: its prompt, model,
    seed and max_tokens (a pin may change when the local model does)."""
    return hashlib.sha256(encode_job(make_job(job.prompt, job.model, job.seed,
                                              job.max_tokens)).encode(
        "utf-8", "surrogatepass")).hexdigest()[:32]


class LedgerEntry(collections.namedtuple("LedgerEntry", "line custom_id url job_key item_id")):
    """A line of a batch as its ledger knows it: item_id None while its
    `wl post` has not been seen to succeed (it may have, if it was cut off)."""

    __slots__ = ()


class Ledger(object):
    """What a batch posted: $XDG_STATE_HOME/wl-infer/batches/<name>.jsonl,
    one JSON object per line, each appended and synced before the next
    step: a header (the batch's `batch` key: its name and a random part,
    so that its jobs are known on the board), `{"line", "custom_id", "url",
    "job"}` before a line's `wl post`, `{"custom_id", "id"}` after it, and
    `{"complete": N}` once every line is posted. A record cut off by a crash
    is the last line, and is left out when read. Posting holds a lock on
    it: one `post --batch` per batch at a time."""

    def __init__(self, path, header, entries, complete):
        self.path, self.name, self.batch = path, header["name"], header["batch"]
        self.source = header.get("source")
        self.entries = entries  # custom_id -> LedgerEntry, in the order they were first written
        self.complete = complete  # the number of jobs, once the batch was posted whole
        self.file = None

    @staticmethod
    def path_of(name):
        return os.path.join(state_dir("batches"), name + ".jsonl")

    @classmethod
    def load(cls, name):
        """The ledger of batch `name`, or None when there is none."""
        path = cls.path_of(name)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UserError("cannot read the ledger %s: %s" % (path, _reason(exc)))
        lines = raw.split(b"\n")
        if lines and lines[-1] != b"":
            lines.pop()  # a record cut off by a crash: its step was never taken as done
        records = []
        for number, line in enumerate(lines[:-1], 1):
            try:
                record = json.loads(line.decode("utf-8"))
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                raise UserError("the ledger %s is damaged at line %d (%s); move it away to start "
                                "the batch again"
                                % (path, number, exc))
            records.append(record)
        header = records[0] if records else {}
        if header.get("ledger") != LEDGER_VERSION or not isinstance(header.get("batch"), str):
            raise UserError("%s is not a wl_infer batch ledger (version %d)"
                            % (path, LEDGER_VERSION))
        entries, complete = collections.OrderedDict(), None
        for record in records[1:]:
            custom_id = record.get("custom_id")
            if "complete" in record:
                complete = record["complete"]
            elif "id" in record and custom_id in entries:
                entries[custom_id] = entries[custom_id]._replace(item_id=record["id"])
            elif "job" in record:
                entries[custom_id] = LedgerEntry(record.get("line"), custom_id, record.get("url")
                                                 or "",
                                                 record["job"], None)
        return cls(path, records[0], entries, complete)

    @classmethod
    def open(cls, name, source):
        """The ledger of batch `name` for posting to: made when there is
        none, and locked against a second `post --batch` of it (read once
        the lock is held: what another one posted before counts)."""
        path = cls.path_of(name)
        if not os.path.exists(path):
            header = {"ledger": LEDGER_VERSION, "name": name, "batch": "%s.%s"
                      % (name, os.urandom(4).hex()),
                      "source": source if source == "-" else os.path.abspath(source),
                      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            try:
                fd, tmp = tempfile.mkstemp(dir=private_dir(os.path.dirname(path)), prefix=".",
                                           suffix=".tmp")
            except OSError as exc:
                raise UserError("cannot write the ledger %s: %s" % (path, _reason(exc)))
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(json.dumps(header) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.link(tmp, path)  # never over a ledger another process made meanwhile
                _sync_dir(os.path.dirname(path))
            except FileExistsError:
                pass
            except OSError as exc:
                raise UserError("cannot write the ledger %s: %s" % (path, _reason(exc)))
            finally:
                _remove(tmp)
        try:
            file = open(path, "a", encoding="utf-8")
        except OSError as exc:
            raise UserError("cannot open the ledger %s: %s" % (path, _reason(exc)))
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            ledger = cls.load(name)
        except BlockingIOError:
            file.close()
            raise UserError("batch %s is being posted by another wl_infer.py right now (its "
                            "ledger %s is locked)"
                            % (name, path))
        except BaseException:
            file.close()
            raise
        ledger.file = file
        return ledger

    def _append(self, record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def intend(self, request, key):
        """Record that line `request` is about to be posted."""
        self._append({"line": request.line, "custom_id": request.custom_id, "url": request.url,
                      "job": key})
        self.entries[request.custom_id] = LedgerEntry(request.line, request.custom_id, request.url,
                                                      key, None)

    def posted(self, custom_id, item_id):
        self._append({"custom_id": custom_id, "id": item_id})
        self.entries[custom_id] = self.entries[custom_id]._replace(item_id=item_id)

    def finish(self, count):
        self._append({"complete": count})
        self.complete = count

    def close(self):
        if self.file is not None:
            self.file.close()  # and with it the lock
            self.file = None


class WorkerMemory(object):
    """What `work` remembers of jobs across runs, in the state folder's
    work.json: each failed job's failures and the time (epoch seconds)
    before which it is not tried again, so that the cap of JOB_TRIES holds
    under cron's `work --once` too; and why each job was last skipped, so
    that a skip is logged once per job, not once per run. The workers of
    one user on this box share it: each change is read, made and written
    under a lock file. A damaged file is started afresh (it costs a repeat
    of a log line or of a failure)."""

    VERSION = 1

    def __init__(self, path=None):
        self.path = path or state_dir("work.json")
        self.lock = threading.Lock()  # the worker's threads
        self.failures, self.skips = {}, {}  # id -> [count, not before]; id -> reason
        with self.lock:
            self._load()

    def _load(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
            failures, skips = doc.get("failures"), doc.get("skips")
            shaped = isinstance(failures, dict) and isinstance(skips, dict)
            if doc.get("version") == self.VERSION and shaped:
                self.failures, self.skips = failures, skips
        except (OSError, ValueError, AttributeError):
            pass

    def _change(self, change):
        """Read, change and write the memory under its lock file; a disk
        that cannot be written leaves it in this process only."""
        with self.lock:
            try:
                folder = private_dir(os.path.dirname(self.path))
                lock = open(self.path + ".lock", "w")
            except OSError:
                return change()
            with lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._load()  # what other workers wrote meanwhile
                found = change()
                tmp = None
                try:
                    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        json.dump({"version": self.VERSION, "failures": self.failures,
                                   "skips": self.skips}, f)
                    os.replace(tmp, self.path)
                except OSError:
                    _remove(tmp)
            return found

    def failure(self, item_id, delay_after):
        """Count a failure of `item_id`, not to be tried for
        `delay_after(failures before this one)` seconds, in one change
        (the worker's threads and other workers may count at once);
        returns (the count, the delay)."""
        def change():
            earlier = self.failures.get(item_id, [0, 0])[0]
            delay = delay_after(earlier)
            self.failures[item_id] = [earlier + 1, time.time() + delay]
            return earlier + 1, delay
        return self._change(change)

    def failed(self, item_id):
        """(failures, seconds before the job may be tried again) of `item_id`."""
        with self.lock:
            count, not_before = self.failures.get(item_id, [0, 0])
        return count, max(0.0, not_before - time.time())

    def poll(self, open_ids, skips, told=True):
        """After a poll of the open jobs `open_ids` (None: wl's list was cut):
        the reasons of `skips` ({id: reason}) not logged before, to be
        logged now (`told` False: -q, nothing is logged, so nothing is
        remembered as told). The skips of jobs no longer open are forgotten,
        and failures a week after their job could have been tried again (a
        job in flight is not open either)."""
        week_ago = time.time() - 7 * 86400

        def change():
            new = dict((i, r) for i, r in skips.items() if self.skips.get(i) != r)
            if told:
                self.skips.update(new)
            for item_id in [i for i in self.skips if open_ids is not None and i not in open_ids]:
                del self.skips[item_id]
            for item_id in [i for i, (_, not_before) in self.failures.items()
                            if not_before < week_ago]:
                del self.failures[item_id]
            return new
        with self.lock:
            new = [i for i, r in skips.items() if self.skips.get(i) != r]
            gone = [i for i in self.skips if open_ids is not None and i not in open_ids]
            old = [i for i, (_, not_before) in self.failures.items() if not_before < week_ago]
        if not (new and told) and not gone and not old:  # nothing to write
            return dict((i, skips[i]) for i in new)
        return self._change(change)


def _sync_dir(folder):
    """A rename or link survives a crash only once its folder is synced."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


# =============================================================================
# What every command works with: options, wl and Ollama, its report
# =============================================================================


class Settings(collections.namedtuple("Settings",
                                      "wl wasteland local_db no_push wl_timeout ollama_urls "
                                                  "timeout quiet json no_logprobs")):
    """What every command is set up with: the wl executable and its
    options (wasteland, local_db, no_push, wl_timeout in seconds), the
    Ollama URLs (`work` and `results` use them all, other commands the
    first) and their inactivity timeout, and how it talks (quiet, json;
    no_logprobs: a worker asks for none). default_settings() makes one."""

    __slots__ = ()

    @property
    def ollama(self):
        return self.ollama_urls[0]


def default_settings(**given):
    """Settings as the command line's defaults make them ($WL_BIN,
    $OLLAMA_HOST), with `given` in their place: for library use."""
    urls = [u for u in (os.environ.get("OLLAMA_HOST") or "").split(",") if u.strip()]
    defaults = dict(wl=os.environ.get("WL_BIN") or "wl", wasteland=None, local_db=False,
                    no_push=False, wl_timeout=DEFAULT_WL_TIMEOUT,
                    ollama_urls=urls or [DEFAULT_OLLAMA], timeout=300.0, quiet=False, json=False,
                    no_logprobs=False)
    defaults.update(given)
    return Settings(**defaults)


def settings_of(args):
    """The Settings of parsed command-line options."""
    return Settings(*(getattr(args, name) for name in Settings._fields))


class Context(object):
    """What a command works with: its Settings, the Signals it acts on, and
    the wl driver and Ollama client, each created on first use (status
    never touches Ollama). `threaded`: the command's wl calls overlap on
    threads (`work`), so the status line shows its jobs, not a slow wl
    call. From Python: Context(default_settings(...))."""

    def __init__(self, settings, signals=None, threaded=False):
        self.settings, self.threaded = settings, threaded
        self.signals = signals or Signals()  # not installed: a library user installs their own
        self._wl = None
        self._ollama = None
        self.status_line = StatusLine(not settings.quiet and sys.stderr.isatty())
        # a local Dolt clone takes one wl at a time: the drivers made here share this lock
        self.wl_turn = threading.Lock() if settings.local_db else None

    @property
    def wl(self):
        if self._wl is None:
            self._wl = self.new_wl(None if self.threaded else self.status_line)
        return self._wl

    def new_wl(self, status_line):
        """A wl driver of its own (for calls on other threads: `status_line` None)."""
        c = self.settings
        return Wl(find_executable(c.wl), c.wasteland, c.local_db, c.wl_timeout, c.no_push,
                  status_line,
                  self.wl_turn, self.signals)

    @property
    def ollama(self):
        if self._ollama is None:
            self._ollama = Ollama(self.settings.ollama, self.settings.timeout)
        return self._ollama

    def progress(self, label, total=None):
        return Progress(self.status_line, label, total)

    def warn(self, message):
        self.status_line.above("wl_infer: warning: %s" % printable(message))

    def out(self, line, quiet=None):
        """A line of data on stdout at once, for a command that streams its
        results (-q: `quiet` instead, or nothing; --json: nothing, the
        document comes at the end)."""
        if self.settings.quiet:
            line = quiet
        if line is not None and not self.settings.json:
            self.status_line.above(line, sys.stdout)


class StatusLine(object):
    """The line at the bottom of a terminal saying what the command waits for
    now: a generation's tokens, a slow wl call, audit's item N of M. Only when
    stderr is a terminal and not -q. Permanent lines (warnings, the worker's
    log) are written above it with `above`."""

    def __init__(self, enabled):
        self.enabled, self.text, self.lock = enabled, "", threading.RLock()

    def show(self, text):
        if self.enabled:
            with self.lock:
                try:  # one row, or the next \r could not take it back
                    # 0: the size is unknown
                    width = os.get_terminal_size(sys.stderr.fileno()).columns or 80
                except (OSError, ValueError):
                    width = 80
                self.text = printable(text)[:max(width - 1, 10)]
                _emit(sys.stderr, "\r\x1b[K" + self.text)

    def clear(self):
        with self.lock:
            if self.text:
                self.text = ""
                _emit(sys.stderr, "\r\x1b[K")

    def above(self, line, stream=None):
        """A permanent line (on stderr, or on `stream`), with the status
        line drawn again below it."""
        with self.lock:
            if self.text:
                _emit(sys.stderr, "\r\x1b[K")
            if stream is not None:
                _emit(stream, line + "\n")
                line = None
            _emit(sys.stderr, (line + "\n" if line is not None else "") + self.text)


class Progress(object):
    """A generation's tokens on the status line, at most ten times a second."""

    def __init__(self, status_line, label, total=None):
        self.status_line, self.label, self.total = status_line, label, total
        self.clock = time.monotonic
        self.start = self.clock()
        self.shown = 0.0

    def __call__(self, tokens):
        now = self.clock()
        if not self.status_line.enabled or now - self.shown < 0.1:
            return
        self.shown = now
        elapsed = now - self.start
        self.status_line.show("%s: %d%s tokens, %s, %.1fs" % (
            self.label, tokens, " of %d" % self.total if self.total else "",
            received_rate(tokens, elapsed),
            elapsed))


    def clear(self):
        self.status_line.clear()


def received_rate(tokens, seconds):
    """Tokens received per second since the request (prompt evaluation
    included): what the status line and the worker's log both show. The
    evidence's tokens_per_s is Ollama's own, of generation alone."""
    return "%.1f tok/s received" % (tokens / seconds if seconds > 0 else 0.0)


class _NoProgress(object):
    """What a verification reports its tokens to when nothing shows them."""

    total = None

    def __call__(self, tokens):
        pass

    def clear(self):
        pass


def NO_PROGRESS(label, total=None):
    return _NoProgress()


class Report(object):
    """A command's result: its exit code and what it prints. stdout is data:
    `doc` with --json (`docs`: several documents, one after the other),
    `quiet` lines with -q (what a pipeline needs: an ID, or nothing), else
    `text` with its `notes` (counts, hints, "nothing found") on stderr, for
    people. `raw`: text written exactly as it is in place of `text` and
    `quiet` (an answer). `errors`: what went wrong with some of the items
    of a command that goes on with the rest, printed as errors always."""

    def __init__(self, code, doc, text, notes=(), quiet=(), raw=None, errors=(), docs=None):
        self.code, self.doc, self.text = code, doc, text
        self.notes, self.quiet = list(notes), list(quiet)
        self.raw, self.errors, self.docs = raw, list(errors), docs


def require_inference(item):
    if item.type != "inference":
        raise UserError("%s is %s, not an inference job" % (
            item.id, "a %s item" % item.type if item.type else "an untyped item"))


def job_of(item):
    """The decoded job of an item read with `wl status`."""
    require_inference(item)
    if item.description is None:
        raise JobError("it has no description, so no job to run", item.id)
    try:
        return decode_job(item.description)
    except JobError as exc:
        raise JobError(exc.reason, item.id)


def find_model(models, name):
    """The digest of model `name` in {name: digest} (from /api/tags), or None."""
    wanted = full_model_name(name).lower()  # Ollama names are case-insensitive
    return next((digest for have, digest in models.items() if have.lower() == wanted), None)


def require_local_model(models, model, url):
    """The model's digest on the Ollama at `url`, whose /api/tags gave
    `models`. Never claim, or re-run, work this box cannot do."""
    digest = find_model(models, model)
    if digest is None:
        raise UserError("model %s is not in the local Ollama at %s; pull it with `ollama pull %s` "
                        "or leave the job to another worker" % (model, url, model))
    return digest


def local_version(ollama):
    """An Ollama's version, or "" (provenance is best effort)."""
    try:
        return ollama.version()
    except OllamaError:
        return ""


def _digest_hex(digest):
    digest = digest.strip().lower()
    return digest[7:] if digest.startswith("sha256:") else digest


def same_digest(a, b):
    """/api/tags prints bare hex; accept a sha256: prefix and any case."""
    return _digest_hex(a) == _digest_hex(b)


def short_digest(digest):
    return printable("sha256:" + _digest_hex(digest)[:12])


# =============================================================================
# Running a job: check, claim, infer, keep, submit (`run`, and `work` per job)
# =============================================================================


def release_claim(ctx, item_id):
    """Give a claim back; returns a sentence saying how that went."""
    try:
        ctx.wl.unclaim(item_id)
        return "the claim on %s was released and the job is open again" % item_id
    except UserError as exc:
        if refused(exc):  # unclaimed by someone else, or (after a failed claim) never ours
            return "no claim of ours is held on %s (%s)" % (item_id, exc)
        return "releasing the claim also failed (%s); run `wl unclaim %s`" % (exc, item_id)
    except KeyboardInterrupt:  # a second signal: wl was stopped mid-call
        return ("releasing the claim was interrupted, so %s may still be claimed by you: check "
                "with `wl status %s` and release it with `wl unclaim %s`"
                % (item_id, item_id, item_id))


DONE_TRIES = 3  # `wl done` attempts before the result is left in the spool
DONE_BACKOFF = 1.0  # seconds before the second attempt, doubling after


def submit_evidence(ctx, item_id, encoded):
    """`wl done`, tried again with backoff unless the board refused the
    request as made, or a signal arrived. After a final failure the item is
    read back: a completion that is on the board anyway (wl timed out or
    failed to push after writing it) is a success."""
    for attempt in range(1, DONE_TRIES + 1):
        try:
            ctx.wl.done(item_id, encoded)
            return
        except WlError as exc:
            if exc.conflict or attempt == DONE_TRIES or ctx.signals.aborting():
                failure = exc
                break
            delay = DONE_BACKOFF * 2 ** (attempt - 1)
            ctx.warn("%s; trying again in %g s (attempt %d of %d)"
                     % (exc, delay, attempt + 1, DONE_TRIES))
            try:
                time.sleep(delay)
            except KeyboardInterrupt:  # stop trying; the claim is released as after any failure
                failure = exc
                break
    try:
        item = ctx.wl.status(item_id)
    except UserError:
        raise failure
    if item.completion is not None and item.completion.evidence == encoded:
        ctx.warn("%s, but the completion is on the board: it was submitted" % failure)
        return
    failure.item_status = item.status
    raise failure


def kept_result(ctx, item, digest):
    """A spooled result for exactly this job and this model, or None."""
    path = spool_path(item.id)
    if not os.path.exists(path):
        return None
    try:
        doc = spool_read(path)
    except UserError as exc:
        ctx.warn("%s; generating again" % exc)
        return None
    if doc["description"] != item.description or not same_digest(doc["model_digest"], digest):
        ctx.warn("the result kept in %s was made for %s; generating again (it will be replaced)"
                 % (path, "another job description" if doc["description"] != item.description
                    else "model %s, this one is %s"
                    % (short_digest(doc["model_digest"]), short_digest(digest))))
        return None
    try:
        fit_evidence(doc["evidence"])
    except UserError as exc:  # the same job would make the same output: refuse before claiming
        raise UserError("%s already ran this job: %s (kept in %s; `wl_infer.py spool --drop %s` "
                        "removes it)"
                        % (item.id, exc, path, item.id))
    doc["path"] = path
    return doc


def resubmit_command(ctx, item_id, skip_claim=False):
    a = ctx.settings
    words = ["wl_infer.py", "run", item_id] + (["--skip-claim"] if skip_claim else [])
    words += ["--wasteland=" + a.wasteland] if a.wasteland else []
    words += ["--local-db"] if a.local_db else []
    words += ["--no-push"] if a.no_push else []
    return " ".join(shlex.quote(w) for w in words)


# What an interruption of a JobRun leaves behind depends on how far it got.
# (Phases, not board statuses: HOLDING is "the claim is ours".)
CHECKING, CLAIMING, HOLDING, SUBMITTING, SUBMITTED = (
    "checking", "claiming", "holding the claim", "submitting", "submitted")


class JobRun(object):
    """One job through check -> claim -> infer -> keep -> submit: the code
    behind both `run` and `work`. Each step is called through `attempt()`,
    so every way out after the claim either submits or releases, and a
    finished result is kept on disk until wl has it. `phase` says what an
    interruption leaves behind."""

    def __init__(self, ctx, item, skip_claim=False):
        self.ctx, self.item, self.id, self.skip_claim = ctx, item, item.id, skip_claim
        self.job = self.digest = self.kept = None
        self.evidence = None  # the whole evidence, as made (or kept), before fitting wl's field
        self.fitted_evidence = None  # as submitted: fitted into wl's field
        self.spooled = None  # where the result is kept on disk, once it is
        self.gen = None
        self.generating_s = None  # wall time of the generation, from its request to its end
        self.cause = None  # the error behind a failure
        self.phase = CHECKING

    def check(self, models, url):
        """Everything that can refuse the job, before the claim. `models`:
        {name: digest} of the Ollama at `url` that will run it."""
        item, allowed = self.item, ("open", "claimed") if self.skip_claim else ("open",)
        require_inference(item)
        if item.status not in allowed:
            raise UserError("%s is %s, not %s; %s" % (
                self.id, item.status, " or ".join(allowed),
                "with --skip-claim the item must already be claimed" if self.skip_claim
                else "only open jobs can be claimed (use --skip-claim if you claimed it "
                "yourself)"))
        job = self.job = job_of(item)
        digest = self.digest = require_local_model(models, job.model, url)
        if job.model_digest and not same_digest(job.model_digest, digest):
            raise UserError("model %s here is %s, the job pins %s; pull the pinned version or "
                            "leave the job to another worker (a result from other weights could "
                            "not be verified against the pin)" % (job.model, short_digest(digest),
                                      short_digest(job.model_digest)))
        self.kept = kept_result(self.ctx, item, digest)
        if self.kept:
            self.evidence, self.spooled = self.kept["evidence"], self.kept["path"]

    def attempt(self, step, *args):
        """Run one step; a failure or a signal releases what is ours and
        raises UserError or Interrupted saying what is left, and where."""
        try:
            return step(*args)
        except UserError as exc:
            raise self.failure(exc)
        except KeyboardInterrupt:
            raise self.interruption()

    def claim(self):
        self.phase = CLAIMING
        if not self.skip_claim:
            self.ctx.wl.claim(self.id)
        self.phase = HOLDING
        self.ctx.signals.check()  # a signal held during the claim: release it now

    def infer(self, ollama, version, on_token=None, digest=None):
        """Run the job on `ollama` (unless a kept result is submitted
        instead) and keep the result on disk. `digest`: the model's digest
        there."""
        if self.evidence is None:
            job = self.job
            top = None if self.ctx.settings.no_logprobs else TOP_LOGPROBS
            started = time.monotonic()
            gen = self.gen = ollama.generate(job, on_token, max_bytes=FIELD_LIMIT, top=top)
            self.generating_s = time.monotonic() - started
            if gen.too_long:
                raise JobError("the output passed %d bytes after %s, so its evidence could never "
                               "fit wl's "
                               "%d-byte field; generation stopped; the job needs a smaller "
                               "max_tokens"
                               % (FIELD_LIMIT, _tokens(gen.chunks), FIELD_LIMIT))
            digest = digest or self.digest
            self.evidence = make_evidence(job, gen.text,
                                      provenance(gen, digest, version, ollama_options(job)))
            self.spooled = self._keep(digest)
        self.ctx.signals.check()

    def _keep(self, digest):
        """Spool the finished result (a signal waits until it is on disk); a
        full disk must not cost the result itself."""
        try:
            with self.ctx.signals.protected("the write of the result to disk"):
                return spool_write(self.item, digest, self.evidence)
        except OSError as exc:
            self.ctx.warn("could not keep the result in %s (%s); submitting it anyway"
                          % (spool_dir(), _reason(exc)))
            return None

    def submit(self):
        self.ctx.signals.check()
        self.fitted_evidence, encoded = fit_evidence(self.evidence)
        self.phase = SUBMITTING
        submit_evidence(self.ctx, self.id, encoded)
        self.phase = SUBMITTED
        if self.spooled:
            _remove(self.spooled)
        self.ctx.signals.check()
        dropped = [name for name, _ in PROVENANCE_FIELDS if self.evidence.get(name) and name
                   not in self.fitted_evidence]
        if dropped:
            self.ctx.warn("submitted without %s: the evidence would not fit wl's %d-byte field "
                          "with %s (verifiers will see them as not available)"
                          % (", ".join(dropped), FIELD_LIMIT,
                                                               "it" if len(dropped) == 1
                                                               else "them"))

    def failure(self, exc):
        """The error to raise for `exc`, once what is ours is released."""
        self.cause = exc
        # between keeping the result and submitting it, only its size can fail
        message = "%s; %s%s" % (exc, self._after_failure(exc),
                                self._kept_note(self.skip_claim, submittable=self.phase
                                                != HOLDING))
        return (Interrupted if self.ctx.signals.aborting() else UserError)(message)

    def interruption(self):
        """The Interrupted to raise for a signal, once what is ours is released."""
        # wl done was stopped: likely still ours
        still_claimed = self.skip_claim or self.phase == SUBMITTING
        return Interrupted(self._after_interrupt()
                           + (self._kept_note(still_claimed) if self.phase != SUBMITTED
                                                      else ""))

    def _after_failure(self, exc):
        """What a failure left on the board, releasing what is ours."""
        if self.skip_claim:
            return "the claim on %s was left to its owner (--skip-claim)" % self.id
        if self.phase == CLAIMING and refused(exc):
            return "nothing was claimed"
        # a claim that timed out or failed for another reason may still have been written
        status = (exc.item_status if isinstance(exc, WlError) else None) or "claimed"
        if status != "claimed":
            return "%s is now %s, so there is no claim to release" % (self.id, status)
        return release_claim(self.ctx, self.id)

    def _after_interrupt(self):
        item_id = self.id
        if self.phase == SUBMITTED:
            return "the result was submitted before stopping: %s is in review" % item_id
        if self.phase == CLAIMING:
            return ("stopped during `wl claim`, so %s may be claimed by you: check with `wl "
                    "status %s` and release it with `wl unclaim %s`" % (item_id, item_id, item_id))
        if self.phase == SUBMITTING:
            return ("stopped during `wl done`, so the result may or may not be on the board: "
                    "check with `wl status %s`" % item_id)
        if self.skip_claim:
            return "the claim on %s was left to its owner (--skip-claim)" % item_id
        self.ctx.status_line.clear()
        _say_now("interrupted: releasing the claim on %s; press Ctrl-C again to stop waiting, and "
                 "the claim may stay held" % item_id)
        return release_claim(self.ctx, item_id)

    def _kept_note(self, still_claimed, submittable=True):
        """Where the result is kept, and how to submit it (or drop it);
        `still_claimed`: the claim is still ours, so the command skips it."""
        if not self.spooled or not os.path.exists(self.spooled):
            return ""
        if not submittable:
            return ("; the result is kept in %s for the record (`wl_infer.py spool --drop %s` "
                    "removes it)" % (self.spooled, self.id))
        return "; the result is kept in %s: submit it with `%s`" % (
            self.spooled, resubmit_command(self.ctx, self.id, still_claimed))


def run_job(ctx, item_id, skip_claim=False):
    """`run`: read the item, check it, then claim, infer and submit on the
    local Ollama, with the progress line. Returns the finished JobRun."""
    item = ctx.wl.status(item_id)
    run = JobRun(ctx, item, skip_claim)
    run.check(ctx.ollama.models(), ctx.ollama.url)
    version = local_version(ctx.ollama) if run.kept is None else ""
    run.attempt(run.claim)
    progress = ctx.progress("running %s with %s" % (run.id, printable(run.job.model)),
                            run.job.max_tokens or None)
    try:
        run.attempt(run.infer, ctx.ollama, version, progress)
    finally:
        progress.clear()
    run.attempt(run.submit)
    return run


# =============================================================================
# Verification: the cheap checks, then a re-run compared as it streams
# =============================================================================
#
# Checks run cheapest first; the first failing one decides the verdict. A
# check's ok is None for "not available" (Go's evidence has no digest or
# logprobs). The worker's submitted output is compared with a re-run that
# stops at the first character that differs. With a tolerance, at a
# divergence the submitted token is looked up among the model's own top
# candidates there; within the tolerance it is forced: the generation goes on
# from the rendered prompt plus the submitted text through that token (a raw
# request) and must reproduce the rest. A forger picks at most max_forced
# tokens, each among near-ties; the model decides everything else.

LOGPROB_TOLERANCE = 0.1  # nats: more, on identical text, is different numerics
NEAR_TIE = 0.5  # nats between the top two candidates: a benign flip is plausible
EXCERPT = 24  # characters shown on each side of a divergence
DEFAULT_MAX_FORCED = 8  # near-tie steps a tolerant verification forces at most
# tokens after a forced one where a continuation's raw prompt may still be split into other tokens
# than
# the worker's model made (" anaknya" generated as one token, read back as two): no refutation
# there
RETOKENIZED_REACH = 4
VERIFIED, MISMATCH = "VERIFIED", "MISMATCH"
# Causes that refute the submitted output whatever the hardware: it does not
# hash to its own hash, it is for another job, or the model would not write it
# (beyond the tolerance). Every other MISMATCH may be an honest worker's.
REFUTATIONS = ("inconsistent-evidence", "binding", "different-output")


class Policy(object):
    """How a re-run is judged. tolerance 0: exact (the submitted text must
    be what this model generates). tolerance > 0: at most `max_forced`
    tokens may be a candidate at most `tolerance` nats below the model's
    choice. strict: same text with logprobs further apart than the larger
    of LOGPROB_TOLERANCE and the tolerance is a MISMATCH (only strict asks
    for every token's logprobs). sample: a Sample, or None to re-run it all."""

    def __init__(self, strict=False, tolerance=0.0, max_forced=DEFAULT_MAX_FORCED, sample=None):
        self.strict, self.tolerance = strict, tolerance
        self.max_forced, self.sample = max_forced, sample


EXACT = Policy()


class Sample(collections.namedtuple("Sample", "windows tokens seed")):
    """--sample K --window L --sample-seed S: re-generate K windows of L
    tokens instead of the whole output. seed None: drawn from the system's
    CSPRNG (and reported, so that anyone can re-check the same windows)."""

    __slots__ = ()


class Span(collections.namedtuple("Span", "char token_index budget last")):
    """A stretch of the submitted output that a verification re-generates:
    from character `char` (token `token_index`; None when the evidence does not
    say), at most `budget` tokens (None: no limit), and to the output's end
    when `last`. A whole verification is one Span from 0."""

    __slots__ = ()


DEFAULT_WINDOW = 16  # tokens per sampled window
CHARS_PER_TOKEN = 4.0  # a guess where the evidence gives no token count


def exact_token_lengths(evidence):
    """The token lengths of the submitted output when the evidence's
    token_lengths cover it exactly (else None): where its tokens start, and
    how many there are."""
    lengths = evidence["token_lengths"]
    if lengths and sum(lengths) == len(evidence["output"]):
        return lengths
    return None


def window_spans(job, evidence, sample, rng):
    """The Spans a sampled verification re-generates, in order: one at the
    start, one that ends at the output's end, and sample.windows - 2 drawn
    with `rng` in between, none overlapping. Where the evidence's
    token_lengths cover the output, a window starts on one of its token
    boundaries that is also a word boundary (between a whitespace character
    and another), and knows its token index; without them, just before a
    whitespace character that follows another (tokenizers start a word's
    token with its space). There a raw prompt cut from the output
    re-tokenizes as the model generated it.
    Returns (spans, why not) with spans None when sampling cannot check this
    output: it is short, or it may end at max_tokens and its token count is
    unknown (Go's evidence), so where it ends could not be checked."""
    submitted, size = evidence["output"], sample.tokens
    lengths = exact_token_lengths(evidence)
    budget = job.max_tokens or None
    if lengths is None and budget:
        return None, ("the output may end at max_tokens, and the evidence gives no token count "
                      "(Go's evidence "
                      "records none), so where it ends cannot be sampled")
    if lengths is not None:
        count, cuts, at = len(lengths), [], 0
        for index, n in enumerate(lengths):  # a token boundary at a word boundary
            if index == 0 or (n and submitted[at].isspace() != submitted[at - 1].isspace()):
                cuts.append((at, index))
            at += n
    else:
        count = len(submitted) / CHARS_PER_TOKEN
        cuts = [(0, None)] + [(i, None) for i in range(1, len(submitted)) if submitted[i].isspace()
                              and not submitted[i - 1].isspace()]
    if count <= sample.windows * size:
        return None, "the output is short (%s), so it is re-run whole" % _tokens(int(count))

    def position(cut):  # in tokens, estimated where the evidence does not say
        return cut[1] if cut[1] is not None else cut[0] / CHARS_PER_TOKEN

    last = max((c for c in cuts if position(c) <= count - size), key=position, default=cuts[0])
    chosen = [cuts[0], last]
    middle = [c for c in cuts if size <= position(c) <= position(last) - size]
    for _ in range(50 * sample.windows):
        if len(chosen) >= sample.windows or not middle:
            break
        cut = rng.choice(middle)
        if all(abs(position(cut) - position(c)) >= size for c in chosen):
            chosen.append(cut)
    spans = []
    for char, token in sorted(set(chosen)):
        is_last = (char, token) == last
        left = budget - token if budget and token is not None else None
        spans.append(Span(char, token, left if is_last else min(size, left or size), is_last))
    return spans, None


class Check(collections.namedtuple("Check", "name ok message")):
    """One line of a verification: ok True, False, or None (not available)."""

    __slots__ = ()


class Cause(object):
    """Why a verification is a MISMATCH (or, for a near-tie, what likely
    happened): a kind, a sentence, and details for --json."""

    def __init__(self, kind, message, **details):
        self.kind, self.message, self.details = kind, message, details

    def document(self):
        return dict(self.details, kind=self.kind, message=self.message)


class Submission(collections.namedtuple("Submission",
                                        "item_id job evidence completed_by checks cause")):
    """A completion to verify, as read from the board: the job, the
    submitted evidence (decoded), who completed it, and the checks that
    need no model. `cause`: a Cause when those checks refute it (no re-run
    is needed), else None."""

    __slots__ = ()

    @classmethod
    def of(cls, item):
        job = job_of(item)
        completion = item.completion
        if completion is None or not completion.evidence:
            raise UserError("%s has no completion evidence to verify (status %s)"
                            % (item.id, item.status))
        evidence, checks, cause = evidence_checks(job, completion.evidence)
        if evidence is None:
            raise JobError(checks[0].message, item.id)
        return cls(item.id, job, evidence, completion.completed_by, checks, cause)

    @property
    def submitted(self):
        """The worker's output."""
        return self.evidence["output"]

    @property
    def expected_hash(self):
        return self.evidence["output_hash"]


class Forced(collections.namedtuple("Forced", "token_index char submitted_token_text "
                                    "rerun_token_text gap "
                                              "logprob")):
    """A near-tie a tolerant verification accepted: at token `token_index`
    (character `char`) the submitted text has `submitted_token_text` where
    the re-run chose `rerun_token_text`, `gap` nats below it."""

    __slots__ = ()


class Divergence(collections.namedtuple("Divergence",
                                        "char token_index excerpt_start submitted rerun")):
    """Where a re-run left the submitted output: character `char` and token
    `token_index` (None when not known) of it, and both texts from
    `excerpt_start` to a little past it."""

    __slots__ = ()


class Window(collections.namedtuple("Window", "start_token_index start_char tokens")):
    """A window a sampled verification re-generated: from token
    `start_token_index` (None when the evidence does not say), character
    `start_char`, `tokens` long."""

    __slots__ = ()


class Sampling(collections.namedtuple("Sampling",
                                      "windows sample_seed window_tokens submitted_tokens "
                                                  "tokens_checked coverage")):
    """What a sampled verification re-generated: its Windows, the seed that
    placed them, their size, the submitted output's tokens (estimated when
    the evidence does not say), those checked and their share."""

    __slots__ = ()


class LocalServer(collections.namedtuple("LocalServer",
                                         "model_digest ollama_version prompt_eval_count")):
    """The verifying server: its model's digest, its Ollama version (asked
    only when the evidence has one to compare) and its prompt_eval_count for
    the job's own request (when it ran to its end)."""

    __slots__ = ()


NO_SERVER = LocalServer(None, None, None)


class Outcome(collections.namedtuple("Outcome", "verdict exact tolerance forced checks cause "
                                     "diverged_at "
                                                "tokens_generated probe_tokens logprob_max_diff "
                                     "actual_hash "
                                                "output local sampling")):
    """What verifying a Submission found: `verdict` VERIFIED or MISMATCH,
    `exact` (VERIFIED without forced steps or sampling), the Forced steps,
    the checks made after the Submission's own, the Cause of a MISMATCH,
    the Divergence, the cost in tokens, the largest logprob difference
    (--strict), the re-run's hash and output (None when it stopped early or
    was sampled), the LocalServer and the Sampling (None: not sampled)."""

    __slots__ = ()


class Verification(collections.namedtuple("Verification", "submission outcome")):
    """A Submission and the Outcome of verifying it (verify_submission)."""

    __slots__ = ()

    item_id = property(lambda self: self.submission.item_id)
    job = property(lambda self: self.submission.job)
    submitted_evidence = property(lambda self: self.submission.evidence)
    expected_hash = property(lambda self: self.submission.expected_hash)
    verdict = property(lambda self: self.outcome.verdict)
    cause = property(lambda self: self.outcome.cause)
    forced = property(lambda self: self.outcome.forced)
    sampling = property(lambda self: self.outcome.sampling)

    @property
    def checks(self):
        return self.submission.checks + self.outcome.checks

    @property
    def refuted(self):
        """A MISMATCH that proves the submitted output is not this job's
        (what `audit --reject` rejects); a near-tie or an unknown cause could
        be an honest worker on other hardware."""
        cause = self.cause
        return self.verdict == MISMATCH and cause is not None and cause.kind in REFUTATIONS


def evidence_checks(job, raw):
    """The checks that need neither Ollama nor a re-run (status shows them,
    verify starts with them). `job` is None when it does not decode.
    Returns (evidence or None when it does not decode, checks, Cause or None)."""
    try:
        evidence = decode_evidence(raw)
    except JobError as exc:
        return None, [Check("decodes", False, "evidence does not decode: %s" % exc)], None
    checks = [Check("decodes", True, "evidence decodes")]
    if output_hash(evidence["output"]) != evidence["output_hash"]:
        return evidence, checks + [Check("self-consistent", False,
                                         "evidence is inconsistent: output does not "
                                         "hash to output_hash")], Cause(
            "inconsistent-evidence", "the output does not hash to output_hash; no honest run "
            "writes that, so the submitted output is refuted without a re-run")
    lengths = evidence["token_lengths"]
    if lengths and sum(lengths) > len(evidence["output"]):
        return evidence, checks + [Check("self-consistent", False,
                                         "evidence is inconsistent: its token_lengths "
                                         "add up to more than the output")], Cause(
            "inconsistent-evidence", "the token_lengths add up to %d characters and the output "
            "has %d; no honest run writes that (an output cut short?), so it is refuted without a "
            "re-run"
            % (sum(lengths), len(evidence["output"])))
    checks.append(Check("self-consistent", True, "output hashes to output_hash"))
    if job is None:
        return evidence, checks + [Check("binding", None,
                                         "binding: not checked, the job does not decode")], None
    differences = []
    if full_model_name(evidence["model"]).lower() != full_model_name(job.model).lower():
        differences.append(("model", "evidence model %s, job model %s"
                            % (evidence["model"], job.model)))
    if evidence["seed"] != job.seed:
        differences.append(("seed", "evidence seed %d, job seed %d"
                            % (evidence["seed"], job.seed)))
    pin, recorded = job.model_digest, evidence["model_digest"]
    if pin and recorded and not same_digest(pin, recorded):
        differences.append(("model_digest", "evidence model_digest %s, job pins %s"
                            % (short_digest(recorded), short_digest(pin))))
    if differences:
        message = "the evidence is not for this job: " + "; ".join(d for _, d in differences)
        return evidence, checks + [Check("binding", False, message)], Cause("binding", message,
                                                                           field=differences[0][0])
    message = "model and seed match the job"
    if pin:
        message += (", and the pinned digest" if recorded else
                    "; the pinned digest is not available (the evidence records no model_digest)")
    return evidence, checks + [Check("binding", True, message)], None


def local_model_check(job, evidence, digest):
    """A different local model does not stop the re-run, but it is the
    likely cause if the texts then differ."""
    recorded, pin = evidence["model_digest"], job.model_digest
    if pin and not same_digest(pin, digest):
        return Check("local-model", False, "local model %s is %s, the job pins %s"
                     % (job.model, short_digest(digest), short_digest(pin)))
    if recorded and not same_digest(recorded, digest):
        return Check("local-model", False, "local model %s is %s, the worker's was %s"
                     % (job.model, short_digest(digest), short_digest(recorded)))
    if not recorded and not pin:
        return Check("local-model", None, "local model %s: not comparable, the evidence records "
                     "no model digest"
                     % short_digest(digest))
    if pin and recorded:
        whose = "the pinned one and the worker's"
    elif recorded:
        whose = "the worker's"
    else:
        whose = "the pinned one (the evidence records no digest)"
    return Check("local-model", True, "local model %s is %s" % (short_digest(digest), whose))


def divergence(gen, submitted, span):
    """Where the re-run of `span` left the `submitted` output (the whole of
    it), with a short excerpt of both texts around it."""
    at = gen.diverged_at
    index = gen.token_at(at)
    if index is None:
        index = len(gen.token_ends)
    absolute = span.char + at
    start = max(0, absolute - EXCERPT)
    rerun = submitted[start:span.char] + gen.text[max(0, start - span.char):at + EXCERPT]
    token_index = None if span.token_index is None else span.token_index + index
    return Divergence(absolute, token_index, start, submitted[start:absolute + EXCERPT], rerun)


def diagnose(gen, job, evidence, digest, version, submitted, rendered=None):
    """The likely Cause of a divergence of `gen` from `submitted` (the
    worker's output from where the re-run started). It informs a person;
    the verdict stays MISMATCH. `rendered`: the prompt as the server
    renders it, when known (to tell whether the worker's prompt came from
    its cache)."""
    recorded_digest = evidence["model_digest"] or job.model_digest
    recorded_version = evidence["ollama_version"]
    if recorded_digest and digest and not same_digest(recorded_digest, digest):
        whose = "the worker's model" if evidence["model_digest"] else "the job's pinned model"
        return Cause("model-digest", "%s is %s and this one is %s: different weights give "
                     "different text; re-check with that version of the model"
                     % (whose, short_digest(recorded_digest), short_digest(digest)),
                     recorded=recorded_digest, local=digest)
    if recorded_version and version and recorded_version != version:
        return Cause("ollama-version", "the worker ran Ollama %s and this is Ollama %s: runtimes "
                     "can differ in numerics; re-check with the worker's version"
                     % (preview(recorded_version, 20), version),
                     recorded=recorded_version, local=version)
    index = gen.token_at(gen.diverged_at)
    entry = gen.entry_at(index)
    if index is None:
        start, chosen = gen.diverged_at, ""
    else:
        start = gen.token_start(index)
        chosen = gen.text[start:gen.token_ends[index]]
    runner_up = next(((text, lp) for text, lp in (entry[1] if entry else []) if text != chosen),
                     None)
    if index is None:
        return Cause("unknown", "the re-run ended where the submitted output goes on, so a "
                     "near-tie cannot be told from a different output")
    if entry is None:
        return Cause("unknown", "this Ollama returned no candidates (logprobs) at the divergence, "
                     "so a near-tie cannot be told from a different output")
    if runner_up is None:
        return Cause("unknown", "the re-run's logprobs at the divergence list no runner-up, so a "
                     "near-tie cannot be told from a different output")
    runner_up_text, runner_up_logprob = runner_up
    margin = entry[0] - runner_up_logprob
    took_runner_up = bool(runner_up_text) and submitted.startswith(runner_up_text, start)
    if start < len(submitted):
        theirs = submitted[start:start + max(len(chosen), len(runner_up_text))]
        has = preview(_dumps(theirs), 20)
    else:
        has = "nothing more"
    where = ("at token %d the re-run chose %s over %s by %.2f nats where the submitted output "
             "has %s") % (
        index, preview(_dumps(chosen), 20), preview(_dumps(runner_up_text), 20), margin, has)
    details = dict(token_index=index, rerun_token_text=chosen, runner_up_text=runner_up_text,
                   margin=round(margin, 4))
    if margin <= NEAR_TIE or took_runner_up:
        cached = prompt_cache_note(evidence, rendered)
        cache_words = ""
        if cached:
            cache_words = cached[0]
            details.update(cached[1])
        call = "the runner-up," if took_runner_up else "a close call,"
        return Cause("near-tie", where + ": %s consistent with benign floating-point differences "
                     "across hardware or batching%s; verify --tolerance %g checks whether the "
                     "rest of the output follows"
                     % (call, cache_words, NEAR_TIE), **details)
    caveat = ""
    if not recorded_digest:
        caveat = " (the evidence records no model digest, so other weights are not ruled out)"
    return Cause("different-output", where + ": the output was not produced by this model and "
                 "seed" + caveat,
                 **details)


def prompt_cache_note(evidence, rendered):
    """How the worker's server evaluated the prompt, from its evidence's
    prompt_eval_count: (words for a near-tie's cause, details for --json),
    or None when the evidence does not say. Ollama counts only the prompt
    tokens it evaluated; a prompt served in part from its cache is split
    into other evaluation batches than a fresh server's, and that can flip
    a near-tie. The prompt's own length in tokens is not known here (a
    re-run stopped at a divergence never gets Ollama's count), so it is
    estimated from its rendered text."""
    count = evidence["prompt_eval_count"]
    if not count:  # not recorded (Go's evidence; Ollama always evaluates at least one)
        return None
    estimate = int(len(rendered) / CHARS_PER_TOKEN) if rendered else None
    details = {"worker_prompt_eval_count": count, "prompt_tokens_estimated": estimate}
    if estimate is not None and count * 2 < estimate:
        return ("; the worker's server evaluated %s of the prompt's about %d (the rest came from "
                "its prompt cache, evaluated in other batches than a fresh server's)"
                % (_tokens(count), estimate), details)
    return ("; the worker's server evaluated %s of the prompt, as a fresh one does: if this "
            "server has run or checked this job before, the prompt came from its cache, evaluated "
            "in other batches"
            % _tokens(count), details)


def logprob_check(gen, evidence, limit=LOGPROB_TOLERANCE):
    """On identical text: (the Check, the largest logprob difference or None)."""
    ours, theirs = gen.chosen_logprobs(), evidence["logprobs"]
    if ours is None or theirs is None:
        return Check("logprobs", None, "logprobs: not compared, %s has none"
                     % ("the evidence" if theirs is None else "this Ollama's re-run")), None
    pairs = list(zip(ours, theirs))
    diff = round(max([abs(round(a, 4) - b) for a, b in pairs] or [0.0]), 4)
    if diff > limit:
        return Check("logprobs", False, "same text, different numerics: logprobs differ by up to "
                     "%.4f nats (different weights, quantisation or runtime)" % diff), diff
    return Check("logprobs", True, "logprobs agree: largest difference %.4f nats over %d tokens"
                 % (diff, len(pairs))), diff


# The kinds of Step a tolerant re-run takes at a divergence
FORCE = "force"  # the submitted token is a near-tie: force it and go on
DECIDED = "decided"  # the tolerance decides: a MISMATCH with its cause
NOT_APPLIED = "not-applied"  # the tolerance cannot be applied here: the exact verdict stands
NO_TOKEN = "no-token"  # one text ends where the other goes on: nothing to force


class Step(collections.namedtuple("Step", "kind forced cause why")):
    """What a tolerant re-run does at a divergence: its `kind`, with the
    Forced step (FORCE), the Cause (DECIDED) or why the tolerance is not
    applied (NOT_APPLIED)."""

    __slots__ = ()


def _force(forced):
    return Step(FORCE, forced, None, None)


def _decided(cause):
    return Step(DECIDED, None, cause, None)


def _not_applied(why):
    return Step(NOT_APPLIED, None, None, why)


NO_STEP = Step(NO_TOKEN, None, None, None)


def near_tie_step(gen, submitted, lengths, tolerance):
    """The Step the tolerance makes of the divergence of `gen` from
    `submitted` (the worker's output from where the re-run started;
    `lengths`: its tokens' lengths, [] when unknown): FORCE when the
    submitted text goes on with one of the model's candidates at most
    `tolerance` nats below its choice, DECIDED when it does not,
    NOT_APPLIED when the re-run cannot tell, NO_TOKEN when one text ends
    where the other goes on."""
    index = gen.token_at(gen.diverged_at)
    if index is None:
        return NO_STEP
    start = gen.token_start(index)
    if start >= len(submitted):
        return NO_STEP
    if gen.thinking:
        return _not_applied("the model thinks before it answers, and a continuation cannot "
                            "include its thinking")
    entry = gen.entry_at(index)
    if entry is None or not entry[1]:
        return _not_applied("this Ollama returned no candidates (top_logprobs) at the divergence")
    chosen = gen.text[start:gen.token_ends[index]]
    best = max([entry[0]] + [lp for _, lp in entry[1]])
    fits = [(text, lp) for text, lp in entry[1] if text and submitted.startswith(text, start)]
    if not fits:
        return _decided(Cause(
            "different-output", "at token %d the submitted output goes on with %s, which is none "
            "of the model's top %d candidates there: the output was not produced by this model "
            "and seed"
            % (index, preview(_dumps(submitted[start:start + 12]), 24), len(entry[1])), gap=None,
            token_index=index, rerun_token_text=chosen))
    length = None
    if index < len(lengths) and sum(lengths[:index]) == start:
        length = lengths[index]
    longest = max(fits, key=lambda c: len(c[0]))
    text, logprob = next((c for c in fits if len(c[0]) == length), longest)
    gap = round(best - logprob, 4) + 0.0
    if gap > tolerance:
        return _decided(Cause(
            "different-output", "at token %d the submitted output has %s, %.2f nats below the "
            "model's "
            "choice %s: beyond the tolerance of %g nats, so not a near-tie this model could have "
            "flipped"
            % (index, preview(_dumps(text), 20), gap, preview(_dumps(chosen), 20), tolerance),
            gap=gap, submitted_token_text=text, token_index=index, rerun_token_text=chosen))
    return _force(Forced(index, start, text, chosen, gap, round(logprob, 4) + 0.0))


NO_RENDERING = ("this Ollama does not render prompts (`_debug_render_only`, Ollama 0.11.5 and "
                "later), so it cannot %s")


class Plan(collections.namedtuple("Plan", "policy spans sample_seed note")):
    """What a verification will re-generate and how: the Policy, the Spans
    (the whole output as one, or its sampled windows), the seed that placed
    the windows (None: not sampled) and a Check saying why a sample asked
    for was not taken (else None)."""

    __slots__ = ()

    @property
    def sampled(self):
        return self.sample_seed is not None


def plan_verification(job, evidence, policy, renders):
    """The Plan for re-running `job` against `evidence` under `policy`.
    `renders()`: whether the server can render prompts, asked only when
    windows are to start inside the output."""
    whole = [Span(0, 0, job.max_tokens or None, True)]
    if policy.sample is None:
        return Plan(policy, whole, None, None)
    seed = policy.sample.seed
    if seed is None:
        seed = random.SystemRandom().getrandbits(63)
    # the positions are a function of the seed and the output's token boundaries: anyone can
    # re-check them
    spans, why_not = window_spans(job, evidence, policy.sample, random.Random(seed))
    if spans is not None and not renders():
        spans, why_not = None, NO_RENDERING % "start a window inside the output"
    if spans is None:
        return Plan(policy, whole, None, Check("sample", None, "not sampled: %s" % why_not))
    return Plan(policy, spans, seed, None)


class Followed(collections.namedtuple("Followed", "gen cause")):
    """One span's re-run: its Generation, and the Cause when the tolerance
    decided a MISMATCH (else None)."""

    __slots__ = ()


class Rerun(object):
    """Re-running a Submission on one Ollama as a Plan says, comparing as it
    streams: run() returns the Outcome. What it gathers on the way (checks,
    forced steps, windows, tokens) is its own until then."""

    def __init__(self, submission, policy, ollama, progress=None):
        self.submission, self.policy, self.ollama = submission, policy, ollama
        self.progress = progress or NO_PROGRESS
        self.plan = None  # made once the model is known to be here
        self.checks = []
        self.forced = []  # Forced steps, over every span
        self.windows = []  # Windows re-generated (sampled)
        self.tokens_generated = 0
        # of those, generated to learn the model's candidates at a divergence
        self.probe_tokens = 0
        # the server's rendering of the prompt, asked once
        self.rendered, self.render_asked = None, False

    def rendered_prompt(self):
        """The prompt as the server renders it, asked once (None: it cannot say)."""
        if not self.render_asked:
            self.rendered = self.ollama.rendered_prompt(self.submission.job)
            self.render_asked = True
        return self.rendered

    def outcome(self, verdict, exact=None, cause=None, diverged_at=None, logprob_max_diff=None,
                actual_hash=None,
                output=None, local=NO_SERVER, sampling=None):
        return Outcome(verdict, exact, self.policy.tolerance, self.forced, self.checks, cause,
                       diverged_at,
                       self.tokens_generated, self.probe_tokens, logprob_max_diff, actual_hash,
                       output, local,
                       sampling)

    def run(self):
        submission, policy, ollama = self.submission, self.policy, self.ollama
        job, evidence = submission.job, submission.evidence
        digest = require_local_model(ollama.models(), job.model, ollama.url)
        self.checks.append(local_model_check(job, evidence, digest))
        plan = self.plan = plan_verification(job, evidence, policy,
                                             lambda: self.rendered_prompt() is not None)
        if plan.note:
            self.checks.append(plan.note)
        spans, sampled = plan.spans, plan.sampled
        prompt_eval_count = output = actual_hash = gen = None
        for n, span in enumerate(spans):
            label = "verifying %s" % submission.item_id
            if sampled:
                label += ", window %d of %d" % (n + 1, len(spans))
            gen, cause = self._follow(span, self.progress(label, None))
            self.tokens_generated += gen.eval_count
            final = gen.final
            if not span.char and final is not None and type(final.get("prompt_eval_count")) is int:
                prompt_eval_count = final["prompt_eval_count"]
            if sampled:
                self.windows.append(Window(span.token_index, span.char, len(gen.token_ends)))
            else:
                output = gen.text
                actual_hash = output_hash(gen.text) if final is not None else None
            local = LocalServer(digest, None, prompt_eval_count)
            if gen.diverged_at is not None:
                return self._diverged(gen, span, cause, local, output, actual_hash)
            if cause is not None:  # the tolerance decided
                return self.outcome(MISMATCH, cause=cause, actual_hash=actual_hash, output=output,
                                    local=local)
        recorded_ending, ending = evidence["done_reason"], gen.final.get("done_reason")
        if self.forced and recorded_ending and ending != recorded_ending:
            # one request makes the ending the same as the submitted one's; forced steps split it
            # over several
            message = ("the re-run ends where the submitted output does, but for another reason "
                       "(%s, the evidence says %s)"
                       % (preview(_dumps(ending), 20), preview(_dumps(recorded_ending), 20)))
            self.checks.append(Check("rerun", False, message))
            return self.outcome(MISMATCH, cause=Cause("different-ending", message),
                                actual_hash=actual_hash,
                                output=output, local=local)
        forcing = ", forcing %s" % _steps(len(self.forced)) if self.forced else ""
        if sampled:
            sampling = self._sampling()
            self.checks.append(Check("rerun", True,
                                     "%d windows re-generated the submitted text (%d of %s%s, "
                                     "coverage %.1f%%, sample seed %d)" % (
                                         len(spans), sampling.tokens_checked,
                                         _tokens(sampling.submitted_tokens),
                                         forcing, 100 * sampling.coverage, sampling.sample_seed)))
            self.checks.append(Check("logprobs", None, "logprobs: not compared (sampled)"))
            return self.outcome(VERIFIED, exact=False, local=local, sampling=sampling)
        self.checks.append(Check("rerun", True, "re-run produced the submitted output (%s%s)" % (
            _tokens(gen.eval_count), forcing)))
        verified = self.outcome(VERIFIED, exact=not self.forced, actual_hash=actual_hash,
                                output=output,
                                local=local)
        if not policy.strict:
            self.checks.append(Check("logprobs", None,
                                     "logprobs: not compared (--strict compares them, at the cost "
                                                       "of asking for them on every token)"))
            return verified
        check, diff = logprob_check(gen, evidence, max(LOGPROB_TOLERANCE, policy.tolerance))
        self.checks.append(check)
        if check.ok is False:
            return verified._replace(verdict=MISMATCH, exact=None, logprob_max_diff=diff,
                                     cause=Cause("different-numerics", check.message
                                                 + " (--strict)"))
        return verified._replace(logprob_max_diff=diff)

    def _sampling(self):
        """The Sampling of a VERIFIED: the share of the output's tokens that a
        window re-generated (an edit there is caught; an edit elsewhere only
        may be, through a later window's prompt, so it is not counted)."""
        submitted = self.submission.submitted
        lengths = exact_token_lengths(self.submission.evidence)
        windows = self.windows
        checked = sum(w.tokens for w in windows)
        if lengths is not None:
            total = len(lengths)
        else:  # estimated from the characters per token of the last window, which runs to the end
            last = windows[-1]
            last_chars = max(len(submitted) - last.start_char, 1)
            total = max(checked, int(round(len(submitted) * last.tokens / last_chars)))
        coverage = round(min(1.0, checked / total), 4)
        return Sampling(windows, self.plan.sample_seed, self.policy.sample.tokens, total, checked,
                        coverage)

    def _diverged(self, gen, span, cause, local, output, actual_hash):
        """A span's re-run left the submitted output: where, and the likely
        cause (unless the tolerance gave one)."""
        submission = self.submission
        evidence, submitted = submission.evidence, submission.submitted
        where = divergence(gen, submitted, span)
        token = ", token %d" % where.token_index if where.token_index is not None else ""
        window = " (in window %d of the sample)" % len(self.windows) if self.plan.sampled else ""
        stopped = " (stopped after %s)" % _tokens(gen.eval_count) if gen.final is None else ""
        steps = " after %s" % _steps(len(self.forced)) if self.forced else ""
        self.checks.append(Check("rerun", False, "re-run diverges at character %d%s%s%s%s" % (
            where.char, token, window, stopped, steps)))
        if cause is None:
            version = local_version(self.ollama) if evidence["ollama_version"] else None
            local = local._replace(ollama_version=version)
            cause = diagnose(gen, submission.job, evidence, local.model_digest, version,
                             submitted[span.char:],
                             self.rendered)
        return self.outcome(MISMATCH, cause=cause, diverged_at=where, actual_hash=actual_hash,
                            output=output,
                            local=local)

    def _follow(self, span, progress):
        """The re-run of one span, compared with the submitted output as it
        streams; with a tolerance, forced through near-ties (self.forced)
        until it reproduces the rest or the tolerance decides. Logprobs are
        asked only with --strict: elsewhere the candidates at a divergence
        come from one probe."""
        policy, evidence = self.policy, self.submission.evidence
        job, whole = self.submission.job, self.submission.submitted
        submitted = whole[span.char:]
        lengths = exact_token_lengths(evidence) or []
        lengths = lengths[span.token_index:] if span.token_index is not None else []
        top = None
        if policy.strict:
            top = TOLERANT_TOP_LOGPROBS if policy.tolerance else TOP_LOGPROBS
        total = None  # of the submitted tokens
        if not span.last:
            total = span.budget
        elif not span.char:
            total = evidence["eval_count"]
        progress.total = total if total and total > 0 else None
        if span.char:
            request = continuation_request(job, self.rendered_prompt(), whole[:span.char],
                                           span.budget, top)
        else:
            request = generate_request(job, top, span.budget)
        gen = None
        try:
            while True:
                gen = self.ollama.compare(request, submitted, progress, into=gen)
                if self._window_full(gen, span):
                    gen.diverged_at = None  # the window's budget ended it; the output goes on
                if gen.diverged_at is None:
                    return Followed(gen, None)
                index = gen.token_at(gen.diverged_at)
                if index is not None and gen.entry_at(index) is None:
                    self._probe(span, gen, index)
                if not policy.tolerance:
                    return Followed(gen, None)
                step = self._step(gen, submitted, lengths, span)
                if step.kind == NOT_APPLIED:
                    self.checks.append(Check("tolerance", None,
                                             "tolerance not applied: %s; the verdict is the "
                                                                "exact one" % step.why))
                    return Followed(gen, None)
                if step.kind != FORCE:
                    return Followed(gen, step.cause)
                forced = step.forced
                self.forced.append(forced._replace(token_index=forced.token_index
                                                   + (span.token_index or 0),
                                                   char=forced.char + span.char))
                gen.force(forced.token_index, forced.submitted_token_text, forced.logprob)
                budget = span.budget - len(gen.token_ends) if span.budget else None
                if budget is not None and budget <= 0:  # num_predict 0 would mean no limit at all
                    gen.final = {"done": True, "done_reason": "length"}
                    if span.last:
                        gen.compare_end(submitted)
                    return Followed(gen, None)
                request = continuation_request(job, self.rendered_prompt(), whole[:span.char]
                                               + gen.text, budget,
                                               top)
        finally:
            progress.clear()

    @staticmethod
    def _window_full(gen, span):
        """A window (not the last) that diverged only by ending at its budget."""
        final = gen.final
        return (gen.diverged_at is not None and not span.last and final is not None
                and final.get("done_reason") == "length" and gen.diverged_at == len(gen.text))

    def _step(self, gen, submitted, lengths, span):
        """near_tie_step, and what this re-run makes of it: a near-tie past
        --max-forced is too many; one on a server that cannot render prompts
        cannot be continued; a refutation right after a forced token may be
        the continuation's own re-tokenization."""
        policy, forced = self.policy, self.forced
        step = near_tie_step(gen, submitted, lengths, policy.tolerance)
        if step.kind == FORCE and len(forced) >= policy.max_forced:
            index, gap = step.forced.token_index, step.forced.gap
            return _decided(Cause(
                "too-many-divergences", "at token %d the submitted output takes a near-tie (%.2f "
                "nats) for the %s time, more than --max-forced %d allows: more than near-tie noise"
                % (index, gap, _ordinal(len(forced) + 1), policy.max_forced),
                token_index=index, gap=gap, near_ties=len(forced) + 1))
        if step.kind == FORCE and self.rendered_prompt() is None:
            return _not_applied(NO_RENDERING % "continue from the submitted text")
        if step.kind == DECIDED and forced:
            index = step.cause.details.get("token_index")
            last_forced = forced[-1].token_index - (span.token_index or 0)
            if index is not None and index - last_forced <= RETOKENIZED_REACH:
                cause = step.cause
                return _decided(Cause(
                    "unknown", "%s; but this is right after a forced token, where the "
                    "continuation's prompt may "
                    "not split into tokens as the worker's model made them, so a forgery cannot "
                    "be told from an honest output here" % cause.message, **cause.details))
        return step

    def _probe(self, span, gen, index):
        """The model's candidates at token `index` of the divergence, asked
        only now: one token after the output so far, sent raw (or, on a
        server that cannot render prompts, the job's request again up to
        that token)."""
        job = self.submission.job
        top = TOLERANT_TOP_LOGPROBS if self.policy.tolerance else TOP_LOGPROBS
        prefix = self.submission.submitted[:span.char] + gen.text[:gen.token_start(index)]
        rendered = self.rendered_prompt()
        if rendered is not None:
            entry = self.ollama.candidates(continuation_request(job, rendered, prefix, 1, top), 0)
            cost = 1
        elif not span.char:
            entry = self.ollama.candidates(generate_request(job, top, index + 1), index)
            cost = index + 1
        else:
            return
        self.tokens_generated += cost
        self.probe_tokens += cost
        if entry is not None:
            gen.probed = (index, entry)


def refuted_outcome(submission):
    """The Outcome of a Submission its own checks refute: no re-run."""
    return Outcome(MISMATCH, None, 0.0, [], [], submission.cause, None, 0, 0, None, None, None,
                   NO_SERVER, None)


def verify_submission(submission, ollama, policy=EXACT, progress=None):
    """Verify a Submission on `ollama`: refuted by its own checks, or
    re-run as planned. `progress(label, total)`: a Progress for the status
    line (None: none). Returns the Verification."""
    if submission.cause is not None:
        return Verification(submission, refuted_outcome(submission))
    return Verification(submission, Rerun(submission, policy, ollama, progress).run())


def verify_item(item, ollama, policy=EXACT, progress=None):
    """Verify an item's completion evidence (a BoardItem from Wl.status):
    the checks that need no model, then (when they leave it open) the
    re-run on `ollama`. Returns the Verification."""
    return verify_submission(Submission.of(item), ollama, policy, progress)


def _ordinal(n):
    return "%d%s" % (n, "th" if 10 <= n % 100 <= 20
                     else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th"))


def _steps(n):
    return "1 near-tie step" if n == 1 else "%d near-tie steps" % n


# =============================================================================
# Rendering a verification: verify's report and its --json document
# =============================================================================
# Only the Outcome's fields are read here: a new verification mode adds to
# the Plan and the Rerun, and shows up through the same fields.


def verification_document(verification):
    """verify's --json document (audit prints one per item)."""
    v, outcome = verification, verification.outcome
    sampling, where, local = outcome.sampling, outcome.diverged_at, outcome.local
    windows = [w._asdict() for w in sampling.windows] if sampling else None
    return {"id": v.item_id, "verdict": v.verdict, "refuted": v.refuted, "exact": outcome.exact,
            "tolerance": outcome.tolerance, "sampled": bool(sampling),
            "windows": windows, "tokens_checked": sampling and sampling.tokens_checked,
            "submitted_tokens": sampling and sampling.submitted_tokens, "coverage": sampling
            and sampling.coverage,
            "sample_seed": sampling and sampling.sample_seed,
            "forced": [step._asdict() for step in outcome.forced],
            "checks": [c._asdict() for c in v.checks],
            "cause": v.cause and v.cause.document(), "diverged_at": where and where._asdict(),
            "tokens_generated": outcome.tokens_generated,
            "logprob_max_diff": outcome.logprob_max_diff,
            "expected_hash": v.expected_hash, "actual_hash": outcome.actual_hash,
            "job": v.job.document(),
            "output": outcome.output, "local": local._asdict(),
            "evidence": evidence_document(v.submitted_evidence)}


def verification_lines(verification):
    """verify's report, for a person: its lines."""
    v, outcome = verification, verification.outcome
    ok = v.verdict == VERIFIED
    cause, where, sampling, forced = v.cause, outcome.diverged_at, outcome.sampling, outcome.forced
    text = [_headline(outcome),
            "  Item:      %s (completed by %s)"
            % (v.item_id, printable(v.submission.completed_by or "unknown")),
            "  Checks:"] + _check_lines(v.checks, "    ")
    if sampling:
        text.append("  Windows:   " + ", ".join(_window_words(w) for w in sampling.windows))
        if ok:
            text.append("  Sampled:   not an exact verification: an edit outside the windows is "
                        "not proven absent (re-check: --sample %d --window %d --sample-seed %d)"
                        % (
                            len(sampling.windows), sampling.window_tokens, sampling.sample_seed))
    if cause:
        text.append("  Cause:     %s: %s" % (cause.kind, printable(cause.message)))
        if v.refuted:
            text.append("  Refuted:   yes: the submitted output is not this job's")
        else:
            text.append("  Refuted:   no: this can be an honest worker's output (audit --reject "
                        "keeps it in review)")
    for n, step in enumerate(forced):
        label = "  Forced:   " if n == 0 else "            "
        text.append("%s token %d: the submitted %s, where the re-run chose %s (%.2f nats)" % (
            label, step.token_index, preview(_dumps(step.submitted_token_text), 24),
            preview(_dumps(step.rerun_token_text), 24), step.gap))
    if where is not None:
        token = ", token %d" % where.token_index if where.token_index is not None else ""
        text += ["  Diverged:  character %d%s" % (where.char, token),
                 "    submitted: " + _excerpt(where, where.submitted),
                 "    re-run:    " + _excerpt(where, where.rerun)]
    if ok and outcome.output is not None:
        text.append("  Output:    " + preview(outcome.output))
    if outcome.actual_hash:
        actual = outcome.actual_hash
    elif ok:
        actual = "none (sampled: only the windows were re-generated)"
    elif outcome.tokens_generated:
        actual = "none (the re-run stopped at the divergence)"
    else:
        actual = "none (no re-run)"
    probes = ""
    if outcome.probe_tokens:
        probes = (" (%d of them to ask the model's candidates at the divergence)"
                  % outcome.probe_tokens)
    text += ["  Expected:  " + printable(v.expected_hash),
             "  Actual:    " + actual,
             "  Cost:      %s generated%s" % (_tokens(outcome.tokens_generated), probes)]
    if outcome.logprob_max_diff is not None:
        text.append("  Logprobs:  largest difference %.4f nats" % outcome.logprob_max_diff)
    return text


def _headline(outcome):
    ok, cause, sampling = outcome.verdict == VERIFIED, outcome.cause, outcome.sampling
    within = ""
    if outcome.forced:
        within = "within tolerance %g nats: %s" % (outcome.tolerance, _steps(len(outcome.forced)))
    if ok and sampling:
        return "✓ VERIFIED by sampling (%d windows, %d of %s checked, coverage %.1f%%%s)" % (
            len(sampling.windows), sampling.tokens_checked, _tokens(sampling.submitted_tokens),
            100 * sampling.coverage, "; " + within if within else "")
    if ok and within:
        return "✓ VERIFIED (%s)" % within
    if ok:
        return "✓ VERIFIED — the re-run produced the submitted output, hashes match"
    if outcome.diverged_at is not None:
        where = outcome.diverged_at.char
        return "✗ MISMATCH — the re-run diverges at character %d (%s)" % (where, cause.kind)
    if outcome.tokens_generated and cause.kind == "different-numerics":
        return "✗ MISMATCH — same text, different numerics (--strict)"
    if outcome.tokens_generated:
        return "✗ MISMATCH — %s" % cause.kind
    return "✗ MISMATCH — %s, without a re-run" % cause.kind


def _window_words(window):
    if window.start_token_index is not None:
        start = window.start_token_index
        return "tokens %s-%s" % (start, start + window.tokens)
    return "characters from %d (%s)" % (window.start_char, _tokens(window.tokens))


def acceptance_message(verification):
    """What `wl accept` records for a VERIFIED: how it was verified, and the hash."""
    outcome = verification.outcome
    how = ""
    if outcome.forced:
        how = " within tolerance %g nats (%s)" % (outcome.tolerance, _steps(len(outcome.forced)))
    sampling = outcome.sampling
    if sampling:
        how += " by sampling (%d windows, %.1f%% coverage, --sample-seed %d)" % (
            len(sampling.windows), 100 * sampling.coverage, sampling.sample_seed)
    return "verified by wl_infer%s: %s" % (how, verification.expected_hash)


def _excerpt(where, text):
    """`text` (one side of a Divergence) around it, with ⟨here⟩ marking it."""
    cut = where.char - where.excerpt_start
    return "%s%s⟨here⟩%s%s" % ("…" if where.excerpt_start else "", printable(text[:cut]),
                              printable(text[cut:]), "…" if len(text) - cut >= EXCERPT else "")


_MARKS = {True: "✓", False: "✗", None: "–"}


def _check_lines(checks, indent):
    return [indent + "%s %s" % (_MARKS[c.ok], printable(c.message)) for c in checks]


# =============================================================================
# The worker (`work`): many jobs, wl calls overlapping generation
# =============================================================================
# Threads: one claimer (polls the board, claims the next job while the current
# ones generate), one per Ollama server (generates, one job at a time), one
# submitter (wl done of finished jobs). They meet in `Worker.cond`. Signals
# are only counted (Signals.graceful); the main thread acts on them.

WORK_BACKOFF_MAX = 600.0  # seconds between polls while wl (or every Ollama) keeps failing
JOB_TRIES = 3  # a job that fails is tried at most this often per worker process


# The kinds of Eligibility: what the worker does with an open job
TAKE = "take"  # claim it: `run` is checked for the claim, `servers` can run it
SKIP = "skip"  # leave it alone, for `reason` (logged once)
LATER = "later"  # not now; a later poll looks again


class Eligibility(collections.namedtuple("Eligibility", "kind run servers reason")):
    """What the worker makes of an open job: its `kind`, with the JobRun and
    the servers (TAKE) or the reason (SKIP)."""

    __slots__ = ()


def _take(run, servers):
    return Eligibility(TAKE, run, servers, None)


def _skip(reason):
    return Eligibility(SKIP, None, (), reason)


NOT_NOW = Eligibility(LATER, None, (), None)


class Server(object):
    """One Ollama server: one generation at a time, as concurrent requests
    are batched together on the server, which can change the output."""

    def __init__(self, url, timeout):
        self.ollama = Ollama(url, timeout)
        self.url = self.ollama.url
        self.models, self.version, self.error = {}, "", None
        self.busy = 0.0  # seconds with a generation in flight
        self.jobs = 0
        # the ID of the job generating here, its tokens so far, and when it started (monotonic)
        self.running, self.tokens, self.started = None, 0, 0.0

    def refresh(self):
        """/api/tags (and the version, for provenance), once per poll."""
        try:
            self.models, self.error = self.ollama.models(), None
            self.version = local_version(self.ollama)
        except OllamaError as exc:
            self.models, self.error = {}, str(exc)


class Worker(object):
    """`work`: polls the board, takes the eligible jobs in order and runs
    each through JobRun, overlapping the wl calls with generation. Never
    more than one job is claimed ahead of its generation (`ready`)."""

    # Threads: the main one (run: signals, the status line), the claimer
    # (claim_loop: polls, eligible, take), one per Server (serve) and the
    # submitter (submit_loop). Each attribute below says who writes it and
    # under which lock; "cond" is self.cond. Set once here: ctx, args,
    # clock, servers (their own fields are written by their thread, read
    # for the status line as plain values), wanted, rng, memory (locked
    # inside), start.
    def __init__(self, ctx, args):
        self.ctx, self.args, self.clock = ctx, args, time.monotonic
        self.servers = [Server(url, args.timeout) for url in args.ollama_urls]
        self.wanted = set(full_model_name(m).lower() for m in args.models) if args.models else None
        # seeded from the system: workers on one board draw different orders
        self.rng = random.Random()
        self.memory = WorkerMemory()  # failures and skips, across runs; its own locks
        self.start = self.clock()
        self.cond = threading.Condition()
        # claimer and server threads, under cond: an Eligibility (TAKE) claimed, not yet generating
        # (at most one)
        self.ready = None
        # server threads append, the submitter pops; under cond
        self.finished = collections.deque()
        self.claiming = True  # claimer, under cond: False once it takes no more jobs
        self.serving = len(self.servers)  # server threads, under cond: those still running
        self.stopping = False  # any thread, under cond (stop())
        self.fatal = None  # claimer or guarded(), under cond: an error that ends the worker
        # claimer only (no lock): the jobs of the last poll still to take, the polls, whether the
        # last
        # found any, the failing polls in a row, and a lost claim (look at the board again first)
        self.candidates, self.polls, self.found, self.failing = [], 0, False, 0
        self.lost_race = False
        # claimer only: jobs lost to other workers since the last regular poll (a board that still
        # lists
        # one as open, a lagging clone, must not make the fresh looks after a loss go round for
        # ever)
        self.lost_ids = set()
        self.skipped = set()  # claimer only: jobs skipped by this run, for the summary
        self.taken = 0  # claimer, under cond: jobs claimed
        # claimer adds, whoever finishes removes, under cond: IDs from claim to outcome
        self.held = set()
        self.counts = {"done": 0, "failed": 0, "skipped": 0, "lost": 0,
                       "tokens": 0}  # any thread, count()
        self.jobs = []  # claimer appends, under cond: {"id", "result", "error"} per job taken
        # under cond: JobRun in hand -> its record (a finished one, with its output, let go)
        self.records = {}

    def log(self, message):
        """A line of the log on stderr: failures and what a signal does (-q keeps these)."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.ctx.status_line.above("%s %s" % (stamp, printable(message)))

    def info(self, message):
        """A line of the log that -q leaves out: the jobs' progress."""
        if not self.args.quiet:
            self.log(message)

    def run(self):
        """Start the threads and wait for them, acting on signals: the first
        stops taking jobs, the second aborts the jobs in flight."""
        self.starting()
        targets = [(self.claim_loop, ())] + [(self.serve, (s,)) for s
                                             in self.servers] + [(self.submit_loop, ())]
        threads = [threading.Thread(target=self.guarded, args=t, daemon=True) for t in targets]
        for thread in threads:
            thread.start()
        seen = 0
        while any(t.is_alive() for t in threads):
            threads[-1].join(0.2)  # the submitter ends last; signals are acted on between waits
            self.ctx.status_line.show(self.in_flight())
            if self.ctx.signals.received != seen:
                seen = self.ctx.signals.received
                if seen == 1:
                    self.log("stopping: no new jobs; the job in flight finishes and is submitted "
                             "(a second signal aborts it)")
                    self.stop()
                elif seen == 2:
                    self.log("aborting: stopping the generation in flight and releasing its claim")
                else:  # a third: out now
                    held = ", ".join(self.jobs_in_flight()) or "none"
                    raise Interrupted("stopped at once: jobs that may still be claimed by you: "
                                      "%s; check them with `wl status ID` and release them with "
                                      "`wl unclaim ID`"
                                      % held)
            # at every wake-up: a generation may still have been connecting
            if self.ctx.signals.aborting():
                self.stop()  # first, so that no server starts another job
                for server in self.servers:
                    server.ollama.cancel()
        if self.fatal is not None:
            raise self.fatal
        return self.summary()

    def starting(self):
        """What an operator must know at once: a stop signal that is
        ignored, and --models that no server here has (none of them: the
        worker would idle for ever, so it does not start)."""
        if "SIGINT" in self.ctx.signals.ignored:
            self.log("SIGINT is ignored (a shell does that to `work &` in a script), so Ctrl-C "
                     "and kill -INT do nothing: stop this worker with SIGTERM (kill %d)"
                     % os.getpid())
        if self.wanted is None:
            return
        for server in self.servers:
            server.refresh()
        usable = [s for s in self.servers if not s.error]
        if not usable:  # nothing to tell yet: the polls say what fails
            return
        missing = sorted(m for m in self.wanted
                         if not any(find_model(s.models, m) for s in usable))
        where = ", ".join(s.url for s in usable)
        if len(missing) == len(self.wanted):
            local = sorted(set(m for s in usable for m in s.models)) or ["no model"]
            raise UserError("none of --models is in an Ollama here: %s; %s %s %s (pull one with "
                            "`ollama pull %s`)"
                            % (", ".join(missing), where, "has" if len(usable) == 1 else "have",
                               ", ".join(local),
                               missing[0]))
        if missing:
            self.log("--models: no Ollama here (%s) has %s; its jobs are skipped"
                     % (where, ", ".join(missing)))

    def in_flight(self):
        """The status line: each server's job, its tokens and their rate."""
        now = self.clock()
        running = ["%s %s, %s%s" % (s.running, _tokens(s.tokens),
                                    received_rate(s.tokens, now - s.started),
                                    " on " + s.url if len(self.servers) > 1 else "")
                   for s in self.servers if s.running]
        return "work: %s; %d done" % (", ".join(running) or "no job in flight",
                                      self.counts["done"])

    def guarded(self, loop, args):
        """A thread's loop; a bug ends the worker with one line, not a traceback."""
        try:
            loop(*args)
        except Exception as exc:  # reported by run(), and the worker stops
            with self.cond:
                self.fatal = self.fatal or UserError("work stopped on an internal error: %s: %s"
                                                     % (type(exc).__name__, exc))
            self.stop()

    def stop(self):
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    def pause(self, seconds):
        """Wait, unless asked to stop meanwhile."""
        with self.cond:
            self.cond.wait_for(lambda: self.stopping, seconds)

    def jobs_in_flight(self):
        with self.cond:
            return sorted(self.held)

    # -- claiming ----------------------------------------------------------------
    def claim_loop(self):
        try:
            while not (self.args.max_jobs and self.taken >= self.args.max_jobs):
                with self.cond:
                    self.cond.wait_for(lambda: self.ready is None or self.stopping)
                    if self.stopping:
                        break
                found = self.next_job()
                if found is None:
                    break
                if not self.take(found.run):
                    continue
                with self.cond:
                    self.ready, self.taken = found, self.taken + 1
                    self.cond.notify_all()
        finally:
            with self.cond:
                self.claiming = False
                abandoned, self.ready = (self.ready, None) if self.stopping else (None, self.ready)
                self.cond.notify_all()
            if abandoned:  # claimed ahead, never started: give it back
                self.info("released %s: %s" % (abandoned.run.id,
                                               release_claim(self.ctx, abandoned.run.id)))
                self.finish(abandoned.run, "released")

    def next_job(self):
        """The next eligible job, polling the board when the last poll's are
        used up; None when the worker is to stop taking jobs."""
        while not self.stopping:
            if self.candidates:
                return self.candidates.pop(0)
            # a lost race looks again at once, --once too
            again, self.lost_race = self.lost_race, False
            if self.polls and self.args.once and not again:
                return None
            # nothing to do: idle
            if self.polls and not self.found and not self.failing and not again:
                self.pause(self.args.interval * random.uniform(0.8, 1.2))  # with jitter
                if self.stopping:
                    return None
            if not again:
                self.lost_ids.clear()
            self.poll()
        return None

    def poll(self):
        """One `wl browse` and one /api/tags per server: the eligible jobs,
        lowest priority number first, in an order of this worker's own
        within a priority, so that workers sharing a board spread over its
        jobs instead of racing for the same one."""
        self.polls += 1
        self.found = False
        try:
            items = self.ctx.wl.browse("open")
        except UserError as exc:
            return self.failed_poll("wl is failing", exc)
        was = [s.error for s in self.servers]
        for server in self.servers:
            server.refresh()
        if all(s.error for s in self.servers):
            return self.failed_poll("no Ollama server is usable",
                                    OllamaError(self.servers[0].error))
        for server, error in zip(self.servers, was):
            if server.error and server.error != error:
                self.log("Ollama at %s is not usable: %s" % (server.url, server.error))
            elif error and not server.error:
                self.info("Ollama at %s is back" % server.url)
        if self.failing:
            self.info("wl works again")
            self.failing = 0
        self.rng.shuffle(items)
        items.sort(key=lambda i: 99 if i.priority is None
                   else i.priority)  # stable: still shuffled within one
        skips = collections.OrderedDict()
        for item in items:
            found = self.eligible(item)
            if found.kind == TAKE:
                self.candidates.append(found)
            elif found.kind == SKIP:
                skips[item.id] = found.reason
        open_ids = None if len(items) >= BROWSE_LIMIT else set(i.id for i in items)
        for item_id, reason in self.memory.poll(open_ids, skips, told=not self.args.quiet).items():
            # once per job and reason, across runs
            self.info("skipped %s (%s)" % (item_id, reason))
        new = set(skips) - self.skipped
        self.skipped |= new
        self.count("skipped", len(new))
        self.found = bool(self.candidates)

    def failed_poll(self, what, exc):
        if self.args.once:
            with self.cond:
                self.fatal = exc
            self.stop()
            return
        self.failing += 1
        delay = min(self.args.interval * 2 ** self.failing, WORK_BACKOFF_MAX)
        self.log("%s (%s); trying again in %s" % (what, exc, _seconds(delay)))
        self.pause(delay)

    def eligible(self, item):
        """The Eligibility of an open job: TAKE (a JobRun checked for its
        claim, and the servers that can run it), SKIP (and why) or LATER."""
        args = self.args
        with self.cond:
            if item.id in self.held:  # released a moment ago; its failure is being recorded
                return NOT_NOW
        if item.id in self.lost_ids:  # another worker has it, whatever this look at the board says
            return NOT_NOW
        failures, wait = self.memory.failed(item.id)
        if failures >= JOB_TRIES:
            return _skip("failed %d times; not tried again by workers on this box" % failures)
        if wait:
            return NOT_NOW
        try:
            job = job_of(item)
        except JobError as exc:
            return _skip(exc.reason)
        except UserError as exc:
            return _skip(str(exc))
        model = job.model
        if self.wanted is not None and full_model_name(model).lower() not in self.wanted:
            return _skip("model %s is not in --models" % model)
        servers = [s for s in self.servers if find_model(s.models, model) is not None]
        if not servers:
            return _skip("model %s not available" % model)
        if job.model_digest:
            servers = [s for s in servers if same_digest(find_model(s.models, model),
                                                         job.model_digest)]
            if not servers:
                return _skip("model %s here is not the pinned %s"
                             % (model, short_digest(job.model_digest)))
        if job.max_tokens == 0 and not args.allow_uncapped:
            return _skip("max_tokens 0 (the model's default) could run for hours; "
                         "--allow-uncapped takes it")
        if job.max_tokens > args.max_tokens_cap:
            return _skip("max_tokens %d is over --max-tokens-cap %d"
                         % (job.max_tokens, args.max_tokens_cap))
        if _size(job.prompt) > args.max_prompt_bytes:
            return _skip("prompt of %d bytes is over --max-prompt-bytes %d" % (
                _size(job.prompt), args.max_prompt_bytes))
        run = JobRun(self.ctx, item)
        try:
            run.check(servers[0].models, servers[0].url)
        except UserError as exc:
            return _skip(str(exc))
        return _take(run, servers)

    def take(self, run):
        """Claim; a claim someone else made first is normal: log it, move on."""
        with self.cond:
            self.held.add(run.id)
        try:
            run.attempt(run.claim)
        except (UserError, Interrupted) as exc:
            if run.phase == CLAIMING and refused(run.cause):
                self.count("lost")
                # the rest of this poll's jobs are as stale as this one: one browse costs less than
                # the
                # claims that would fail
                self.candidates, self.lost_race = [], True
                self.lost_ids.add(run.id)
                self.info("lost %s to another worker (%s); looking at the board again"
                          % (run.id, run.cause))
            else:
                self.log("claim of %s failed: %s; %s" % (run.id, exc, self.remember_failure(run)))
            with self.cond:
                self.held.discard(run.id)
            return False
        with self.cond:
            self.records[run] = {"id": run.id, "result": None, "error": None}
            self.jobs.append(self.records[run])
        self.info("claimed %s %s" % (run.id, run.job.model))
        return True

    # -- generating and submitting -------------------------------------------------
    def serve(self, server):
        def mine():
            return self.ready is not None and server in self.ready.servers

        try:
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: self.stopping or mine()
                                       or (not self.claiming and not self.ready))
                    if self.stopping or not mine():
                        return
                    run, self.ready = self.ready.run, None
                    self.cond.notify_all()
                self.infer_on(server, run)
        finally:
            with self.cond:
                self.serving -= 1
                self.cond.notify_all()

    def infer_on(self, server, run):
        started = self.clock()
        generated = run.evidence is None
        if len(self.servers) > 1 and generated:
            self.info("running %s on %s" % (run.id, server.url))

        def on_token(tokens):
            server.tokens = tokens
            self.ctx.signals.check()  # a second signal stops a generation at its next token

        server.running, server.tokens, server.started = run.id, 0, self.clock()
        try:
            run.attempt(run.infer, server.ollama, server.version, on_token,
                        find_model(server.models, run.job.model))
        except (UserError, Interrupted) as exc:
            return self.job_failed(run, exc)
        finally:
            server.running = None
            if generated:
                server.busy += self.clock() - started
        server.jobs += generated
        with self.cond:
            self.finished.append(run)
            self.cond.notify_all()

    def submit_loop(self):
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.finished or not self.serving)
                if not self.finished:
                    return
                run = self.finished.popleft()
            try:
                run.attempt(run.submit)
            except (UserError, Interrupted) as exc:
                self.job_failed(run, exc)
                continue
            tokens = run.gen.eval_count if run.gen else 0
            self.count("done")
            self.count("tokens", tokens)
            if run.gen:  # the rate the status line shows too: tokens received since the request
                said = "%s in %s (%s)" % (_tokens(tokens), _seconds(run.generating_s),
                                          received_rate(tokens, run.generating_s))
            else:
                said = "(the kept result, submitted without generating again)"
            self.info("done %s %s" % (run.id, said))
            self.finish(run, "done")

    def job_failed(self, run, exc):
        if self.ctx.signals.aborting():  # the second signal stopped it: not a failure of the job
            self.log("released %s, stopped by the signal: %s" % (run.id, exc))
            self.finish(run, "released", str(exc))
            return
        self.count("failed")
        self.log("failed %s: %s; %s" % (run.id, exc, self.remember_failure(run)))
        self.finish(run, "failed", str(exc))  # only now may a poll take the job again

    def remember_failure(self, run):
        """A job that fails is tried again later, at most JOB_TRIES times in
        all (by the workers on this box, across runs), so a poison job
        cannot keep a worker spinning, under cron either."""
        count, delay = self.memory.failure(run.id, lambda earlier: self.args.interval
                                           * 2 ** (earlier + 1))
        if count >= JOB_TRIES:
            return "failure %d of %d: not tried again by workers on this box" % (count, JOB_TRIES)
        return "failure %d of %d: tried again in %s at the earliest" % (count, JOB_TRIES,
                                                                        _seconds(delay))

    def finish(self, run, result, error=None):
        with self.cond:
            self.held.discard(run.id)
            record = self.records.pop(run, None)
            if record is not None:
                record["result"], record["error"] = result, error

    def count(self, what, n=1):
        with self.cond:  # the threads share the counts
            self.counts[what] += n

    def summary(self):
        wall = self.clock() - self.start
        c = self.counts
        calls = self.ctx.wl.calls
        per_job = round(calls / c["done"], 2) if c["done"] else None
        text = ["work: %d done, %d failed, %d skipped, %d lost to other workers; %s in %s; %d wl "
                "calls%s" % (
            c["done"], c["failed"], c["skipped"], c["lost"], _tokens(c["tokens"]), _seconds(wall),
            calls,
            " (%.1f per job done)" % per_job if per_job is not None else "")]
        servers = []
        for s in self.servers:
            busy = s.busy / wall if wall > 0 else 0.0
            servers.append({"url": s.url, "jobs": s.jobs, "busy_s": round(s.busy, 3),
                            "busy_fraction": round(busy, 3)})
            text.append("  Ollama at %s: %d job%s, busy %.0f%% (%s generating)" % (
                s.url, s.jobs, "" if s.jobs == 1 else "s", 100 * busy, _seconds(s.busy)))
        doc = dict(c, wall_s=round(wall, 3), wl_calls=calls, wl_calls_per_job=per_job,
                   servers=servers,
                   jobs=[dict(r) for r in self.jobs])
        code = EXIT_OK
        if self.ctx.signals.aborting():
            code = EXIT_INTERRUPTED
        # for cron: a run that only failed is an error
        elif self.args.once and c["failed"] and not c["done"]:
            code = EXIT_ERROR
            text.append("work --once: every job it took failed (exit %d)" % code)
        return Report(code, doc, [], text)


def _seconds(value):
    return "%.1f s" % value if value < 120 else "%.1f min" % (value / 60)


# =============================================================================
# Batches: a file of jobs posted once, its answers collected and checked
# =============================================================================
#
# `post --batch FILE` checks every line first (nothing is posted unless each
# line is a job), then posts each line its Ledger does not show posted: the
# intent is recorded before a line's `wl post` and the item ID after it, so
# that the same command run again, after any failure, posts exactly what is
# missing (a line whose post was cut off is looked up on the board first).
# `results` and `post --wait` collect answers with a Collector: one `wl
# browse` per poll, one `wl status` per finished job, a re-run per check.

WORKER_PROMPT_BYTES = 32768  # the --max-prompt-bytes of `work` by default
UNCAPPED = "workers running `work` skip such jobs unless they pass --allow-uncapped"
BATCH_ERRORS_SHOWN = 20  # refused lines listed one by one; more are counted
# results, post --wait: jobs not done by a worker when the command gave up waiting
EXIT_UNFINISHED = 3
READS_IN_FLIGHT = 4  # `wl status` calls of `results` at a time (reads are independent)
FINISHED = ("in_review", "completed")  # a worker has submitted a result


def postable(job):
    """The job's description, refused here when wl or a worker would refuse it."""
    description = encode_job(job)
    check_field_size(description, "the job", "shorten the prompt")
    try:
        decode_job(description)
    except JobError as exc:
        raise JobError("workers would refuse this job (%s)" % exc)
    return description


class LocalModels(object):
    """The poster's local models (one /api/tags), to pin jobs to their
    digests; each problem is said once."""

    def __init__(self, ctx, no_pin):
        self.ctx, self.no_pin, self.said = ctx, no_pin, set()
        try:
            self.models = ctx.ollama.models()
        except OllamaError as exc:
            self.models = None
            ctx.warn("could not check the model locally: %s" % exc)

    def pin(self, job, posted="the job is posted"):
        """The job pinned to its model's local digest (unless --no-pin, or
        it pins one itself). `posted`: how a warning says it goes ahead."""
        if self.models is None or job.model_digest:
            return job
        digest = find_model(self.models, job.model)
        if digest is None:
            self._say("model %s is not in the local Ollama at %s; %s anyway, but you cannot "
                      "verify results until you `ollama pull %s`"
                      % (job.model, self.ctx.ollama.url, posted, job.model))
        elif self.no_pin:
            pass
        elif _is_digest(digest):
            return job._replace(model_digest=digest)
        else:
            self._say("not pinned: Ollama reports the digest of %s as %s, not 64 hex digits"
                      % (job.model, preview(_dumps(digest), 80)))
        return job

    def _say(self, message):
        if message not in self.said:
            self.said.add(message)
            self.ctx.warn(message)


def prompt_warning(job):
    """What to say of a prompt most workers would skip, or None."""
    size = _size(job.prompt)
    if size <= WORKER_PROMPT_BYTES:
        return None
    return ("the prompt is %d bytes, over the %d that workers running `work` take by default "
            "(--max-prompt-bytes): most of them will skip it" % (size, WORKER_PROMPT_BYTES))


def _lines_said(numbers, limit=8):
    shown = ", ".join("%d" % n for n in numbers[:limit])
    return ("line " if len(numbers) == 1 else "lines ") + shown + (", ..." if len(numbers) > limit
                                                                   else "")


def batch_lines(stream):
    """(number, text, problem) for each line of a batch file that is not
    blank; text None and a problem when it cannot be read as a line. Read
    a line at a time, each at most BATCH_LINE_MAX bytes."""
    number = 0
    while True:
        raw = stream.readline(BATCH_LINE_MAX + 1)
        if not raw:
            return
        number += 1
        if len(raw) > BATCH_LINE_MAX:
            while raw and not raw.endswith(b"\n"):  # the rest of this line, never held whole
                raw = stream.readline(BATCH_LINE_MAX)
            yield number, None, "it is over %d bytes" % BATCH_LINE_MAX
            continue
        # a byte order mark, as some editors write
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if not raw.strip():
            continue
        try:
            yield number, raw.decode("utf-8"), None
        except UnicodeDecodeError:
            yield number, None, "it is not UTF-8 text"


class BatchPost(object):
    """`post --batch`: every line is checked first, into a work file of
    the jobs to post (standard input is read once, and the lines never sit
    in memory), then each is posted unless the ledger shows it posted."""

    def __init__(self, ctx, args):
        self.ctx, self.args = ctx, args
        self.name = batch_name(args.batch, args.name)
        self.defaults = JobDefaults(args.model, args.seed, args.max_tokens)
        self.ledger = None
        self.jobs = 0  # lines that are jobs
        # posted now, by an earlier run, found on the board
        self.posted = self.before = self.found = 0
        self.docs = []  # --json: one per job

    def run(self):
        wl = self.ctx.wl  # a missing wl is an error now, before anything is read
        source = self._open()
        self.ledger = Ledger.open(self.name, self.args.batch)
        try:
            with tempfile.TemporaryFile("w+", encoding="utf-8",
                                        dir=os.path.dirname(self.ledger.path)) as work:
                try:
                    self.check(source, work)
                finally:
                    if source is not sys.stdin.buffer:
                        source.close()
                work.seek(0)
                self.post(wl, work)
        except UserError:
            # refused before anything was posted: no ledger is left behind
            if not self.ledger.entries:
                _remove(self.ledger.path)
            raise
        finally:
            self.ledger.close()
        return self.report()

    def _open(self):
        if self.args.batch == "-":
            return sys.stdin.buffer
        try:
            return open(self.args.batch, "rb")
        except OSError as exc:
            raise UserError("cannot read --batch %s: %s" % (self.args.batch, _reason(exc)))

    def check(self, source, work):
        """Every line, checked: the jobs go to `work`; any line refused
        refuses the batch, listing each line and why."""
        models = LocalModels(self.ctx, self.args.no_pin)
        seen = {}  # custom_id -> its line
        refused, uncapped, large = [], [], []
        for number, text, problem in batch_lines(source):
            try:
                if problem is not None:
                    raise JobError(problem)
                request = parse_batch_line(text, number, self.defaults)
                if request.custom_id in seen:
                    raise JobError("custom_id %s is also on line %d" % (
                        preview(_dumps(request.custom_id), 40), seen[request.custom_id]))
                seen[request.custom_id] = number
                job = request.job._replace(batch=self.ledger.batch, custom_id=request.custom_id)
                # before the pin: a line that is refused says nothing about its model
                postable(job)
                job = models.pin(job, "its jobs are posted")
                description = postable(job)
                key = job_key(job)
                entry = self.ledger.entries.get(request.custom_id)
                if entry is not None and entry.job_key != key:
                    raise JobError("custom_id %s was posted in batch %s%s with another job; give "
                                   "this batch another --name (or the line another custom_id)" % (
                                       preview(_dumps(request.custom_id), 40), self.name,
                                       " as " + entry.item_id if entry.item_id else ""))
            except UserError as exc:
                refused.append((number, str(exc)))
                continue
            self.jobs += 1
            if not job.max_tokens:
                uncapped.append(number)
            if prompt_warning(job):
                large.append(number)
            work.write(json.dumps([number, request.custom_id, request.url, key, description,
                                   post_title(job.prompt)]) + "\n")
        if refused:
            total = self.jobs + len(refused)
            lines = ["line %d: %s" % r for r in refused[:BATCH_ERRORS_SHOWN]]
            if len(refused) > BATCH_ERRORS_SHOWN:
                more = len(refused) - BATCH_ERRORS_SHOWN
                lines.append("... and %d more line%s refused (--json lists them all)"
                             % (more, "" if more == 1 else "s"))
            raise UserError("%d of %d lines of %s are not jobs that can be posted; nothing was "
                            "posted"
                            % (len(refused), total, self._source()), lines,
                            lines_refused=[{"line": n, "error": e} for n, e in refused])
        if not self.jobs:
            raise UserError("%s has no jobs (no line that is not blank)" % self._source())
        if uncapped:
            self.ctx.warn("%d job%s without max_tokens (%s) run to the model's own limit, and %s; "
                          "give max_tokens on the lines, or --max-tokens N"
                          % (len(uncapped), "" if len(uncapped) == 1 else "s",
                                                                _lines_said(uncapped), UNCAPPED))
        if large:
            self.ctx.warn("%d prompt%s (%s) %s over the %d bytes that workers running `work` take "
                          "by default (--max-prompt-bytes): most of them will skip %s" % (
                              len(large), "" if len(large) == 1 else "s", _lines_said(large),
                              "is" if len(large) == 1 else "are", WORKER_PROMPT_BYTES,
                              "it" if len(large) == 1 else "them"))

    def _source(self):
        return "standard input" if self.args.batch == "-" else self.args.batch

    def post(self, wl, work):
        """Each checked job, unless the ledger has it posted: its intent
        recorded, `wl post`, its item ID recorded, a line on stdout."""
        ledger, on_board = self.ledger, None
        start, done = time.monotonic(), 0
        number = None
        try:
            for record in work:
                number, custom_id, url, key, description, title = json.loads(record)
                entry = ledger.entries.get(custom_id)
                item_id = entry.item_id if entry is not None else None
                if item_id is not None:
                    self.before += 1
                # its post was cut off in an earlier run: it may have happened
                elif entry is not None:
                    if on_board is None:
                        on_board = self.on_board(wl)
                    item_id = on_board.get(custom_id)
                    if item_id is not None:
                        ledger.posted(custom_id, item_id)
                        self.found += 1
                else:
                    ledger.intend(BatchRequest(number, custom_id, url, None), key)
                if item_id is None:
                    item_id = self.post_one(wl, title, description, number)
                    ledger.posted(custom_id, item_id)
                    self.posted += 1
                done += 1
                self.ctx.out("%s  %s" % (item_id, printable(custom_id)), item_id)
                self.docs.append({"line": number, "custom_id": custom_id, "id": item_id,
                                  "posted": entry is None or entry.item_id is None})
                elapsed = time.monotonic() - start
                rate = done / elapsed if elapsed > 0 else 0.0
                self.ctx.status_line.show("posting batch %s: %d of %d%s"
                                     % (self.name, done, self.jobs, (
                    ", %.1f jobs/s, %s left" % (rate, _seconds((self.jobs - done) / rate)) if rate
                    else "")))
                if self.ctx.signals.received:  # held while wl wrote the job
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise Interrupted("%s; run the same command again to post the rest" % self._so_far())
        finally:
            self.ctx.status_line.clear()
        ledger.finish(self.jobs)

    def post_one(self, wl, title, description, number):
        try:
            return wl.post(title, description)
        except WlError as exc:
            raise UserError("%s; %s; run the same command again to post the rest (line %d is "
                            "looked up on the board first: its post may have happened)"
                            % (exc, self._so_far(), number))

    def _so_far(self):
        return "%d of %d jobs of batch %s are posted (%d by this run)" % (
            self.before + self.found + self.posted, self.jobs, self.name, self.posted + self.found)

    def on_board(self, wl):
        """This batch's jobs on the board, by custom_id: one `wl browse`."""
        found = {}
        for item in wl.browse(None, max(BROWSE_LIMIT, 2 * self.jobs)):
            try:
                job = decode_job(item.description or "")
            except JobError:
                continue
            if job.batch == self.ledger.batch:
                found.setdefault(job.custom_id, item.id)
        return found

    def report(self):
        ledger = self.ledger
        notes = ["Batch %s: %d job%s, %d posted now%s%s (ledger %s)" % (
            self.name, self.jobs, "" if self.jobs == 1 else "s", self.posted,
            ", %d found on the board" % self.found if self.found else "",
            ", %d posted before" % self.before if self.before else "", ledger.path),
            "Next: wl_infer.py results %s --wait"
                 % shlex.quote(self.args.batch if self.args.batch != "-"
                                                                 else self.name)]
        doc = {"batch": self.name, "ledger": ledger.path, "jobs": self.docs, "posted": self.posted,
               "found": self.found, "posted_before": self.before}
        return Report(EXIT_OK, doc, [], notes)


# -- collecting results ----------------------------------------------------------

class BatchJob(collections.namedtuple("BatchJob", "line custom_id url item_id")):
    """A job whose result is collected: its line in the batch file (None:
    given by its ID), its custom_id (None: the job's own, if any), the
    OpenAI endpoint its line was written for ("": none) and its item ID."""

    __slots__ = ()


class Collection(collections.namedtuple("Collection",
                                        "wait deadline interval verify spot_check accept reject "
                                                      "as_completed")):
    """How results are collected: wait for workers (until `deadline`
    seconds, None: no limit), polling every `interval` seconds; check them
    (`verify`), or a share `spot_check` of each worker's; accept the
    verified and reject the refuted; hand each on as soon as it is final,
    or in input order."""

    __slots__ = ()


# How far a Result has got
WAITING, READING, CHECKING, HELD, FINAL, WRITTEN = (
    "waiting for a worker", "reading", "checking", "held for a spot check", "final", "written")


class Result(object):
    """One job's result while it is collected: the board's view of it, its
    Submission once read (the cheap checks made), its Verification once a
    re-run (or a cheap check) decided it (`checked`), an error, the action
    taken on the board, and its `state`."""

    def __init__(self, index, job):
        self.index, self.job, self.item_id = index, job, job.item_id
        self.state = WAITING
        self.status = self.worker = self.completion_id = None
        self.submission = self.verification = None
        self.checked, self.error, self.action = False, None, None
        self.servers = ()  # where it can be checked

    @property
    def unfinished(self):
        return self.error is None and self.status not in FINISHED

    @property
    def custom_id(self):
        if self.job.custom_id is not None:
            return self.job.custom_id
        return (self.submission and self.submission.job.custom_id) or None

    @property
    def verdict(self):
        return self.verification.verdict if self.checked and self.error is None else None

    @property
    def refuted(self):
        return self.verdict == MISMATCH and self.verification.refuted

    def document(self):
        """The line `results` writes."""
        s, v = self.submission, self.verification
        decided = self.verdict is not None
        exact = sampled = coverage = refuted = cause = None
        if decided:
            exact, sampled, refuted = v.outcome.exact, bool(v.sampling), self.refuted
            coverage = v.sampling and v.sampling.coverage
            cause = v.cause and v.cause.document()
        return {"custom_id": self.custom_id, "line": self.job.line, "id": self.item_id,
                "status": self.status,
                "worker": self.worker, "output": s and s.submitted, "output_hash": s
                and s.expected_hash,
                "checked": self.checked, "verdict": self.verdict, "exact": exact,
                "sampled": sampled,
                "coverage": coverage, "refuted": refuted, "cause": cause, "action": self.action,
                "error": self.error}

    def openai(self, created):
        """The line as OpenAI's Batch API writes its output (the answer, or
        an error for a refuted, unfinished or failed job), with the verdict
        under "wl_infer"."""
        ours = self.document()
        custom_id = ours.pop("custom_id") or self.item_id
        output = ours.pop("output")
        line = {"id": self.item_id, "custom_id": custom_id, "response": None, "error": None,
                "wl_infer": ours}
        if self.error is not None:
            line["error"] = {"code": "error", "message": self.error}
        elif self.unfinished:
            line["error"] = {"code": "unfinished", "message": "%s is %s%s: no answer is in review"
                             % (
                self.item_id, self.status or "not on the board", " by " + self.worker
                if self.worker else "")}
        elif self.refuted:
            line["error"] = {"code": "refuted", "message": "%s: %s" % (
                self.verification.cause.kind, self.verification.cause.message)}
        else:
            line["response"] = {"status_code": 200, "request_id": self.item_id,
                                "body": self._completion(output, created)}
        return line

    def _completion(self, output, created):
        evidence, job = self.submission.evidence, self.submission.job
        lengths = exact_token_lengths(evidence)
        tokens = evidence["eval_count"] or (len(lengths) if lengths is not None else None)
        finish = evidence["done_reason"] or None
        usage = {"prompt_tokens": None, "completion_tokens": tokens, "total_tokens": None}
        suffix = (self.completion_id or self.item_id).split("-", 1)[-1]
        if self.job.url == CHAT:
            return {"id": "chatcmpl-" + suffix, "object": "chat.completion", "created": created,
                    "model": job.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": output},
                                 "logprobs": None, "finish_reason": finish}], "usage": usage}
        return {"id": "cmpl-" + suffix, "object": "text_completion", "created": created,
                "model": job.model,
                "choices": [{"text": output, "index": 0, "logprobs": None,
                             "finish_reason": finish}],
                "usage": usage}


class Collector(object):
    """Collects the results of `jobs`: polls the board (one `wl browse` per
    poll) until every job is done or the deadline has passed, reads each
    finished job once (`wl status`, READS_IN_FLIGHT at a time), checks it on
    the Ollama servers (one verification at a time on each, as `work` runs
    jobs), and hands each result to `on_final` once nothing can change it,
    having accepted or rejected it first when asked.

    Threads: readers (wl status) and one checker per server take their
    work from `unread` and `unchecked`; the main thread polls, hands results
    on and acts on the board. Everything they share is under `cond`.
    Spot checks: a worker's result is checked with the chance spot_check;
    every result of a worker that had one refuted is checked; when the
    polling is over, a worker none of whose results was checked gets one
    checked at random, and the rest are final unchecked."""

    def __init__(self, ctx, jobs, policy, options, on_final):
        self.ctx, self.policy, self.options, self.on_final = ctx, policy, options, on_final
        self.results = [Result(i, job) for i, job in enumerate(jobs)]
        self.cond = threading.Condition()
        self.unread = collections.deque()
        self.unchecked = collections.deque()
        self.final = collections.deque()
        self.in_flight = 0  # reads and checks
        self.stopping = False
        self.fatal = None  # a thread's internal error, which ends the collection
        self.polls = 0
        # items asked of wl browse, raised when it is cut short
        self.limit = max(BROWSE_LIMIT, 2 * len(jobs))
        self.flagged = set()  # workers with a refuted result
        # which results a spot check takes: a worker must not know
        self.rng = random.SystemRandom()
        self.next_out = 0  # input order: the next result to hand on
        # calls overlap on threads: the status line says how far we are
        self.reads_wl = ctx.new_wl(None)
        urls = ctx.settings.ollama_urls
        self.servers = [Server(url, ctx.settings.timeout) for url
                        in urls] if options.verify else []

    def run(self):
        """Collect; returns the Results, in input order."""
        for server in self.servers:
            server.refresh()
        if self.servers and all(s.error for s in self.servers):
            raise OllamaError(self.servers[0].error
                              + " (results are checked on it; --no-verify collects "
                                                      "them unchecked)")
        # a local Dolt clone: one at a time
        readers = 1 if self.ctx.settings.local_db else READS_IN_FLIGHT
        threads = [threading.Thread(target=self._guarded, args=(self.read_loop,), daemon=True)
                   for _ in range(readers)]
        threads += [threading.Thread(target=self._guarded, args=(self.check_loop, s), daemon=True)
                    for s in self.servers]
        for thread in threads:
            thread.start()
        clock = time.monotonic
        deadline = None if self.options.deadline is None else clock() + self.options.deadline
        next_poll = clock()
        try:
            while self.hand_on() < len(self.results):
                if self.ctx.signals.received:  # held during an accept or a reject
                    raise KeyboardInterrupt
                with self.cond:
                    if self.fatal is not None:
                        raise self.fatal
                    now = clock()
                    polling = self._polling(now, deadline)
                    if not polling:
                        self._settle()
                    if not polling or now < next_poll:
                        wake = [0.5] + ([next_poll - now] if polling else [])
                        self.cond.wait(max(0.01, min(wake)))
                        self._show(polling, next_poll - clock())
                        continue
                self.poll()
                next_poll = clock() + self.options.interval
        except KeyboardInterrupt:
            for server in self.servers:
                server.ollama.cancel()
            written = sum(1 for r in self.results if r.state == WRITTEN)
            raise Interrupted("%d of %d results were handed on; the same command collects them "
                              "again"
                              % (written, len(self.results)))
        finally:
            with self.cond:
                self.stopping = True
                self.cond.notify_all()
            self.ctx.status_line.clear()
        return self.results

    def _guarded(self, loop, *args):
        """A thread's loop; a bug ends the command with one line, not a traceback."""
        try:
            loop(*args)
        except Exception as exc:
            with self.cond:
                self.fatal = UserError("results stopped on an internal error: %s: %s"
                                       % (type(exc).__name__, exc))
                self.cond.notify_all()

    def _polling(self, now, deadline):
        """Whether the board is to be polled again; when not, the jobs no
        worker has done are final, unfinished."""
        waiting = [r for r in self.results if r.state == WAITING]
        if waiting and (not self.polls or (self.options.wait
                                           and (deadline is None or now < deadline))):
            return True
        for r in waiting:
            self._finalize(r)
        return False

    def _show(self, polling, next_poll):
        counts = collections.Counter(r.state for r in self.results)
        done = counts[FINAL] + counts[WRITTEN]
        self.ctx.status_line.show("results: %d of %d final%s%s%s" % (
            done, len(self.results), ", %d being checked" % (counts[CHECKING] + counts[READING])
            if counts[CHECKING] + counts[READING] else "",
            ", %d not done yet" % counts[WAITING] if counts[WAITING] else "",
            "; next poll in %.0f s" % max(0, next_poll) if polling else ""))

    # -- the board ---------------------------------------------------------------
    def poll(self):
        """One `wl browse`: the jobs a worker has done are to be read. While
        waiting, wl failing is said and tried again at the next poll."""
        self.polls += 1
        try:
            items = self.ctx.wl.browse(None, self.limit, descriptions=False)
        except UserError as exc:
            if not self.options.wait:
                raise
            self.ctx.warn("%s; trying again at the next poll" % exc)
            return
        cut = len(items) >= self.limit
        listed = dict((item.id, item) for item in items)
        with self.cond:
            for r in self.results:
                if r.state != WAITING:
                    continue
                item = listed.get(r.item_id) or self._by_prefix(r, items)
                if item is None:
                    if not cut and r.error is None:
                        r.error = "%s is not on the board (withdrawn, or no such item)" % r.item_id
                        self._finalize(r)
                    continue
                r.item_id, r.status, r.worker = item.id, item.status, item.claimed_by
                if item.status in FINISHED:
                    r.state = READING
                    self.unread.append(r)
            self.cond.notify_all()
        if cut:  # the board has more items than wl listed: ask for more next time
            self.limit *= 2

    def _by_prefix(self, r, items):
        """The item an ID prefix given on the command line names, as wl resolves it."""
        # a whole ID (wl's are 10 hex digits): nothing to resolve
        if len(r.item_id) >= len("w-") + 10:
            return None
        found = [item for item in items if item.id.startswith(r.item_id)]
        if len(found) > 1:
            r.error = 'ambiguous prefix "%s" matches: %s' % (r.item_id, ", "
                                                             "".join(i.id for i in found[:5]))
            self._finalize(r)
            return None
        return found[0] if found else None

    def read_loop(self):
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.stopping or self.unread)
                if self.stopping:
                    return
                r = self.unread.popleft()
                self.in_flight += 1
            item = submission = error = None
            try:
                item = self.reads_wl.status(r.item_id)
                if item.status in FINISHED:
                    submission = Submission.of(item)
            except UserError as exc:
                error = str(exc)
            with self.cond:
                self.in_flight -= 1
                if item is not None:
                    r.status = item.status
                    completion = item.completion
                    completed_by = completion and completion.completed_by
                    r.worker = completed_by or item.claimed_by or r.worker
                    r.completion_id = completion and completion.id
                if error is not None:
                    r.error = error
                    self._finalize(r)
                # sent back meanwhile (rejected): the next poll sees it again
                elif item.status not in FINISHED:
                    r.state = WAITING
                else:
                    r.submission = submission
                    self._decide(r)
                self.cond.notify_all()

    # -- checking ----------------------------------------------------------------
    def _decide(self, r):
        """After the cheap checks: final (refuted by them, or not to be
        checked), to be checked, or held for the spot check (under cond)."""
        if r.submission.cause is not None:  # the cheap checks refuted it
            r.verification, r.checked = verify_submission(r.submission, None), True
            self._finalize(r)
        elif not self.options.verify:
            self._finalize(r)
        elif self.options.spot_check is None or r.worker in self.flagged or \
                self.rng.random() < self.options.spot_check:
            self._check(r)
        else:
            r.state = HELD

    def _check(self, r):
        model = r.submission.job.model
        having = [s for s in self.servers if find_model(s.models, model) is not None]
        r.servers = having or self.servers[:1]
        r.state = CHECKING
        self.unchecked.append(r)

    def check_loop(self, server):
        def mine():
            return next((r for r in self.unchecked if server in r.servers), None)

        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.stopping or mine() is not None)
                if self.stopping:
                    return
                r = mine()
                self.unchecked.remove(r)
                self.in_flight += 1
            verification = error = None
            try:
                verification = verify_submission(r.submission, server.ollama, self.policy)
            except UserError as exc:
                error = str(exc)
            with self.cond:
                self.in_flight -= 1
                r.verification, r.checked, r.error = verification, error is None, error
                self._finalize(r)
                self.cond.notify_all()

    def _settle(self):
        """Once the polling is over and nothing is in flight: the spot
        check's last word on the results it held (under cond)."""
        if self.in_flight or self.unread or self.unchecked:
            return
        held = [r for r in self.results if r.state == HELD]
        checked = set(r.worker for r in self.results if r.checked)
        unseen = collections.OrderedDict()
        for r in held:
            if r.worker not in checked:
                unseen.setdefault(r.worker, []).append(r)
        for results in unseen.values():  # at least one result of each worker is checked
            self._check(self.rng.choice(results))
        if not unseen:
            for r in held:
                self._finalize(r)
        self.cond.notify_all()

    def _finalize(self, r):
        """Nothing will change `r` now (under cond); a refuted result has
        every result of its worker checked."""
        r.state = FINAL
        if self.options.as_completed:
            self.final.append(r)
        if r.refuted and self.options.spot_check is not None and r.worker not in self.flagged:
            self.flagged.add(r.worker)
            for other in self.results:
                if other.worker == r.worker and other.state == HELD:
                    self._check(other)

    # -- handing on ----------------------------------------------------------------
    def hand_on(self):
        """Act on and hand on the results that are final, in input order or
        as they came; returns how many have been handed on."""
        while True:
            with self.cond:
                if self.options.as_completed:
                    r = self.final.popleft() if self.final else None
                else:
                    nxt = None
                    if self.next_out < len(self.results):
                        nxt = self.results[self.next_out]
                    r = nxt if nxt is not None and nxt.state == FINAL else None
                    self.next_out += r is not None
                if r is None:
                    return sum(1 for x in self.results if x.state == WRITTEN)
                r.state = WRITTEN
            self.act(r)
            self.on_final(r)

    def act(self, r):
        """--accept and --reject, as audit's, on this result's item."""
        options = self.options
        acting = options.accept or options.reject
        if not acting or r.error is not None or r.status != "in_review":
            return
        if not r.checked:
            r.action = "kept in review (not checked)" if options.accept else None
            return
        try:
            r.action = act_on_board(self.ctx, r.verification, options.accept, options.reject)
        except UserError as exc:
            r.error = str(exc)


def act_on_board(ctx, verification, accept, reject):
    """audit's and results' --accept and --reject: what was done, or None."""
    if accept and verification.verdict == VERIFIED:
        return _accept(ctx, verification)
    if reject and verification.refuted:
        cause = verification.cause
        ctx.wl.reject(verification.item_id, preview("wl_infer audit: MISMATCH, %s: %s" % (
            cause.kind, cause.message), 500))
        return "rejected"
    if reject and verification.verdict == MISMATCH:
        return "kept in review (not a refutation)"
    return None


def unchecked_chance(results, checked, forged):
    """The chance that a worker who forged `forged` of its `results` had
    none of them among the `checked` ones drawn at random."""
    if forged > results - checked:
        return 0.0
    return math.comb(results - forged, checked) / math.comb(results, checked)


# =============================================================================
# Commands: each takes (ctx, args) and returns a Report
# =============================================================================


def _job_lines(job, indent="  "):
    return [
        indent + "Model:       " + printable(job.model),
        indent + "Pinned:      " + (short_digest(job.model_digest) if job.model_digest
                                    else "no digest"),
        indent + "Seed:        %d" % job.seed,
        indent + "Max tokens:  " + ("%d" % job.max_tokens if job.max_tokens > 0
                                    else "model default"),
        indent + "Prompt:      " + preview(job.prompt),
    ]


def _provenance_lines(evidence, indent):
    """Our keys of an evidence, decoded or as submitted (absent keys allowed)."""
    digest, version, count = (evidence.get(k) for k
                              in ("model_digest", "ollama_version", "eval_count"))
    if not digest and not version and not count:
        return [indent + "Provenance:  none recorded (evidence in the Go wl infer format)"]
    rate = ""
    if evidence.get("tokens_per_s") is not None:
        rate = " at %.2f tokens/s" % evidence["tokens_per_s"]
    logprobs = evidence.get("logprobs")
    return [indent + "Model digest: " + (short_digest(digest) if digest else "not recorded"),
            indent + "Ollama:       " + (preview(version, 30) if version
                                         else "version not recorded"),
            indent + "Tokens:       " + ("%d%s, done: %s" % (count, rate, preview(
                evidence.get("done_reason") or "not recorded", 20)) if count else "not recorded"),
            indent + "Logprobs:     " + ("%d tokens" % len(logprobs) if logprobs is not None
                                         else "not recorded")]


def cmd_post(ctx, args):
    if args.batch is not None:
        if args.prompt is not None or args.prompt_file is not None:
            raise UserError("--batch and --prompt/--prompt-file do not go together: each line of "
                            "the batch file has its prompt")
        if args.wait:
            raise UserError("post --batch does not wait: collect its answers with `wl_infer.py "
                            "results %s --wait`"
                            % shlex.quote(args.batch))
        if args.model is not None:
            check_model_name(args.model, "--model")
        return BatchPost(ctx, args).run()
    if args.name is not None:
        raise UserError("--name names a batch: it needs --batch FILE")
    if args.model is None:
        raise UserError("post needs --model TAG (or --batch FILE, whose lines may name their "
                        "models)")
    check_model_name(args.model, "--model")
    policy, options = wait_settings(args)
    wl = ctx.wl  # a missing wl is an error now, before any warning about the job
    prompt = read_prompt(args)
    job = make_job(prompt, args.model, args.seed, args.max_tokens)
    try:
        postable(job)  # before contacting anything: never post what workers would refuse
        job = LocalModels(ctx, args.no_pin).pin(job)
        description = postable(job)
    except JobError as exc:
        raise UserError("not posted: %s" % exc)
    if not job.max_tokens:
        ctx.warn("no --max-tokens: the job runs to the model's own limit, and %s; post with "
                 "--max-tokens N to have it taken" % UNCAPPED)
    if prompt_warning(job):
        ctx.warn(prompt_warning(job))
    title = post_title(prompt)
    item_id = wl.post(title, description)
    if ctx.signals.received:  # held while wl wrote the job
        raise Interrupted("the job was posted before stopping: %s" % item_id)
    doc = {"id": item_id, "title": title, "job": job.document()}
    if options is None:
        return Report(EXIT_OK, doc, ["✓ Posted inference job: " + item_id] + _job_lines(job),
                      notes=["Next: wl_infer.py run " + item_id], quiet=[item_id])
    return wait_for_answer(ctx, doc, policy, options)


def wait_for_answer(ctx, doc, policy, options):
    """post --wait: the answer of the job just posted, once a worker has
    done it and it is checked, exactly as it is on stdout."""
    item_id = doc["id"]
    later = "`wl_infer.py results %s --wait`" % item_id
    if not ctx.settings.quiet:
        ctx.status_line.above("posted %s; waiting for a worker to do it" % item_id)
    try:
        [result] = Collector(ctx, [BatchJob(None, None, "", item_id)], policy, options,
                             lambda r: None).run()
    except Interrupted:
        raise Interrupted("the job is posted as %s; collect its answer with %s" % (item_id, later))
    doc["result"] = result.document()
    if result.error is not None:
        raise UserError("%s: %s" % (item_id, result.error))
    if result.unfinished:
        ctx.warn("no worker had done %s within %s; it stays posted: collect its answer with %s"
                 % (item_id, _seconds(options.deadline), later))
        return Report(EXIT_UNFINISHED, doc, [])
    if result.verdict == MISMATCH:
        cause = result.verification.cause
        ctx.warn("the answer to %s is a MISMATCH (%s%s), so it is not printed; `wl_infer.py "
                 "verify %s` says why"
                 % (item_id, cause.kind, ", refuted" if result.refuted else "", item_id))
        return Report(EXIT_MISMATCH, doc, [])
    note = ("✓ VERIFIED answer to %s (completed by %s)"
            % (item_id, printable(result.worker or "unknown"))
            if result.checked else "the answer to %s, not checked (--no-verify)" % item_id)
    return Report(EXIT_OK, doc, [], [note], raw=result.submission.submitted)


def wait_settings(args):
    """post --wait's Policy (None: --no-verify) and Collection, or (None, None) without --wait."""
    given = [name for name in ("wait_timeout", "interval", "tolerance", "max_forced", "sample",
                               "window",
                               "sample_seed") if getattr(args, name) not in (None, 0.0)]
    if args.strict or args.no_verify:
        given.append("strict" if args.strict else "no_verify")
    if not args.wait:
        if given:
            raise UserError("--%s is for waiting: it needs --wait" % given[0].replace("_", "-"))
        return None, None
    return collection_settings(args, spot_check=None, accept=False, reject=False,
                               as_completed=False)


def collection_settings(args, spot_check, accept, reject, as_completed):
    """The Policy (None: --no-verify) and the Collection of `results` and `post --wait`."""
    if args.no_verify and (args.strict or args.tolerance or args.sample
                           or args.max_forced is not None):
        raise UserError("--no-verify checks nothing, so it takes no --strict, --tolerance, "
                        "--max-forced or --sample")
    if args.wait_timeout is not None and not args.wait:
        raise UserError("--wait-timeout needs --wait")
    if args.interval is not None and not args.wait:
        raise UserError("--interval needs --wait: without it the board is looked at once")
    policy = None if args.no_verify else verify_policy(args)
    interval = DEFAULT_RESULTS_INTERVAL if args.interval is None else args.interval
    return policy, Collection(args.wait, args.wait_timeout, interval, not args.no_verify,
                              spot_check, accept, reject,
                              as_completed)


DEFAULT_RESULTS_INTERVAL = 10.0  # seconds between looks at the board while waiting for workers


def read_prompt(args):
    given = [x for x in (args.prompt, args.prompt_file) if x is not None]
    if len(given) != 1:
        raise UserError("post needs exactly one of --prompt TEXT, --prompt - (stdin) or "
                        "--prompt-file PATH")
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise UserError("cannot read --prompt-file %s: %s" % (args.prompt_file, _reason(exc)))
        source = "--prompt-file " + args.prompt_file
    elif args.prompt == "-":  # one trailing newline is the `echo` that sent it, not the prompt
        raw, source = sys.stdin.buffer.read(), "the prompt on stdin"
        raw = raw[:-1] if raw.endswith(b"\n") else raw
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
    done = run_job(ctx, args.id, args.skip_claim)
    item_id, evidence, kept = done.id, done.fitted_evidence, done.kept
    text = (["✓ Inference completed for " + item_id] + _job_lines(done.job) + [
        "  Evidence:" + (" the result kept on %s, submitted without generating again"
                         % kept["spooled_at"]
                         if kept else ""),
        "    Output hash: " + evidence["output_hash"],
        "    Output:      " + preview(evidence["output"])] + _provenance_lines(evidence, "    "))
    return Report(EXIT_OK, {"id": item_id, "evidence": evidence_document(evidence),
                            "resubmitted": kept is not None}, text,
                  notes=["Next: wl_infer.py verify " + item_id])


def cmd_verify(ctx, args):
    policy = verify_policy(args)
    def verified(item_id):
        item = ctx.wl.status(item_id)
        return verification_report(verify_item(item, ctx.ollama, policy, ctx.progress))

    return each_item(args.ids, verified)


def verification_report(verification):
    exit_code = EXIT_OK if verification.verdict == VERIFIED else EXIT_MISMATCH
    return Report(exit_code, verification_document(verification), verification_lines(verification))


def each_item(ids, report_of):
    """The Report of a command given several IDs: each item's report in
    turn (a blank line between them; --json: one document each), exiting
    with the worst code. With one ID, its own report, errors included; with
    several, an item that fails is an error line and the rest go on."""
    if len(ids) == 1:
        return report_of(ids[0])
    text, quiet, docs, errors, notes, code = [], [], [], [], [], EXIT_OK
    for item_id in ids:
        try:
            report = report_of(item_id)
        except UserError as exc:
            errors.append("%s: %s" % (item_id, exc))
            docs.append({"id": item_id, "error": str(exc)})
            code = EXIT_ERROR
            continue
        text += ([""] if text else []) + report.text
        quiet += report.quiet
        docs.append(report.doc)
        notes += report.notes
        code = max(code, report.code)
    return Report(code, None, text, notes, quiet, errors=errors, docs=docs)


def cmd_status(ctx, args):
    return each_item(args.ids, lambda item_id: status_report(ctx.wl.status(item_id)))


def status_report(item):
    job, job_error = None, None
    try:
        job = job_of(item)
    except UserError as exc:
        job_error = str(exc)
    completion, evidence, checks = item.completion, None, None
    if completion is not None:
        evidence, checks, _ = evidence_checks(job, completion.evidence or "")
    text = ["%s: %s" % (item.id, printable(item.title)),
            "  Status:      " + printable(item.status),
            "  Type:        " + printable(item.type or "unknown"),
            "  Posted by:   " + printable(item.posted_by or "unknown")]
    if item.claimed_by:
        text.append("  Claimed by:  " + printable(item.claimed_by))
    if job is not None:
        text += ["  Job:"] + _job_lines(job, "    ")
    else:
        text += ["  Job:         does not decode (%s)" % printable(job_error),
                 "  Description: " + preview(_go_string(item.description or ""), 200)]
    if completion is not None:
        text += ["  Completion:  %s by %s" % (printable(completion.id),
                                              printable(completion.completed_by or "unknown"))]
        if evidence is not None:
            text += ["    Output hash: " + printable(evidence["output_hash"]),
                     "    Output:      " + preview(evidence["output"])]
            text += _provenance_lines(evidence, "    ")
        text += ["    Checks (without running the model):"] + _check_lines(checks, "      ")
    doc = {"id": item.id, "title": item.title, "status": item.status, "type": item.type,
           "posted_by": item.posted_by, "claimed_by": item.claimed_by, "job": job
           and job.document(),
           "description": item.description and _go_string(item.description),
           "completion": None if completion is None else {
               "id": completion.id, "completed_by": completion.completed_by,
               "evidence": evidence and evidence_document(evidence),
               "raw": completion.evidence and _go_string(completion.evidence),
               "checks": [c._asdict() for c in checks]}}
    return Report(EXIT_OK, doc, text, quiet=[printable(item.status)])


def cmd_output(ctx, args):
    """The submitted outputs, exactly as submitted: all of them, or none
    (an error about one would leave the others misaligned in a pipe)."""
    outputs, docs = [], []
    for item_id in args.ids:
        item = ctx.wl.status(item_id)
        completion = item.completion
        if completion is None or not completion.evidence:
            raise UserError("%s has no completion, so no output (status %s)"
                            % (item.id, item.status))
        try:
            job = job_of(item)
        except UserError:
            job = None
        evidence, checks, cause = evidence_checks(job, completion.evidence)
        if evidence is None:
            raise JobError(checks[0].message, item.id)
        if cause is not None:  # free to see, and a reader must know before using the text
            ctx.warn("%s: the output is refuted without a re-run (%s): %s"
                     % (item.id, cause.kind, cause.message))
        outputs.append(evidence["output"])
        docs.append({"id": item.id, "completed_by": completion.completed_by,
                     "output": evidence["output"],
                     "output_hash": evidence["output_hash"], "refuted": cause is not None})
    if args.null:
        end = "\0"
    elif len(outputs) > 1:
        end = "\n"
    else:
        end = ""
    return Report(EXIT_OK, docs[0], [], raw="".join(output + end for output in outputs),
                  docs=docs if len(docs) > 1 else None)


def results_source(args):
    """(the batch's name or None, its BatchJobs in input order, notes) from
    the command line: a batch file or a ledger's name, item IDs, or --ids FILE."""
    if args.ids_file is not None:
        return None, [BatchJob(None, None, "", i) for i in read_ids(args.ids_file)], []
    if not args.batch:
        raise UserError("results needs a batch (its file or its name), item IDs, or --ids FILE")
    if all(is_item_id(b) and not os.path.isfile(b) for b in args.batch):
        return None, [BatchJob(None, None, "", i) for i in args.batch], []
    if len(args.batch) > 1:
        raise UserError("results takes one batch (its file or its name), or item IDs; got %s"
                        % " ".join(shlex.quote(b) for b in args.batch))
    given = args.batch[0]
    if os.path.isfile(given) or given == "-":
        name = batch_name(given, args.name)
    else:
        name = batch_name(None, args.name or given)
    ledger = Ledger.load(name)
    if ledger is None:
        raise UserError("no batch %s here: there is no ledger %s (a batch is posted with "
                        "`wl_infer.py post --batch FILE`, on this machine)"
                        % (name, Ledger.path_of(name)))
    entries = sorted(ledger.entries.values(), key=lambda e: e.line or 0)
    jobs = [BatchJob(e.line, e.custom_id, e.url, e.item_id) for e in entries
            if e.item_id is not None]
    notes = []
    missing = [e.line for e in entries if e.item_id is None]
    if missing or ledger.complete is None:
        notes.append("batch %s was not posted whole%s: run the `wl_infer.py post --batch` that "
                     "posted it again to post the rest"
                     % (name, " (%s perhaps not posted)" % _lines_said(missing)
                                        if missing else ""))
    return name, jobs, notes


def read_ids(path):
    """Item IDs, the first word of each line of `path` (- : standard
    input) that is not blank: the output of `list -q` or `post --batch`."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError("cannot read --ids %s: %s" % (path, _reason(exc)))
    ids = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words:
            continue
        if not is_item_id(words[0]):
            raise UserError("line %d of --ids %s: %s is not an item ID"
                            % (number, path, preview(words[0], 40)))
        ids.append(words[0])
    if not ids:
        raise UserError("--ids %s holds no item IDs" % path)
    return ids


def cmd_results(ctx, args):
    if args.spot_check is not None and args.no_verify:
        raise UserError("--spot-check chooses which results to check; --no-verify checks none")
    if args.accept and args.no_verify:
        raise UserError("--accept accepts only verified results, and --no-verify checks none")
    policy, options = collection_settings(args, args.spot_check, args.accept, args.reject,
                                          args.as_completed)
    name, jobs, notes = results_source(args)
    if not jobs:
        raise UserError("batch %s has no posted jobs" % name)
    for note in notes:
        ctx.warn(note)
    created = int(time.time())
    lines = []

    def write(result):
        line = result.openai(created) if args.format == "openai" else result.document()
        if args.json:
            lines.append(line)
        else:
            text = _json_line(line)
            ctx.out(text, text)

    results = Collector(ctx, jobs, policy, options, write).run()
    return results_report(name, results, options, lines)


def _json_line(doc):
    """One JSON Lines record, as _json_text encodes (UTF-8 as it is where stdout is UTF-8)."""
    utf8 = (getattr(sys.stdout, "encoding", "") or "").lower().replace("-", "") == "utf8"
    return json.dumps(doc, ensure_ascii=not utf8, separators=(",", ":"))


def results_report(name, results, options, lines):
    counts = collections.Counter()
    for r in results:
        if r.error is not None:
            counts["error"] += 1
        elif r.unfinished:
            counts["unfinished"] += 1
        elif r.verdict is None:
            counts["unchecked"] += 1
        else:
            counts[r.verdict] += 1
            counts["refuted"] += r.refuted
    code = EXIT_OK
    if counts["error"]:
        code = EXIT_ERROR
    elif counts[MISMATCH]:
        code = EXIT_MISMATCH
    elif counts["unfinished"]:
        code = EXIT_UNFINISHED
    title = "Results of batch " + name if name else "Results"
    summary = ("%s: %d job%s: %d verified, %d MISMATCH (%d refuted), %d not checked, %d not done "
               "by a worker, %d error%s") % (
        title, len(results), "" if len(results) == 1 else "s", counts[VERIFIED], counts[MISMATCH],
        counts["refuted"], counts["unchecked"], counts["unfinished"], counts["error"],
        "" if counts["error"] == 1 else "s")
    notes = [summary]
    actions = collections.Counter(r.action for r in results if r.action)
    if actions:
        notes.append("On the board: " + ", ".join("%s %d" % (a, n) for a, n
                                                  in sorted(actions.items())))
    workers = spot_check_figures(results) if options.spot_check is not None else []
    for w in workers:
        notes.append("  " + w["said"])
    if counts["unfinished"]:
        notes.append("%d job%s not done by a worker yet: the same command with --wait collects %s"
                     % (
            counts["unfinished"], "" if counts["unfinished"] == 1 else "s",
            "it" if counts["unfinished"] == 1 else "them"))
    errors = ["%s: %s" % (r.item_id, r.error) for r in results if r.error is not None]
    doc = {"batch": name, "results": lines, "counts": dict((k.lower(), v) for k, v
                                                           in counts.items()),
           "workers": [dict((k, v) for k, v in w.items() if k != "said") for w in workers]}
    return Report(code, doc, [], notes, errors=errors)


def spot_check_figures(results):
    """Per worker: its results, how many were checked and refuted, and the
    chance that forging 1, a tenth or half of them would have gone unchecked."""
    by_worker = collections.OrderedDict()
    for r in results:
        if r.submission is not None and r.error is None:
            by_worker.setdefault(r.worker or "unknown", []).append(r)
    figures = []
    for worker, mine in by_worker.items():
        n, k = len(mine), sum(1 for r in mine if r.checked)
        refuted = sum(1 for r in mine if r.refuted)
        forged = sorted(set(f for f in (1, -(-n // 10), -(-n // 2)) if 1 <= f <= n))
        chances = dict((str(f), round(unchecked_chance(n, k, f), 4)) for f in forged)
        if refuted:
            said = "%s: %d of %d results refuted, so every one was checked" % (printable(worker),
                                                                               refuted, n)
        else:
            said = ("%s: %d of %d results checked, none refuted; had %s forged %s, the chance it "
                    "went unchecked: %s") % (
                printable(worker), k, n, printable(worker),
                " / ".join("%s of %d" % (f, n) for f in chances),
                " / ".join("%.0f%%" % (100 * p) for p in chances.values()))
        figures.append({"worker": worker, "results": n, "checked": k, "refuted": refuted,
                        "unchecked_chance": chances, "said": said})
    return figures


def cmd_spool(ctx, args):
    folder = spool_dir()
    if args.drop:
        path = spool_path(args.drop)
        try:
            os.unlink(path)
        except FileNotFoundError:
            raise UserError("no kept result for %s in %s (IDs here are full IDs)"
                            % (args.drop, folder))
        except OSError as exc:
            raise UserError("cannot drop %s: %s" % (path, _reason(exc)))
        return Report(EXIT_OK, {"dropped": args.drop, "path": path},
                      ["✓ Dropped the kept result for " + args.drop])
    docs, lines, notes = [], [], []
    for path, doc in spool_list():
        if isinstance(doc, UserError):
            docs.append({"path": path, "error": str(doc)})
            notes.append("✗ " + printable(str(doc)))
            continue
        evidence = doc["evidence"]
        docs.append({"id": doc["id"], "spooled_at": doc["spooled_at"], "model": evidence["model"],
                     "output_bytes": _size(evidence["output"]),
                     "output_hash": evidence["output_hash"],
                     "path": path})
        lines.append("%s  %s  %s  %d bytes  %s"
                     % (doc["id"], printable(doc["spooled_at"]), printable(
            evidence["model"]), _size(evidence["output"]), preview(evidence["output"], 40)))
    kept = len(docs) - len(notes)
    if kept:
        notes[:0] = ["%d kept result%s in %s (finished, not yet taken by wl)" % (
            kept, "" if kept == 1 else "s", printable(folder))]
        notes.append("Submit one with `wl_infer.py run ID`, or drop it with `wl_infer.py spool "
                     "--drop ID`.")
    elif not notes:
        notes = ["No kept results in %s: every finished result is on the board."
                 % printable(folder)]
    return Report(EXIT_OK, {"folder": folder, "results": docs}, lines, notes)


class Listed(collections.namedtuple("Listed", "item job job_error")):
    """A board item with its job decoded (job None and job_error the
    JobError, when it does not decode)."""

    __slots__ = ()


class Listing(collections.namedtuple("Listing", "items total more")):
    """What one `wl browse` showed: the Listed items (up to the limit), how
    many there were, and whether wl's own list was cut (there may be more)."""

    __slots__ = ()

    def cut(self, what, limit):
        """The note that --limit cut the list, or None."""
        if self.total <= len(self.items):
            return None
        return "showing %d of %s%d %s (--limit %d)" % (len(self.items), "at least " if self.more
                                                       else "",
                                                       self.total, what, limit)


def board_items(ctx, status, model, limit):
    """One `wl browse`: the Listing of inference items with `status`
    ("all": any) and, when given, `model`. wl is asked for more than
    `limit`, so that a filter does not cut the list short and a cut is said."""
    wanted = full_model_name(model).lower() if model else None
    asked = max(limit + 1, BROWSE_LIMIT)
    items = ctx.wl.browse(None if status == "all" else status, asked)
    listed = []
    for item in items:
        try:
            listed.append(Listed(item, job_of(item), None))
        except JobError as exc:
            listed.append(Listed(item, None, exc))
    if wanted:
        listed = [entry for entry in listed if entry.job
                  and full_model_name(entry.job.model).lower() == wanted]
    return Listing(listed[:limit], len(listed), len(items) >= asked)


def _table(header, rows):
    """Left-aligned columns; the last one runs free."""
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header) - 1)]
    return ["  ".join([c.ljust(w) for c, w in zip(r, widths)] + [r[-1]]).rstrip() for r
            in [header] + rows]


def cmd_list(ctx, args):
    rows, docs = [], []
    listing = board_items(ctx, args.status, args.model, args.limit)
    for item, job, job_error in listing.items:
        docs.append({"id": item.id, "status": item.status, "priority": item.priority, "job": job
                     and job.document(),
                     "job_error": job_error and str(job_error), "title": item.title,
                     "posted_by": item.posted_by,
                     "claimed_by": item.claimed_by})
        if job is None:  # the whole reason: the last column runs free
            rows.append([item.id, printable(item.status or "?"), "-", "-", "-",
                         "(does not decode: %s)" % printable(job_error.reason)])
        else:
            rows.append([item.id, printable(item.status or "?"), preview(job.model, 24),
                         str(job.seed),
                         str(job.max_tokens) if job.max_tokens else "default",
                         preview(job.prompt, 50)])
    which = "" if args.status == "all" else " " + args.status
    ids = [row[0] for row in rows]
    if not rows:
        return Report(EXIT_OK, docs, [], ["No%s inference jobs on the board%s." % (
            which, " for model " + printable(args.model) if args.model else "")])
    counted = listing.cut("%s inference jobs" % which.strip() if which else "inference jobs",
                          args.limit) or \
        "%d%s inference job%s" % (len(rows), which, "" if len(rows) == 1 else "s")
    return Report(EXIT_OK, docs, _table(["ID", "STATUS", "MODEL", "SEED", "MAX", "PROMPT"], rows),
                  [counted], ids)


class AuditRow(object):
    """One item in review: its Submission and its Verification (None until
    made, or after an error), the error, and what was done on the board
    (accepted, rejected)."""

    def __init__(self, item_id):
        self.item_id, self.submission, self.verification = item_id, None, None
        self.error, self.action = None, None


def cmd_audit(ctx, args):
    """Verify every completion in review: the cheap checks of all first (a
    forged output costs nothing), then the re-runs, shortest output first."""
    policy = verify_policy(args)
    listing = board_items(ctx, "in_review", args.model, args.limit)
    rows = [AuditRow(listed.item.id) for listed in listing.items]
    for n, row in enumerate(rows, 1):
        ctx.status_line.show("%d of %d: reading %s" % (n, len(rows), row.item_id))
        try:
            row.submission = Submission.of(ctx.wl.status(row.item_id))
        except UserError as exc:
            row.error = str(exc)
            continue
        if row.submission.cause is not None:  # refuted by the cheap checks: no re-run
            row.verification = verify_submission(row.submission, None)
    ctx.status_line.clear()
    pending = [r for r in rows if r.submission and r.verification is None]
    for n, row in enumerate(sorted(pending, key=lambda r: len(r.submission.submitted)), 1):
        try:
            row.verification = verify_submission(row.submission, ctx.ollama, policy,
                                                 _positioned(ctx, "%d of %d: "
                                                             % (n, len(pending))))
        except UserError as exc:
            row.error = str(exc)
    for row in rows:
        if row.verification is None:
            continue
        try:
            row.action = act_on_board(ctx, row.verification, args.accept, args.reject)
        except UserError as exc:
            row.error = str(exc)
    report = audit_report(rows, policy)
    cut = listing.cut("completions in review", args.limit)
    if cut:
        report.notes.insert(1, cut + "; the rest were not audited")
    return report


def _positioned(ctx, position):
    """Progress for a verification, its label after `position` ("2 of 5: ")."""
    return lambda label, total: ctx.progress(position + label, total)


def _accept(ctx, verification):
    try:
        ctx.wl.accept(verification.item_id, acceptance_message(verification))
        return "accepted"
    except WlError as exc:
        if exc.refusal != "own-completion":
            raise
        return "not accepted: completed by this rig (wl forbids accepting your own)"


def audit_report(rows, policy):
    counts = {VERIFIED: 0, MISMATCH: 0, "ERROR": 0}
    table, notes, docs, unrefuted = [], [], [], []
    for row in rows:
        verification, item_id = row.verification, row.item_id
        verdict = "ERROR" if row.error else verification.verdict
        counts[verdict] += 1
        if verification is not None:
            doc = dict(verification_document(verification), action=row.action, error=row.error)
            cause, sampling = verification.cause, verification.sampling
            forced = verification.forced
            if cause:
                how = cause.kind
            elif sampling and verification.verdict == VERIFIED:
                how = "sampled: %.0f%% coverage" % (100 * sampling.coverage)
            elif forced:
                how = "tolerance: %d forced" % len(forced)
            else:
                how = "-"
            tokens = "%d" % verification.outcome.tokens_generated
            table.append([item_id, preview(verification.job.model, 24), verdict, how, tokens,
                          row.action or ""])
            if cause:
                notes.append("%s: %s: %s" % (item_id, cause.kind, printable(cause.message)))
            if verification.verdict == MISMATCH and not verification.refuted:
                unrefuted.append(item_id)
        else:
            doc = {"id": item_id, "verdict": "ERROR", "error": row.error}
            table.append([item_id, "-", verdict, "error", "-", ""])
        if row.error:
            notes.append("%s: error: %s" % (item_id, printable(row.error)))
        docs.append(doc)
    if counts["ERROR"]:
        code = EXIT_ERROR
    elif counts[MISMATCH]:
        code = EXIT_MISMATCH
    else:
        code = EXIT_OK
    if not rows:
        return Report(code, docs, [], ["No inference completions in review."])
    summary = "Audited %d completion%s in review: %d verified, %d mismatched, %d error%s" % (
        len(rows), "" if len(rows) == 1 else "s", counts[VERIFIED], counts[MISMATCH],
        counts["ERROR"],
        "" if counts["ERROR"] == 1 else "s")
    # an honest worker on other hardware lands here: never rejected, and the next step is said
    if unrefuted:
        notes.append("%d MISMATCH%s not refuted outright (%s): %s kept in review, never rejected; "
                     "%s" % (
            len(unrefuted), "" if len(unrefuted) == 1 else "es", " ".join(unrefuted),
            "it is" if len(unrefuted) == 1 else "they are",
            "re-check with a larger --tolerance or --max-forced, or on the worker's model and "
            "Ollama version"
            if policy.tolerance else "re-check with `wl_infer.py audit --tolerance %g`"
            % NEAR_TIE))
    return Report(code, docs, _table(["ID", "MODEL", "VERDICT", "CAUSE", "TOKENS", "ACTION"],
                                     table),
                  [summary] + notes)


def cmd_work(ctx, args):
    _ = ctx.wl  # made before the threads start: a missing wl is an error now
    return Worker(ctx, args).run()


# =============================================================================
# Command line
# =============================================================================


def _item_id(text):
    if not is_item_id(text):
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


def _tags(text):
    tags = [t.strip() for t in text.split(",") if t.strip()]
    if not tags:
        raise ValueError(text)
    for tag in tags:
        check_model_name(tag, "--models")
    return tags


def _count(text):
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _nats(text):
    value = float(text)
    if not 0 <= value < float("inf"):
        raise ValueError(text)
    return value


def _positive(text):
    value = float(text)
    if not 0 < value < float("inf"):  # also refuses nan
        raise ValueError(text)
    return value


def _duration(text):
    """Seconds, or a number with s, m or h."""
    scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1:].lower())
    value = float(text[:-1] if scale else text) * (scale or 1)
    if not 0 <= value < float("inf"):
        raise ValueError(text)
    return value


def _rate(text):
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0 < value <= 1:
        raise ValueError(text)
    return value


def _argument_type(name, parse):
    """An argparse type from `parse`, whose ValueError becomes argparse's
    own wording with `name`: "invalid NAME value: 'TEXT'"."""
    def convert(text):
        try:
            return parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError("invalid %s value: %r" % (name, text))
    return convert


_seed = _argument_type("64-bit integer seed", _seed)
_duration = _argument_type("duration (seconds, or 90s, 15m, 2h)", _duration)
_rate = _argument_type("share between 0 and 1 (or 1% to 100%)", _rate)
_max_tokens = _argument_type("non-negative integer", _max_tokens)
_positive = _argument_type("positive number of seconds", _positive)
_nats = _argument_type("non-negative number of nats", _nats)
_count = _argument_type("positive integer", _count)
_tags = _argument_type("comma-separated list of models", _tags)


ID_HELP = "the item's ID on the board, e.g. w-3f9a0c12be (any unique prefix will do)"


def _no_push(p):
    """The one option every command that writes to the board has."""
    p.add_argument("--no-push", action="store_true",
                   help="commit locally, do not push (wl --no-push)")


def _post_arguments(p):
    p.add_argument("--prompt", metavar="TEXT",
                   help="the prompt; - reads it from stdin, less one trailing "
                   "newline (write --prompt=-TEXT for a prompt that starts with -)")
    p.add_argument("--prompt-file", metavar="PATH",
                   help="read the prompt from a file, byte for byte")
    p.add_argument("--model", metavar="TAG", help="Ollama model, e.g. llama3.2:1b (with --batch: "
                   "for the lines that name none)")
    p.add_argument("--seed", type=_seed, default=DEFAULT_SEED, help="seed (default 42)")
    p.add_argument("--max-tokens", type=_max_tokens, default=0, metavar="N",
                   help="token limit (default 0: the model's default)")
    p.add_argument("--no-pin", action="store_true",
                   help="do not pin the local model's digest in the job (pinned by default when "
                   "present)")
    p.add_argument("--batch", metavar="FILE", help="post a job per line of FILE (- : stdin): our "
                   "lines or OpenAI batch requests; checked whole first, posted exactly once (run "
                   "again to resume)")
    p.add_argument("--name", metavar="NAME", help="with --batch: the batch's name (default: the "
                   "file's name "
                   "without its extension; needed for stdin)")
    p.add_argument("--wait", action="store_true",
                   help="wait until a worker has done the job, check the answer "
                   "and print it on stdout, exactly")
    _wait_arguments(p)
    _policy_arguments(p)
    _no_push(p)


def _wait_arguments(p):
    p.add_argument("--wait-timeout", type=_duration, metavar="D",
                   help="with --wait: give up after D (seconds, or 90s, 15m, 2h; exit %d)"
                   % EXIT_UNFINISHED)
    p.add_argument("--interval", type=_positive, metavar="SECONDS",
                   help="with --wait: seconds between looks at the board (default %g)"
                   % DEFAULT_RESULTS_INTERVAL)
    p.add_argument("--no-verify", action="store_true",
                   help="take the answers as submitted, without re-running "
                   "them (the checks that need no model still run)")


def _results_arguments(p):
    p.add_argument("batch", nargs="*", metavar="BATCH",
                   help="the batch file, or its name, or item IDs")
    p.add_argument("--ids", dest="ids_file", metavar="FILE",
                   help="the item IDs in FILE (- : stdin), the first "
                   "word of each line")
    p.add_argument("--name", metavar="NAME", help="the batch's name, when post --batch was given "
                   "one")
    p.add_argument("--wait", action="store_true", help="wait until every job is done by a worker")
    _wait_arguments(p)
    p.add_argument("--spot-check", type=_rate, metavar="RATE",
                   help="re-run only a share RATE (0.1 or 10%%) of "
                   "each worker's answers, at least one each, and all of a worker's once one is "
                   "refuted")
    p.add_argument("--accept", action="store_true",
                   help="accept the verified (wl accept --quality 5)")
    p.add_argument("--reject", action="store_true",
                   help="reject the refuted, with the cause (wl reject)")
    p.add_argument("--format", choices=("wl_infer", "openai"), default="wl_infer",
                   help="openai: OpenAI Batch API output lines, the verdict under \"wl_infer\"")
    p.add_argument("--as-completed", action="store_true",
                   help="write each line as soon as it is final, not in the batch's order")
    _policy_arguments(p)
    _no_push(p)


def _output_arguments(p):
    p.add_argument("ids", nargs="+", type=_item_id, metavar="ID", help=ID_HELP)
    p.add_argument("-z", "--null", action="store_true",
                   help="end each output with a NUL (default: one ID: "
                   "nothing added; several: a newline after each)")


def _logprobs(p):
    p.add_argument("--no-logprobs", action="store_true",
                   help="do not record logprobs in the evidence: asking for them slows generation "
                   "(about 15%% on a CPU test server); verifiers then cannot compare numerics "
                   "(--strict)")


def _run_arguments(p):
    p.add_argument("id", type=_item_id, metavar="ID", help=ID_HELP)
    p.add_argument("--skip-claim", action="store_true",
                   help="the item is already claimed (by you or a claimer)")
    _logprobs(p)
    _no_push(p)


def _verify_arguments(p):
    p.add_argument("ids", nargs="+", type=_item_id, metavar="ID", help=ID_HELP
                   + "; several: each in turn")
    _policy_arguments(p)


def _policy_arguments(p):
    p.add_argument("--strict", action="store_true",
                   help="same text with logprobs more than %g nats (or the tolerance) apart is a "
                   "MISMATCH"
                   % LOGPROB_TOLERANCE)
    p.add_argument("--tolerance", type=_nats, default=0.0, metavar="NATS",
                   help="accept the submitted token where the model's own choice was at most NATS "
                   "better (0.5 for mixed hardware; default 0: exact)")
    p.add_argument("--max-forced", type=_max_tokens, metavar="N",
                   help="with --tolerance: at most N such tokens (default %d)"
                   % DEFAULT_MAX_FORCED)
    p.add_argument("--sample", type=_count, metavar="K",
                   help="re-generate K windows of the output (the first, the last and K-2 at "
                   "random) instead of all of it: a fraction of the cost, VERIFIED with a stated "
                   "coverage, never exact")
    p.add_argument("--window", type=_count, metavar="L",
                   help="with --sample: tokens per window (default %d)"
                   % DEFAULT_WINDOW)
    p.add_argument("--sample-seed", type=_seed, metavar="S",
                   help="with --sample: draw the windows from seed S (default: a random one, "
                   "which the report gives), so that anyone can re-check the same windows")


def verify_policy(args):
    if args.max_forced is not None and not args.tolerance:
        raise UserError("--max-forced needs --tolerance: exact verification forces nothing")
    if (args.window is not None or args.sample_seed is not None) and not args.sample:
        raise UserError("--window and --sample-seed need --sample K")
    if args.sample and args.strict:
        raise UserError("--strict compares the logprobs of every token, so it cannot be sampled; "
                        "leave out one")
    if args.sample is not None and args.sample < 2:
        raise UserError("--sample needs at least 2 windows: the first and the last")
    sample = Sample(args.sample, args.window or DEFAULT_WINDOW,
                    args.sample_seed) if args.sample else None
    return Policy(args.strict, args.tolerance, DEFAULT_MAX_FORCED if args.max_forced is None
                  else args.max_forced,
                  sample)


def _status_arguments(p):
    p.add_argument("ids", nargs="+", type=_item_id, metavar="ID", help=ID_HELP
                   + "; several: each in turn")


def _list_arguments(p):
    p.add_argument("--status", choices=("open", "claimed", "in_review", "completed", "all"),
                   default="open",
                   help="which jobs (default open)")
    p.add_argument("--model", metavar="TAG", help="only jobs for this model")
    p.add_argument("--limit", type=_count, default=50, metavar="N",
                   help="at most N jobs (default 50)")


def _audit_arguments(p):
    p.add_argument("--model", metavar="TAG", help="only jobs for this model")
    p.add_argument("--limit", type=_count, default=50, metavar="N",
                   help="at most N items (default 50)")
    p.add_argument("--accept", action="store_true",
                   help="accept VERIFIED items (wl accept --quality 5)")
    p.add_argument("--reject", action="store_true",
                   help="reject MISMATCH items with the cause (wl reject)")
    _policy_arguments(p)
    _no_push(p)


def _work_arguments(p):
    p.add_argument("--models", type=_tags, metavar="TAG,...", help="only jobs for these models")
    p.add_argument("--once", action="store_true",
                   help="one poll: run what is eligible, then exit (for cron)")
    p.add_argument("--max-jobs", type=_count, metavar="N", help="exit after taking N jobs")
    p.add_argument("--interval", type=_positive, default=30.0, metavar="SECONDS",
                   help="seconds between polls when idle (default 30, with jitter)")
    p.add_argument("--max-tokens-cap", type=_count, default=4096, metavar="N",
                   help="skip jobs whose max_tokens is above N (default 4096)")
    p.add_argument("--allow-uncapped", action="store_true",
                   help="take jobs with max_tokens 0 (the model's default, no limit)")
    p.add_argument("--max-prompt-bytes", type=_count, default=32768, metavar="N",
                   help="skip jobs whose prompt is longer (default 32768)")
    _logprobs(p)
    _no_push(p)


def _spool_arguments(p):
    p.add_argument("--drop", type=_item_id, metavar="ID", help="delete the kept result for ID")


class Command(collections.namedtuple("Command", "name run help usage add_arguments examples")):
    """A command: its name, the function that runs it (ctx, args) -> Report,
    the one line saying what it does, its usage after the name, the
    function that adds its own options, and the examples its --help ends with."""

    __slots__ = ()


COMMANDS = [
    Command("post", cmd_post, "post an inference job, or a batch file of them, on the board",
            "--model TAG --prompt TEXT [--wait] [options] | --batch FILE [options]",
            _post_arguments, [
                'wl_infer.py post --prompt "What is 1+1?" --model llama3.2:1b --max-tokens 64',
                'echo "Summarise: ..." | wl_infer.py post --prompt - --model llama3.2:1b '
                '--max-tokens 256 --wait',
                "wl_infer.py post --batch prompts.jsonl --model llama3.2:1b --max-tokens 256",
            ]),
    Command("results", cmd_results, "collect a batch's answers, each checked: JSON lines on "
            "stdout",
            "BATCH | ID... | --ids FILE [options]", _results_arguments, [
                "wl_infer.py results prompts.jsonl --wait > answers.jsonl",
                "wl_infer.py results prompts.jsonl --spot-check 10% --accept --reject",
                "wl_infer.py results prompts.jsonl --format openai > output.jsonl",
            ]),
    Command("output", cmd_output, "print submitted outputs exactly as submitted (not re-run)",
            "ID... [options]", _output_arguments, [
                "wl_infer.py output w-3f9a > answer.txt",
                "wl_infer.py -q list --status in_review | xargs wl_infer.py output -z | xargs -0 "
                "-n1 echo",
            ]),
    Command("run", cmd_run, "claim a job, run it on the local Ollama, submit the result",
            "ID [options]", _run_arguments, [
                "wl_infer.py run w-3f9a",
                "wl_infer.py run w-3f9a --skip-claim      # claimed already, with `wl claim`",
            ]),
    Command("verify", cmd_verify, "check a completion and re-run its job: exit 0 VERIFIED, 1 "
            "MISMATCH",
            "ID... [options]", _verify_arguments, [
                "wl_infer.py verify w-3f9a",
                "wl_infer.py verify w-3f9a --tolerance 0.5   # the worker ran other hardware",
                "if wl_infer.py -q verify w-3f9a; then echo verified; fi",
            ]),
    Command("status", cmd_status, "show a job, its claim and its completion (no model needed)",
            "ID... [options]", _status_arguments, [
                "wl_infer.py status w-3f9a",
                "wl_infer.py -q status w-3f9a               # the status alone: open, claimed, "
                "in_review...",
                "wl_infer.py --json status w-3f9a | jq .completion.checks",
            ]),
    Command("list", cmd_list, "list inference jobs on the board (one wl browse)",
            "[options]", _list_arguments, [
                "wl_infer.py list",
                "wl_infer.py list --status in_review --model llama3.2:1b",
                "wl_infer.py -q list --status in_review | xargs -n1 wl_infer.py verify",
            ]),
    Command("audit", cmd_audit, "verify every completion in review; accept or reject them",
            "[options]", _audit_arguments, [
                "wl_infer.py audit --tolerance 0.5",
                "wl_infer.py audit --tolerance 0.5 --accept --reject",
            ]),
    Command("work", cmd_work, "take jobs for the local models and run them, until stopped (a "
            "worker)",
            "[options]", _work_arguments, [
                "wl_infer.py work",
                "wl_infer.py work --once --models llama3.2:1b   # one poll, from cron",
                "wl_infer.py work --ollama http://gpu1:11434 --ollama http://gpu2:11434",
            ]),
    Command("spool", cmd_spool, "list finished results kept on disk because wl did not take them",
            "[options]", _spool_arguments, [
                "wl_infer.py spool",
                "wl_infer.py run w-3f9a                     # submits the kept result, without "
                "generating",
                "wl_infer.py spool --drop w-3f9a",
            ]),
]
COMMAND_BY_NAME = {command.name: command for command in COMMANDS}
PROG = "wl_infer.py"  # in usage lines and in every command we suggest
SHARED_OPTIONS = ("options for every command, before or after its name (--wasteland, --local-db, "
                  "--wl,\n--ollama, --timeout, --wl-timeout, --json, -q): see `%s --help`" % PROG)


def command_list():
    """What a bare `wl_infer.py` prints: the commands, one line each."""
    width = max(len(c.name) for c in COMMANDS)
    return "\n".join(["usage: %s [options] COMMAND [options]" % PROG,
                      "Verifiable LLM inference jobs on the Wasteland wanted board.", "",
                      "commands:"]
                     + ["  %s  %s" % (c.name.ljust(width), c.help) for c in COMMANDS]
                     + ["", "`%s COMMAND --help` shows a command's options and examples." % PROG])


def build_parser():
    """The parser of every command (plain argparse)."""
    class Parser(argparse.ArgumentParser):
        def __init__(self, **kwargs):  # examples keep their lines
            super(Parser, self).__init__(formatter_class=argparse.RawDescriptionHelpFormatter,
                                         **kwargs)

        def error(self, message):  # one line, our prefix, exit 2 (see main)
            option = re.match(r"argument (--[\w-]+)(?:/[-\w]+)?: expected one argument$", message)
            if option:  # argparse takes a value starting with - for an option
                message += "; for a value that starts with -, write %s=VALUE" % option.group(1)
            raise UserError("%s (see `%s --help`)" % (message, self.prog))

    def shared(p, shown=True):
        """The options every command takes, accepted before and after the
        command name: SUPPRESS defaults, filled in by parse_args. Only the
        top-level help lists them (`shown`); a command's points to it."""
        g = p.add_argument_group("options for every command")

        def said(text):
            return text if shown else argparse.SUPPRESS

        g.add_argument("--wasteland", metavar="ORG/DB", default=argparse.SUPPRESS,
                       help=said("wasteland to use (passed to every wl call)"))
        g.add_argument("--local-db", action="store_true", default=argparse.SUPPRESS,
                       help=said("use wl's local Dolt clone (passed to wl)"))
        g.add_argument("--wl", metavar="PATH", default=argparse.SUPPRESS,
                       help=said("wl executable (default: $WL_BIN, else wl on PATH)"))
        g.add_argument("--ollama", metavar="URL", action="append", default=argparse.SUPPRESS,
                       help=said("Ollama server (default: $OLLAMA_HOST, else %s); `work` and "
                                 "`results` take several (repeat it, or a comma-separated "
                                 "OLLAMA_HOST)" % DEFAULT_OLLAMA))
        g.add_argument("--timeout", type=_positive, metavar="SECONDS", default=argparse.SUPPRESS,
                       help=said("Ollama inactivity timeout: no byte for this long (default 300); "
                                 "a long generation is never cut for being long"))
        g.add_argument("--wl-timeout", type=_positive, metavar="SECONDS",
                       default=argparse.SUPPRESS,
                       help=said("limit for one wl call (default %g)" % DEFAULT_WL_TIMEOUT))
        g.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help=said("print one JSON document on stdout (wins over -q)"))
        g.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help=said("stdout: only what a pipeline needs (post: the ID, list: IDs, "
                                 "status: the status, output and results: theirs; others "
                                 "nothing); stderr: only warnings and errors"))

    parser = Parser(prog=PROG, usage="%(prog)s [options] COMMAND [options]",
                    description="Verifiable LLM inference jobs on the Wasteland wanted board.",
                    epilog="Exit codes: 0 success/VERIFIED, 1 MISMATCH, 2 error, 3 jobs not done "
                    "yet (results, post "
                           "--wait), 130 interrupted.\n`%s COMMAND --help` shows a command's "
                    "options and examples." % PROG)
    parser.add_argument("--version", action="version", version="wl_infer " + __version__)
    shared(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    for command in COMMANDS:
        examples = "\n".join("  " + e for e in command.examples)
        p = sub.add_parser(command.name, prog=PROG + " " + command.name, usage="%(prog)s "
                           + command.usage,
                           help=command.help, description=command.help[0].upper()
                           + command.help[1:] + ".",
                           epilog="%s\n\nexamples:\n%s" % (SHARED_OPTIONS, examples))
        # its own options; the shared ones are taken, and listed by the top help
        command.add_arguments(p)
        shared(p, shown=False)
    return parser


def parse_args(argv):
    """The options given, with every Settings field set (those not given,
    or that the command has not, from default_settings)."""
    args = build_parser().parse_args(argv)
    given = dict((name, getattr(args, name)) for name in Settings._fields if hasattr(args, name))
    if hasattr(args, "ollama"):  # --ollama, repeated
        given["ollama_urls"] = args.ollama
    for name, value in default_settings(**given)._asdict().items():
        setattr(args, name, value)
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
    # UTF-8 as is; on any other stdout encoding, \u escapes (still valid JSON,
    # where the stream's backslashreplace fallback would corrupt it)
    utf8 = (getattr(sys.stdout, "encoding", "") or "").lower().replace("-", "") == "utf8"
    return json.dumps(doc, ensure_ascii=not utf8, indent=2) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # never die on a non-UTF-8 terminal
            stream.reconfigure(errors="backslashreplace")
    want_json = "--json" in argv
    if not argv:  # what a newcomer types first: the commands, not an error about one missing
        _emit(sys.stderr, command_list() + "\n")
        return EXIT_ERROR
    try:
        args = parse_args(argv)
        working = args.command == "work"
        # a worker: the first signal lets the job in flight finish
        signals = Signals(graceful=working)
        signals.install()
        ctx = Context(settings_of(args), signals, threaded=working)
        try:
            report = COMMAND_BY_NAME[args.command].run(ctx, args)
        finally:
            ctx.status_line.clear()  # what follows goes on a line of its own
    except UserError as exc:
        if want_json:
            _emit(sys.stdout, _json_text(dict({"error": str(exc)}, **exc.details)))
        _emit(sys.stderr, "".join("wl_infer: error: %s\n" % printable(line) for line in exc.lines
                                  + [str(exc)]))
        return EXIT_ERROR
    except Interrupted as exc:
        _say_now("interrupted; %s" % printable(str(exc)))
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        _say_now("interrupted")
        return EXIT_INTERRUPTED
    print_report(report, args)
    return report.code


def print_report(report, args):
    if args.json:
        _emit(sys.stdout, "".join(_json_text(doc) for doc in report.docs)
              if report.docs is not None
              else _json_text(report.doc))
    elif report.raw is not None:
        _emit(sys.stdout, report.raw if not sys.stdout.isatty() else printable(report.raw))
    else:
        lines = report.quiet if args.quiet else report.text
        if lines:
            _emit(sys.stdout, "\n".join(lines) + "\n")
    if report.errors:
        _emit(sys.stderr, "".join("wl_infer: error: %s\n" % printable(e) for e in report.errors))
    if report.notes and not args.quiet and not args.json:  # the JSON document says it all
        _emit(sys.stderr, "\n".join(printable(n) for n in report.notes) + "\n")


if __name__ == "__main__":
    sys.exit(main())
