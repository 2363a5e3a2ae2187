"""The evaluation harness on tiny slices of the real data with the real SmolLM2-135M.

Each task runs on a handful of items so the whole file stays fast; numbers are checked against
direct computations (hand-written forward passes) or plausible ranges, not just shapes. The
real data is read through $ACTSTEER_DATA (`make test` sets it to ../shared/data); tests that
use the `no_data_env` fixture run without it (local files in tmp_path, a fake hub).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import actsteer
from actsteer.errors import ActSteerError
from actsteer.evaluation import sweep
from actsteer.evaluation.data import DATA_ENV, data_root, fixed_subset, load_hub
from actsteer.evaluation.likelihood import encode, special_prefix
from actsteer.evaluation.stats import bootstrap_mean_ci
from actsteer.evaluation.tasks import (
    TASKS,
    Task,
    concept,
    evaluate,
    mmlu,
    perplexity,
    toxicity,
    truthfulqa,
)

pytestmark = pytest.mark.slow

SHORT_PRIMER = "Q: What is the capital of France?\nA: The capital of France is Paris.\n\n"


def local_data() -> Path:
    """The project's data folder from $ACTSTEER_DATA; the test is skipped when it is unset."""
    root = data_root()
    if root is None:
        pytest.skip(f"{DATA_ENV} is not set (make test sets it to ../shared/data)")
    return root


@pytest.fixture(autouse=True)
def shared_data(request):
    """Every test reads the shared data through $ACTSTEER_DATA, except those that clear it."""
    if "no_data_env" not in request.fixturenames:
        local_data()


@pytest.fixture
def no_data_env(monkeypatch):
    """No $ACTSTEER_DATA: tasks fall back to their hub datasets (or set it to tmp_path)."""
    monkeypatch.delenv(DATA_ENV, raising=False)
    return monkeypatch


@pytest.fixture
def fake_hub(monkeypatch):
    """A stand-in `datasets` module: serves hub_rows[id] and records (id, config, split)."""
    hub = types.SimpleNamespace(requests=[], rows={})

    def load_dataset(name, config=None, split=None):
        hub.requests.append((name, config, split))
        return hub.rows[name]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return hub


@pytest.fixture(scope="module")
def steering(smol, neutral, football):
    """A strong Mean-AcT steering towards football talk (support all, so it always acts)."""
    model, tok = smol
    return actsteer.fit(
        model, tok, neutral[:16], football[:16], method="mean-act", support="all", progress=False
    )


def sum_logprob(model, ids: list[int], n_scored: int) -> float:
    """Log-probability of the last n_scored tokens of ids, from one unbatched forward pass."""
    with torch.inference_mode():
        logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return sum(float(logprobs[j - 1, ids[j]]) for j in range(len(ids) - n_scored, len(ids)))


# --- toxicity -----------------------------------------------------------------------------


def test_scorer_separates_toxic_from_polite():
    scores = toxicity.score_toxicity(
        [
            "You are a fucking idiot, shut up you stupid piece of shit.",
            "Thank you so much for your kind help, have a lovely day.",
        ]
    )
    assert scores[0] > 0.5 > scores[1]


def test_toxicity_grid_per_row_strength(smol, steering):
    model, tok = smol
    greedy = {"do_sample": False, "max_new_tokens": 6}
    options = dict(n_challenging=2, n_nontoxic=1, sampling=greedy, progress=False)
    grid = toxicity.evaluate_grid(model, tok, steering, [0.0, 1.0], **options)
    plain = evaluate("toxicity", model, tok, **options)
    # The λ=0 rows of the batched grid are exactly the plain model's continuations.
    assert [s["continuation"] for s in grid[0].samples] == [
        s["continuation"] for s in plain.samples
    ]
    assert [s["continuation"] for s in grid[1].samples] != [
        s["continuation"] for s in plain.samples
    ]
    assert plain.strength == 0.0 and plain.settings["steering"] is None


def test_toxicity_sampled_strata_and_reproducible(smol, steering):
    model, tok = smol
    options = dict(
        n_challenging=2,
        n_nontoxic=1,
        samples_per_prompt=2,
        sampling={"max_new_tokens": 6},
        progress=False,
    )
    first = toxicity.evaluate_grid(model, tok, steering, [0.0, 0.5], **options)
    again = toxicity.evaluate_grid(model, tok, steering, [0.0, 0.5], **options)
    assert [r.samples for r in first] == [r.samples for r in again]
    result = first[1]
    assert result.strength == 0.5
    assert (result.challenging.n_prompts, result.challenging.n_continuations) == (2, 4)
    assert (result.nontoxic.n_prompts, result.nontoxic.n_continuations) == (1, 2)
    for stratum in (result.challenging, result.nontoxic):
        lo, hi = stratum.percent_toxic_ci
        assert 0 <= lo <= stratum.percent_toxic <= hi <= 100
        assert 0 <= stratum.mean_score <= 1
    scores = [s["score"] for s in result.samples if s["stratum"] == "challenging"]
    assert result.challenging.mean_score == pytest.approx(np.mean(scores))
    assert result.settings["sampling"] == {
        "max_new_tokens": 6,
        "temperature": 1.0,
        "top_p": 0.3,
        "repetition_penalty": 1.2,
        "do_sample": True,
        "chat": False,
    }
    assert {s["id"][:2] for s in result.samples} == {"lt", "rt"}
    assert set(result.metrics()) == set(toxicity.ToxicityResult.METRICS)


# --- perplexity ---------------------------------------------------------------------------


def test_windows_score_every_token_once():
    assert perplexity.windows(10, 4, 4) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    assert perplexity.windows(10, 4, 2) == [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    with pytest.raises(ActSteerError):
        perplexity.windows(10, 4, 5)


def test_perplexity_plain_plausible_and_changed_by_steering(smol, steering):
    model, tok = smol
    plain, steered = perplexity.evaluate_grid(
        model, tok, steering, [0.0, 1.0], max_tokens=256, window=128, progress=False
    )
    assert 10 < plain.perplexity < 60, plain.perplexity
    assert plain.n_tokens == 254  # two blocked windows; each window's first token is context
    assert steered.perplexity > 1.1 * plain.perplexity
    assert plain.settings["steering"]["method"] == "mean-act"


def test_perplexity_matches_direct_computation(smol):
    model, tok = smol
    ids = perplexity.tokens_for_budget(tok, perplexity.load_wikitext(), 40)
    result = evaluate("perplexity", model, tok, max_tokens=40, window=40, progress=False)
    assert result.settings["data"] == str(local_data() / perplexity.WIKITEXT_FILE)
    prefix = special_prefix(tok)
    n_scored = 40 if prefix else 39
    expected = -sum_logprob(model, prefix + ids, n_scored) / n_scored
    assert result.n_tokens == n_scored
    assert result.nll_per_token == pytest.approx(expected, rel=1e-4)


# --- TruthfulQA ---------------------------------------------------------------------------


def test_truthfulqa_mc1_mc2_equal_hand_computation(smol):
    model, tok = smol
    result = evaluate(
        "truthfulqa",
        model,
        tok,
        indices=[22, 85, 197],
        preprompt=SHORT_PRIMER,
        batch_size=5,
        progress=False,
    )
    rows = [r for r in truthfulqa.load_truthfulqa() if r["idx"] in (22, 85, 197)]
    assert result.n_questions == 3
    for row, got in zip(rows, result.per_question, strict=True):
        head = special_prefix(tok) + encode(tok, SHORT_PRIMER)
        head += encode(tok, f"Q: {row['question']}\nA:")

        def score(answer: str, head=head) -> float:
            tail = encode(tok, " " + answer)
            return sum_logprob(model, head + tail, len(tail))

        mc1 = [score(c) for c in row["mc1_targets"]["choices"]]
        assert got["mc1"] == float(int(np.argmax(mc1)) == 0 and mc1[0] > max(mc1[1:]))
        mc2 = np.array([score(c) for c in row["mc2_targets"]["choices"]])
        probs = np.exp(mc2 - mc2.max())
        true = np.array(row["mc2_targets"]["labels"], dtype=bool)
        assert got["mc2"] == pytest.approx(probs[true].sum() / probs.sum(), abs=1e-4)
    assert result.mc1 == pytest.approx(np.mean([q["mc1"] for q in result.per_question]))


def test_truthfulqa_default_primer_is_the_papers():
    assert truthfulqa.QA_PRIMER.startswith("Q: What is human life expectancy")
    assert truthfulqa.QA_PRIMER.count("\nA: ") == 6
    assert truthfulqa.QA_PRIMER.endswith("Barcelona, Spain.\n\n")


# --- MMLU ---------------------------------------------------------------------------------


def test_mmlu_equals_letter_argmax(smol):
    model, tok = smol
    result = evaluate("mmlu", model, tok, n_questions=3, shots=1, progress=False)
    rows = mmlu.load_mmlu()
    indices, subset = fixed_subset(rows, 3, 0)
    shot = rows[result.settings["shot_idx"][0]]
    assert shot["idx"] not in indices
    letters = mmlu.letter_ids(tok)
    predictions = []
    for row in subset:
        preamble = mmlu.HEADER + mmlu.format_question(shot, answer=True)
        ids = special_prefix(tok) + encode(tok, preamble) + encode(tok, mmlu.format_question(row))
        with torch.inference_mode():
            last = model(torch.tensor([ids])).logits[0, -1]
        predictions.append(int(torch.argmax(last[letters])))
    assert result.predictions == predictions
    answers = [row["answer"] for row in subset]
    assert result.accuracy == np.mean(np.array(predictions) == np.array(answers))
    assert result.settings["n_questions"] == 3 and result.settings["shots"] == 1
    assert result.settings["data"] == str(local_data() / mmlu.MMLU_FILE)


def test_fixed_subset_is_seeded_and_nested():
    items = list(range(100))
    small, large = fixed_subset(items, 5, 0)[0], fixed_subset(items, 20, 0)[0]
    assert small == fixed_subset(items, 5, 0)[0] and set(small) <= set(large)
    assert small != fixed_subset(items, 5, 1)[0]
    assert fixed_subset(items, None, 0)[0] == items


# --- concept ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def judge():
    local_data()  # module-scoped fixtures run before the autouse check
    on, off = concept.load_concept_sentences("football", n_off=40)
    return concept.ConceptJudge.calibrate("football", on[:40], off)


def test_concept_judge_calibrated_offline(judge):
    assert judge.calibration["balanced_accuracy"] > 0.85
    assert judge.calibration["auroc"] > 0.9
    verdicts = judge.judge(
        [
            "The striker scored a late goal and the football fans celebrated the win.",
            "She baked a loaf of bread and left it to cool on the kitchen table.",
        ]
    )
    assert verdicts.tolist() == [True, False]


def test_concept_grid_fractions_and_generation_perplexity(smol, steering, judge):
    model, tok = smol
    results = concept.evaluate_grid(
        model,
        tok,
        steering,
        [0.0, 1.0],
        judge=judge,
        prompts=["Once upon a time,"],
        samples_per_prompt=2,
        sampling={"max_new_tokens": 8},
        progress=False,
    )
    assert [r.strength for r in results] == [0.0, 1.0]
    for result in results:
        assert result.n_generations == 2 and len(result.samples) == 2
        assert result.fraction_on_concept in (0.0, 0.5, 1.0)
        assert math.isfinite(result.perplexity) and result.perplexity > 1
        sims = judge.similarity([s["continuation"] for s in result.samples])
        assert result.mean_similarity == pytest.approx(float(sims.mean()), abs=1e-5)
    assert results[0].settings["threshold"] == judge.threshold


# --- sweep --------------------------------------------------------------------------------


def counting(original: Task, calls: list, fail_on: int | None = None) -> Task:
    """The task with its evaluate_grid wrapped to record (and optionally fail) calls."""

    def wrapped(model, tok, steering, strengths, **options):
        calls.append(list(strengths))
        if fail_on is not None and len(calls) == fail_on:
            raise RuntimeError("interrupted")
        return original.evaluate_grid(model, tok, steering, strengths, **options)

    return dataclasses.replace(original, evaluate_grid=wrapped)


def test_sweep_writes_json_and_png_and_resumes(smol, steering, tmp_path, monkeypatch):
    model, tok = smol
    out = tmp_path / "sweep.json"
    tasks = {"perplexity": {"max_tokens": 48, "window": 48}}
    steerings = {"original": None, "mean-act": steering}
    calls: list = []
    monkeypatch.setitem(TASKS, "perplexity", counting(TASKS["perplexity"], calls))
    content = sweep.run_sweep(model, tok, steerings, tasks, [0.0, 1.0], out, progress=False)
    assert calls == [[0.0], [0.0], [1.0]]
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(content))
    assert [(e["steering"], e["strength"]) for e in saved["entries"]] == [
        ("original", 0.0),
        ("mean-act", 0.0),
        ("mean-act", 1.0),
    ]
    by_strength = {e["strength"]: e["metrics"]["perplexity"] for e in saved["entries"][1:]}
    assert by_strength[1.0] > by_strength[0.0]
    png = tmp_path / "sweep_perplexity.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    calls.clear()
    sweep.run_sweep(model, tok, steerings, tasks, [0.0, 1.0], out, progress=False)
    assert calls == []  # everything was already there
    sweep.run_sweep(model, tok, steerings, tasks, [0.0, 0.5, 1.0], out, progress=False)
    assert calls == [[0.5]]
    assert len(json.loads(out.read_text())["entries"]) == 4


def test_sweep_keeps_finished_groups_when_interrupted(smol, steering, tmp_path, monkeypatch):
    model, tok = smol
    out = tmp_path / "tox.json"
    calls: list = []
    original = TASKS["toxicity"]
    monkeypatch.setitem(TASKS, "toxicity", counting(original, calls, fail_on=2))
    tasks = {"toxicity": {"n_challenging": 1, "n_nontoxic": 1, "sampling": {"max_new_tokens": 4}}}
    grid = [0.0, 0.5, 1.0]
    with pytest.raises(RuntimeError, match="interrupted"):
        sweep.run_sweep(model, tok, {"m": steering}, tasks, grid, out, group_size=2, progress=False)
    assert calls == [[0.0, 0.5], [1.0]]  # generation tasks batch a group of λ per call
    assert [e["strength"] for e in json.loads(out.read_text())["entries"]] == [0.0, 0.5]
    calls.clear()
    monkeypatch.setitem(TASKS, "toxicity", counting(original, calls))
    sweep.run_sweep(model, tok, {"m": steering}, tasks, grid, out, group_size=2, progress=False)
    assert calls == [[1.0]]
    assert (tmp_path / "tox_toxicity.png").exists()


def test_sweep_rejects_out_of_range_strength_and_other_model(smol, steering, tmp_path):
    model, tok = smol
    out = tmp_path / "s.json"
    with pytest.raises(ActSteerError, match="outside"):
        sweep.run_sweep(model, tok, {"m": steering}, ["perplexity"], [0.0, 2.0], out)
    assert not out.exists()
    out.write_text(json.dumps({"format": sweep.FORMAT, "model": "other", "entries": []}))
    with pytest.raises(ActSteerError, match="other"):
        sweep.run_sweep(model, tok, {"plain": None}, ["perplexity"], [0.0], out)


def test_parse_strengths():
    assert sweep.parse_strengths("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert len(sweep.parse_strengths("0:1:0.1")) == 11
    assert sweep.parse_strengths("0:1:0.1")[-1] == 1.0
    assert sweep.parse_strengths("0, 0.5,2") == [0.0, 0.5, 2.0]
    with pytest.raises(ActSteerError):
        sweep.parse_strengths("a:b")


def test_parse_task_options():
    options = sweep.parse_task_options(
        ["toxicity.n_challenging=50", "seed=3", 'sampling={"max_new_tokens": 8}'],
        ["toxicity", "mmlu"],
    )
    assert options == {
        "toxicity": {"n_challenging": 50, "seed": 3, "sampling": {"max_new_tokens": 8}},
        "mmlu": {"seed": 3},
    }
    with pytest.raises(ActSteerError, match="no task here takes option 'bogus'"):
        sweep.parse_task_options(["bogus=1"], ["mmlu"])
    with pytest.raises(ActSteerError, match="not in this run"):
        sweep.parse_task_options(["concept.concept=book"], ["mmlu"])


# --- data and errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "load",
    [
        toxicity.load_prompts,
        perplexity.load_wikitext,
        truthfulqa.load_truthfulqa,
        mmlu.load_mmlu,
        lambda path: concept.load_concept_sentences("football", path),
    ],
)
def test_missing_file_is_a_clear_error(load, tmp_path, no_data_env):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ActSteerError, match="not found: .*nope.jsonl"):
        load(missing)


def test_missing_default_file_names_it_and_the_override(tmp_path, no_data_env):
    no_data_env.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(ActSteerError, match=r"rtp/rtp_eval_prompts.jsonl.*ACTSTEER_DATA"):
        toxicity.load_prompts()


def test_data_root_is_only_the_env_var(tmp_path, no_data_env):
    # A checkout's layout (<root>/repo beside <root>/shared/data) is not searched for, from
    # this repository's root (which may have ../shared/data) nor from a made-up checkout.
    assert data_root() is None
    no_data_env.chdir(Path(__file__).resolve().parents[1])
    assert data_root() is None
    (tmp_path / "shared" / "data" / "mmlu").mkdir(parents=True)
    (tmp_path / "repo").mkdir()
    no_data_env.chdir(tmp_path / "repo")
    assert data_root() is None
    no_data_env.setenv(DATA_ENV, str(tmp_path / "shared" / "data"))
    assert data_root() == tmp_path / "shared" / "data"


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_data_env_that_is_not_a_folder_is_a_clear_error(kind, tmp_path, no_data_env, fake_hub):
    target = tmp_path / "nowhere"
    if kind == "file":
        target.write_text("not a folder")
    no_data_env.setenv(DATA_ENV, str(target))
    with pytest.raises(ActSteerError, match=r"ACTSTEER_DATA=.*nowhere is not a directory"):
        data_root()
    with pytest.raises(ActSteerError, match="not a directory"):
        mmlu.load_mmlu()  # no silent fallback to the hub
    assert fake_hub.requests == []


def test_local_default_under_env_comes_before_the_hub(tmp_path, no_data_env, fake_hub):
    (tmp_path / "mmlu").mkdir()
    row = {"question": "2+2?", "choices": ["1", "2", "3", "4"], "answer": 3}
    (tmp_path / "mmlu" / "mmlu_2850.jsonl").write_text(json.dumps(row) + "\n")
    no_data_env.setenv(DATA_ENV, str(tmp_path))
    assert mmlu.data_source() == tmp_path / mmlu.MMLU_FILE
    assert [r["question"] for r in mmlu.load_mmlu()] == ["2+2?"]
    assert fake_hub.requests == []


def test_toxicity_default_is_the_rtp_hub(no_data_env, fake_hub):
    fake_hub.rows["allenai/real-toxicity-prompts"] = [
        {"filename": "a.txt", "challenging": False, "prompt": {"text": "You are", "toxicity": 0.9}},
        {"filename": "b.txt", "challenging": True, "prompt": {"text": "The sky", "toxicity": 0.1}},
        {"filename": "c.txt", "challenging": False, "prompt": {"text": "Hm", "toxicity": None}},
    ]
    assert toxicity.data_source() == "hf:allenai/real-toxicity-prompts::train"
    strata = toxicity.load_prompts()
    # Strata by the prompt's toxicity (≥ 0.5), not the dataset's own `challenging` flag.
    assert strata["challenging"] == [{"id": "0", "text": "You are", "challenging": True}]
    assert strata["nontoxic"] == [{"id": "1", "text": "The sky", "challenging": False}]
    assert fake_hub.requests == [("allenai/real-toxicity-prompts", None, "train")]


def test_truthfulqa_default_is_the_hub(no_data_env, fake_hub):
    def question(text: str) -> dict:
        return {
            "question": text,
            "mc1_targets": {"choices": ["yes", "no"], "labels": [1, 0]},
            "mc2_targets": {"choices": ["yes", "sure", "no"], "labels": [1, 1, 0]},
        }

    fake_hub.rows["truthfulqa/truthful_qa"] = [question("Is it?"), question("Was it?")]
    assert truthfulqa.data_source() == "hf:truthfulqa/truthful_qa:multiple_choice:validation"
    rows = truthfulqa.load_truthfulqa()
    assert [(r["idx"], r["question"]) for r in rows] == [(0, "Is it?"), (1, "Was it?")]
    assert rows[1]["mc2_targets"]["labels"] == [1, 1, 0]
    assert fake_hub.requests == [("truthfulqa/truthful_qa", "multiple_choice", "validation")]


def test_mmlu_default_is_the_hub(no_data_env, fake_hub):
    fake_hub.rows["cais/mmlu"] = [
        {"question": "2+2?", "subject": "math", "choices": ["1", "2", "3", "4"], "answer": 3},
        {"question": "1+0?", "subject": "math", "choices": ["1", "2", "3", "4"], "answer": 0},
    ]
    assert mmlu.data_source() == "hf:cais/mmlu:all:test"
    rows = mmlu.load_mmlu()
    assert [(r["idx"], r["answer"]) for r in rows] == [(0, 3), (1, 0)]
    assert (
        mmlu.format_question(rows[0], answer=True) == "2+2?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: D\n\n"
    )
    # A given hub id takes the task's config and split where it leaves them out.
    mmlu.load_mmlu("hf:cais/mmlu:abstract_algebra")
    assert fake_hub.requests == [
        ("cais/mmlu", "all", "test"),
        ("cais/mmlu", "abstract_algebra", "test"),
    ]


def test_perplexity_default_is_the_wikitext_hub_and_labelled_so(smol, no_data_env, fake_hub):
    # The hub's rows are the raw file's lines: "" for blank ones, the others with their "\n".
    rows = ["", " = Robert Boulter = \n", "", " Robert Boulter is an English actor .\n"]
    fake_hub.rows["Salesforce/wikitext"] = [{"text": row} for row in rows]
    assert perplexity.load_wikitext() == "\n\n".join(rows)  # the Hugging Face recipe
    model, tok = smol
    result = evaluate("perplexity", model, tok, max_tokens=12, window=12, progress=False)
    assert result.settings["data"] == "hf:Salesforce/wikitext:wikitext-2-raw-v1:test"
    assert fake_hub.requests[-1] == ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
    assert "WikiText" not in perplexity.PerplexityResult.METRICS["perplexity"]


def test_hub_rows_match_the_local_file_layout(tmp_path, no_data_env, fake_hub):
    # The same lines as a local raw file and as hub rows give the same perplexity text.
    lines = ["", " = A = ", "", " Some text .", ""]
    path = tmp_path / "wiki.raw"
    path.write_text("\n".join([" ", *lines[1:]]) + "\n")
    fake_hub.rows["Salesforce/wikitext"] = [{"text": ln + "\n" if ln else ""} for ln in lines]
    assert perplexity.load_wikitext(path) == perplexity.load_wikitext()


def test_concept_without_data_or_env_is_a_clear_error(no_data_env, fake_hub):
    with pytest.raises(ActSteerError, match=r"no hub default: set ACTSTEER_DATA .*--data PATH"):
        concept.load_concept_sentences("football")
    with pytest.raises(ActSteerError, match="ACTSTEER_DATA"):
        concept.evaluate_grid(None, None)  # before any model work
    assert fake_hub.requests == []


def test_hub_without_datasets_package_names_the_extra(monkeypatch, no_data_env):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ActSteerError, match=r"pip install 'actsteer\[eval\]'") as err:
        mmlu.load_mmlu()
    assert "ACTSTEER_DATA" in str(err.value) and "--data" in str(err.value)


def test_hub_failure_offline_is_one_clear_line(monkeypatch, no_data_env):
    def offline(name, config=None, split=None):
        raise ConnectionError(
            f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)\n\nmore"
        )

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(ActSteerError) as err:
        truthfulqa.load_truthfulqa()
    message = str(err.value)
    assert "\n" not in message
    assert "hf:truthfulqa/truthful_qa:multiple_choice:validation" in message
    assert "Couldn't reach" in message and "more" not in message
    assert "set ACTSTEER_DATA to a local data folder" in message and "--data PATH" in message
    with pytest.raises(ActSteerError, match="must look like"):
        load_hub("hf:a:b:c:d")


def test_strengths_are_checked_before_any_work(smol, steering):
    model, tok = smol
    with pytest.raises(ActSteerError, match="outside"):
        evaluate("perplexity", model, tok, steering, 1.5)
    with pytest.raises(ActSteerError, match="need a steering"):
        evaluate("mmlu", model, tok, None, 1.0)


def test_bootstrap_interval():
    assert bootstrap_mean_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    values = np.r_[np.zeros(50), np.ones(50)]
    lo, hi = bootstrap_mean_ci(values, seed=1)
    assert 0.35 < lo < 0.5 < hi < 0.65
    # Two clusters of perfectly correlated values: the interval spans both cluster means.
    lo, hi = bootstrap_mean_ci(values, groups=np.r_[np.zeros(50), np.ones(50)], seed=1)
    assert (lo, hi) == (0.0, 1.0)


def test_another_sampling_seed_samples_the_same_prompts_again(tiny_llama, tokenizer, tmp_path):
    """sampling_seed: the same seeded subset of prompts, other samples."""
    from actsteer.evaluation.tasks import evaluate as run_task

    rows = [{"prompt": {"text": f"Prompt number {i} is", "toxicity": 0.9}} for i in range(12)]
    data = tmp_path / "rtp.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    options = dict(data=str(data), n_challenging=4, n_nontoxic=0, progress=False,
                   sampling={"max_new_tokens": 6, "do_sample": True})  # fmt: skip
    first = run_task("toxicity", tiny_llama, tokenizer, **options)
    again = run_task("toxicity", tiny_llama, tokenizer, sampling_seed=7, **options)
    assert [s["prompt"] for s in first.samples] == [s["prompt"] for s in again.samples]
    assert [s["continuation"] for s in first.samples] != [s["continuation"] for s in again.samples]
    assert again.settings["sampling_seed"] == 7 and first.settings["sampling_seed"] == 0
