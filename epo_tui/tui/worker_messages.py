"""The worker's events as Textual messages: one class per event type, so the app has one handler each.

The app's worker loop posts `message_for(event)` for every event the client's bus delivers; a widget
handles `on_worker_<event>` (e.g. `on_worker_progress`). Each message carries the `protocol` event
unchanged in `.event`. The namespace keeps the names apart from Textual's own (`events.Ready`).
"""

from __future__ import annotations

from textual.message import Message

from epo_tui import protocol


class WorkerMessage(Message, namespace="worker"):
    """An event from the worker (or from the client about the worker)."""

    def __init__(self, event: protocol.Event) -> None:
        super().__init__()
        self.event = event


class Hello(WorkerMessage, namespace="worker"):
    event: protocol.Hello


class State(WorkerMessage, namespace="worker"):
    event: protocol.State


class Ready(WorkerMessage, namespace="worker"):
    event: protocol.Ready


class FeatureList(WorkerMessage, namespace="worker"):
    event: protocol.FeatureList


class Started(WorkerMessage, namespace="worker"):
    event: protocol.Started


class Progress(WorkerMessage, namespace="worker"):
    event: protocol.Progress


class Checkpointed(WorkerMessage, namespace="worker"):
    event: protocol.Checkpointed


class Finished(WorkerMessage, namespace="worker"):
    event: protocol.Finished


class Scored(WorkerMessage, namespace="worker"):
    event: protocol.Scored


class Injected(WorkerMessage, namespace="worker"):
    event: protocol.Injected


class Error(WorkerMessage, namespace="worker"):
    event: protocol.Error


class Log(WorkerMessage, namespace="worker"):
    event: protocol.Log


class Bye(WorkerMessage, namespace="worker"):
    event: protocol.Bye


class SessionList(WorkerMessage, namespace="worker"):
    """An answer to the sessions browser's own request (it awaits it); the app needs no handler."""

    event: protocol.SessionList


class SessionDetails(WorkerMessage, namespace="worker"):
    """An answer to the sessions browser's own request (it awaits it); the app needs no handler."""

    event: protocol.SessionDetails


class ProcessStarted(WorkerMessage, namespace="worker"):
    event: protocol.WorkerStarted


class ProcessExited(WorkerMessage, namespace="worker"):
    event: protocol.WorkerExited


MESSAGES: dict[type[protocol.Event], type[WorkerMessage]] = {
    protocol.Hello: Hello, protocol.State: State, protocol.Ready: Ready, protocol.FeatureList: FeatureList,
    protocol.Started: Started, protocol.Progress: Progress, protocol.Checkpointed: Checkpointed,
    protocol.Finished: Finished, protocol.Scored: Scored, protocol.Injected: Injected, protocol.Error: Error,
    protocol.Log: Log, protocol.Bye: Bye, protocol.SessionList: SessionList, protocol.SessionDetails: SessionDetails,
    protocol.WorkerStarted: ProcessStarted,
    protocol.WorkerExited: ProcessExited}


def message_for(event: protocol.Event) -> WorkerMessage:
    """The Textual message that carries `event`."""
    return MESSAGES[type(event)](event)
