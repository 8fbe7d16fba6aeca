"""What our processes write where a person reads it: text a terminal shows and never obeys.

Task files, their names and what agents print are untrusted (DESIGN.md). An escape sequence
in a title, a file name or an agent's error would otherwise reach the terminal of whoever
runs `work`, `herd` or `import_tasks`, or reads a worker's log with `cat`: clear it, retitle
it, move its cursor over earlier lines, or write its clipboard. Every log line and every
line a command writes has its control characters written as escapes (`\\x1b`); JSON output
escapes them already.
"""

from __future__ import annotations

import logging

from django.core.management.base import BaseCommand, OutputWrapper

from workqueue.text import printable


class PrintableFormatter(logging.Formatter):
    inner: logging.Formatter | None = None  # another's format, made printable

    @classmethod
    def around(cls, formatter: logging.Formatter | None) -> PrintableFormatter:
        made = cls()
        made.inner = formatter
        return made

    def format(self, record: logging.LogRecord) -> str:
        return printable((self.inner or super()).format(record))


class PrintableOutput(OutputWrapper):
    def write(self, msg="", style_func=None, ending=None):
        super().write(printable(msg), style_func, ending)


class _Printable:
    """A command's output stream, made printable whenever Django sets it (at the command's
    start, or from call_command's `stdout=`)."""

    def __set_name__(self, owner, name: str) -> None:
        self.attribute = f"_{name}"

    def __get__(self, command, owner=None):
        return self if command is None else getattr(command, self.attribute)

    def __set__(self, command, wrapper: OutputWrapper) -> None:
        if not isinstance(wrapper, PrintableOutput):
            output = PrintableOutput(wrapper._out, wrapper.ending)
            output.style_func = wrapper.style_func
            wrapper = output
        setattr(command, self.attribute, wrapper)


class PrintableCommand(BaseCommand):
    stdout = _Printable()
    stderr = _Printable()
