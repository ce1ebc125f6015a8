"""The UI side of the worker protocol (epo_tui.client), against tests/fake_worker.py as the worker.

Plain `asyncio.run` inside sync tests: no pytest plugin needed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

from pydantic import ValidationError

from epo_tui import protocol
from epo_tui.bus import FRONTIER_LIMIT, Bus, BusClosed
from epo_tui.client import WorkerClient, WorkerError, describe_exit, worker_command
from epo_tui.errors import UserError

FAKE = Path(__file__).resolve().parent / "fake_worker.py"


def fake(*args: str) -> list[str]:
    return [sys.executable, str(FAKE), *args]


def run(coroutine, timeout: float = 10.0):
    """Runs a test coroutine with a hard limit, so a hang fails instead of blocking the suite."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


async def next_of(subscription, type_: type, timeout: float = 5.0):
    """The next event of this type, skipping others."""
    async def find():
        while True:
            event = await subscription.get()
            if isinstance(event, type_):
                return event
    return await asyncio.wait_for(find(), timeout)


# ------------------------------------------------------------------------------------ worker_command


def test_worker_command_splits_like_a_shell_without_one():
    assert worker_command("ssh host epo-tui worker") == ["ssh", "host", "epo-tui", "worker"]
    assert worker_command("a 'b c'") == ["a", "b c"]
    assert worker_command("ssh host 'epo-tui worker; rm -rf ~'") == ["ssh", "host", "epo-tui worker; rm -rf ~"]
    assert worker_command(None)[1:] == ["-m", "epo_tui", "worker"]


@pytest.mark.parametrize("text", ["", "   "])
def test_worker_command_refuses_an_empty_command(text):
    with pytest.raises(UserError, match="empty"):
        worker_command(text)


def test_worker_command_refuses_unbalanced_quotes():
    with pytest.raises(UserError, match="closing quotation"):
        worker_command("ssh host 'epo-tui worker")


def test_a_missing_program_is_a_user_error():
    async def main():
        with pytest.raises(UserError, match="not found"):
            await WorkerClient(["/nonexistent/epo-tui-worker"]).start()
    run(main())


def test_describe_exit():
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-9) == "killed by SIGKILL (signal 9)"


# ------------------------------------------------------------------------------------------------- bus


def progress(iteration: int, frontier_at: tuple[int, ...] = ()) -> protocol.Progress:
    """A progress event of iteration `iteration`, with a frontier point from each of `frontier_at`."""
    return protocol.Progress(session="s", iteration=iteration, iterations_total=10, elites=[], frontier_new=[
        protocol.FrontierPoint(iteration=i, xent=1.0, objective=0.0, act=1.0, token_ids=[1], text="a")
        for i in frontier_at])


def log(message: str) -> protocol.Log:
    return protocol.Log(level="info", message=message)


def test_subscription_keeps_discrete_order_and_coalesces_progress_in_place():
    async def main():
        bus = Bus()
        sub = bus.subscribe()
        logs_only = bus.subscribe({protocol.Log})
        bus.publish(progress(1))
        bus.publish(log("a"))
        bus.publish(progress(2))
        bus.publish(log("b"))
        bus.publish(progress(3))
        assert sub.backlog == 3  # two logs and one progress slot
        got = [await sub.get() for _ in range(3)]
        # the progress slot keeps its first place but carries the newest content
        assert got == [progress(3), log("a"), log("b")]
        assert sub.get_nowait() is None
        assert [logs_only.get_nowait(), logs_only.get_nowait()] == [log("a"), log("b")]
        assert logs_only.get_nowait() is None and logs_only.latest(protocol.Progress) is None
        assert sub.latest(protocol.Progress).iteration == 3 and bus.latest(protocol.Log).message == "b"
    run(main())


def test_subscription_drops_its_oldest_discrete_events_when_full():
    async def main():
        sub = Bus().subscribe(limit=3)
        for i in range(5):
            sub.put(log(str(i)))
        assert sub.dropped == 2 and sub.backlog == 3
        assert [(await sub.get()).message for _ in range(3)] == ["2", "3", "4"]
    run(main())


def test_coalesced_progress_keeps_the_frontier_points_of_skipped_iterations():
    async def main():
        sub = Bus().subscribe()
        for i in range(1, 4):
            sub.put(progress(i, (i,)))
        event = await sub.get()
        assert event.iteration == 3 and [p.iteration for p in event.frontier_new] == [1, 2, 3]
        for i in range(FRONTIER_LIMIT + 5):
            sub.put(progress(i, (i,)))
        assert len((await sub.get()).frontier_new) == FRONTIER_LIMIT
    run(main())


def test_a_closed_subscription_drains_then_ends():
    async def main():
        bus = Bus()
        sub = bus.subscribe()
        bus.publish(log("last"))
        bus.close()
        assert [e async for e in sub] == [log("last")]
        with pytest.raises(BusClosed):
            await sub.get()
    run(main())


# ---------------------------------------------------------------------------------------------- client


def test_requests_are_answered_by_id():
    async def main():
        async with WorkerClient(fake("echo")) as client:
            sub = client.bus.subscribe()
            # three requests in flight at once, each gets its own answer
            scored, hello, ready = await asyncio.gather(
                client.request(protocol.ScoreCommand(text="Debian is free", feature=3)),
                client.request(protocol.HelloCommand(client="test")),
                client.request(protocol.LoadCommand(demo=True)))
            assert isinstance(scored, protocol.Scored) and scored.tokens == ["Debian", "is", "free"]
            assert scored.feature == 3 and isinstance(hello, protocol.Hello) and isinstance(ready, protocol.Ready)
            assert len({scored.id, hello.id, ready.id}) == 3
            assert client.hello.worker == "fake" and client.hello.id is None
            assert client.last_load == protocol.LoadCommand(demo=True)
            assert (await next_of(sub, protocol.Ready)).id == ready.id  # answers are published too
            id_ = await client.send(protocol.FeaturesCommand())
            assert (await next_of(sub, protocol.FeatureList)).id == id_ == ready.id + 1
            with pytest.raises(ValidationError):  # a malformed command cannot even be built
                protocol.ScoreCommand()
        assert client.returncode == 0 and not client.running
        assert (await next_of(sub, protocol.Bye)).reason == "shutdown"
        assert (await next_of(sub, protocol.WorkerExited)).returncode == 0
        with pytest.raises(WorkerError) as err:
            await client.request(protocol.HelloCommand())
        assert err.value.kind == "not_running"
    run(main())


def test_a_worker_error_answer_is_raised_with_its_kind():
    async def main():
        async with WorkerClient(fake("echo")) as client:
            errors = client.bus.subscribe({protocol.Error})
            with pytest.raises(WorkerError) as err:
                await client.request(protocol.ScoreCommand(text="x", feature=-1))
            assert err.value.kind == "input" and err.value.message == "feature -1 is out of range"
            assert (await errors.get()) is err.value.event  # published like any event
            assert isinstance(await client.request(protocol.ScoreCommand(text="still serving")), protocol.Scored)
    run(main())


def test_a_flood_of_progress_reaches_a_slow_subscriber_coalesced_and_bounded():
    n = 20_000

    async def main():
        client = WorkerClient(fake("flood", str(n)))
        slow = client.bus.subscribe()
        idle = client.bus.subscribe()  # never read until the end
        await client.start()
        progress, logs, frontier, backlogs = [], [], [], []
        while True:
            event = await asyncio.wait_for(slow.get(), 5)
            backlogs.append(slow.backlog)
            if isinstance(event, protocol.Progress):
                progress.append(event.iteration)
                frontier += [p.iteration for p in event.frontier_new]
            elif isinstance(event, protocol.Log):
                logs.append(event.message)
            elif isinstance(event, protocol.Bye):
                break
            await asyncio.sleep(0.005)  # a busy UI
        await client.close()
        assert 0 < len(progress) < n // 10
        assert progress[-1] == n and progress == sorted(progress)
        assert logs == [f"at {i}" for i in range(n // 10, n + 1, n // 10)]  # discrete events: all, in order
        assert frontier == list(range(100, n + 1, 100))  # no frontier point lost to coalescing
        # memory: one progress slot plus the 16 discrete events at most, never a backlog of n
        assert max(backlogs) <= 17 and slow.dropped == 0
        assert len(idle._coalesced) == 1 and len(idle._events) == 16 and idle.backlog == 17
        assert idle.latest(protocol.Progress).iteration == n
        types = [e.TYPE async for e in idle]  # the idle one still gets every discrete event, in order
        assert types[:3] == ["worker_started", "hello", "started"]
        assert types[-3:] == ["finished", "bye", "worker_exited"] and types.count("progress") == 1
    run(main())


def test_a_dying_worker_is_reported_with_exit_code_and_stderr_tail():
    async def main():
        mirrored = []
        client = WorkerClient(fake("die-after", "3"), on_stderr=mirrored.append)
        errors = client.bus.subscribe({protocol.Error})
        logs = client.bus.subscribe({protocol.Log})
        await client.start()
        with pytest.raises(WorkerError) as err:
            await client.request(protocol.ScoreCommand(text="pending while it dies"))
        assert err.value.kind == "worker_died" and "exit code 3" in str(err.value)
        died = await next_of(errors, protocol.Error)
        assert died.kind == "worker_died" and died.returncode == 3
        assert died.message == "the worker died: exit code 3"
        assert died.stderr_tail == [f"fake stderr line {i}" for i in range(10, 30)]
        assert client.stderr_tail(200) == mirrored == [f"fake stderr line {i}" for i in range(30)]
        assert [(await logs.get()).message for _ in range(3)] == ["event 0", "event 1", "event 2"]
        assert not client.running
        await client.close()  # nothing left to stop: returns at once
    run(main())


def test_a_sigkilled_worker_is_reported_as_killed_by_signal_9():
    async def main():
        client = WorkerClient(fake("sigkill-self"))
        errors = client.bus.subscribe({protocol.Error})
        await client.start()
        with pytest.raises(WorkerError, match="signal 9"):
            await client.request(protocol.HelloCommand())
        died = await next_of(errors, protocol.Error)
        assert died.message == "the worker died: killed by SIGKILL (signal 9)"
        assert died.returncode == -9 and died.stderr_tail == ["fake worker: about to SIGKILL myself"]
        await client.close()
    run(main())


def test_garbage_lines_become_protocol_errors_and_reading_goes_on():
    async def main():
        client = WorkerClient(fake("garbage"))
        sub = client.bus.subscribe({protocol.Error, protocol.Log, protocol.WorkerExited})
        await client.start()
        events = []
        while not events or not isinstance(events[-1], protocol.WorkerExited):
            events.append(await asyncio.wait_for(sub.get(), 5))
        await client.close()
        assert [e.TYPE for e in events] == ["error"] * 6 + ["log"] + ["error"] * 2 + ["log", "worker_exited"]
        errors = [e for e in events if isinstance(e, protocol.Error)]
        assert all(e.kind == "protocol" and e.origin == "client" for e in errors)
        assert "not JSON" in errors[0].message and errors[0].excerpt == "this is not json"
        assert "UTF-8" in errors[1].message and "object" in errors[2].message
        assert "'nope'" in errors[3].message and "99" in errors[4].message
        # a known event with a field of the wrong type: one error naming the field, never a crash later
        assert errors[5].message == "unreadable line from the worker: log: field 'message': input should be a " \
            "valid string"
        assert "longer than" in errors[6].message and "longer than" in errors[7].message
        assert f"{3 * protocol.MAX_LINE_BYTES + 10:,} bytes" in errors[7].message  # newline included
        assert events[-2].message == "after garbage"
    run(main())


def test_a_request_without_answer_times_out():
    async def main():
        async with WorkerClient(fake("sleep")) as client:
            started = time.monotonic()
            with pytest.raises(WorkerError) as err:
                await client.request(protocol.HelloCommand(), timeout=0.2)
            assert err.value.kind == "timeout" and time.monotonic() - started < 1
            assert client._waiting == {}
    run(main())


def test_close_kills_a_worker_that_ignores_shutdown_and_sigterm():
    async def main():
        client = WorkerClient(fake("hang-on-shutdown"))
        exited = client.bus.subscribe({protocol.WorkerExited, protocol.Error})
        await client.start()
        await next_of(client.bus.subscribe({protocol.Hello}), protocol.Hello)  # it is up and has set its signals
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await client.close(shutdown_timeout=0.3, terminate_timeout=0.3)
        assert time.monotonic() - started < 2.5
        assert client.returncode == -9 and not client.running
        event = await exited.get()  # a deliberate stop: not reported as a death
        assert isinstance(event, protocol.WorkerExited) and event.returncode == -9
    run(main())


def test_restart_replays_load_and_resumes_the_last_session(tmp_path):
    record = tmp_path / "commands.ndjson"

    async def main():
        async with WorkerClient(fake("echo", "--record", str(record))) as client:
            errors = client.bus.subscribe({protocol.Error})
            first_pid = client.pid
            await client.request(protocol.LoadCommand(config_path="/x/config.toml"))
            await client.request(protocol.StartCommand(feature={"index": 5}))
            assert client.last_session == "fake-session-1"
            with pytest.raises(WorkerError, match="exit code 5"):
                await client.request(protocol.ScoreCommand(text="__die__"))
            assert (await next_of(errors, protocol.Error)).kind == "worker_died"
            answer = await client.restart(resume=True, timeout=5)
            assert client.pid != first_pid and client.running
            assert isinstance(answer, protocol.Started) and answer.session == "fake-session-1"
            assert answer.iteration == 7
            assert client.last_session == "fake-session-1"
        return client

    client = run(main())
    commands = [json.loads(line) for line in record.read_text().splitlines()]
    assert [c["type"] for c in commands] == ["load", "start", "score", "load", "start", "shutdown"]
    assert commands[3]["config_path"] == "/x/config.toml"
    assert commands[4]["resume"] == "fake-session-1" and "feature" not in commands[4]
    assert client.returncode == 0


def test_resume_last_without_a_session_is_a_user_error():
    async def main():
        async with WorkerClient(fake("echo")) as client:
            with pytest.raises(UserError, match="nothing to resume"):
                await client.resume_last()
            assert await client.restart() is None  # nothing to replay either
            assert client.running
    run(main())
