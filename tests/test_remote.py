"""The LLM backend seam (issue 16): `llm.remote.RemoteLM` against a REAL vLLM server, compared with the in-process
`llm.LM` on the same model, adapter and prompts; and the client's refusals that need no server.

The vLLM server is the CPU build from `.venv-vllm` (`make vllm`, never part of `make test`), started by the module
fixture on a free 127.0.0.1 port with the packaged SmolLM2 (the safetensors conversion in the models cache) and the
shipped adapter served under its folder name (`recllm.llm.remote.vllm_command`, the command `make vllm-serve`
runs). Without `.venv-vllm` those tests are skipped with that reason. No stand-in server is used anywhere.

Tolerance: vLLM returns log-probabilities, the in-process model logits; they differ by one constant per prompt,
so the letter scores are compared centred (mean over the prompt's letters removed) and must agree within 1e-3
(measured: under 3e-5 in float32), and the fused scores (z-scores) within 1e-3.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import build_recommender, free_port, wait_until_up
from recllm.errors import AdapterError, ModelError
from recllm.llm.remote import RemoteLM, base_url, letter_row

ROOT = Path(__file__).resolve().parent.parent
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
USERS = 50  # users ranked by both backends
SCORE_TOL = 1e-3

needs_vllm = pytest.mark.skipif(not VLLM_PY.exists(), reason=".venv-vllm is absent: `make vllm` builds the vLLM "
                                "server's virtualenv (not part of make test)")


# ------------------------------------------------------------------------------ no server needed


def test_a_missing_letter_is_refused_never_guessed():
    ids = [330, 331, 332]
    full = {"logprobs": {"top_logprobs": [{"token_id:49": -0.5, "token_id:330": -1.0, "token_id:331": -2.0,
                                           "token_id:332": -3.0}]}}
    assert letter_row(full, ids).tolist() == [-1.0, -2.0, -3.0]  # the sampled token (49) is not a letter
    top_k = {"logprobs": {"top_logprobs": [{"token_id:49": -0.5, "token_id:330": -1.0}]}}  # an older server's top-k
    as_text = {"logprobs": {"top_logprobs": [{"A": -1.0, "B": -2.0, "C": -3.0}]}}  # token text keys: ambiguous
    for choice, found in ((top_k, 1), (as_text, 0), ({}, 0)):
        with pytest.raises(ModelError) as err:
            letter_row(choice, ids, "http://127.0.0.1:1")
        assert f"for {found} of the 3 candidate letters" in str(err.value) and "\n" not in str(err.value)


def test_an_unreachable_server_is_a_one_line_error():
    with pytest.raises(ModelError) as err:
        RemoteLM(f"http://127.0.0.1:{free_port()}")
    assert "Cannot reach the LLM server" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ModelError):
        base_url("127.0.0.1:8001")
    assert base_url("http://h:1/v1/") == "http://h:1" == base_url("http://h:1")


def test_llm_url_flag_and_environment(monkeypatch):
    from recllm.options import EngineOptions

    monkeypatch.setenv("RECLLM_LLM_URL", "http://127.0.0.1:8001")
    parser = argparse.ArgumentParser()
    EngineOptions.add_arguments(parser)
    assert EngineOptions.from_args(parser.parse_args([])).llm_url == "http://127.0.0.1:8001"
    assert EngineOptions.from_args(parser.parse_args(["--llm-url", "http://10.0.0.9:9000"])).llm_url == \
        "http://10.0.0.9:9000"
    monkeypatch.delenv("RECLLM_LLM_URL")
    parser = argparse.ArgumentParser()
    EngineOptions.add_arguments(parser)
    assert EngineOptions.from_args(parser.parse_args([])).llm_url is None


def test_eval_with_llm_url_asks_the_server(capsys):
    from recllm.cli import main

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there: the error shows the server was asked
    assert main(["eval", "--ranker", "llm", "--llm-url", url, "--systems", "popularity"]) != 0
    err = capsys.readouterr().err.strip()
    assert f"Cannot reach the LLM server at {url}" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------ a real vLLM server


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory):
    """A vLLM server of its own (its own process group), stopped after the module's tests."""
    if not VLLM_PY.exists():
        pytest.skip(".venv-vllm is absent: `make vllm` builds it")
    from recllm.llm.remote import vllm_command

    folder = tmp_path_factory.mktemp("vllm-server")
    port = free_port()
    cmd = vllm_command(str(VLLM_PY), port=port)  # converts the packaged model once into the models cache
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               HF_HUB_OFFLINE="1")  # fmt: skip
    log = open(folder / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", proc, folder / "server.log", timeout=420, name="vLLM")
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its engine processes
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def backends(vllm_url):
    """(in-process LM, RemoteLM): the packaged SmolLM2 with the shipped adapter, each way."""
    from recllm.engine import default_adapter
    from recllm.llm import load_model

    adapter = default_adapter(None)
    assert adapter is not None, "the shipped default adapter is missing"
    return load_model(None, adapter), RemoteLM(vllm_url, None, adapter)


def _centred(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean()


@pytest.mark.server
@pytest.mark.slow
@needs_vllm
def test_remote_ranking_matches_in_process(backends, chat_home, capsys):
    local_lm, remote_lm = backends
    assert remote_lm.adapter_id == local_lm.adapter_id and remote_lm.adapter_metadata == local_lm.adapter_metadata
    local = build_recommender(chat_home, ranker="llm", lm=local_lm, explain=0)
    remote = build_recommender(chat_home, ranker="llm", lm=remote_lm, explain=0)
    from recllm.request import Request

    users = local.interactions.users[:USERS]
    requests = [Request(user=u, k=10, explain=0) for u in users]
    t0 = time.perf_counter()
    a = local.recommend_many(requests)
    t1 = time.perf_counter()
    b = remote.recommend_many(requests)
    t2 = time.perf_counter()
    same = 0
    for ra, rb in zip(a, b):
        same += [r.item_id for r in ra.recommendations] == [r.item_id for r in rb.recommendations]
        head_a = {r.candidate.item_id: r for r in ra.ranked if np.isfinite(r.llm_score)}
        head_b = {r.candidate.item_id: r for r in rb.ranked if np.isfinite(r.llm_score)}
        assert head_a.keys() == head_b.keys() and len(head_a) == 20  # the same 20 candidates went to the model
        ids = list(head_a)
        la, lb = _centred([head_a[i].llm_score for i in ids]), _centred([head_b[i].llm_score for i in ids])
        assert np.abs(la - lb).max() < SCORE_TOL
        assert max(abs(head_a[i].fused_score - head_b[i].fused_score) for i in ids) < SCORE_TOL
    assert rb.ranker["device"] == "remote" and rb.ranker["adapter"] == local_lm.adapter_id
    with capsys.disabled():
        print(f"\n[remote] same top-10 order for {same}/{len(users)} users; in-process {len(users) / (t1 - t0):.2f} "
              f"users/s, vLLM server {len(users) / (t2 - t1):.2f} users/s (2 shared CPU cores)")
    assert same >= 0.95 * len(users)


@pytest.mark.server
@pytest.mark.slow
@needs_vllm
def test_remote_explanations_are_validated_and_why_answers(backends, chat_home):
    _, remote_lm = backends
    rec = build_recommender(chat_home, ranker="llm", lm=remote_lm, explain=3)
    result = rec.recommend(user="1", k=5)
    reasons = [r.reason for r in result.recommendations[:3]]
    assert all(r is not None and r.text and r.source in ("llm", "fallback") for r in reasons)
    assert all(r.meta.get("llm_url") == remote_lm.url for r in reasons)
    assert all(r.explanation for r in result.recommendations[:3])
    answer, top = rec.why("#1", result), result.recommendations[0]  # from the trace: evidence, not the model's text
    evidence = top.reason.evidence
    assert answer.startswith(top.title) and any(t in answer for t in (*evidence.titles, *evidence.shared))
    pieces = list(remote_lm.stream_many(["The capital of France is", "My favourite film is"], 8, stop=("\n",)))
    assert sorted(row for row, p in pieces if p is None) == [0, 1]
    texts = ["".join(p for row, p in pieces if row == n and p) for n in (0, 1)]
    assert texts[0] == remote_lm.generate("The capital of France is", 8, stop=("\n",))  # greedy: the same text
    stream = remote_lm.stream("Once upon a time, in a land far away,", 40)
    assert next(stream, None) is not None
    stream.close()  # closes the connection: the server stops that request


@pytest.mark.server
@needs_vllm
def test_the_adapter_is_chosen_by_name_and_checked(backends, vllm_url, tmp_path):
    local_lm, remote_lm = backends
    shipped = ROOT / "adapters" / remote_lm.adapter_id
    base = RemoteLM(vllm_url, None, None)  # the base model alone
    assert base.adapter_id is None and base.served_name == "SmolLM2-135M-Instruct-Q4_1"
    prompt = ["(A) one\n(B) two\nAnswer: ("]
    ids = remote_lm.letter_token_ids(2, prefix="(")
    assert not np.allclose(base.letter_scores(prompt, ids), remote_lm.letter_scores(prompt, ids), atol=1e-3)

    renamed = tmp_path / "not-served"
    shutil.copytree(shipped, renamed)
    with pytest.raises(AdapterError, match="does not serve adapter not-served"):
        RemoteLM(vllm_url, None, renamed)
    changed = tmp_path / "prompt" / shipped.name  # same name, trained with another prompt: refused before use
    shutil.copytree(shipped, changed)
    meta = json.loads((changed / "recllm_adapter.json").read_text())
    meta["prompt"]["sha256"] = "0" * 64
    (changed / "recllm_adapter.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="was trained with prompt"):
        RemoteLM(vllm_url, None, changed)
    other = tmp_path / "weights" / shipped.name  # same name, other weights than the server's folder
    shutil.copytree(shipped, other)
    with open(other / "adapter_model.safetensors", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(AdapterError, match="weights differ"):
        RemoteLM(vllm_url, None, other)


@pytest.mark.server
@pytest.mark.slow
@needs_vllm
def test_cli_recommends_through_the_server(vllm_url, small_catalog_files, indexed_home):
    catalog, interactions = small_catalog_files
    env = dict(os.environ, RECLLM_HOME=str(indexed_home), RECLLM_LLM_URL=vllm_url, PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="1")  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "recllm", "recommend", "--user", "1", "-k", "5", "--ranker", "llm",
                           "--explain", "1", "--catalog", str(catalog), "--interactions", str(interactions), "--json",
                           "--trace"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert len(out["recommendations"]) == 5 and out["recommendations"][0]["explanation"]
    assert out["trace"]["ranker"]["llm_url"] == vllm_url and out["trace"]["ranker"]["device"] == "remote"
