"""A batch run: `run_batch` (IN → OUT, resumable, one process or a data-parallel launch) and the
`recllm batch` / `python -m recllm.batch` command line. The engine is built from `options.EngineOptions`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from recllm.batch.files import (
    direct_todo,
    done_lines,
    merge,
    open_output,
    out_path_of,
    remove_leftovers,
    scan,
    shard_path,
    shard_paths,
)
from recllm.batch.rows import Row, read_rows
from recllm.batch.serve import DEFAULT_BATCH_SIZE, encode, serve
from recllm.errors import InputError, RecllmError
from recllm.jsonl import AppendFile
from recllm.request import Engine

DIST_TIMEOUT = timedelta(hours=24)  # how long a process waits at a barrier for the slowest one


class Processes:
    """This process's place in a data-parallel launch (torchrun / accelerate launch), or a single process."""

    def __init__(self):
        self.state = None
        self.num = 1
        self.rank = 0
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch
            from accelerate import PartialState
            from accelerate.utils import parse_flag_from_env

            cpu = not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")
            self.state = PartialState(cpu=cpu, timeout=DIST_TIMEOUT)
            self.num = self.state.num_processes
            self.rank = self.state.process_index

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def split(self, items: list) -> list:
        if self.state is None:
            return items
        with self.state.split_between_processes(items) as mine:
            return list(mine)

    def close(self) -> None:
        if self.state is not None:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


# ------------------------------------------------------------------ the run


@dataclass
class BatchStats:
    """What one call of `run_batch` did (for this process)."""

    rows: int = 0  # rows in the input
    skipped: int = 0  # rows whose output was already written (resume)
    served: int = 0  # rows this process sent to the recommender
    errors: int = 0  # error rows in OUT (rank 0; other ranks: error rows they wrote)
    seconds: float = 0.0  # the whole call: reading, building the recommender, serving, merging
    serve_seconds: float = 0.0  # the serving loop of this process only
    processes: int = 1
    rank: int = 0

    @property
    def rows_per_s(self) -> float:
        """Rows this process served per second of its serving loop."""
        return self.served / self.serve_seconds if self.serve_seconds > 0 else 0.0


def run_batch(in_path: str | Path, out_path: str | Path, *, recommender=None,
              recommender_factory: Callable[[], object] | None = None, resume: bool = False,
              batch_size: int = DEFAULT_BATCH_SIZE, explain: int | None = None, trace: bool = True,
              retry_errors: bool = False, progress: bool = True) -> BatchStats:  # fmt: skip
    """Serve every row of IN into OUT (one line per row, input order); see the module docstring.

    Give a built `recommender`, or a `recommender_factory` (called once per process, rank 0 first: under a
    data-parallel launch each process builds its own). `resume` skips rows already written (OUT and any
    shards); `retry_errors` serves error rows again on resume. Progress (rows/s, ETA) goes to stderr.
    """
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if recommender is None and recommender_factory is None:
        raise InputError("run_batch needs a recommender or a recommender_factory")
    started = time.perf_counter()
    in_path, out_path = Path(in_path), Path(out_path)
    if in_path.resolve() == out_path.resolve():
        raise InputError(f"the output {out_path} would overwrite the input")
    rows = read_rows(in_path)
    procs = Processes()
    stats = BatchStats(rows=len(rows), processes=procs.num, rank=procs.rank)
    guard = writer = None
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        if procs.main:
            guard = open_output(out_path)  # OUT is ours until the run ends (the merge replaces it)
        direct = direct_todo(guard, rows, resume, retry_errors) if procs.num == 1 else None
        if direct is not None:
            todo, stats.errors = direct
            stats.skipped = len(rows) - len(todo)
            writer = guard
        else:
            writer = open_output(shard_path(out_path, procs.rank))
            todo, stats.skipped = _sharded_setup(procs, guard, writer, rows, resume, retry_errors)
        if recommender is None:
            recommender = _build(procs, recommender_factory)
        bar = _bar(progress and procs.main, total=len(todo), procs=procs)
        serving = time.perf_counter()
        try:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                for out in serve(recommender, chunk, explain=explain, trace=trace):
                    stats.errors += "error" in out
                    writer.write(encode(out))
                writer.sync()
                stats.served += sum(row.work for row in chunk)
                bar.update(len(chunk))
        finally:
            bar.close()
            stats.serve_seconds = time.perf_counter() - serving
        if writer is not guard:
            writer.close()
            procs.barrier()  # every shard is complete
            if procs.main:
                stats.errors = merge(out_path, rows, retry_errors=retry_errors)
            procs.barrier()
    finally:
        for held in (writer, guard):
            if held is not None:
                held.close()
        procs.close()
    stats.seconds = time.perf_counter() - started
    return stats


def _sharded_setup(procs: Processes, out: AppendFile | None, own: AppendFile, rows: list[Row], resume: bool,
                   retry_errors: bool) -> tuple[list[Row], int]:  # fmt: skip
    """Prepare this process's shard and pick its rows: the same pending list is split on every process."""
    if procs.main:
        remove_leftovers(out.path, shards=False)
    if resume:
        own.truncate(scan(own.path)[1])  # each process only ever changes its own shard
        done = done_lines(out_path_of(own.path), rows, retry_errors=retry_errors)
        pending = [row for row in rows if row.work and row.id not in done]
        skipped = sum(row.work for row in rows) - len(pending)
    else:
        own.truncate(0)
        if procs.main:
            out.truncate(0)
            for path in shard_paths(out.path):
                if int(path.name.rsplit("-", 1)[1]) >= procs.num:
                    path.unlink(missing_ok=True)
        pending = [row for row in rows if row.work]
        skipped = 0
    procs.barrier()  # nobody writes before every process has read the same state
    return procs.split(pending), skipped


def _build(procs: Processes, factory: Callable[[], object]):
    """Build the recommender; rank 0 first, so a missing index is built once, not raced."""
    if procs.state is None:
        return factory()
    with procs.state.main_process_first():
        return factory()


def _bar(enabled: bool, *, total: int, procs: Processes):
    from tqdm.auto import tqdm

    desc = "batch" if procs.num == 1 else f"batch (rank 0 of {procs.num})"
    return tqdm(total=total, desc=desc, unit="row", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


# ------------------------------------------------------------------ command line


def add_arguments(parser: argparse.ArgumentParser, *, engine_options: bool = True) -> None:
    """The `recllm batch` arguments. `engine_options=False` when the caller adds --catalog etc. itself."""
    from recllm.options import EngineOptions

    parser.add_argument("input", type=Path, help="JSONL file, one request per line")
    parser.add_argument("-o", "--output", type=Path, required=True, help="JSONL file to write, one line per row")
    parser.add_argument("--resume", action="store_true", help="keep rows already in OUTPUT, serve the rest")
    parser.add_argument("--retry-errors", action="store_true", help="with --resume, serve error rows again")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"rows per model call (default {DEFAULT_BATCH_SIZE})")  # fmt: skip
    parser.add_argument("--explain", type=int, default=None, metavar="N",
                        help="explain the top N items of each row (default: the recommender's; 0: fastest)")
    parser.add_argument("--no-trace", action="store_true", help="leave the trace out of each output row")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars on stderr")
    parser.add_argument("--factory", metavar="MODULE:FUNCTION",
                        help="build the recommender with this function instead (tests, custom setups)")
    if engine_options:
        EngineOptions.add_arguments(parser, explain=False)


def recommender_factory(args: argparse.Namespace) -> Callable[[], Engine]:
    """A no-argument function that builds the recommender the arguments describe (`options.EngineOptions`,
    or `--factory MODULE:FUNCTION`)."""
    from recllm.options import EngineOptions

    if getattr(args, "factory", None):
        module, _, name = args.factory.partition(":")
        if not name:
            raise InputError(f"--factory must look like module:function, got {args.factory!r}")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise InputError(f"--factory {args.factory}: {exc}") from None
    return EngineOptions.from_args(args).build


def run(args: argparse.Namespace) -> int:
    """Run `recllm batch` from parsed arguments; prints a summary on stderr, returns the exit status."""
    stats = run_batch(
        args.input,
        args.output,
        recommender_factory=recommender_factory(args),
        resume=args.resume,
        batch_size=args.batch_size,
        explain=args.explain,
        trace=not args.no_trace,
        retry_errors=args.retry_errors,
        progress=not args.quiet,
    )
    if stats.processes > 1:  # every process: how its share went (load balance)
        print(f"recllm batch: rank {stats.rank} of {stats.processes} served {stats.served} rows in "
              f"{stats.serve_seconds:.1f} s ({stats.rows_per_s:.2f} rows/s)", file=sys.stderr)  # fmt: skip
    if stats.rank == 0:
        shards = f" on {stats.processes} processes" if stats.processes > 1 else ""
        print(f"recllm batch: {stats.rows} rows → {args.output} ({stats.skipped} already done, "
              f"{stats.rows - stats.skipped} new{shards}; {stats.errors} error rows) in {stats.seconds:.1f} s",
              file=sys.stderr)  # fmt: skip
        if stats.processes == 1:
            print(f"recllm batch: served {stats.served} rows in {stats.serve_seconds:.1f} s "
                  f"({stats.rows_per_s:.2f} rows/s)", file=sys.stderr)  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m recllm.batch IN -o OUT` (the same as `recllm batch`)."""
    parser = argparse.ArgumentParser(prog="recllm batch", description="Serve a JSONL file of requests.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except RecllmError as exc:
        print(f"recllm batch: {exc}", file=sys.stderr)
        return 1
