"""Errors of the trainer side of the protocol."""


class TrainerError(Exception):
    """Base of the errors this package raises."""


class ProtocolError(TrainerError):
    """The edge and the trainer do not understand each other (a frame or message is wrong)."""


class TaskError(TrainerError):
    """Raise it from ``fit`` or ``evaluate`` to fail a task with a message: the edge reports the
    message to the cloud (``job status`` shows it for this node) and sends the next task."""


class EdgeGone(TrainerError):
    """The edge closed the connection (it stopped, or stopped this trainer)."""
