"""Stage 4 (sae_summary_to_llm.py), selfexplain.concepts, .prompts and .llm_backends against a real local server.

The server (tests/fake_llm_server.py) speaks the OpenAI chat-completions API and
Replicate's predictions API as the official clients use them; each test scripts its
replies per neuron and attempt.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict
from email.utils import formatdate
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT, ctrl_c_as_in_a_terminal

import sae_summary_to_llm as stage
from fake_llm_server import FakeLLMServer, Reply
from selfexplain import artifacts, concepts, llm_backends, prompts
from selfexplain.artifacts import read_jsonl
from selfexplain.errors import UserError

OPENAI_KEY = "sk-test-DO-NOT-LEAK-0123456789abcdef"
REPLICATE_TOKEN = "r8_DoNotLeakThisToken0123456789abcd"
CLASSES = ["wheel", "bicycle", "house", "sun", "fish", "clock"]
DEAD = 2  # neuron 2 is dead in the fixture
LIVE = [0, 1, 3, 4, 5]
SAE_FP = "5ae0f1a9e2b3c4d5"  # the fingerprint stage 3 recorded in the fixture's summary.json


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No LLM settings, no proxies, no .env from the developer's folder; tiny backoff."""
    for key in ("REPLICATE_API_TOKEN", "OPENAI_API_KEY", "OPENAI_BASE_URL", "REPLICATE_API_BASE_URL",
                "REPLICATE_BASE_URL", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(llm_backends, "POLL_INTERVAL", 0.05)
    saved = dict(os.environ)
    yield
    os.environ.clear()  # a .env file read by a test must not leak into the next one
    os.environ.update(saved)


@pytest.fixture
def report(tmp_path) -> Path:
    """A stage-3 report: six neurons (one dead), three 16x16 PNG thumbnails each."""
    out = tmp_path / "neuron_report"
    (out / "thumbs").mkdir(parents=True)
    with open(out / "neurons.jsonl", "w") as fh:
        for i in range(6):
            examples = []
            for j in range(3):
                thumb = f"thumbs/n{i:04d}_{j}.png"
                Image.new("L", (16, 16), color=40 * j).save(out / thumb)
                examples.append({"image_index": 10 * i + j, "activation": 3.0 - j, "class": CLASSES[(i + j) % 6],
                                 "thumb": thumb})
            neuron = {
                "neuron_id": i, "dead": i == DEAD, "threshold": 0.5, "frequency": 0.01 * (i + 1),
                "mean_on_activation": 2.5, "score": 1.0 / (i + 1),
                "top_classes": [] if i == DEAD else [
                    {"class": CLASSES[i], "index": i, "pmi": 2.0, "p_class_given_on": 0.4, "lens": 0.8, "knockout": -0.3},
                    {"class": CLASSES[(i + 1) % 6], "index": (i + 1) % 6, "pmi": 1.1, "p_class_given_on": 0.2,
                     "lens": 0.3, "knockout": -0.1}],
                "anti_classes": [{"class": CLASSES[(i + 3) % 6], "index": (i + 3) % 6, "pmi": -1.5, "lens": -0.4}],
                "where": {"row": 0.8, "col": 0.2, "description": "lower left"},
                "auto_summary": f"fires on {CLASSES[i]}", "top_examples": examples, "sprite": f"sprites/n{i:04d}.png",
                "sae_fingerprint": SAE_FP}
            fh.write(json.dumps(neuron) + "\n")
    artifacts.write_json(out / "summary.json", {"sae_fingerprint": SAE_FP})
    return out


def answers(report: Path, fingerprint: str | None = SAE_FP) -> dict[int, dict]:
    """The current answer per neuron (the latest line for the report's SAE), as plain dicts."""
    current, _ = concepts.current_answers(report, fingerprint)
    return {i: asdict(r) for i, r in current.items()}


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """Every time.sleep the clients ask for, recorded and skipped (so Retry-After waits cost nothing)."""
    asked = []
    monkeypatch.setattr(time, "sleep", lambda seconds: asked.append(seconds))
    return asked


def run_openai(report, srv, monkeypatch, **overrides) -> int:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    settings = dict(report_dir=str(report), backend="openai", base_url=srv.openai_url, backoff=0.01, workers=2)
    return stage.main(**{**settings, **overrides})


def run_replicate(report, srv, monkeypatch, **overrides) -> int:
    monkeypatch.setenv("REPLICATE_API_TOKEN", REPLICATE_TOKEN)
    monkeypatch.setenv("REPLICATE_API_BASE_URL", srv.replicate_url)
    settings = dict(report_dir=str(report), backend="replicate", backoff=0.01, workers=2)
    return stage.main(**{**settings, **overrides})


RUNNERS = {"openai": run_openai, "replicate": run_replicate}
TOKENS = {"openai": OPENAI_KEY, "replicate": REPLICATE_TOKEN}


# ----------------------------------------------------------------------------- answers
@pytest.mark.parametrize("raw, concept", [
    ('Concept: "Round wheel with spokes."', "Round wheel with spokes"),
    ("**pointed triangular roof**", "pointed triangular roof"),
    ("```\nlong parallel legs\n```", "long parallel legs"),
    ("<think>circles... maybe wheels</think>\nAnswer: circular outline", "circular outline"),
    ("Concept:\n- fish tail fin\nbecause the examples show fish", "fish tail fin"),
    ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen", " ".join(
        "one two three four five six seven eight nine ten eleven twelve".split())),
    ("```text\nround wheel\n```", "round wheel"),  # the fence's language tag was kept as the concept
    ("Okay, so the neuron fires on circles.\n</think>\n\nround wheel", "round wheel"),  # R1: no opening tag
    ("Here is the concept:\nround wheel", "round wheel"),  # a lead-in line
    ('The concept is "round wheel".', "round wheel"),
    ("## Analysis\nThe strokes are circular.\n**Answer:** round wheel", "round wheel"),  # the labelled line wins
    # session 23: prose around the concept was kept, cut to 12 words ('Sure! Looking at the statistics ... "a')
    ('Sure! Looking at the statistics and the sketches, this neuron detects "a round circle outline with spokes". '
     "Let me know if you need more.", "a round circle outline with spokes"),
    ('"circle outline" — it fires on round shapes in the centre', "circle outline"),
    ("This neuron appears to detect round circular outlines.", "round circular outlines"),
    ("I think it is a spoked wheel", "a spoked wheel"),
])
def test_parse_concept_cleans_answers(raw, concept):
    assert prompts.parse_concept(raw, max_words=12) == concept


@pytest.mark.parametrize("raw", ["", "  \n ", "!!! ??? ...", "12345 678", "I'm sorry, I can't help with that.",
                                 "Unfortunately I cannot see any images.", "As a language model, I cannot view images.",
                                 "<think>circles, maybe wheels, or",
                                 "Sure! Looking at the sketches, this neuron seems to respond mostly to circles and round "
                                 "shapes drawn anywhere."])  # small talk with no quoted concept: asked again
def test_parse_concept_rejects_garbage(raw):
    with pytest.raises(prompts.MalformedAnswer):
        prompts.parse_concept(raw)


def test_prompt_names_classes_and_examples(report):
    neuron = read_jsonl(report / "neurons.jsonl")[0]
    text = prompts.neuron_prompt(neuron, max_words=12, attached=neuron["top_examples"][:2])
    assert "Neuron #0" in text and "- wheel: PMI +2.00; 40% of its strongly-on sketches (smoothed); lens +0.80" in text
    assert "lower left" in text
    assert "1. wheel (3.00); 2. bicycle (2.00)." in text  # the attached images, in order
    assert "the red tint over it marks where the neuron fires (not part of the drawing)" in text  # the thumbnails' overlay
    assert "12 words" in prompts.system_prompt(12)


def test_every_prompt_is_a_file_that_the_code_reads():
    files = {p.stem for p in prompts.PROMPT_DIR.glob("*.txt")}
    assert files == {"concept_system", "concept_user", "why_system", "why_user", "why_versus"}
    assert prompts.why_system_prompt() == prompts.load_prompt("why_system").strip()
    assert "'cat' with probability 80%" in prompts.why_prompt("cat", 0.8, [])
    # --versus: the other class and what told the two apart, asked for in the same sentence
    versus = {"class": "dog", "probability": 0.15, "neurons": [{"concept": "whiskers", "share": 0.7}]}
    text = prompts.why_prompt("cat", 0.8, [("ears", 0.5)], versus)
    assert "'dog' (probability 15%)" in text and "whiskers (70% of the evidence)" in text
    assert "rather than 'dog'" in text and text.startswith(prompts.why_prompt("cat", 0.8, [("ears", 0.5)]))
    assert prompts.why_prompt("cat", 0.8, [], {"class": "cat", "index": 0, "skipped": "it is the predicted class"}
                              ) == prompts.why_prompt("cat", 0.8, [])
    with pytest.raises(UserError, match="not found"):
        prompts.load_prompt("nope")


# ----------------------------------------------------------------------------- offline and auto
def test_offline_answers_every_live_neuron_and_reruns_ask_nothing(report, capsys):
    assert stage.main(report_dir=str(report), backend="offline") == 0
    got = answers(report)
    assert sorted(got) == LIVE  # the dead neuron is skipped
    assert all(r["backend"] == "offline" and r["answer"].startswith("offline: ") for r in got.values())
    assert got[0]["answer"] == "offline: strokes typical of wheel/bicycle, lower left"
    err = capsys.readouterr().err
    assert "1 dead skipped" in err and "backend offline: 5 neurons to ask" in err  # not "offline (offline)"
    before = (report / "llm_output.jsonl").read_bytes()
    assert stage.main(report_dir=str(report), backend="offline") == 0
    assert (report / "llm_output.jsonl").read_bytes() == before
    assert concepts.load_concepts(report)[0].startswith("offline: ")

    neurons = [json.loads(line) for line in (report / "neurons.jsonl").read_text().splitlines()]
    neurons[0]["where"]["description"] = "upper right"  # new statistics (same SAE): the label must follow
    (report / "neurons.jsonl").write_text("".join(json.dumps(n) + "\n" for n in neurons))
    assert stage.main(report_dir=str(report), backend="offline") == 0
    assert answers(report)[0]["answer"] == "offline: strokes typical of wheel/bicycle, upper right"
    assert "1 neurons to ask, 4 already answered" in capsys.readouterr().err


def test_auto_chooses_offline_without_settings(capsys):
    backend = llm_backends.make_backend("auto")
    assert backend.name == "offline"
    assert "BACKEND=auto chose offline: no REPLICATE_API_TOKEN" in capsys.readouterr().err
    assert backend.ask("system", "Neuron #1", fallback="offline: wheel") == "offline: wheel"


def test_auto_uses_real_environment_variables(monkeypatch, capsys):
    with FakeLLMServer() as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.openai_url)
        backend = llm_backends.make_backend("auto")
        assert (backend.name, backend.model) == ("openai", "fake-vision-1")  # listed by the server
        monkeypatch.setenv("REPLICATE_API_TOKEN", REPLICATE_TOKEN)
        assert llm_backends.make_backend("auto").name == "replicate"  # replicate wins when its token is set
    assert "chose replicate: REPLICATE_API_TOKEN is set in the environment" in capsys.readouterr().err


def test_a_token_only_in_dotenv_never_starts_paid_calls_under_auto(tmp_path, capsys):
    (tmp_path / ".env").write_text(f"REPLICATE_API_TOKEN={REPLICATE_TOKEN}\nOPENAI_API_KEY={OPENAI_KEY}\n")
    assert llm_backends.make_backend("auto").name == "offline"
    err = capsys.readouterr().err
    assert "./.env sets REPLICATE_API_TOKEN, OPENAI_API_KEY" in err and "BACKEND=replicate" in err
    assert "REPLICATE_API_TOKEN" not in os.environ  # the file is not loaded into the environment
    backend = llm_backends.make_backend("replicate", base_url="http://127.0.0.1:9")  # named: the file is used
    assert backend.name == "replicate" and REPLICATE_TOKEN in backend._secrets


def test_dotenv_is_read_from_the_current_folder_only(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text(f"REPLICATE_API_TOKEN={REPLICATE_TOKEN}\n")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")  # the .env is in the parent folder
    with pytest.raises(UserError, match="needs REPLICATE_API_TOKEN"):
        llm_backends.make_backend("replicate")


def test_server_with_several_models_asks_which(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    with FakeLLMServer(model_id=["llava:7b", "qwen2.5vl:7b"]) as srv:
        with pytest.raises(UserError, match="llava:7b, qwen2.5vl:7b"):
            llm_backends.make_backend("openai", base_url=srv.openai_url)


def test_missing_neurons_file_says_what_to_run(tmp_path):
    with pytest.raises(UserError, match="sae_summarize.py"):
        stage.main(report_dir=str(tmp_path / "nowhere"), backend="offline")


def test_only_and_limit_select_neurons(report):
    assert stage.main(report_dir=str(report), backend="offline", only=[DEAD, 4]) == 0
    assert sorted(answers(report)) == [DEAD, 4]  # ONLY may name a dead neuron
    assert stage.main(report_dir=str(report), backend="offline", limit=2) == 0
    assert sorted(answers(report)) == [0, 1, DEAD, 4]
    assert stage.main(report_dir=str(report), backend="offline", limit=2) == 0  # the next batch, not the same two
    assert sorted(answers(report)) == [0, 1, DEAD, 3, 4, 5]
    summary = json.loads((report / "llm_summary.json").read_text())
    assert (summary["asked"], summary["already_answered"]) == (2, 3)
    with pytest.raises(UserError, match="99"):
        stage.main(report_dir=str(report), backend="offline", only=[99])


# ----------------------------------------------------------------------------- real server
def test_openai_success_sends_stats_and_images(report, monkeypatch):
    with FakeLLMServer(token=OPENAI_KEY) as srv:
        assert run_openai(report, srv, monkeypatch, n_images=2) == 0
        asked = srv.requests("openai")
    got = answers(report)
    assert sorted(got) == LIVE
    assert got[3] == {**got[3], "answer": "shape number 3", "backend": "openai", "model": "fake-vision-1",
                      "images": 2, "attempts": 1}
    chats = [e for e in asked if e["path"] == "/v1/chat/completions"]
    assert sorted(e["neuron_id"] for e in chats) == LIVE
    assert all(e["images"] == 2 for e in chats)  # two real PNGs as data: URLs per neuron
    assert chats[0]["system"] == prompts.system_prompt(12)
    text3 = next(e["text"] for e in chats if e["neuron_id"] == 3)
    assert "- sun: PMI +2.00; 40% of its strongly-on sketches (smoothed); lens +0.80" in text3 and "fish" in text3
    config = json.loads((report / "llm_config.json").read_text())  # which server answered, whatever set it
    assert config["ASKED"] == {"backend": "openai", "model": "fake-vision-1", "base_url": srv.openai_url.rstrip("/") + "/"}
    assert json.loads((report / "llm_summary.json").read_text())["base_url"] == config["ASKED"]["base_url"]


def test_replicate_success_uses_models_endpoint_and_one_tiled_image(report, monkeypatch):
    with FakeLLMServer(token=REPLICATE_TOKEN) as srv:
        assert run_replicate(report, srv, monkeypatch) == 0
        creates = [e for e in srv.requests("replicate") if e.get("attempt")]
    got = answers(report)
    assert sorted(got) == LIVE and got[4]["answer"] == "shape number 4"
    assert got[4]["model"] == "anthropic/claude-4-sonnet"
    assert {e["path"] for e in creates} == {"/v1/models/anthropic/claude-4-sonnet/predictions"}
    assert all(e["prefer"] is None and e["images"] == 1 for e in creates)  # never held: the id comes at once
    assert creates[0]["input"]["system_prompt"] == prompts.system_prompt(12)
    assert json.loads((report / "llm_summary.json").read_text())["base_url"].startswith(srv.replicate_url.rstrip("/"))


def test_replicate_community_model_runs_by_version_while_polling(monkeypatch):
    monkeypatch.setenv("REPLICATE_API_TOKEN", REPLICATE_TOKEN)
    slow = Reply(kind="slow", delay=3.0, text="spiky sun rays")
    # the create's answer comes 2 s late: a create held with `Prefer: wait=2` timed out at 2.5 s and lost the id
    with FakeLLMServer(script=lambda *_: slow, create_latency=2.0) as srv:
        backend = llm_backends.make_backend("replicate", "yorickvp/llava-13b:abc123", srv.replicate_url, timeout=2.0)
        assert backend.ask("be brief", "Neuron #7 what is it?") == "spiky sun rays"  # created, then polled
        create = srv.requests("replicate")[0]
    assert (create["path"], create["version"]) == ("/v1/predictions", "abc123")
    assert create["input"]["prompt"].startswith("be brief")  # llava takes no system prompt: merged
    assert any(e.get("poll") for e in srv.requests("replicate"))


def test_a_replicate_create_that_never_answers_times_out(monkeypatch):
    """Without `Prefer: wait` the client sends creates with timeout=None, which httpx reads as no limit: a
    server that never answered a create hung the worker (40 s late came back after 40 s, not at TIMEOUT + 10)."""
    monkeypatch.setenv("REPLICATE_API_TOKEN", REPLICATE_TOKEN)
    with FakeLLMServer(create_latency=30.0) as srv:
        backend = llm_backends.make_backend("replicate", "yorickvp/llava-13b:abc123", srv.replicate_url, timeout=0.5)
        start = time.monotonic()
        with pytest.raises(llm_backends.LLMError, match="create request got no answer within 10.5s"):
            backend.ask("be brief", "Neuron #7 what is it?")
        assert time.monotonic() - start < 20


@pytest.mark.parametrize("api", ["openai", "replicate"])
def test_429_is_retried_by_the_client_honouring_retry_after(api, report, monkeypatch, waits):
    def script(_, nid, attempt):
        if nid == 3 and attempt == 1:
            return Reply(kind="status", status=429, headers={"Retry-After": "7"}, detail="slow down")
        return Reply(text=f"Concept: shape {nid}")

    with FakeLLMServer(script=script) as srv:
        assert RUNNERS[api](report, srv, monkeypatch) == 0
        assert srv.attempts[(api, 3)] == 2
    got = answers(report)
    assert sorted(got) == LIVE and got[3]["answer"] == "shape 3"
    assert 7.0 in waits  # the server's Retry-After, not a backoff of our own


@pytest.mark.parametrize("form", ["milliseconds", "http-date"])
def test_openai_client_reads_retry_after_ms_and_http_dates(form, report, monkeypatch, waits):
    headers, wait = (({"retry-after-ms": "1500"}, 1.5) if form == "milliseconds" else
                     ({"Retry-After": formatdate(time.time() + 30, usegmt=True)}, 30.0))

    def script(_, nid, attempt):
        return Reply(kind="status", status=429, headers=headers) if attempt == 1 else Reply(text=f"shape {nid}")

    with FakeLLMServer(script=script) as srv:
        assert run_openai(report, srv, monkeypatch, only=[1]) == 0
    assert any(abs(w - wait) < 2.0 for w in waits), waits


def test_an_empty_answer_says_it_was_empty(report, monkeypatch, capsys, waits):
    """It read 'no answer in the response' though the server had sent a choice, only with empty text."""
    with FakeLLMServer(script=lambda *_: Reply(text="")) as srv:
        assert run_openai(report, srv, monkeypatch, only=[1], retries=0, model="m") == 1
    assert "the model answered with empty text (finish_reason stop)" in capsys.readouterr().err


def test_redo_asks_an_answered_neuron_again_and_its_new_answer_wins(report, monkeypatch):
    """Session 23: a bad answer could only be replaced by editing the append-only file or changing the model."""
    replies = {"n": 0}

    def script(_, nid, attempt):
        replies["n"] += 1
        return Reply(text=f"shape {nid} take {replies['n']}")

    with FakeLLMServer(script=script) as srv:
        assert run_openai(report, srv, monkeypatch, only=[1, 3]) == 0
        assert run_openai(report, srv, monkeypatch, only=[1, 3]) == 0  # answered: nothing asked
        assert sum(srv.attempts.values()) == 2
        assert run_openai(report, srv, monkeypatch, only=[3], redo=True) == 0
        assert srv.attempts[("openai", 3)] == 2 and srv.attempts[("openai", 1)] == 1
    got = answers(report)
    assert got[3]["answer"] == "shape 3 take 3" and got[1]["answer"].startswith("shape 1 take")


@pytest.mark.parametrize("status", [408, 409])
def test_request_timeout_and_conflict_are_retried(status, report, monkeypatch, waits):
    def script(_, nid, attempt):
        return Reply(kind="status", status=status) if attempt == 1 else Reply(text=f"shape {nid}")

    with FakeLLMServer(script=script) as srv:
        assert run_openai(report, srv, monkeypatch, only=[1]) == 0
        assert srv.attempts[("openai", 1)] == 2
    assert answers(report)[1]["answer"] == "shape 1"


@pytest.mark.parametrize("api", ["openai", "replicate"])
def test_5xx_until_give_up_lists_the_neuron_and_exits_1(api, report, monkeypatch, capsys, waits):
    def script(_, nid, attempt):
        return Reply(kind="status", status=503, detail="overloaded") if nid == 3 else Reply(text=f"shape {nid}")

    with FakeLLMServer(script=script) as srv:
        assert RUNNERS[api](report, srv, monkeypatch, retries=2) == 1
        assert srv.attempts[(api, 3)] == 3  # one try plus the client's two retries, and no retries of ours on top
    assert sorted(answers(report)) == [0, 1, 4, 5]  # nothing written for neuron 3
    summary = json.loads((report / "llm_summary.json").read_text())
    assert [f["neuron_id"] for f in summary["failed"]] == [3] and "503" in summary["failed"][0]["error"]
    assert "neuron 3: failed" in capsys.readouterr().err


@pytest.mark.parametrize("api, tries", [("openai", 3), ("replicate", 1)])
def test_a_5xx_create_is_not_sent_again_to_replicate(api, tries, report, monkeypatch, waits):
    """A 502 may come after Replicate started a paid prediction: a second create could bill twice."""
    def script(_, nid, attempt):
        return Reply(kind="status", status=502, detail="bad gateway") if nid == 3 else Reply(text=f"shape {nid}")

    with FakeLLMServer(script=script) as srv:
        assert RUNNERS[api](report, srv, monkeypatch, retries=2) == 1
        assert srv.attempts[(api, 3)] == tries
    assert sorted(answers(report)) == [0, 1, 4, 5]


@pytest.mark.parametrize("api", ["openai", "replicate"])
def test_the_same_client_error_for_the_first_neurons_stops_the_run(api, report, monkeypatch):
    """A 422 for every neuron (a schema the model does not take) stops after 3, not after all of them."""
    script = lambda _, nid, attempt: Reply(kind="status", status=422, detail="input: unknown field")  # noqa: E731
    with FakeLLMServer(script=script) as srv:
        with pytest.raises(UserError, match="422"):
            RUNNERS[api](report, srv, monkeypatch, workers=1, retries=0)
        assert concepts.REFUSALS_BEFORE_STOP <= sum(srv.attempts.values()) < len(LIVE)  # + one already in flight
    assert answers(report) == {}


def test_a_server_that_answers_no_api_stops_the_run_early_and_counts_what_failed(report, monkeypatch, waits, capsys):
    """A page that is not the API: each neuron would cost its retries, so the run stops, saying where to look;
    the count is of every neuron that failed, those in flight at the stop too (it said 8 after listing 10)."""
    monkeypatch.setattr(concepts, "FAILURES_BEFORE_STOP", 2)  # the tiny report has 5 live neurons (the real rule: 8)
    with FakeLLMServer(script=lambda *_: Reply(kind="html", text="Please sign in")) as srv:
        with pytest.raises(UserError, match=r"\d neurons failed and none was answered .*text, not JSON.*Please sign in"
                                            r".*check that the server is up") as stopped:
            run_openai(report, srv, monkeypatch, workers=2, retries=0, model="m")
        assert concepts.FAILURES_BEFORE_STOP <= sum(srv.attempts.values()) < len(LIVE)  # + those in flight at most
    listed = [line for line in capsys.readouterr().err.splitlines() if ": failed: " in line]
    assert str(stopped.value).startswith(f"openai: {len(listed)} neurons failed")
    assert answers(report) == {}


@pytest.mark.parametrize("model", ["m", ""])
def test_a_server_nothing_listens_on_stops_at_the_first_request(model, report, monkeypatch, waits):
    """Nothing at BASE_URL: every request would fail alike, so the first says so (it took 8 neurons' retries,
    33 s, and said 'connection error: Connection error.'); without MODEL the model listing finds it, before any
    neuron is asked. No answer made, so llm_config.json is not claimed by this server."""
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with pytest.raises(UserError, match=r"^openai: cannot connect to http://127\.0\.0\.1:\d+/v1/ \(.*\): is the "
                                        r"server up, and is BASE_URL right\?") as stopped:
        monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
        stage.main(report_dir=str(report), backend="openai", base_url=url, workers=1, retries=0, model=model)
    assert "\n" not in str(stopped.value) and "Connection error." not in str(stopped.value)
    assert not (report / "llm_config.json").exists() and answers(report) == {}


def test_replicate_at_an_address_nothing_listens_on_stops_at_the_first_request(report, monkeypatch, waits):
    monkeypatch.setenv("REPLICATE_API_TOKEN", REPLICATE_TOKEN)
    monkeypatch.setenv("REPLICATE_API_BASE_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(UserError, match=r"^replicate: cannot connect to http://127\.0\.0\.1:\d+ .*is the server up"):
        stage.main(report_dir=str(report), backend="replicate", workers=1, retries=0)
    assert not (report / "llm_config.json").exists() and answers(report) == {}


def test_a_busy_server_fails_neurons_and_never_stops_the_run(report, monkeypatch, waits):
    """Rate limits and timeouts say the server is busy, not wrong: the neurons are listed for a rerun (exit 1)."""
    monkeypatch.setattr(concepts, "FAILURES_BEFORE_STOP", 2)
    script = lambda _, nid, attempt: (Reply(kind="status", status=(429, 503)[nid % 4 == 1], detail="busy")  # noqa: E731
                                      if nid % 2 else Reply(kind="slow", delay=30.0, text="late"))
    with FakeLLMServer(script=script) as srv:
        assert run_openai(report, srv, monkeypatch, workers=2, retries=0, timeout=0.5, model="m") == 1
        assert {nid for (_, nid) in srv.attempts} == set(LIVE)  # every neuron was asked


def test_a_replicate_model_is_checked_before_any_request_and_its_404_says_where_to_look(report, monkeypatch):
    with FakeLLMServer() as srv:
        with pytest.raises(UserError, match="owner/name or owner/name:version, got 'nosuchmodel'"):
            run_replicate(report, srv, monkeypatch, model="nosuchmodel")
        assert srv.log == []  # nothing was sent
    script = lambda _, nid, attempt: Reply(kind="status", status=404, detail="Not found")  # noqa: E731
    with FakeLLMServer(script=script) as srv:
        with pytest.raises(UserError, match=r"HTTP 404: Not found \(no such model: is MODEL=nobody/nothing on "):
            run_replicate(report, srv, monkeypatch, model="nobody/nothing", workers=1)


def test_a_password_in_base_url_is_never_shown_or_stored(report, monkeypatch, capsys):
    assert llm_backends.public_url("https://u:s3cret@host:8/v1?api-key=k3y#x") == "https://host:8/v1"
    assert llm_backends.public_url("https://user:p@ss@host/v1") == "https://host/v1"  # up to the last @
    script = lambda _, nid, attempt: Reply(kind="status", status=404, detail="not found")  # noqa: E731
    with FakeLLMServer(script=script) as srv:
        url = srv.openai_url.replace("://", "://user:s3cret@")
        with pytest.raises(UserError, match="404") as refused:
            run_openai(report, srv, monkeypatch, workers=1, retries=0, base_url=url)  # no MODEL: lists models
    stored = (report / "llm_summary.json").read_text()  # llm_config.json: only from a run that made answers
    assert "s3cret" not in str(refused.value) + stored + "".join(capsys.readouterr())
    assert json.loads(stored)["base_url"] == srv.openai_url.rstrip("/") + "/"
    assert not (report / "llm_config.json").exists()


def free_port() -> int:
    """A port nothing listens on (bound, then closed, by this process)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_404_says_where_to_look(report, monkeypatch):
    script = lambda _, nid, attempt: Reply(kind="status", status=404, detail="not found")  # noqa: E731
    with FakeLLMServer(script=script) as srv:
        with pytest.raises(UserError, match=r"HTTP 404: not found \(no such model or path: is MODEL=m served there.*"
                                            r"/v1\?\)\); answers so far are kept"):
            run_openai(report, srv, monkeypatch, workers=1, retries=0, model="m")


def test_rate_limits_that_outlast_the_retries_fail_neurons_not_the_run(report, monkeypatch, waits):
    script = lambda _, nid, attempt: Reply(kind="status", status=429, detail="slow down")  # noqa: E731
    with FakeLLMServer(script=script) as srv:
        assert run_openai(report, srv, monkeypatch, workers=1, retries=0) == 1  # "N neurons failed", exit 1
        assert sum(srv.attempts.values()) == len(LIVE)


def test_long_offline_labels_are_not_asked_again_on_a_rerun(report, capsys):
    """The stored answer is the parsed label (cut to MAX_WORDS); a rerun compares like with like."""
    assert stage.main(report_dir=str(report), backend="offline", max_words=3) == 0
    before = (report / "llm_output.jsonl").read_bytes()
    assert stage.main(report_dir=str(report), backend="offline", max_words=3) == 0
    assert (report / "llm_output.jsonl").read_bytes() == before
    assert "0 neurons to ask" in capsys.readouterr().err


def test_a_client_error_after_answers_fails_only_that_neuron(report, monkeypatch):
    script = lambda _, nid, attempt: (Reply(kind="status", status=400, detail="image too large") if nid >= 3  # noqa: E731
                                      else Reply(text=f"shape {nid}"))
    with FakeLLMServer(script=script) as srv:
        assert run_openai(report, srv, monkeypatch, workers=1, retries=0) == 1
    assert sorted(answers(report)) == [0, 1]  # 3, 4 and 5 failed and are listed, the run went on


def test_cli_exit_code_says_when_neurons_failed(report, monkeypatch):
    from selfexplain.config import run_cli

    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    script = lambda _, nid, attempt: Reply(kind="status", status=500) if nid == 0 else Reply(text="wheel")  # noqa: E731
    with FakeLLMServer(script=script) as srv:
        argv = [f"--report_dir={report}", "--backend=openai", f"--base_url={srv.openai_url}", "--backoff=0.01",
                "--retries=1"]
        with pytest.raises(SystemExit) as failed:
            run_cli(stage.main, vars(stage), argv)
        assert failed.value.code == 1
        with pytest.raises(SystemExit) as resumed:  # only neuron 0 is asked again, and fails again
            run_cli(stage.main, vars(stage), argv + ["--only=[1, 0]"])
        assert resumed.value.code == 1 and srv.attempts[("openai", 0)] == 4 and srv.attempts[("openai", 1)] == 1
    assert sorted(answers(report)) == [1, 3, 4, 5]


def test_malformed_answers_are_retried_then_reported(report, monkeypatch):
    def script(_, nid, attempt):
        if nid == 1:
            return Reply(text="" if attempt == 1 else "Concept: **pointed roof**")
        return Reply(text="?!?! ...") if nid == 4 else Reply(text=f"shape {nid}")

    with FakeLLMServer(script=script) as srv:
        assert run_openai(report, srv, monkeypatch, retries=2) == 1
        assert srv.attempts[("openai", 4)] == 3
    got = answers(report)
    assert got[1]["answer"] == "pointed roof" and got[1]["attempts"] == 2
    assert 4 not in got and sorted(got) == [0, 1, 3, 5]


@pytest.mark.parametrize("api", ["openai", "replicate"])
def test_slow_answers_time_out_then_fail(api, report, monkeypatch):
    def script(_, nid, attempt):
        return Reply(kind="slow", delay=30.0, text="late") if nid == 5 else Reply(text=f"shape {nid}")

    with FakeLLMServer(script=script) as srv:
        assert RUNNERS[api](report, srv, monkeypatch, timeout=1.0, retries=1) == 1
        assert srv.attempts[(api, 5)] == 2
        if api == "replicate":  # timed-out predictions are cancelled, not left running
            assert sum(e["path"].endswith("/cancel") for e in srv.requests("replicate")) == 2
    assert sorted(answers(report)) == [0, 1, 3, 4]
    failed = json.loads((report / "llm_summary.json").read_text())["failed"]
    assert failed[0]["neuron_id"] == 5 and "timed out" in failed[0]["error"]


def test_answers_made_before_a_fatal_stop_are_counted_and_shown_in_the_atlas(report, monkeypatch):
    def script(_, nid, attempt):  # the key is revoked after two neurons
        return Reply(text=f"shape number {nid}") if nid in LIVE[:2] else Reply(kind="status", status=401,
                                                                              detail="key revoked")
    with FakeLLMServer(script=script) as srv:
        with pytest.raises(UserError, match="401"):
            run_openai(report, srv, monkeypatch, workers=1, retries=0, model="m")
    assert set(answers(report)) == set(LIVE[:2])
    summary = json.loads((report / "llm_summary.json").read_text())
    assert summary["answered"] == 2 and summary["asked"] == len(LIVE) and "401" in summary["stopped"]
    atlas = (report / "index.html").read_text()
    assert "shape number 0" in atlas and "shape number 1" in atlas


def test_bad_token_stops_the_run_with_a_clear_error(report, monkeypatch):
    with FakeLLMServer(token="sk-the-right-key-0123456789") as srv:
        with pytest.raises(UserError, match="401"):
            run_openai(report, srv, monkeypatch, workers=1, model="m")
        assert len([e for e in srv.log if e["status"] == 401]) < len(LIVE)  # stopped early
    assert answers(report) == {}
    summary = json.loads((report / "llm_summary.json").read_text())  # this run's, not an earlier run's
    assert summary["backend"] == "openai" and summary["answered"] == 0 and "401" in summary["stopped"]
    assert summary["failed"] and all("401" in f["error"] for f in summary["failed"])  # the failures that stopped it


@pytest.mark.parametrize("api", ["openai", "replicate"])
def test_token_never_appears_in_logs_or_files(api, report, monkeypatch, capsys):
    token = TOKENS[api]

    def script(_, nid, attempt):  # a server that echoes the token back in errors and answers
        if nid == 1:
            return Reply(kind="status", status=500, detail=f"upstream rejected Bearer {token}")
        return Reply(text=f"shape {nid} {token}" if attempt == 1 else f"shape {nid}")

    with FakeLLMServer(token=token, script=script) as srv:
        assert RUNNERS[api](report, srv, monkeypatch, retries=1) == 1
        assert srv.answered()  # the token was used to authenticate
    out = capsys.readouterr()
    core = token[3:24]  # also catches a token that answer parsing reshaped
    assert core not in out.out + out.err
    for path in report.rglob("*"):
        if path.is_file():
            assert core.encode() not in path.read_bytes(), path


def test_offline_answers_are_replaced_by_a_real_backend(report, monkeypatch):
    assert stage.main(report_dir=str(report), backend="offline") == 0
    with FakeLLMServer() as srv:
        assert run_openai(report, srv, monkeypatch) == 0
    got = answers(report)  # the latest answer per neuron, all from the LLM now
    assert sorted(got) == LIVE and {r["backend"] for r in got.values()} == {"openai"}
    assert json.loads((report / "llm_config.json").read_text())["ASKED"]["backend"] == "openai"
    assert concepts.load_concepts(report)[0] == "shape number 0"


def test_killed_run_resumes_without_asking_twice_or_losing_a_neuron(report, monkeypatch, tmp_path):
    """SIGKILL a run mid-way (one request held open), tear its tail, rerun: each neuron once."""
    held = {"on": True}

    def script(_, nid, attempt):
        return Reply(kind="hold") if held["on"] and nid >= 4 else Reply(text=f"shape {nid}")

    out = report / "llm_output.jsonl"
    with FakeLLMServer(token=OPENAI_KEY, script=script) as srv:
        env = {**os.environ, "OPENAI_API_KEY": OPENAI_KEY}
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "sae_summary_to_llm.py"), f"--report_dir={report}", "--backend=openai",
             f"--base_url={srv.openai_url}", "--model=m", "--workers=2", "--backoff=0.01"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        # kill only once every delivered answer is on disk and a request hangs
        while not (srv.held() and len(read_jsonl(out)) == sum(srv.answered().values()) > 0):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        srv.release()
        first = set(srv.answered())
        assert first and first < set(LIVE)
        with open(out, "a") as fh:
            fh.write('{"neuron_id": 5, "answ')  # what a torn write would leave
        held["on"] = False
        assert run_openai(report, srv, monkeypatch, model="m") == 0
        answered = srv.answered()
    assert answered == Counter({i: 1 for i in LIVE})  # each neuron answered exactly once overall
    assert sorted(answers(report)) == LIVE
    assert out.read_bytes().endswith(b"\n")


def test_backend_ask_api_for_stage_5(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    with FakeLLMServer(script=lambda *_: Reply(text="It is a bicycle because of the two wheels.")) as srv:
        backend = llm_backends.make_backend("openai", "gpt-test", srv.openai_url, timeout=5.0, retries=0)
        assert (backend.name, backend.model) == ("openai", "gpt-test")
        text = prompts.why_prompt("bicycle", 0.9, [("wheel", 0.6)])
        sentence = backend.ask(prompts.why_system_prompt(), text)
        sent = srv.requests("openai")[-1]
    assert sentence == "It is a bicycle because of the two wheels."
    assert sent["system"] == prompts.why_system_prompt() and "'bicycle' with probability 90%" in sent["text"]
    assert "wheel (60% of the evidence)" in sent["text"]
    assert concepts.load_concepts(Path("nowhere")) == {}


def test_offline_label_names_a_well_detected_ground_truth_part():
    neuron = {"neuron_id": 3, "top_classes": [{"class": "a-b-c"}], "where": {"description": "upper right"},
              "parts": {"best_part": "spiral", "auroc": 0.93, "in_box_share": 0.8}}
    assert prompts.offline_label(neuron) == "offline: spiral (train AUROC 0.93), upper right"
    neuron["parts"]["distractor_auroc"] = 0.85  # ... and detects it among other classes' sketches too
    assert prompts.offline_label(neuron) == "offline: spiral (train AUROC 0.93), upper right"
    neuron["parts"]["distractor_auroc"] = 0.6  # fires on the part's classes more than on the part: not named
    assert prompts.offline_label(neuron) == "offline: strokes typical of a-b-c, upper right"
    neuron["parts"].update(distractor_auroc=None, auroc=0.6)  # a weak detector is not named after the part
    assert prompts.offline_label(neuron) == "offline: strokes typical of a-b-c, upper right"
    neuron["clear_class"] = False  # stage 3 found no clear class (weak PMI, or too few images): no class echo
    assert prompts.offline_label(neuron) == "offline: strokes without a clear class preference, upper right"
    neuron["clear_classes"] = ["a-b-c"]  # stage 3 names only the classes that hold (PMI and support)
    assert prompts.offline_label(neuron) == "offline: strokes typical of a-b-c, upper right"


# ----------------------------------------------------------------------------- injected text
@pytest.mark.parametrize("raw, concept", [
    ("\x1b]0;pwned\x07round wheel", "round wheel"),  # a window-title escape
    ("\x1b[31mred\x1b[0m spokes", "red spokes"),  # colours
    ("wheel\u202e rim\x00\x08", "wheel rim"),  # a bidi override, NUL, backspace
])
def test_control_characters_never_pass_parse_concept(raw, concept):
    assert prompts.parse_concept(raw) == concept


def test_control_characters_in_class_names_and_answers_are_not_stored(report, monkeypatch):
    records = read_jsonl(report / "neurons.jsonl")
    records[0]["top_classes"][0]["class"] = "wheel\x1b]0;owned\x07"
    artifacts.write_jsonl(report / "neurons.jsonl", records)
    assert stage.main(report_dir=str(report), backend="offline", only=[0]) == 0
    with FakeLLMServer(script=lambda _, nid, attempt: Reply(text="\x1b]0;pwned\x07spoked \x1b[2Jwheel")) as srv:
        assert run_openai(report, srv, monkeypatch, only=[1]) == 0
        sent = next(e["text"] for e in srv.requests("openai") if e.get("neuron_id") == 1)
    raw = (report / "llm_output.jsonl").read_bytes()
    assert b"\x1b" not in raw and b"\\u001b" not in raw and b"\x07" not in raw and b"\\u0007" not in raw
    assert answers(report)[0]["answer"].startswith("offline: strokes typical of wheel/")
    assert answers(report)[1]["answer"] == "spoked wheel"
    assert "\x1b" not in sent  # class names are cleaned before they reach the prompt too


# ----------------------------------------------------------------------------- reasoning models
def test_reasoning_models_get_max_completion_tokens_and_no_temperature(report, monkeypatch):
    with FakeLLMServer(reasoning_models=("o3-mini", "gpt-5-mini")) as srv:
        assert run_openai(report, srv, monkeypatch, model="o3-mini", only=[0, 1]) == 0
        chats = [e for e in srv.requests("openai") if e["path"] == "/v1/chat/completions"]
    assert {e["status"] for e in chats} == {200}  # no 400 first
    assert all("max_completion_tokens" in e["params"] and not {"max_tokens", "temperature"} & set(e["params"])
               for e in chats)


def test_unsupported_parameter_falls_back_once_per_parameter(report, monkeypatch, capsys):
    # a reasoning model under a name the backend does not recognise: the server's 400s teach it
    with FakeLLMServer(reasoning_models=("house-reasoner",)) as srv:
        assert run_openai(report, srv, monkeypatch, model="house-reasoner", workers=1) == 0
        chats = [e for e in srv.requests("openai") if e["path"] == "/v1/chat/completions"]
    assert sorted(answers(report)) == LIVE
    assert [e["status"] for e in chats[:3]] == [400, 400, 200]  # max_tokens, then temperature, then answered
    assert all(e["status"] == 200 for e in chats[3:])  # later neurons never repeat the refused parameters
    assert "max_completion_tokens" in chats[-1]["params"] and "temperature" not in chats[-1]["params"]
    assert "refuses 'max_tokens'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- stale answers
def test_answers_for_another_sae_are_set_aside_and_asked_again(report, capsys):
    assert stage.main(report_dir=str(report), backend="offline") == 0
    assert {r["sae_fingerprint"] for r in read_jsonl(report / "llm_output.jsonl")} == {SAE_FP}
    assert all(r["prompt_version"] == prompts.prompt_version() and r["model"] == "offline"
               for r in read_jsonl(report / "llm_output.jsonl"))
    artifacts.write_json(report / "summary.json", {"sae_fingerprint": "0123456789abcdef"})  # stage 2 and 3 rerun
    capsys.readouterr()
    assert stage.main(report_dir=str(report), backend="offline") == 0
    assert "5 neurons to ask, 0 already answered" in capsys.readouterr().err
    assert len(read_jsonl(report / "llm_output.jsonl")) == 2 * len(LIVE)  # the old lines are kept, not deleted
    assert sorted(answers(report, "0123456789abcdef")) == LIVE
    concepts.load_concepts(report, "fedcba9876543210")  # an SAE nothing was made for
    assert "set aside 10 answers and 6 summaries made for another SAE" in capsys.readouterr().err
    assert concepts.load_concepts(report, "fedcba9876543210") == {}
    assert stage.main(report_dir=str(report), backend="offline", prune=True) == 0  # retrained often: tidy up
    assert "pruned 5 answers made for another SAE" in capsys.readouterr().err
    assert {r["sae_fingerprint"] for r in read_jsonl(report / "llm_output.jsonl")} == {"0123456789abcdef"}
    assert sorted(answers(report, "0123456789abcdef")) == LIVE  # the current SAE's answers stay


def test_a_changed_prompt_or_model_is_asked_again(report, monkeypatch):
    with FakeLLMServer() as srv:
        assert run_openai(report, srv, monkeypatch, model="m1", only=[0]) == 0
        assert run_openai(report, srv, monkeypatch, model="m1", only=[0]) == 0  # nothing changed: not asked
        assert srv.attempts[("openai", 0)] == 1
        assert run_openai(report, srv, monkeypatch, model="m2", only=[0]) == 0
        assert srv.attempts[("openai", 0)] == 2
        monkeypatch.setattr(prompts, "prompt_version", lambda: "edited0")
        assert run_openai(report, srv, monkeypatch, model="m2", only=[0]) == 0
        assert srv.attempts[("openai", 0)] == 3
    assert answers(report)[0]["prompt_version"] == "edited0" and answers(report)[0]["model"] == "m2"


def test_load_concepts_prefers_answers_then_summaries_of_the_same_sae(report):
    artifacts.append_jsonl(report / "llm_output.jsonl", {"neuron_id": 1, "answer": "spoked wheel", "backend": "openai",
                                                         "model": "m", "sae_fingerprint": SAE_FP})
    artifacts.append_jsonl(report / "llm_output.jsonl", {"neuron_id": 3, "answer": "old", "backend": "openai",
                                                         "model": "m", "sae_fingerprint": "ffffffffffffffff"})
    got = concepts.load_concepts(report, SAE_FP)
    assert got[1] == "spoked wheel" and got[3] == "fires on sun" and got[0] == "fires on wheel"



def test_an_unclear_answer_is_kept_but_never_cited_as_the_concept(report):
    """The prompt lets the model say "unclear"; an explanation must not read "because of unclear"."""
    artifacts.append_jsonl(report / "llm_output.jsonl", {"neuron_id": 0, "answer": "Unclear.", "backend": "openai",
                                                         "model": "m", "sae_fingerprint": SAE_FP})
    assert prompts.is_unclear("Unclear.") and not prompts.is_unclear("unclear stroke blob")
    assert prompts.is_unclear("unclear - the images vary") and prompts.is_unclear("Unclear (mixed strokes)")
    assert concepts.load_concepts(report, SAE_FP)[0] == "fires on wheel"  # the statistics summary stays


# ----------------------------------------------------------------------------- nothing lost
def test_runs_only_append_and_a_second_concurrent_run_is_refused(report):
    out = report / "llm_output.jsonl"
    foreign = b'{"neuron_id": 9, "answer": "written by another run", "backend": "openai", "model": "m"}\n'
    out.write_bytes(foreign)
    assert stage.main(report_dir=str(report), backend="offline") == 0
    assert out.read_bytes().startswith(foreign)  # never rewritten, only appended to
    with concepts.AnswerLog(out):  # another run holds the file
        with pytest.raises(UserError, match="another sae_summary_to_llm.py run is writing"):
            stage.main(report_dir=str(report), backend="offline", only=[DEAD])
    assert stage.main(report_dir=str(report), backend="offline", only=[DEAD]) == 0  # released on exit
    assert out.read_bytes().startswith(foreign)


def test_ctrl_c_keeps_the_answers_of_requests_in_flight(report):
    """SIGINT while 2 slow requests are in flight: both answers reach the file, nothing else is asked."""
    out = report / "llm_output.jsonl"
    script = lambda _, nid, attempt: Reply(delay=2.0, text=f"shape {nid}")  # noqa: E731  (answers after 2 s)
    with FakeLLMServer(token=OPENAI_KEY, script=script) as srv:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "sae_summary_to_llm.py"), f"--report_dir={report}", "--backend=openai",
             f"--base_url={srv.openai_url}", "--model=m", "--workers=2"],
            env={**os.environ, "OPENAI_API_KEY": OPENAI_KEY}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            preexec_fn=ctrl_c_as_in_a_terminal)
        deadline = time.monotonic() + 60
        while sum(srv.attempts.values()) < 2:  # both workers have sent their request
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0].decode()
        paid = srv.answered()
    assert proc.returncode == 130, output
    assert "interrupted" in output and sum(paid.values()) == 2
    assert {r["neuron_id"] for r in read_jsonl(out)} == set(paid)  # every answer paid for is on disk


# ----------------------------------------------------------------------------- local files
def test_thumbnail_paths_outside_the_report_are_never_read_or_sent(report, tmp_path, monkeypatch, capsys):
    secret = tmp_path / "secret.png"
    Image.new("L", (16, 16), color=255).save(secret)
    records = read_jsonl(report / "neurons.jsonl")
    (report / "thumbs" / "link.png").symlink_to(secret)
    examples = records[0]["top_examples"]
    examples[0]["thumb"], examples[1]["thumb"] = str(secret), "../secret.png"
    examples.append(dict(examples[2], thumb="thumbs/link.png"))  # a link inside that points outside
    artifacts.write_jsonl(report / "neurons.jsonl", records)
    with FakeLLMServer() as srv:
        assert run_openai(report, srv, monkeypatch, only=[0]) == 0
        sent = srv.requests("openai")[-1]
    assert sent["images"] == 1  # only thumbs/n0000_2.png, which is inside the report
    assert "is not inside" in capsys.readouterr().err
    assert concepts.contained(report, "thumbs/n0000_2.png") == (report / "thumbs/n0000_2.png").resolve()
    assert concepts.contained(report, "/etc/passwd") is None and concepts.contained(report, "thumbs/../..") is None


def test_prompt_carries_the_real_image_frequency_and_the_threshold_rule():
    neuron = {"neuron_id": 3, "image_frequency": 0.42, "frequency": 0.0099, "quantile": 0.99, "threshold": 1.234,
              "mean_on_activation": 2.0}
    text = prompts.neuron_prompt(neuron)
    assert "fires at all on 42.0% of training sketches" in text
    assert "99th percentile" in text and "about 1% of sketches by definition" in text
    # interpolated quantiles leave up to one image more above τ (1.01% on the demo): never "at most 1%" beside it
    assert "for 0.99% of all training sketches" in text and "at most 1%" not in text
    lowered = prompts.neuron_prompt({**neuron, "quantile": 0.875})  # QUANTILE lowered on small data
    assert "87.5th percentile" in lowered and "about 12.5% of sketches by definition" in lowered
    assert "probability 99.6%." in prompts.why_prompt("triangle", 0.996, [("circle", 0.5)])  # not "100%"


def test_prompt_states_what_a_rare_neuron_and_its_classes_are_without_contradiction():
    """Session 23: a neuron whose 99th percentile is 0 was 'strongly on ... about 1% of sketches by definition'
    for '0.05%' beside 'fires at all on 0.1%' (the same 3 images); each class's share was Laplace-smoothed
    (56 of 58 read 81%) and classes below chance were listed among those it fires for."""
    rare = {"neuron_id": 0, "image_frequency": 3 / 5760, "frequency": 3 / 5760, "quantile": 0.99, "threshold": 0.0,
            "mean_on_activation": 1.0, "n_on": 3}
    text = prompts.neuron_prompt(rare)
    assert "fires at all on 0.05% of training sketches" in text and "for 0.05% of all" in text
    assert "by definition" not in text and "strongly on means on at all" in text
    common = {"neuron_id": 1, "image_frequency": 0.372, "frequency": 58 / 5760, "quantile": 0.99, "threshold": 1.5,
              "mean_on_activation": 2.0, "n_on": 58, "top_classes": [
                  {"class": "triangle-arc-dots", "pmi": 2.28, "p_class_given_on": 0.81, "count": 56, "lens": 0.5},
                  {"class": "zigzag-arc-spiral", "pmi": -0.67, "p_class_given_on": 0.04, "count": 2, "lens": 0.1}]}
    text = prompts.neuron_prompt(common)
    assert "- triangle-arc-dots: PMI +2.28; 56 of 58 strongly-on sketches; lens +0.50" in text
    assert "zigzag-arc-spiral" not in text  # below chance: not a class it fires for
    assert "- none above chance" in prompts.neuron_prompt({**common, "top_classes": common["top_classes"][1:]})


def test_the_atlas_summary_gives_a_rare_neurons_share_as_its_card_does():
    from selfexplain import report as report_module

    rec = {"dead": False, "image_frequency": 3 / 5760, "top_classes": [], "n_on": 3,
           "where": {"description": "centre"}}
    assert report_module.auto_summary(rec).startswith("Active on 0.05% of images")  # the card's 'active 0.05%'


# ----------------------------------------------------------------------------- session 14: a walkthrough's findings
def test_workers_in_flight_when_a_parameter_is_refused_ask_again_without_it(report, monkeypatch):
    """Every request in flight had sent max_tokens; the first 400 dropped it, the others then found it
    'already dropped' and failed: 3 such neurons stopped the whole run (exit 2)."""
    with FakeLLMServer(reasoning_models=("house-reasoner",), refusal_delay=0.3) as srv:
        assert run_openai(report, srv, monkeypatch, model="house-reasoner", workers=5) == 0
        chats = [e for e in srv.requests("openai") if e["path"] == "/v1/chat/completions"]
    assert sorted(answers(report)) == LIVE
    assert sum(e["status"] == 400 for e in chats) >= 5  # the race happened: every worker saw a refusal


@pytest.mark.parametrize("cut", ["<think>circles, maybe wheels", ""])  # thinking in the text, or in its own field
def test_a_reasoning_model_cut_off_while_thinking_is_asked_with_room_to_answer(report, monkeypatch, capsys, cut):
    def script(api, nid, attempt):
        return Reply(text=cut, finish="length") if attempt == 1 else Reply(text="wheel")

    with FakeLLMServer(script=script) as srv:
        assert run_openai(report, srv, monkeypatch, model="deepseek-r1:14b", workers=1, only=[0, 1]) == 0
        chats = srv.requests("openai")
    assert [a["answer"] for a in answers(report).values()] == ["wheel", "wheel"]
    assert chats[0]["params"]["max_tokens"] == llm_backends.OPENAI_MAX_TOKENS
    assert chats[-1]["params"]["max_tokens"] == llm_backends.REASONING_MAX_TOKENS  # learnt from the first cut-off
    assert "thinks before it answers" in capsys.readouterr().err


@pytest.mark.parametrize("reply, words", [
    (Reply(kind="json", body={"error": {"message": "upstream provider down", "code": 502}}), "upstream provider down"),
    (Reply(text="", finish="length"), "cut off before it began"),
])
def test_a_reply_without_text_says_why(report, monkeypatch, reply, words):
    with FakeLLMServer(script=lambda api, nid, attempt: reply) as srv:
        assert run_openai(report, srv, monkeypatch, only=[0], retries=0) == 1
    summary = json.loads((report / "llm_summary.json").read_text())
    assert summary["failed"][0]["neuron_id"] == 0 and words in summary["failed"][0]["error"]


def test_an_account_out_of_quota_stops_at_once(report, monkeypatch, waits):
    quota = Reply(kind="status", status=429, code="insufficient_quota", detail="You exceeded your current quota")
    with FakeLLMServer(script=lambda api, nid, attempt: quota) as srv:
        with pytest.raises(UserError, match="out of quota"):
            run_openai(report, srv, monkeypatch, workers=1, retries=0)
        assert len(srv.requests("openai")) <= 2  # the next one may have started; not all 5, each with retries


def test_a_server_busy_for_every_neuron_stops_the_run(report, monkeypatch, waits):
    busy = Reply(kind="status", status=503, detail="overloaded")
    monkeypatch.setattr(concepts, "BUSY_BEFORE_STOP", 3)
    with FakeLLMServer(script=lambda api, nid, attempt: busy) as srv:
        with pytest.raises(UserError, match="busy .* for 3 neurons and answered none"):
            run_openai(report, srv, monkeypatch, workers=1, retries=0)


def test_auto_never_sends_a_key_kept_in_dotenv(report, monkeypatch, tmp_path):
    """./.env held a real key; the environment named only a local server: auto sent the key there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(f"OPENAI_API_KEY={OPENAI_KEY}\n")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("REPLICATE_API_TOKEN", raising=False)
    with FakeLLMServer() as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.openai_url)
        assert stage.main(report_dir=str(report), backend="auto", only=[0]) == 0
        sent = {e.get("auth") for e in srv.requests("openai") if e["path"] == "/v1/chat/completions"}
    assert sent == {f"Bearer {llm_backends.NO_KEY}"}


@pytest.mark.parametrize("name", ["REPLICATE_API_TOKEN", "OPENAI_API_KEY"])
@pytest.mark.parametrize("bad", ["r8_abcdefghijklmnop\u201d", "sk-abcdefghijklmnopqrst\r", "sk-abc def"])
def test_a_token_with_characters_no_token_has_is_one_line(monkeypatch, name, bad):
    monkeypatch.setenv(name, bad)
    with pytest.raises(UserError, match=f"{name} holds characters no token has") as info:
        llm_backends.make_backend("replicate" if name.startswith("REPLICATE") else "openai")
    assert bad.strip() not in str(info.value)


def test_replicate_never_sleeps_a_retry_after_longer_than_the_timeout(report, monkeypatch, waits):
    limited = Reply(kind="status", status=429, detail="throttled", headers={"Retry-After": "3600"})
    with FakeLLMServer(token=REPLICATE_TOKEN, script=lambda api, nid, attempt: limited) as srv:
        run_replicate(report, srv, monkeypatch, only=[0], retries=1, timeout=5)
    assert waits and max(waits) <= 5  # 3600 s outlived SIGTERM


def test_llm_summary_says_why_the_run_stopped_in_words():
    assert stage.stop_reason(KeyboardInterrupt()) == "interrupted (Ctrl-C)"
    assert stage.stop_reason(SystemExit(143)) == "terminated (SIGTERM)"  # was "143"
    assert stage.stop_reason(UserError("openai refused the requests")) == "openai refused the requests"


def test_a_second_ctrl_c_quits_without_waiting_for_threads_in_flight(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(
        "import threading, time\n"
        "from selfexplain.config import run_cli\n"
        "def main():\n"
        "    threading.Thread(target=time.sleep, args=(60,)).start()  # a request in flight to a hung server\n"
        "    raise KeyboardInterrupt\n"
        "if __name__ == '__main__':\n"
        "    run_cli(main, globals())\n")
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=50)
    assert done.returncode == 130 and done.stderr.strip() == "interrupted"
    assert time.monotonic() - start < 30  # not after the thread's 60 s
