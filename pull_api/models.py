"""Per-user API tokens for the MCP endpoint: stored as a hash, shown once."""

from __future__ import annotations

import hashlib
import os
import secrets
from datetime import timedelta

import psutil
from django.conf import settings
from django.core.validators import RegexValidator
from django.db import IntegrityError, models, transaction
from django.db.models.signals import post_save, pre_delete
from django.dispatch import receiver
from django.utils import timezone

from workqueue.locks import Identity
from workqueue.models import HTTP_HOST, Status, Task

PREFIX = "hv_"
NAME = RegexValidator(
    r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,49}\Z",
    "1 to 50 letters, digits, '_', '.' or '-', starting with a letter or digit.",
)
HOLDER_CHARS = Task._meta.get_field("holder").max_length
# last_used_at is written at most this often: a busy agent must not make a write per call.
USE_STAMP_INTERVAL = timedelta(minutes=1)


def digest(secret: str) -> str:
    # The secret is 256 random bits: a plain hash cannot be reversed or guessed.
    return hashlib.sha256(secret.encode()).hexdigest()


class NameTaken(Exception):
    """The user has a token of that name already."""


class ApiTokenQuerySet(models.QuerySet):
    def active(self) -> ApiTokenQuerySet:
        return self.filter(revoked_at__isnull=True, user__is_active=True)


class ApiToken(models.Model):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=50, validators=[NAME])
    digest = models.CharField(max_length=64, unique=True)
    hint = models.CharField(max_length=12, help_text="The first characters, to recognise it.")
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = ApiTokenQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["user", "name"], name="api_token_unique_name")
        ]

    def __str__(self) -> str:
        return f"{self.user} / {self.name}"

    @classmethod
    def issue(cls, user, name: str) -> tuple[ApiToken, str]:
        """A new token for `user`; the secret is returned here and never stored."""
        secret = PREFIX + secrets.token_urlsafe(32)
        try:
            with transaction.atomic():
                token = cls.objects.create(
                    user=user, name=name, digest=digest(secret), hint=secret[: len(PREFIX) + 6]
                )
        except IntegrityError:  # two creations of one name at once: the constraint decides
            raise NameTaken(name) from None
        return token, secret

    @classmethod
    def authenticate(cls, secret: str) -> ApiToken | None:
        """The live token with this secret, or None (unknown, revoked, inactive user)."""
        if not secret.startswith(PREFIX) or len(secret) > 200:
            return None
        token = cls.objects.active().select_related("user").filter(digest=digest(secret)).first()
        if token is not None:
            now = timezone.now()
            if token.last_used_at is None or now - token.last_used_at > USE_STAMP_INTERVAL:
                ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        return token

    def revoke(self, by: str = "") -> bool:
        """Revoke the token, and give back what its agent holds: it can no longer finish
        it, and its claims would otherwise stay held until their leases ran out."""
        revoked = bool(
            ApiToken.objects.filter(pk=self.pk, revoked_at__isnull=True).update(
                revoked_at=timezone.now()
            )
        )
        if revoked:
            self.give_back(f"its token {self.name} was revoked", by)
        return revoked

    def give_back(self, why: str, by: str = "") -> None:
        """Give back what this token's agent holds, which it can no longer finish: held,
        it would wait for its lease to run out."""
        from workqueue import actions, claims  # not in a worker's start-up

        held = Task.objects.filter(status=Status.CLAIMED, holder=self.worker_name)
        released = actions.act(held, "release", by or self.worker_name, message=why)
        claims.apply_pending_changes(released.changed)

    @property
    def worker_name(self) -> str:
        """The holder name of this token's claims: one token, one agent. A username too
        long for the holder's column is cut short, and told apart again by the user's id
        (no Django username has a '~')."""
        user, tail = self.user.get_username(), f"/{self.name}"
        room = HOLDER_CHARS - len("mcp:") - len(tail)
        if len(user) > room:
            mark = f"~{self.user_id}"
            user = user[: room - len(mark)] + mark
        return f"mcp:{user}{tail}"

    def identity(self) -> Identity:
        """Claims over HTTP live by lease: the host is marked so that no reaper judges
        them by the pid of whichever web process served the claim."""
        pid = os.getpid()
        return Identity(
            worker=self.worker_name,
            host=f"{HTTP_HOST}{settings.HYPERVISOR_HOST}",
            pid=pid,
            started=psutil.Process(pid).create_time(),
        )

    def permits(self, tool: str) -> bool:
        # Here, not at the top: the tools' module brings the task editor and its YAML
        # parser, which every process loading the models (each worker) would pay for.
        from workqueue.pull import READ_TOOLS

        need = "queue.view_task" if tool in READ_TOOLS else "queue.change_task"
        return self.user.has_perm(need)


@receiver(post_save, sender=settings.AUTH_USER_MODEL)
def give_back_a_deactivated_accounts_claims(sender, instance, **kwargs) -> None:
    """A deactivated account's tokens stop at once (ApiTokenQuerySet.active): what their
    agents hold goes back with them, as on a revocation."""
    if not instance.is_active:
        _give_back_claims_of(instance, "deactivated")


@receiver(pre_delete, sender=settings.AUTH_USER_MODEL)
def give_back_a_deleted_accounts_claims(sender, instance, **kwargs) -> None:
    _give_back_claims_of(instance, "deleted")


def _give_back_claims_of(user, ended: str) -> None:
    for token in user.api_tokens.filter(revoked_at__isnull=True):
        token.give_back(f"its account {user.get_username()} was {ended}")
