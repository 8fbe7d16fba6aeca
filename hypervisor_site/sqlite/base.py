"""Django's SQLite backend, with every writer queueing on one lock first.

See hypervisor_site.writers: a transaction (BEGIN IMMEDIATE) takes the writers' lock
before it begins and gives it up when it commits or rolls back; a write statement in
autocommit mode (QuerySet.update, Model.save) takes it around itself.
"""

from __future__ import annotations

import re

from django.db.backends.sqlite3 import base

from hypervisor_site.writers import WriterTurn

# Writes to the main database; the connection's own temporary one needs no turn.
WRITE = re.compile(
    r"\s*(?:INSERT|UPDATE|DELETE|REPLACE)\b(?!(?:\s+OR\s+\w+)?\s+INTO\s+temp\.)", re.IGNORECASE
)


class DatabaseWrapper(base.DatabaseWrapper):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.writer_turn: WriterTurn | None = None

    def turn(self) -> WriterTurn:
        name = self.settings_dict["NAME"]
        if self.writer_turn is None or self.writer_turn.path != f"{name}.writers":
            if self.writer_turn is not None:
                self.writer_turn.close()
            self.writer_turn = WriterTurn(str(name))
        return self.writer_turn

    def _start_transaction_under_autocommit(self):
        turn = self.turn()
        turn.take()
        try:
            super()._start_transaction_under_autocommit()
        except BaseException:
            turn.give_up()
            raise

    def _commit(self):
        try:
            return super()._commit()
        finally:
            self._give_up_turn()

    def _rollback(self):
        try:
            return super()._rollback()
        finally:
            self._give_up_turn()

    def _close(self):
        try:
            return super()._close()
        finally:
            if self.writer_turn is not None:
                self.writer_turn.close()

    def _give_up_turn(self) -> None:
        if self.writer_turn is not None:
            self.writer_turn.give_up()

    def create_cursor(self, name=None):
        cursor = self.connection.cursor(factory=QueueingCursor)
        cursor.wrapper = self
        return cursor


class QueueingCursor(base.SQLiteCursorWrapper):
    wrapper: DatabaseWrapper

    def execute(self, query, params=None):
        if self._queues(query):
            with _Turn(self.wrapper):
                return super().execute(query, params)
        return super().execute(query, params)

    def executemany(self, query, param_list):
        if self._queues(query):
            with _Turn(self.wrapper):
                return super().executemany(query, param_list)
        return super().executemany(query, param_list)

    def _queues(self, query: str) -> bool:
        # Inside a transaction the turn is held already (taken at BEGIN).
        turn = self.wrapper.writer_turn
        return not (turn is not None and turn.held) and bool(WRITE.match(query))


class _Turn:
    """A write statement in autocommit mode: its own turn, for as long as it runs."""

    def __init__(self, wrapper: DatabaseWrapper):
        self.turn = wrapper.turn()

    def __enter__(self):
        self.turn.take()

    def __exit__(self, *exc):
        self.turn.give_up()
