"""Errors a user can act on. The CLI prints their message as one line, without a traceback."""


class FedlrError(Exception):
    """Base class: the message names the problem and the fix."""


class ConfigError(FedlrError, ValueError):
    """A setting is invalid; raised before any work starts."""


class NodeLimitError(FedlrError):
    """A job breaks a limit set on the node (its privacy, what it reads, what it allocates);
    the node refuses to train."""


class AdapterFileError(FedlrError):
    """An adapter file or directory is missing, unreadable or not in a format fedlr knows."""


class RoundFailedError(FedlrError):
    """Too few valid client updates to aggregate; the global state was left unchanged.
    `rejected` holds the round's rejections (`fedlr.lora.rounds.Rejection`), for the record."""

    def __init__(self, message: str, rejected: list | None = None) -> None:
        super().__init__(message)
        self.rejected = list(rejected or [])
