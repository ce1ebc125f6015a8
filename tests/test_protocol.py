"""epo_tui.protocol: every message is a typed dataclass with one way to and from its line."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from epo_tui import protocol
from epo_tui.features import FeatureEntry

ELITE = protocol.Elite(penalty=1.0, token_ids=[50256, 7], tokens=["<|endoftext|>", "hi"], token_bytes=["", "6869"],
                       activations=[0.0, 2.5], act=2.5, xent=3.25, objective=-0.75, prompt_start=1, text="hi")
POINT = protocol.FrontierPoint(iteration=3, xent=3.25, objective=-0.75, act=2.5, token_ids=[7], text="hi")
SESSION = protocol.SessionInfo(id="20261125-120000-abc123", status="interrupted", features=[5, 9], label="bridges",
                               model="google/gemma-2-2b", sae="gemma-scope-2b-pt-res/layer_12", hook="blocks.12.hook_resid_post",
                               iteration=40, iterations_total=100, checkpoint_iteration=38,
                               created="2026-11-25T12:00:00+00:00", updated="2026-11-25T12:30:00+00:00", error="oom")

# one of each message, every field set to something other than its default
COMMANDS = [
    protocol.HelloCommand(id=1, client="test"),
    protocol.LoadCommand(id="a", config={"model": {"name": "gpt2"}}),
    protocol.LoadCommand(id=2, config_path="/x/config.toml"),
    protocol.LoadCommand(demo=True),
    protocol.FeaturesCommand(id=3),
    protocol.StartCommand(id=4, feature={"index": 5}, search={"iterations": 9}, seed_prompt="Once",
                          checkpoint_seconds=0.5),
    protocol.StartCommand(resume="2026", search={"iterations": 40}),
    protocol.PauseCommand(), protocol.ResumeCommand(), protocol.StopCommand(),
    protocol.ResumeCommand(id=8, session="20261125-1200", iterations=200),
    protocol.SessionsCommand(id=9), protocol.SessionCommand(id=10, session="abc1"),
    protocol.ScoreCommand(id=5, text="Debian", feature=3),
    protocol.InjectCommand(text="hello"),
    protocol.ShutdownCommand(id=6),
]
EVENTS = [
    protocol.Hello(id=1, worker="1.0", protocol=1, pid=42),
    protocol.State(state="compiling", detail="starting prompts"),
    protocol.Ready(id="a", model="gpt2", sae="res-jb/8", hook="blocks.8.hook_resid_pre", d_sae=24576,
                   neuronpedia_id="gpt2-small/8-res-jb", dtype="float32", devices=["TFRT_CPU_0"], device_kind="cpu",
                   model_parallel=2, config={"search": {"elites": 8}}, labels="/x/labels.jsonl"),
    protocol.FeatureList(features=[FeatureEntry(index=3, top_tokens=(" a", "b"), top_token_ids=(1, 2), label="x",
                                                log10_density=-3.5)]),
    protocol.Started(id=4, session="s1", label="feature 5", feature={"kind": "sae", "indices": [5]}, iteration=2,
                     iterations_total=9, lambdas=[1.0], elites=[ELITE]),
    protocol.Progress(session="s1", iteration=3, iterations_total=9, it_per_s=2.5, budget_left_s=60.0,
                      elites=[ELITE], frontier_new=[POINT], best_objective=-0.75),
    protocol.Checkpointed(session="s1", iteration=3),
    protocol.Finished(session="s1", status="stopped", iteration=3, iterations_total=9, folder="/s/s1",
                      reason="its time budget (2m) ran out"),
    protocol.Scored(id=5, feature=3, tokens=["<|endoftext|>", "hi"], token_bytes=["", "6869"], token_ids=[1, 7],
                    activations=[9.0, 2.5], xent=[None, 3.25], prompt_start=1),
    protocol.Injected(elite=2, act=2.5, xent=3.25, text="hello"),
    protocol.Error(id=7, kind="input", message="score: no model loaded", traceback="Traceback ..."),
    protocol.Log(level="warning", message="sae.labels not applied"),
    protocol.Bye(reason="shutdown"),
    protocol.SessionList(id=9, host="tpu-vm-0", folder="/home/r/.cache/epo-tui/sessions", sessions=[SESSION],
                         problems=["20261124-090000-aaaaaa: session.json: not valid JSON; skipped"]),
    protocol.SessionDetails(id=10, session=SESSION, meta={"id": SESSION.id, "label": None}, elites=[ELITE],
                            history=[POINT], problems=[], running_elsewhere=True),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: type(c).__name__)
def test_a_command_reads_back_as_it_was_written(command):
    assert protocol.parse_command(protocol.encode(command)) == command


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_an_event_reads_back_as_it_was_written(event):
    line = protocol.encode(event)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert protocol.parse_event(line) == event


def test_every_type_has_a_class_and_every_class_a_type():
    assert set(protocol.COMMANDS) == {"hello", "load", "features", "start", "pause", "resume", "stop", "score",
                                      "inject", "shutdown", "sessions", "session"}
    assert {type(c) for c in COMMANDS} == set(protocol.COMMANDS.values())
    assert {type(e) for e in EVENTS} == set(protocol.EVENTS.values())


def test_the_line_is_versioned_typed_and_leaves_unset_command_fields_out():
    line = protocol.encode(protocol.ScoreCommand(id=3, text="hi"))
    assert line == b'{"v":1,"type":"score","id":3,"text":"hi"}\n'  # no "feature": null for an older worker
    assert json.loads(protocol.encode(protocol.Bye())) == {"v": 1, "type": "bye", "reason": None}
    assert protocol.to_json(protocol.State(state="idle")) == {"type": "state", "state": "idle", "detail": None}


@pytest.mark.parametrize(("line", "message"), [
    (b'{"v":1,"type":"score"}', "score: missing field 'text'"),
    (b'{"v":1,"type":"score","text":3}', "score: field 'text': input should be a valid string"),
    (b'{"v":1,"type":"score","text":"a","feature":"3"}', "score: field 'feature': input should be a valid integer"),
    (b'{"v":1,"type":"score","text":"a","feature":true}', "score: field 'feature': input should be a valid integer"),
    (b'{"v":1,"type":"score","text":"a","colour":1}', "score: unknown field 'colour'"),
    (b'{"v":1,"type":"start","checkpoint_seconds":"5"}',
     "start: field 'checkpoint_seconds': input should be a valid number"),
    (b'{"v":1,"type":"load","demo":1}', "load: field 'demo': input should be a valid boolean"),
    (b'{"v":1,"type":"format"}', "unknown command 'format'"),
    (b'{"v":2,"type":"hello"}', "protocol version 2 is not supported"),
    (b'[1]', "expected a JSON object, found list"),
])
def test_a_malformed_command_is_one_protocol_error_naming_the_field(line, message):
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.parse_command(line)
    assert str(err.value).startswith(message)


def test_a_malformed_commands_id_is_kept_for_the_answer():
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.parse_command(b'{"v":1,"type":"score","id":"x9"}')
    assert err.value.id == "x9"


@pytest.mark.parametrize(("fields", "message"), [
    ({"session": "s", "iteration": "3", "iterations_total": 9, "elites": []},
     "progress: field 'iteration': input should be a valid integer"),
    ({"session": "s", "iteration": 3, "iterations_total": 9, "elites": [{"act": 1.0}]},
     "progress: missing field 'elites.0.penalty'"),
    ({"session": "s", "iteration": 3, "iterations_total": 9, "elites": [], "frontier_new": [{"iteration": 3}]},
     "progress: missing field 'frontier_new.0.xent'"),
])
def test_a_malformed_event_is_one_protocol_error_naming_the_field(fields, message):
    with pytest.raises(protocol.ProtocolError, match=f"^{message}$"):
        protocol.parse_event(json.dumps({"v": 1, "type": "progress", **fields}).encode())


def test_an_events_unknown_fields_are_skipped_and_its_missing_optional_ones_default():
    """A newer worker may add a field; an older one may lack one (neuronpedia_id came later)."""
    event = protocol.parse_event(json.dumps({
        "v": 1, "type": "ready", "model": "m", "sae": "s", "hook": "h", "d_sae": 4, "dtype": "float32",
        "devices": ["cpu"], "device_kind": "cpu", "config": {}, "from_the_future": [1, 2]}).encode())
    assert isinstance(event, protocol.Ready) and event.neuronpedia_id is None and event.model_parallel == 1


def test_building_a_message_checks_its_types_too():
    with pytest.raises(ValidationError):
        protocol.Finished(session="s", status="done", iteration=1, iterations_total=1, folder="/f")  # not a status
    with pytest.raises(ValidationError):
        protocol.ScoreCommand(text=b"bytes")
    with pytest.raises(ValueError):  # JSON has no NaN: never written as a line another reader would refuse
        protocol.encode(protocol.Injected(elite=0, act=float("nan"), xent=1.0, text="x"))


def test_an_elite_is_the_same_on_the_wire_and_on_disk():
    on_disk = ELITE.to_json()
    assert "feature_activations" not in on_disk and protocol.Elite.from_json(on_disk) == ELITE
    combined = protocol.Elite.from_json({**on_disk, "feature_activations": {"3": [0.0, 1.0], "9": [0.0, 2.0]}})
    assert combined.feature_activations == {"3": [0.0, 1.0], "9": [0.0, 2.0]}
    older = {k: v for k, v in on_disk.items() if k != "token_bytes"}  # files written before token_bytes
    assert protocol.Elite.from_json(older).token_bytes == []


def test_every_event_reaches_the_app_as_a_textual_message_of_its_own():
    from epo_tui.tui.worker_messages import MESSAGES, message_for

    assert set(MESSAGES) == {*protocol.EVENTS.values(), protocol.WorkerStarted, protocol.WorkerExited}
    handlers = [cls.handler_name for cls in MESSAGES.values()]
    assert len(set(handlers)) == len(handlers) and "on_worker_progress" in handlers  # none shadows another
    assert "on_ready" not in handlers  # Textual's own Ready event keeps its handler
    progress = EVENTS[5]
    assert message_for(progress).event is progress
