"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class MtcError(Exception):
    """A diagnostic about user input: a file, a node, an argument.

    Args:
        message: what was expected and what was found.
        file: the file the problem is in, if any.
        node: the node (or layer) name involved, if any.
        op: the node's op type (or layer type), if known.
        origin: the front-end layer the node came from (``mtc.origin``), if known.
        pass_name: the pass that found the problem, if any.
    """

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        node: str | None = None,
        op: str | None = None,
        origin: str | None = None,
        pass_name: str | None = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.node = node
        self.op = op
        self.origin = origin
        self.pass_name = pass_name
        super().__init__(self.format())

    def format(self) -> str:
        parts: list[str] = []
        if self.file:
            parts.append(self.file)
        if self.pass_name:
            parts.append(f"pass {self.pass_name}")
        if self.node is not None:
            where = f"node '{self.node}'"
            extra = ", ".join(x for x in (self.op, f"from {self.origin}" if self.origin else None) if x)
            if extra:
                where += f" ({extra})"
            parts.append(where)
        parts.append(self.message)
        # One line, always: messages from libraries can carry newlines.
        return ": ".join(parts).replace("\n", " ")

    def __str__(self) -> str:
        return self.format()
