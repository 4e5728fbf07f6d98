"""Batch prompting: JSONL rows in, JSONL rows out — ordered, resumable, data-parallel.

One input line is one request (the row contract in DESIGN.md):

    {"id": "r1", "user": "42", "k": 5}
    {"id": "r2", "history": ["Heat", "Ronin (1998)"], "question": "why did you suggest Collateral?"}
    {"id": "r3", "messages": [{"role": "user", "content": "a funny space movie for kids"}]}

One output line per input row, in input order:

    {"id": "r1", "recommendations": [...], "trace": {...}}          + "answer" when the row asks "why ...?"
    {"id": "r4", "error": "unknown user '4242' in ratings.csv ..."}  a row that cannot be served; the run goes on

- `rows`: the row format (parse and check lines or dicts → `Row`s).
- `serve`: rows → engine requests → output objects (`serve`, `process`).
- `files`: durable output, resume after a kill at any byte, shards and their merge.
- `run`: `run_batch`, data-parallel processes (torchrun / accelerate launch), the command line.
"""

from recllm.batch.files import Written, merge, scan, shard_path, shard_paths
from recllm.batch.rows import Ask, Row, parse_ask, parse_lines, read_rows, rows_from_dicts
from recllm.batch.run import BatchStats, Processes, add_arguments, main, recommender_factory, run, run_batch
from recllm.batch.serve import DEFAULT_BATCH_SIZE, process, serve

__all__ = [
    "DEFAULT_BATCH_SIZE", "Ask", "BatchStats", "Processes", "Row", "Written", "add_arguments", "main", "merge",
    "parse_ask", "parse_lines", "process", "read_rows", "recommender_factory", "rows_from_dicts", "run",
    "run_batch", "scan", "serve", "shard_path", "shard_paths",
]  # fmt: skip
