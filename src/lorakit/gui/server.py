"""`lorakit gui`: serve the page, safe by default.

It binds 127.0.0.1. Another host is refused unless a login is set (`--auth user:pass`, or the
LORAKIT_GUI_AUTH environment variable, which keeps the password out of the process list), or
`--allow-unauthenticated-remote` says that the network in between is trusted. Files are read and written
only inside the `--root` folders (default: the current folder).
"""
from __future__ import annotations

import atexit
import ipaddress
import os

from lorakit.gui.paths import Roots

AUTH_ENV = "LORAKIT_GUI_AUTH"


class UnsafeServerError(ValueError):
    """A setting that would expose the GUI without a login."""


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, colon, password = text.partition(":")
    if not colon or not user or not password:
        raise UnsafeServerError("authentication is user:password (both non-empty)")
    return user, password


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name that could resolve anywhere


def check_exposure(host: str, auth: tuple[str, str] | None, allow_unauthenticated_remote: bool) -> None:
    if not is_loopback(host) and auth is None and not allow_unauthenticated_remote:
        raise UnsafeServerError(f"--host {host} exposes the GUI (and the files under its roots) to the network: set "
                                f"--auth user:password or {AUTH_ENV}, or pass --allow-unauthenticated-remote if "
                                "the network is trusted")


def serve(host: str = "127.0.0.1", port: int = 7860, roots: list[str] | None = None, auth: str | None = None,
          allow_unauthenticated_remote: bool = False, block: bool = True):
    """Start the server (blocking unless block=False); returns the gradio app."""
    login = parse_auth(auth if auth is not None else os.environ.get(AUTH_ENV))
    check_exposure(host, login, allow_unauthenticated_remote)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home; the GUI works offline
    try:
        from lorakit.gui.view import CSS, build_app
    except ImportError as e:  # gradio is pinned in requirements-lock.txt; a bare `pip install lorakit` lacks it
        raise ValueError(f"the GUI needs gradio ({e}): pip install -r requirements-lock.txt") from None

    allowed = Roots.of(roots)
    app = build_app(allowed)
    atexit.register(app.runs.stop)  # a run the GUI started ends (saving its state) with the GUI
    app.queue(default_concurrency_limit=4)
    app.launch(server_name=host, server_port=port, auth=login, allowed_paths=[str(r) for r in allowed.folders],
               prevent_thread_lock=not block, ssr_mode=False, inbrowser=False, show_error=True,
               footer_links=[], quiet=False, css=CSS)
    return app
