"""A minimal SMTP server on loopback for the tests (RFC 5321's commands, no extensions): what the portal's
SMTP backend sends is received over a real connection and kept, one ``email.message.Message`` per DATA."""

from __future__ import annotations

import email
import socket
import socketserver
import threading
from email.message import Message

import pytest


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        server: SmtpServer = self.server  # type: ignore[assignment]
        self._say(220, "test SMTP ready")
        envelope: dict = {"from": None, "to": []}
        while True:
            line = self.rfile.readline()
            if not line:
                return
            command = line.decode("ascii", "replace").strip()
            verb = command.split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                self._say(250, "test")
            elif verb == "MAIL":
                envelope = {"from": command.split(":", 1)[1].strip(" <>"), "to": []}
                self._say(*server.mail_reply)
            elif verb == "RCPT":
                server.rcpts += 1
                code, text = server.rcpt_reply
                if code == 250:
                    envelope["to"].append(command.split(":", 1)[1].strip(" <>"))
                self._say(code, text)
            elif verb == "DATA":
                self._say(354, "end with <CRLF>.<CRLF>")
                data = bytearray()
                while True:
                    chunk = self.rfile.readline()
                    if chunk in (b".\r\n", b".\n", b""):
                        break
                    data += chunk[1:] if chunk.startswith(b"..") else chunk
                message = email.message_from_bytes(bytes(data))
                with server.lock:
                    server.received.append((envelope["from"], list(envelope["to"]), message))
                self._say(250, "queued")
            elif verb == "RSET":
                envelope = {"from": None, "to": []}
                self._say(250, "ok")
            elif verb == "NOOP":
                self._say(250, "ok")
            elif verb == "QUIT":
                self._say(221, "bye")
                return
            else:
                self._say(502, "not implemented")

    def _say(self, code: int, text: str) -> None:
        self.wfile.write(f"{code} {text}\r\n".encode())


class SmtpServer(socketserver.ThreadingTCPServer):
    """``with SmtpServer() as smtp:`` — listens on 127.0.0.1 (``smtp.port``); ``smtp.received``: (envelope
    sender, recipients, message) of every message, in order."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.port = self.server_address[1]
        self.received: list[tuple[str, list[str], Message]] = []
        self.rcpt_reply = (250, "ok")  # what RCPT TO is answered (a test sets 550 or 450)
        self.mail_reply = (250, "ok")  # what MAIL FROM is answered (a test sets 553: the sender refused)
        self.rcpts = 0  # RCPT TO commands seen
        self.lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> SmtpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


def closed_port() -> int:
    """A loopback port nothing listens on (a relay that is down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def relay(settings):
    """An SMTP relay on loopback the portal's e-mail goes to (``EMAIL_URL`` as ``smtp://127.0.0.1:<port>``)."""
    with SmtpServer() as smtp:
        settings.EMAIL_ENABLED = True
        settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
        settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", smtp.port
        settings.EMAIL_USE_TLS = settings.EMAIL_USE_SSL = False
        settings.EMAIL_TIMEOUT = 5
        settings.DEFAULT_FROM_EMAIL = "VirtCloud portal <virtcloud@example.org>"
        settings.SITE_URL = "https://portal.example.org"
        yield smtp
