"""Fault-injection benchmark of `peft-merge-ext merge`: kills, full disks, read-only folders, races and Hub failures.

One command, everything built locally (no downloads), in a temporary folder removed at the end:

    python benchmarks/faults.py               # >= 50 kills and every other scenario (about 8-10 minutes on 2 cores)
    python benchmarks/faults.py --quick       # a few runs of each scenario (under about 2 minutes)
    python benchmarks/faults.py --runs 120    # the number of kills (default 54, --quick 6)

Inputs: a Llama-shaped base checkpoint (hidden 1024, 8 layers, random init, bf16, about 300 MB saved by
`save_pretrained(max_shard_size="100MB")`) and two rank-16 LoRA adapters made with `peft.get_peft_model(...,
LoraConfig(init_lora_weights=False))`. Two reference merges are made once up front with the CLI: P (both adapters,
summed) and Q (adapter a alone); every later output is compared tensor by tensor with them.

Scenarios (each run of the CLI is a subprocess: `peft-merge-ext merge ... --quiet --max-shard-size 100MB`):

1. kills: a merge onto a new output, or with `--overwrite` onto an earlier output holding the other reference, is sent
   SIGINT, SIGTERM or SIGKILL at a random moment (seeded; half spread over the whole measured run, half over its
   writing phase). Then: the output is absent or a complete earlier/new result (marker, manifest and nothing else,
   config.json and README.md present, every safetensors file loads, tensors equal to the reference), the inputs are
   unchanged (sha256 of every file), and the same command run again (with `--overwrite` if the output now exists)
   exits 0, gives the new result and leaves no `.tmp-*`, `.old-*` or `.lock` next to the output.
2. write failures: RLIMIT_FSIZE lowered (SIGXFSZ ignored), and a real full disk (a small tmpfs mounted in the work
   folder as the output's file system: 0 bytes free, or room for part of the output; skipped if `mount` fails): exit
   2, one `peft-merge-ext: error:` line on stderr naming where, no output (or the earlier one, untouched, with
   `--overwrite`), nothing left next to it right after the failed run.
3. read-only location: the output's parent made immutable (`chattr +i`; skipped if that fails): exit 2, one line on
   stderr, nothing created, an earlier output there untouched, no lock or temporary folder ever seen.
4. concurrency: two identical merges onto the same `--out` started together: one exits 0, the other exits 2 at once
   (before the first ends) naming the first's PID; the output is one complete result.
5. Hub: the fake Hub of `tests/hub_server.py` on 127.0.0.1 (`HF_ENDPOINT`, `HF_HUB_DISABLE_XET=1`). `merge --push`
   with a 500 on the commit: exit 1, one line on stderr with the retry command, the folder kept; a foreign file is
   planted in it and the printed command is run: exit 0 and the repository holds exactly the manifest's files. An
   invalid token: exit 1 before merging (no temporary folder ever created, no output). A normal push: exact files.

The markdown table (scenario | runs | outputs half-written | inputs lost | foreign files uploaded | leftovers after
next run | wrong exit codes | other failed checks) is printed and, for a full run, written to
`benchmarks/results/faults.md` (`--results PATH` to choose, also for `--quick`). The exit code is 1 when any column
but `runs` is not 0; every failed check is listed below the table with its command and kill point. In the rows of
scenarios 2-5, which need no repair run, "leftovers after next run" counts what is left right after the run.

The work folder goes to /dev/shm when it has room (a full run writes ~40 GB: kept off the shared disk), else to the
system temp folder; `--tmpdir` chooses, `--keep` keeps it for inspection.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
MARKER = ".peft-merge-ext.json"
MANIFEST = ".peft-merge-ext-files.json"
TARGETS_A = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS_B = ["q_proj", "v_proj", "up_proj", "down_proj"]
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}
COLUMNS = [
    "outputs half-written",
    "inputs lost",
    "foreign files uploaded",
    "leftovers after next run",
    "wrong exit codes",
    "other failed checks",
]


# ----------------------------------------------------------------------------------------------------------------
# Bookkeeping


@dataclass
class Row:
    scenario: str
    runs: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COLUMNS, 0))
    skipped: str = ""


@dataclass
class Failure:
    scenario: str
    column: str
    detail: str
    command: str = ""
    kill: str = ""


class Report:
    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}
        self.failures: list[Failure] = []
        self.notes: list[str] = []

    def row(self, scenario: str) -> Row:
        return self.rows.setdefault(scenario, Row(scenario))

    def fail(self, scenario: str, column: str, detail: str, command: str = "", kill: str = "", amount: int = 1):
        self.row(scenario).counts[column] += amount
        self.failures.append(Failure(scenario, column, detail, command, kill))
        print(f"    FAIL [{column}] {detail}" + (f" (kill: {kill})" if kill else ""), flush=True)

    def total(self) -> Row:
        total = Row("**total**")
        for row in self.rows.values():
            total.runs += row.runs
            for column in COLUMNS:
                total.counts[column] += row.counts[column]
        return total

    def table(self) -> str:
        header = "| scenario | runs | " + " | ".join(COLUMNS) + " |"
        lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
        for row in [*self.rows.values(), self.total()]:
            if row.skipped:
                lines.append(f"| {row.scenario} | skipped: {row.skipped} |" + " |" * len(COLUMNS))
                continue
            cells = " | ".join(str(row.counts[column]) for column in COLUMNS)
            lines.append(f"| {row.scenario} | {row.runs} | {cells} |")
        return "\n".join(lines)

    def bad(self) -> int:
        return sum(self.total().counts.values())


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def build_inputs(work: Path, layers: int, seed: int) -> dict[str, Any]:
    """The base checkpoint (random init, bf16, 100 MB shards) and two LoRA adapters, saved the usual way."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    base, adapter_a, adapter_b = work / "base", work / "adapter-a", work / "adapter-b"
    config = LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(base, max_shard_size="100MB")
    for folder, adapter_seed, targets in ((adapter_a, seed + 1, TARGETS_A), (adapter_b, seed + 2, TARGETS_B)):
        torch.manual_seed(adapter_seed)
        lora = LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False)
        peft_model = get_peft_model(model, lora)
        peft_model.save_pretrained(folder)
        model = peft_model.unload()
    del model, peft_model
    shards = sorted(base.glob("*.safetensors"))
    return {
        "base": base,
        "adapters": (adapter_a, adapter_b),
        "parameters": parameters,
        "base_bytes": sum(p.stat().st_size for p in base.iterdir()),
        "shards": len(shards),
        "layers": layers,
        "adapter_bytes": sum(p.stat().st_size for f in (adapter_a, adapter_b) for p in f.iterdir()),
    }


def sha256_tree(folders: list[Path]) -> dict[str, str]:
    digests = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                with open(path, "rb") as handle:
                    digests[str(path)] = hashlib.file_digest(handle, "sha256").hexdigest()
            else:
                digests[str(path)] = "<dir>"
    return digests


# ----------------------------------------------------------------------------------------------------------------
# Outputs


class Reference:
    """A reference merge: its tensors in memory and its config, to compare outputs against."""

    def __init__(self, label: str, folder: Path) -> None:
        from safetensors.torch import load_file

        self.label, self.folder = label, folder
        self.tensors: dict[str, Any] = {}
        for shard in sorted(folder.glob("*.safetensors")):
            self.tensors.update(load_file(str(shard)))
        self.config = json.loads((folder / "config.json").read_text())
        self.files = json.loads((folder / MANIFEST).read_text())["files"]
        self.probe = next(name for name in sorted(self.tensors) if "q_proj" in name)


def check_result(folder: Path, allowed: list[Reference], extra_ok: set[str] = frozenset()) -> tuple[str, str]:
    """`("absent", "")`, `("complete", label)` or `("broken", why)` for an output folder."""
    import torch
    from safetensors import safe_open

    if not os.path.lexists(folder):
        return "absent", ""
    if folder.is_symlink() or not folder.is_dir():
        return "broken", "not a folder"
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    try:
        marker = json.loads((folder / MARKER).read_text())
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as error:
        return "broken", f"marker or manifest missing or invalid ({type(error).__name__}); files: {sorted(names)}"
    if marker.get("package") != "peft-merge-ext":
        return "broken", f"marker does not name peft-merge-ext: {marker}"
    expected = set(files) | {MARKER, MANIFEST}
    if names - extra_ok != expected:
        return "broken", f"files {sorted(names - extra_ok)} != manifest + marker {sorted(expected)}"
    for needed in ("config.json", "README.md"):
        if needed not in names:
            return "broken", f"{needed} missing"
    try:
        config = json.loads((folder / "config.json").read_text())
    except ValueError as error:
        return "broken", f"config.json does not parse: {error}"
    tensors: dict[str, tuple[Path, Any]] = {}
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        return "broken", "no safetensors file"
    handles = []
    try:
        for shard in shards:
            try:
                handle = safe_open(str(shard), framework="pt")
            except Exception as error:  # any load failure is the finding
                return "broken", f"{shard.name} does not load: {type(error).__name__}: {error}"
            handles.append(handle)
            for key in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                tensors[key] = (shard, handle)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            if set(weight_map) != set(tensors) or any(tensors[k][0].name != v for k, v in weight_map.items()):
                return "broken", "model.safetensors.index.json does not match the shards"
        candidates = []
        for reference in allowed:
            if set(reference.tensors) != set(tensors) or config != reference.config:
                continue
            probe = tensors[reference.probe][1].get_tensor(reference.probe)
            if torch.equal(probe, reference.tensors[reference.probe]):
                candidates.append(reference)
        if not candidates:
            return "broken", f"tensors/config match none of {[r.label for r in allowed]}"
        reference = candidates[0]
        for key, (shard, handle) in tensors.items():
            try:
                tensor = handle.get_tensor(key)
            except Exception as error:
                return "broken", f"{shard.name}: {key} does not load: {type(error).__name__}: {error}"
            expected_tensor = reference.tensors[key]
            if tensor.dtype != expected_tensor.dtype or not torch.equal(tensor, expected_tensor):
                return "broken", f"{key} differs from reference {reference.label}"
    finally:
        del handles
    return "complete", reference.label


def leftovers(out: Path) -> list[str]:
    """The temporary, replaced and lock entries of `out` in its parent folder."""
    prefix = f".{out.name}."
    try:
        entries = os.listdir(out.parent)
    except FileNotFoundError:
        return []
    return sorted(
        name
        for name in entries
        if name.startswith(prefix)
        and (name.startswith(prefix + "tmp-") or name.startswith(prefix + "old-") or name == prefix + "lock")
    )


# ----------------------------------------------------------------------------------------------------------------
# Running the CLI


@dataclass
class Run:
    command: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    first_tmp: float | None = None  # when its `.tmp-<pid>-*` folder was first seen
    phase: str = ""  # at the kill: startup, locked, write, swap, after-swap, finished
    pid: int = 0


def cli() -> list[str]:
    script = Path(sys.executable).parent / "peft-merge-ext"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from peft_merge_ext.cli import main; sys.exit(main())"]


class Runner:
    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.work, self.env = work, env
        self.logs = work / "logs"
        self.logs.mkdir()
        self.count = 0
        self.live: set[subprocess.Popen] = set()

    def stop_all(self) -> None:
        for process in list(self.live):
            if process.poll() is None:
                process.kill()
                process.wait()
        self.live.clear()

    def command(self, base: Path, adapters: list[Path], out: Path, *extra: str) -> list[str]:
        command = [*cli(), "merge", "--base", str(base)]
        for adapter in adapters:
            command += ["--adapter", str(adapter)]
        return [*command, "--out", str(out), "--quiet", "--max-shard-size", "100MB", *extra]

    def start(self, command: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path, Path]:
        self.count += 1
        stdout, stderr = self.logs / f"{self.count}.out", self.logs / f"{self.count}.err"
        with open(stdout, "wb") as out_file, open(stderr, "wb") as err_file:
            process = subprocess.Popen(
                command,
                stdout=out_file,
                stderr=err_file,
                stdin=subprocess.DEVNULL,
                env=env or self.env,
                cwd=self.work,
                start_new_session=True,
            )
        self.live = {p for p in self.live if p.poll() is None}
        self.live.add(process)
        return process, stdout, stderr

    def watch(
        self,
        command: list[str],
        out: Path,
        *,
        kill_after: float | None = None,
        signum: int | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 300,
    ) -> Run:
        """Run `command`, watching `out`'s parent every few ms; with `kill_after`, send `signum` at that moment."""
        process, stdout, stderr = self.start(command, env)
        started = time.monotonic()
        tmp_prefix, old_prefix = f".{out.name}.tmp-{process.pid}-", f".{out.name}.old-{process.pid}-"
        lock = f".{out.name}.lock"
        first_tmp = None
        seen_lock = seen_tmp = False
        phase = ""

        def look() -> str:
            nonlocal first_tmp, seen_lock, seen_tmp
            try:
                names = os.listdir(out.parent)
            except FileNotFoundError:
                names = []
            tmp = any(n.startswith(tmp_prefix) for n in names)
            old = any(n.startswith(old_prefix) for n in names)
            locked = lock in names
            if tmp and first_tmp is None:
                first_tmp = time.monotonic() - started
            seen_tmp |= tmp
            seen_lock |= locked
            if old:
                return "swap"
            if tmp:
                return "write"
            if locked and not seen_tmp:
                return "locked"
            if seen_tmp:
                return "after-swap"
            return "startup"

        while process.poll() is None:
            elapsed = time.monotonic() - started
            current = look()
            if kill_after is not None and elapsed >= kill_after:
                phase = current
                process.send_signal(signum)
                break
            if elapsed > timeout:
                process.kill()
                phase = "timeout"
                break
            time.sleep(0.004)
        if kill_after is not None and not phase:
            phase = "finished"
        try:
            returncode = process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            returncode = process.wait()
            phase += "+hung"
        seconds = time.monotonic() - started
        return Run(
            command,
            returncode,
            stdout.read_text(errors="replace"),
            stderr.read_text(errors="replace"),
            seconds,
            first_tmp,
            phase,
            process.pid,
        )


def shown(command: list[str], work: Path) -> str:
    text = shlex.join(command)
    return text.replace(str(work), "$W").replace(cli()[0], "peft-merge-ext")


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------------------
# Scenarios


class Bench:
    def check_failure(
        self, scenario: str, returncode: int, stderr: str, expected: int, shown_command: str, label: str = ""
    ) -> list[str]:
        """Count a wrong exit code, and stderr other than one `peft-merge-ext: ...` line; returns the lines."""
        lines = stderr_lines(stderr)
        where = f"{label}: " if label else ""
        if returncode != expected:
            detail = f"{where}exit {returncode}, expected {expected}; last stderr lines: {lines[-2:]}"
            self.report.fail(scenario, "wrong exit codes", detail, shown_command)
        if len(lines) != 1 or not lines[0].startswith("peft-merge-ext:"):
            detail = f"{where}{len(lines)} stderr lines, expected one 'peft-merge-ext: ...' line: {lines[-3:]}"
            self.report.fail(scenario, "other failed checks", detail, shown_command)
        return lines

    def check_complete(self, scenario: str, out: Path, shown_command: str, label: str) -> str:
        """Count an output that is not the complete reference result, and leftovers next to it; returns its state."""
        state, what = check_result(out, [self.refs["P"]])
        if state != "complete":
            self.report.fail(scenario, "outputs half-written", f"{label} {state} {what}", shown_command)
        found = leftovers(out)
        if found:
            self.report.fail(scenario, "leftovers after next run", f"{found}", shown_command, amount=len(found))
        return state

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.rng = random.Random(args.seed)
        self.report = Report()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
        env.update(
            PYTHONDONTWRITEBYTECODE="1",
            HF_HOME=str(work / "hf_home"),
            HF_HUB_OFFLINE="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            TRANSFORMERS_VERBOSITY="error",
            TOKENIZERS_PARALLELISM="false",
        )
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        self.env = env
        (work / "hf_home").mkdir()
        self.runner = Runner(work, env)
        self.clock = time.perf_counter()
        self.durations: dict[str, list[float]] = {"new": [], "overwrite": []}
        self.first_tmp: dict[str, list[float]] = {"new": [], "overwrite": []}

    # -- helpers ---------------------------------------------------------------------------------------------------
    def stamp(self) -> str:
        return f"[at {time.perf_counter() - self.clock:.0f} s]"

    def merge_command(self, target: str, out: Path, *extra: str) -> list[str]:
        adapters = list(self.inputs["adapters"]) if target == "P" else [self.inputs["adapters"][0]]
        return self.runner.command(self.inputs["base"], adapters, out, *extra)

    def check_inputs(self, scenario: str, command: list[str], kill: str = "") -> None:
        now = sha256_tree(self.input_folders)
        if now != self.input_digests:
            changed = sorted(k for k in set(now) | set(self.input_digests) if now.get(k) != self.input_digests.get(k))
            self.report.fail(
                scenario, "inputs lost", f"input files changed: {changed[:5]}", shown(command, self.work), kill
            )
            self.input_digests = now  # report each change once

    def normal(self, target: str, out: Path, mode: str, *extra: str) -> Run:
        run = self.runner.watch(self.merge_command(target, out, *extra), out)
        if run.returncode == 0:
            self.durations[mode].append(run.seconds)
            if run.first_tmp is not None:
                self.first_tmp[mode].append(run.first_tmp)
        return run

    def typical(self, mode: str) -> tuple[float, float]:
        """Median duration and median moment the temporary folder appears, over the last normal runs."""
        durations = self.durations[mode][-7:] or self.durations["new"][-7:]
        firsts = self.first_tmp[mode][-7:] or self.first_tmp["new"][-7:]
        duration = statistics.median(durations)
        first = statistics.median(firsts) if firsts else duration / 2
        return duration, min(first, duration)

    # -- setup -----------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        started = time.perf_counter()
        print("Building the base checkpoint and two adapters ...", flush=True)
        self.inputs = build_inputs(self.work, self.args.layers, self.args.seed)
        self.input_folders = [self.inputs["base"], *self.inputs["adapters"]]
        self.input_digests = sha256_tree(self.input_folders)
        print(
            f"  base: {self.inputs['parameters'] / 1e6:.0f} M parameters, bf16, "
            f"{self.inputs['base_bytes'] / 1e6:.0f} MB in {self.inputs['shards']} shards; adapters "
            f"{self.inputs['adapter_bytes'] / 1e6:.1f} MB ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        refs = self.work / "refs"
        refs.mkdir()
        self.refs: dict[str, Reference] = {}
        for label in ("P", "Q"):
            run = self.normal(label, refs / label, "new")
            if run.returncode != 0:
                raise SystemExit(f"The reference merge {label} failed:\n{run.stderr}")
            self.refs[label] = Reference(label, refs / label)
        self.output_bytes = sum(p.stat().st_size for p in (refs / "P").iterdir())
        self.largest_shard = max(p.stat().st_size for p in (refs / "P").glob("*.safetensors"))
        # One --overwrite run, to measure that kind of run too.
        scratch = self.work / "scratch"
        scratch.mkdir()
        shutil.copytree(refs / "P", scratch / "out")
        run = self.normal("Q", scratch / "out", "overwrite", "--overwrite")
        if run.returncode != 0:
            raise SystemExit(f"The --overwrite merge failed:\n{run.stderr}")
        shutil.rmtree(scratch)
        new, new_tmp = self.typical("new")
        over, over_tmp = self.typical("overwrite")
        print(
            f"  one merge: {new:.1f} s (writing from {new_tmp:.1f} s); with --overwrite: {over:.1f} s "
            f"(writing from {over_tmp:.1f} s); output {self.output_bytes / 1e6:.0f} MB",
            flush=True,
        )

    # -- 1. kills --------------------------------------------------------------------------------------------------
    def kills(self, count: int) -> None:
        print(f"\n1. {count} kills {self.stamp()}", flush=True)
        folder = self.work / "kill"
        folder.mkdir()
        out = folder / "out"
        current: str | None = None  # the reference `out` holds now
        combos = [(mode, sig) for mode in ("new", "overwrite") for sig in SIGNALS]
        plan: list[tuple[str, str]] = []
        while len(plan) < count:
            block = combos[:]
            self.rng.shuffle(block)
            plan += block
        self.phases: dict[str, int] = {}
        self.kill_leftovers_before = 0
        for index, (mode, sig_name) in enumerate(plan[:count]):
            scenario = f"kill {sig_name}, {'new output' if mode == 'new' else '--overwrite earlier output'}"
            row = self.report.row(scenario)
            row.runs += 1
            # Prepare: a new output needs no folder; --overwrite needs the other reference in place.
            if mode == "new":
                if out.exists():
                    shutil.rmtree(out)
                target, earlier, extra = "P" if index % 2 else "Q", None, ()
            else:
                if current is None:
                    run = self.normal("P", out, "new", *(("--overwrite",) if out.exists() else ()))
                    if run.returncode != 0 or check_result(out, [self.refs["P"]])[0] != "complete":
                        raise SystemExit(f"Could not prepare an earlier output:\n{run.stderr}")
                    current = "P"
                earlier = current
                target, extra = ("Q" if current == "P" else "P"), ("--overwrite",)
            duration, first_tmp = self.typical(mode)
            if self.rng.random() < 0.5:  # anywhere in the run
                delay = self.rng.uniform(0.0, duration * 0.98)
            else:  # while it writes
                delay = self.rng.uniform(first_tmp, duration * 0.98)
            command = self.merge_command(target, out, *extra)
            run = self.runner.watch(command, out, kill_after=delay, signum=SIGNALS[sig_name])
            self.phases[run.phase] = self.phases.get(run.phase, 0) + 1
            kill = f"{sig_name} at {delay:.2f} s ({run.phase}), exit {run.returncode}"
            shown_command = shown(command, self.work)
            allowed_codes = {0, 130, -SIGNALS[sig_name]}
            if run.returncode not in allowed_codes or "hung" in run.phase:
                self.report.fail(
                    scenario,
                    "wrong exit codes",
                    f"killed run exited {run.returncode} (expected one of "
                    f"{sorted(allowed_codes)}); stderr tail: {run.stderr.strip()[-300:]!r}",
                    shown_command,
                    kill,
                )
            allowed = [self.refs[target]] + ([self.refs[earlier]] if earlier else [])
            state, what = check_result(out, allowed)
            if state == "broken":
                self.report.fail(scenario, "outputs half-written", f"after the kill: {what}", shown_command, kill)
            elif state == "absent" and mode == "overwrite":
                self.report.notes.append(f"{scenario}: earlier output absent right after the kill ({kill}).")
            if run.returncode == 0 and state != "complete":
                self.report.fail(scenario, "outputs half-written", "exit 0, no complete output", shown_command, kill)
            self.check_inputs(scenario, command, kill)
            before = leftovers(out)
            self.kill_leftovers_before += len(before)
            strays = sorted(set(os.listdir(folder)) - {"out", *before})
            if strays:
                self.report.fail(scenario, "other failed checks", f"unexpected entries {strays}", shown_command, kill)
                for name in strays:
                    path = folder / name
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            # The same command again (with --overwrite if the killed run left a result).
            again = extra if (not out.exists() or extra) else ("--overwrite",)
            next_run = self.normal(target, out, mode, *again)
            next_command = shown(next_run.command, self.work)
            if next_run.returncode != 0:
                self.report.fail(
                    scenario,
                    "wrong exit codes",
                    f"next run exited {next_run.returncode}: {next_run.stderr.strip()[-300:]!r}",
                    next_command,
                    kill,
                )
            next_state, what = check_result(out, [self.refs[target]])
            if next_state != "complete":
                self.report.fail(
                    scenario, "outputs half-written", f"after the next run: {next_state} {what}", next_command, kill
                )
                current = None
            else:
                current = target
            after = leftovers(out)
            if after:
                self.report.fail(
                    scenario,
                    "leftovers after next run",
                    f"{after} (before the next run: {before})",
                    next_command,
                    kill,
                    amount=len(after),
                )
                for name in after:
                    path = folder / name
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            print(
                f"  {index + 1:3d}/{count} {scenario:40s} {kill:40s} -> {state:8s} leftovers {len(before)}; "
                f"next run: exit {next_run.returncode}, {next_state}, leftovers {len(after)}",
                flush=True,
            )
        if out.exists():
            shutil.rmtree(out)

    # -- 2. file too large -----------------------------------------------------------------------------------------
    def file_too_large(self, limits: list[tuple[str, int, bool]]) -> None:
        scenario = "file too large (RLIMIT_FSIZE)"
        print(f"\n2a. {scenario} {self.stamp()}", flush=True)
        self.report.row(scenario)
        folder = self.work / "fsize"
        folder.mkdir()
        out = folder / "out"
        for label, limit, overwrite in limits:
            if out.exists():
                shutil.rmtree(out)
            if overwrite:
                shutil.copytree(self.refs["P"].folder, out)

            def limited(limit: int = limit) -> None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

            self._failed_write(scenario, label, out, overwrite, limited, f"ulimit -f {limit // 1024}  # {limit} B")
        shutil.rmtree(folder)

    def disk_full(self, variants: list[tuple[str, float, bool]]) -> None:
        """A small tmpfs mounted in the work folder as the output's file system: real ENOSPC."""
        scenario = "disk full (ENOSPC, small tmpfs)"
        print(f"\n2b. {scenario} {self.stamp()}", flush=True)
        row = self.report.row(scenario)
        mount = self.work / "full"
        mount.mkdir()
        out = mount / "out"
        for label, room, overwrite in variants:
            size = int(self.output_bytes * room) + (self.output_bytes if overwrite else 0)
            size = max(size, 64 * 1024)
            mounted = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True, text=True
            )
            if mounted.returncode != 0:
                row.skipped = f"mount -t tmpfs failed ({mounted.stderr.strip()[:80]})"
                print(f"  skipped: {row.skipped}", flush=True)
                break
            try:
                if overwrite:
                    shutil.copytree(self.refs["P"].folder, out)
                if room == 0:  # fill it: creating a file still works, writing a byte does not
                    with contextlib.suppress(OSError), open(mount / "filler", "wb") as filler:
                        while True:
                            filler.write(b"\0" * 65536)
                            filler.flush()
                    with contextlib.suppress(OSError), open(mount / "filler", "ab") as filler:
                        while True:
                            filler.write(b"\0")
                            filler.flush()
                setup = f"mount -t tmpfs -o size={size} tmpfs $W/full" + (
                    "; fill it up (dd if=/dev/zero of=$W/full/filler)" if room == 0 else ""
                )
                self._failed_write(scenario, label, out, overwrite, None, setup, keep={"filler"})
            finally:
                subprocess.run(["umount", str(mount)], capture_output=True)
        shutil.rmtree(mount, ignore_errors=True)

    def _failed_write(
        self,
        scenario: str,
        label: str,
        out: Path,
        overwrite: bool,
        preexec: Any,
        setup: str,
        keep: set[str] = frozenset(),
    ) -> None:
        """Run a merge (target Q; with --overwrite over P) that must fail writing: exit 2, one error line naming
        where, no output (or the earlier one untouched), nothing left next to it."""
        self.report.row(scenario).runs += 1
        extra = ("--overwrite",) if overwrite else ()
        command = self.merge_command("Q", out, *extra)
        started = time.monotonic()
        # Pipes, not files: RLIMIT_FSIZE would also cut the child's stderr file.
        completed = subprocess.run(
            command, capture_output=True, text=True, env=self.env, cwd=self.work, preexec_fn=preexec, timeout=300
        )
        seconds = time.monotonic() - started
        shown_command = f"{setup}; {shown(command, self.work)}"
        lines = self.check_failure(scenario, completed.returncode, completed.stderr, 2, shown_command, label)
        last = lines[-1] if lines else ""
        if len(lines) == 1 and str(out.parent) not in last:
            self.report.fail(
                scenario,
                "other failed checks",
                f"{label}: the error names no file or folder of the output, nor a fix: {last!r}",
                shown_command,
            )
        state, what = check_result(out, [self.refs["P"]] if overwrite else [])
        expected_state = "complete" if overwrite else "absent"
        if state != expected_state:
            self.report.fail(
                scenario,
                "outputs half-written",
                f"{label}: output {state} {what} (expected {expected_state})",
                shown_command,
            )
        found = leftovers(out)
        strays = sorted(set(os.listdir(out.parent)) - {out.name, *found, *keep})
        if found or strays:
            self.report.fail(
                scenario,
                "leftovers after next run",
                f"{label}: left next to the output right after the failed run: {found + strays}",
                shown_command,
                amount=len(found) + len(strays),
            )
            for name in found + strays:
                path = out.parent / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        self.check_inputs(scenario, command)
        print(
            f"  {label:40s} exit {completed.returncode:3d} in {seconds:4.1f} s, output {state}, leftovers "
            f"{found + strays}, {len(lines)} stderr line(s): {last[:100]}",
            flush=True,
        )

    # -- 3. read-only location -------------------------------------------------------------------------------------
    def read_only(self, variants: list[str]) -> None:
        scenario = "read-only location (chattr +i)"
        print(f"\n3. {scenario} {self.stamp()}", flush=True)
        row = self.report.row(scenario)
        folder = self.work / "ro"
        folder.mkdir()
        shutil.copytree(self.refs["P"].folder, folder / "earlier")
        try:
            subprocess.run(["chattr", "+i", str(folder)], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as error:
            row.skipped = f"chattr +i failed ({getattr(error, 'stderr', b'') or error!s})".strip()
            print(f"  skipped: {row.skipped}", flush=True)
            shutil.rmtree(folder)
            return
        try:
            snapshot = sha256_tree([folder])
            work_before = set(os.listdir(self.work))
            whole, _ = self.typical("new")
            for variant in variants:
                row.runs += 1
                if variant == "new":
                    out, extra = folder / "out", ()
                elif variant == "nested":
                    out, extra = folder / "sub" / "out", ()
                else:
                    out, extra = folder / "earlier", ("--overwrite",)
                command = self.merge_command("Q", out, *extra)
                run = self.runner.watch(command, out)
                shown_command = f"chattr +i $W/ro; {shown(command, self.work)}"
                lines = self.check_failure(scenario, run.returncode, run.stderr, 2, shown_command, variant)
                if run.first_tmp is not None:
                    self.report.fail(
                        scenario, "other failed checks", f"{variant}: a temporary folder appeared", shown_command
                    )
                if sha256_tree([folder]) != snapshot or set(os.listdir(self.work)) != work_before:
                    self.report.fail(
                        scenario,
                        "outputs half-written",
                        f"{variant}: something was created or changed",
                        shown_command,
                    )
                self.check_inputs(scenario, command)
                print(
                    f"  {variant:10s} exit {run.returncode} in {run.seconds:.1f} s (a whole merge: {whole:.1f} s): "
                    f"{(lines[-1] if lines else '')[:120]}",
                    flush=True,
                )
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=False, capture_output=True)
        state, what = check_result(folder / "earlier", [self.refs["P"]])
        if state != "complete":
            self.report.fail(scenario, "outputs half-written", f"earlier output {state} {what}")
        shutil.rmtree(folder)

    # -- 4. concurrency --------------------------------------------------------------------------------------------
    def concurrency(self, variants: list[str]) -> None:
        scenario = "two merges onto one --out at once"
        print(f"\n4. {scenario} {self.stamp()}", flush=True)
        row = self.report.row(scenario)
        folder = self.work / "race"
        folder.mkdir()
        out = folder / "out"
        for variant in variants:
            row.runs += 1
            if out.exists():
                shutil.rmtree(out)
            extra: tuple[str, ...] = ()
            allowed = [self.refs["Q"]]
            if variant == "overwrite":
                shutil.copytree(self.refs["P"].folder, out)
                extra = ("--overwrite",)
            command = self.merge_command("Q", out, *extra)
            shown_command = f"{shown(command, self.work)} & {shown(command, self.work)}"
            for attempt in range(3):
                first, _, first_err = self.runner.start(command)
                second, _, second_err = self.runner.start(command)
                ends: dict[int, float] = {}
                started = time.monotonic()
                while len(ends) < 2 and time.monotonic() - started < 300:
                    for process in (first, second):
                        if process.pid not in ends and process.poll() is not None:
                            ends[process.pid] = time.monotonic() - started
                    time.sleep(0.005)
                for process in (first, second):
                    if process.poll() is None:
                        process.kill()
                        process.wait()
                codes = {first.pid: first.returncode, second.pid: second.returncode}
                errors = {first.pid: first_err.read_text(), second.pid: second_err.read_text()}
                winners = [pid for pid, code in codes.items() if code == 0]
                losers = [pid for pid, code in codes.items() if code != 0]
                # Not a race when one run finished before the other reached the lock: try again.
                missed = len(winners) == 2 or (
                    len(winners) == 1 and len(losers) == 1 and "already exists" in errors[losers[0]]
                )
                if not missed or attempt == 2:
                    break
                print(f"  {variant}: the runs did not overlap ({codes}); again", flush=True)
                if out.exists():
                    shutil.rmtree(out)
                if variant == "overwrite":
                    shutil.copytree(self.refs["P"].folder, out)
            if sorted(codes.values()) != [0, 2]:
                self.report.fail(
                    scenario,
                    "wrong exit codes",
                    f"{variant}: exit codes {sorted(codes.values())}, expected [0, 2]; "
                    f"stderr: {[stderr_lines(e)[-1:] for e in errors.values()]}",
                    shown_command,
                )
            if len(winners) == 1 and len(losers) == 1:
                winner, loser = winners[0], losers[0]
                lines = stderr_lines(errors[loser])
                if len(lines) != 1 or f"PID {winner} " not in lines[0]:
                    self.report.fail(
                        scenario,
                        "other failed checks",
                        f"{variant}: the loser's stderr does not name PID {winner} in one line: {lines[-3:]}",
                        shown_command,
                    )
                if ends.get(loser, 1e9) >= ends.get(winner, 0):
                    self.report.fail(
                        scenario,
                        "other failed checks",
                        f"{variant}: the loser ended at {ends.get(loser)} s, "
                        f"after the winner ({ends.get(winner)} s): it did not fail at once",
                        shown_command,
                    )
                message = lines[-1] if lines else ""
            else:
                message = ""
            state, what = check_result(out, allowed)
            if state != "complete":
                self.report.fail(scenario, "outputs half-written", f"{variant}: output {state} {what}", shown_command)
            found = leftovers(out)
            if found:
                self.report.fail(
                    scenario, "leftovers after next run", f"{variant}: {found}", shown_command, amount=len(found)
                )
            self.check_inputs(scenario, command)
            print(
                f"  {variant:10s} exits {sorted(codes.values())} (ended at "
                f"{', '.join(f'{v:.1f}' for v in sorted(ends.values()))} s), output {state}: {message[:100]}",
                flush=True,
            )
        shutil.rmtree(folder)

    # -- 5. Hub ----------------------------------------------------------------------------------------------------
    def hub(self) -> None:
        print(f"\n5. Hub faults (tests/hub_server.py) {self.stamp()}", flush=True)
        sys.path.insert(0, str(REPO_ROOT / "tests"))
        from hub_server import HubServer

        server = HubServer().start()
        try:
            env = dict(self.env)
            env.update(HF_ENDPOINT=server.url, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", HF_TOKEN=server.token)
            folder = self.work / "hub"
            folder.mkdir()
            self._hub_commit_failure(server, env, folder)
            self._hub_invalid_token(server, env, folder)
            if not self.args.quick:
                self._hub_push(server, env, folder)
        finally:
            server.stop()

    def _remote_check(self, scenario: str, server: Any, repo_id: str, out: Path, command: str) -> None:
        try:
            remote = {k: v for k, v in server.repo(repo_id).files().items() if k != ".gitattributes"}
        except KeyError:
            remote = {}
        manifest = json.loads((out / MANIFEST).read_text())["files"]
        foreign = sorted(set(remote) - set(manifest))
        if foreign:
            self.report.fail(scenario, "foreign files uploaded", f"uploaded {foreign}", command, amount=len(foreign))
        missing = sorted(set(manifest) - set(remote))
        if missing:
            self.report.fail(scenario, "other failed checks", f"not uploaded: {missing}", command)
        different = sorted(k for k in set(manifest) & set(remote) if remote[k] != (out / k).read_bytes())
        if different:
            self.report.fail(scenario, "other failed checks", f"uploaded bytes differ: {different}", command)
        print(f"  remote {repo_id}: {len(remote)} file(s), foreign {foreign}, missing {missing}", flush=True)

    def _hub_commit_failure(self, server: Any, env: dict[str, str], folder: Path) -> None:
        scenario = "hub: commit fails (HTTP 500), then retry"
        row = self.report.row(scenario)
        row.runs += 1
        out, repo_id = folder / "out-retry", "test-user/merged-retry"
        server.fail("commit", 500)
        command = self.merge_command("P", out, "--push", repo_id)
        shown_command = f"server.fail('commit', 500); {shown(command, self.work)}"
        run = self.runner.watch(command, out, env=env)
        lines = self.check_failure(scenario, run.returncode, run.stderr, 1, shown_command)
        state = self.check_complete(scenario, out, shown_command, "local folder")
        self.check_inputs(scenario, command)
        print(f"  push with a failing commit: exit {run.returncode}, local output {state}", flush=True)
        print(f"    stderr: {(lines[-1] if lines else '')[:300]}", flush=True)
        retry = re.search(r"`(peft-merge-ext upload [^`]+)`", run.stderr)
        if retry is None:
            self.report.fail(
                scenario, "other failed checks", "no `peft-merge-ext upload ...` command printed", shown_command
            )
            return
        # A file of the user's own, planted in the folder before the retry: it must not be uploaded.
        (out / "my-notes.txt").write_text("private notes, not part of the merge\n")
        (out / ".env").write_text("SECRET=1\n")
        retry_command = shlex.split(retry.group(1))
        retry_command[0:1] = cli()
        run = self.runner.watch(retry_command, out, env=env)
        shown_retry = f"{shown_command}; echo notes > $W/hub/out-retry/my-notes.txt; {retry.group(1)}"
        if run.returncode != 0:
            self.report.fail(
                scenario,
                "wrong exit codes",
                f"retry exited {run.returncode}: {stderr_lines(run.stderr)[-2:]}",
                shown_retry,
            )
        print(f"  retry `{retry.group(1).replace(str(self.work), '$W')}`: exit {run.returncode}", flush=True)
        self._remote_check(scenario, server, repo_id, out, shown_retry)
        state, what = check_result(out, [self.refs["P"]], extra_ok={"my-notes.txt", ".env"})
        if state != "complete":
            self.report.fail(scenario, "outputs half-written", f"local folder after retry {state} {what}", shown_retry)

    def _hub_invalid_token(self, server: Any, env: dict[str, str], folder: Path) -> None:
        scenario = "hub: invalid token"
        row = self.report.row(scenario)
        row.runs += 1
        out, repo_id = folder / "out-token", "test-user/merged-token"
        bad_env = dict(env, HF_TOKEN="hf_" + "x" * 34)
        command = self.merge_command("P", out, "--push", repo_id)
        shown_command = f"HF_TOKEN=hf_xxx {shown(command, self.work)}"
        run = self.runner.watch(command, out, env=bad_env)
        lines = self.check_failure(scenario, run.returncode, run.stderr, 1, shown_command)
        if run.first_tmp is not None:
            self.report.fail(
                scenario, "other failed checks", "a temporary folder was created: it merged first", shown_command
            )
        state, what = check_result(out, [])
        if state != "absent":
            self.report.fail(scenario, "outputs half-written", f"output {state} {what}", shown_command)
        found = leftovers(out)
        if found:
            self.report.fail(scenario, "leftovers after next run", f"{found}", shown_command, amount=len(found))
        if ("model", repo_id) in server.state.repos:
            self.report.fail(scenario, "other failed checks", "the repository was created", shown_command)
        self.check_inputs(scenario, command)
        print(f"  invalid token: exit {run.returncode} in {run.seconds:.1f} s, output {state}", flush=True)
        print(f"    stderr: {(lines[-1] if lines else '')[:300]}", flush=True)

    def _hub_push(self, server: Any, env: dict[str, str], folder: Path) -> None:
        scenario = "hub: push"
        row = self.report.row(scenario)
        row.runs += 1
        out, repo_id = folder / "out-push", "test-user/merged-push"
        command = self.merge_command("P", out, "--push", repo_id)
        shown_command = shown(command, self.work)
        run = self.runner.watch(command, out, env=env)
        if run.returncode != 0:
            self.report.fail(
                scenario, "wrong exit codes", f"exit {run.returncode}: {stderr_lines(run.stderr)[-2:]}", shown_command
            )
        state = self.check_complete(scenario, out, shown_command, "output")
        self.check_inputs(scenario, command)
        print(f"  push: exit {run.returncode}, output {state}", flush=True)
        if run.returncode == 0:
            self._remote_check(scenario, server, repo_id, out, shown_command)


# ----------------------------------------------------------------------------------------------------------------
# Report


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024**2:.0f} GiB"
    return f"{os.cpu_count()} cores ({cpu}), {ram} RAM, Linux {platform.release()}, Python {platform.python_version()}"


def filesystem(path: Path) -> str:
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    return f"{kind} ({best})"


def markdown(bench: Bench, args: argparse.Namespace, seconds: float) -> str:
    report, inputs = bench.report, bench.inputs
    lines = [
        "# Fault-injection benchmark (`benchmarks/faults.py`)",
        "",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Command: `{' '.join(['python benchmarks/faults.py', *sys.argv[1:]])}` (seed {args.seed})",
        f"- Machine: {machine()}",
        f"- Work folder file system: {filesystem(bench.work)}",
        f"- Checkpoint: Llama-shaped, hidden 1024, {inputs['layers']} layers, vocab 32000, "
        f"{inputs['parameters'] / 1e6:.0f} M parameters, bf16, {inputs['base_bytes'] / 1e6:.0f} MB in "
        f'{inputs["shards"]} safetensors shards (`max_shard_size="100MB"`); two rank-16 LoRA adapters '
        f"({inputs['adapter_bytes'] / 1e6:.1f} MB, fp32); merged output {bench.output_bytes / 1e6:.0f} MB",
        f"- One merge (CLI subprocess): {bench.typical('new')[0]:.1f} s, with `--overwrite` "
        f"{bench.typical('overwrite')[0]:.1f} s (medians of the last normal runs)",
        f"- Wall time: {seconds:.0f} s ({seconds / 60:.1f} min)",
        "",
        report.table(),
        "",
        'Kill rows: "leftovers after next run" counts `.tmp-*`, `.old-*` and `.lock` entries next to the output after '
        "the repair run; in the other rows (no repair run needed) what is left right after the run itself.",
        "",
    ]
    if getattr(bench, "phases", None):
        phases = ", ".join(f"{name} {count}" for name, count in sorted(bench.phases.items(), key=lambda i: -i[1]))
        lines += [
            f"Kill moments by phase of the killed run: {phases} (startup: before the lock; locked: lock held, no "
            "temporary folder yet; write: temporary folder being written; swap: previous output moved aside; "
            "after-swap: result in place, finishing; finished: exited before the signal). Leftovers found right "
            f"after the kills, all removed by the next run: {bench.kill_leftovers_before}.",
            "",
        ]
    if report.notes:
        lines += ["Notes:", "", *[f"- {note}" for note in report.notes], ""]
    if report.failures:
        lines += ["## Failed checks", ""]
        for failure in report.failures:
            lines.append(f"- **{failure.scenario}** [{failure.column}]: {failure.detail}")
            if failure.kill:
                lines.append(f"  - kill: {failure.kill}")
            if failure.command:
                lines.append(f"  - command (`$W` = the work folder, kept with `--keep`): `{failure.command}`")
        lines.append("")
    else:
        lines += ["All checks passed.", ""]
    return "\n".join(lines)


def work_root(choice: str | None) -> str | None:
    if choice:
        return choice
    shm = Path("/dev/shm")
    with contextlib.suppress(OSError):
        stats = os.statvfs(shm)
        if os.access(shm, os.W_OK) and stats.f_bavail * stats.f_frsize > 6 * 1024**3:
            return str(shm)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="A few runs of each scenario (under ~2 minutes).")
    parser.add_argument("--runs", type=int, help="Number of kills (default 54; 6 with --quick).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the kill moments and the checkpoint.")
    parser.add_argument("--layers", type=int, help="Base model layers (default 8; 4 with --quick).")
    parser.add_argument("--tmpdir", help="Where the work folder goes (default: /dev/shm if it has room, else TMPDIR).")
    parser.add_argument("--keep", action="store_true", help="Keep the work folder (for the reproductions).")
    parser.add_argument("--results", type=Path, help="Markdown file to write (default: results/faults.md, full runs).")
    args = parser.parse_args()
    kills = args.runs if args.runs is not None else (6 if args.quick else 54)
    args.layers = args.layers or (4 if args.quick else 8)
    results = args.results or (None if args.quick else Path(__file__).resolve().parent / "results" / "faults.md")

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="peft-merge-ext-faults-", dir=work_root(args.tmpdir)))
    print(f"Work folder: {work} ({filesystem(work)})", flush=True)
    bench = Bench(args, work)
    try:
        bench.setup()
        bench.kills(kills)
        big = bench.largest_shard
        if args.quick:
            bench.file_too_large([("limit 50% of a shard, --overwrite", big // 2, True)])
            bench.disk_full([("disk full (0 B free), new output", 0.0, False)])
        else:
            bench.file_too_large(
                [
                    ("limit 0 B (no write at all), new output", 0, False),
                    ("limit 64 KiB, new output", 64 * 1024, False),
                    ("limit 50% of a shard, --overwrite", big // 2, True),
                    ("limit shard size - 1 B, new output", big - 1, False),
                ]
            )
            bench.disk_full(
                [
                    ("disk full (0 B free), new output", 0.0, False),
                    ("room for 30% of the output, new output", 0.3, False),
                    ("room for 95% of the output, new output", 0.95, False),
                    ("room for 50% more, --overwrite", 0.5, True),
                ]
            )
        bench.read_only(["new"] if args.quick else ["new", "nested", "overwrite"])
        bench.concurrency(["new"] if args.quick else ["new", "overwrite", "new"])
        bench.hub()
        bench.check_inputs("final input check", [])
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130
    finally:
        bench.runner.stop_all()
        if os.path.ismount(work / "full"):
            subprocess.run(["umount", str(work / "full")], check=False, capture_output=True)
        with contextlib.suppress(OSError):
            subprocess.run(["chattr", "-i", str(work / "ro")], check=False, capture_output=True)
        if args.keep:
            print(f"Kept the work folder {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - started
    text = markdown(bench, args, seconds)
    print("\n" + text)
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(text)
        print(f"Written to {results}")
    return 1 if bench.report.bad() else 0


if __name__ == "__main__":
    sys.exit(main())
