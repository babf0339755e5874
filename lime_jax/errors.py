"""The one way an error becomes the one-line message every command prints (`lime-jax <cmd>: ...`)."""

from __future__ import annotations


def one_line(err: BaseException | str, limit: int | None = None) -> str:
  """`err`'s text with its white space folded to single spaces; cut after `limit` characters
  (for messages that quote foreign libraries at length); the type's name when it has no text."""
  text = " ".join(str(err).split())
  if not text and isinstance(err, BaseException):
    return type(err).__name__
  return text[:limit] + " ..." if limit is not None and len(text) > limit else text
