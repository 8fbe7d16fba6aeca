"""`make run`: migrate, first-start setup, then the Huey consumer and the web server together."""

from __future__ import annotations

import errno
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError

from hypervisor_site.terminal import PrintableCommand
from workqueue.importer import configured_roots, inside
from workqueue.models import Queue

EXAMPLES = Path(settings.BASE_DIR) / "examples" / "inbox"
MANAGE = Path(settings.BASE_DIR) / "manage.py"


class Command(PrintableCommand):
    help = "Migrate, set up a first start, and run the Huey consumer and the web server."

    def add_arguments(self, parser):
        parser.add_argument("--addr", default="127.0.0.1:8000", help="host:port to serve on")
        parser.add_argument(
            "--setup-only",
            action="store_true",
            help="migrate and do the first-start setup, then exit",
        )

    def handle(self, *args, **options):
        if not options["setup_only"]:
            # Before the first start's password is made: it is shown once, by a server
            # that is really up, never beside another program's.
            refuse_a_taken_address(options["addr"])
        call_command("migrate", interactive=False, verbosity=0)
        login = self.first_start_login()
        self.import_examples_once()
        if options["setup_only"]:
            if login:  # shown once: no later start can show it
                self.stdout.write(self.first_start_words(login))
            return
        self.serve(options["addr"], login)

    def first_start_login(self) -> tuple[str, str] | None:
        """Create an admin login when there is no user at all; the password is shown once."""
        users = get_user_model()
        if users.objects.exists():
            return None
        password = secrets.token_urlsafe(12)
        users.objects.create_superuser("admin", "", password)
        return "admin", password

    def import_examples_once(self) -> None:
        """A copy of examples/inbox in the data folder, imported: workers' finishes and the
        board write into their tasks' files, which must not be the repository's."""
        data = Path(settings.HYPERVISOR_DATA_DIR)
        marker = data / ".examples-imported"
        copy = data.resolve() / "examples" / "inbox"
        if marker.exists():
            self.move_examples_out_of_the_repository(copy)
            return
        if not EXAMPLES.is_dir():
            return
        if not inside(copy, configured_roots()):
            return  # HYPERVISOR_IMPORT_ROOTS leaves the examples out: the board could not
            # write their files, and the person chose other folders
        shutil.copytree(EXAMPLES, copy, dirs_exist_ok=True)
        call_command("import_tasks", str(copy), queue="examples", stdout=self.stdout)
        marker.write_text(f"examples/inbox was copied to {copy} and imported on first start\n")

    def move_examples_out_of_the_repository(self, copy: Path) -> None:
        """A first start before the copy (an install upgraded since) imported the
        repository's examples/inbox itself: finishes and edits still wrote there, and a
        `git pull` meets them. Its files as they are now go to the copy, the tasks with them."""
        repository = str(EXAMPLES.resolve())
        if not inside(copy, configured_roots()):
            return
        if not Queue.objects.filter(name="examples", folder=repository).exists():
            return
        shutil.copytree(EXAMPLES, copy, dirs_exist_ok=True)  # copy2: mtimes kept, not re-read
        Queue.objects.move_folder("examples", repository, copy)
        self.stdout.write(
            f"The examples queue now reads its copy in {copy}, no longer the repository's "
            "examples/inbox (`git checkout -- examples/inbox` undoes what was written there)."
        )

    def say_where_to_log_in(self, addr: str, login: tuple[str, str] | None) -> None:
        # The style as the write's, not in its text: the text's escapes are written out.
        self.stdout.write(f"\nHypervisor is running at http://{addr}/", self.style.SUCCESS)
        if login:
            self.stdout.write(self.first_start_words(login))
        else:
            self.stdout.write(
                "Log in with your account (lost the admin password? "
                "`python manage.py changepassword admin`)"
            )
        self.stdout.write("Press Ctrl-C to stop the web server and the Huey consumer.\n")

    def first_start_words(self, login: tuple[str, str]) -> str:
        return (
            f"First start: log in as {login[0]} with password {login[1]}\n"
            "(shown once; change it with `python manage.py changepassword admin`)"
        )

    def serve(self, addr: str, login: tuple[str, str] | None) -> None:
        python = sys.executable
        # Handlers first: a Ctrl-C during start-up must still stop both children.
        stopping = False

        def stop(signum, frame):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        huey = subprocess.Popen([python, str(MANAGE), "run_huey"])
        # --insecure: serve static files with DEBUG off; this is the embedded, local default.
        web = subprocess.Popen(
            [python, str(MANAGE), "runserver", addr, "--noreload", "--insecure"]
        )
        # Say where to log in once our server answers, below its own start-up banner (one
        # that exited at once answers nothing: its error is said below, not a password).
        wait_for_port(addr, timeout=20)
        if web.poll() is None:
            self.say_where_to_log_in(addr, login)

        children = {"huey": huey, "web": web}
        failed = None
        while not stopping and failed is None:
            for name, child in children.items():
                if child.poll() is not None:
                    failed = name
            time.sleep(0.2)
        for child in children.values():
            if child.poll() is None:
                # SIGINT lets Huey finish what it runs; runserver stops at once either way.
                child.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 10
        for child in children.values():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if failed:
            raise CommandError(
                f"the {failed} process exited with code {children[failed].returncode}; "
                "stopped the other one"
            )
        self.stdout.write("Stopped.")


def refuse_a_taken_address(addr: str) -> None:
    host, _, port = addr.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise CommandError(f"--addr {addr!r}: give host:port, such as 127.0.0.1:8000") from None
    if not 0 < number <= 65535:  # 0 would be any free port, which no one could be told
        raise CommandError(f"--addr {addr}: the port must be 1 to 65535")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host.strip("[]") or "127.0.0.1", number))
    except socket.gaierror as exc:
        raise CommandError(f"--addr {addr}: no host {host!r} here ({exc.strerror})") from None
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
            # Not an address of this machine, say: another port would not help.
            raise CommandError(f"cannot serve on {addr}: {exc.strerror or exc}") from None
        raise CommandError(
            f"cannot serve on {addr}: {exc.strerror or exc} (another server there?); "
            f"stop it, or pass another port: `python manage.py start --addr {host or '127.0.0.1'}:"
            f"{number + 1 if number < 65535 else 8001}`"
        ) from None


def wait_for_port(addr: str, timeout: float) -> bool:
    host, _, port = addr.rpartition(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False
