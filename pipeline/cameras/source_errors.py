"""Why a camera or file is not delivering frames, as a code a program can act on.

The codes are Roboflow inference's (v1.4) for the same job, so code written against its
stream status reads ours (its enum spells them with a ``STREAM_`` prefix):

- ``CONNECTION_FAILED``: the source could not be reached or was lost (refused, reset,
  unreachable, a live stream that ended), and any failure to open or read that no other code
  names;
- ``AUTH_FAILED``: the camera or server refused the credentials (RTSP or HTTP 401, 403);
- ``TLS_CERTIFICATE``: the TLS certificate is not trusted or names another host;
- ``TLS_HANDSHAKE``: TLS failed otherwise (the other end speaks no TLS, or no common version);
- ``TIMEOUT``: no answer, or no frame, within the source's timeout;
- ``NOT_FOUND``: no such file, or the server has no such path (RTSP or HTTP 404);
- ``CODEC_UNSUPPORTED``: what came is no video this server decodes (no decoder for its codec,
  no video stream, data FFmpeg cannot read as one, a format a file source may not use).

``classify`` reads what FFmpeg raised through PyAV: the error's number (PyAV's
``av.error.*`` classes carry FFmpeg's ``AVERROR`` tags and the OS's errno as ``errno``), and,
for TLS, FFmpeg's last error line (``exc.log``), since FFmpeg answers every TLS failure with
the same EIO. Nothing here imports PyAV: it is a table over numbers and words.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

CONNECTION_FAILED = "CONNECTION_FAILED"
AUTH_FAILED = "AUTH_FAILED"
TLS_CERTIFICATE = "TLS_CERTIFICATE"
TLS_HANDSHAKE = "TLS_HANDSHAKE"
TIMEOUT = "TIMEOUT"
NOT_FOUND = "NOT_FOUND"
CODEC_UNSUPPORTED = "CODEC_UNSUPPORTED"
CODES = (CONNECTION_FAILED, AUTH_FAILED, TLS_CERTIFICATE, TLS_HANDSHAKE, TIMEOUT, NOT_FOUND, CODEC_UNSUPPORTED)


def _ffmpeg_tag(a: int | str, b: str, c: str, d: str) -> int:
    """The ``errno`` PyAV gives FFmpeg's ``AVERROR(FFERRTAG(a, b, c, d))`` (FFmpeg's ABI)."""
    first = a if isinstance(a, int) else ord(a)
    return first | ord(b) << 8 | ord(c) << 16 | ord(d) << 24


# errno -> code: FFmpeg's own errors (av.error.HTTPUnauthorizedError and the like, RTSP's
# status codes included: FFmpeg maps RTSP 401 to its HTTP 401 error), then the OS's.
BY_ERRNO = {
    _ffmpeg_tag(0xF8, "4", "0", "1"): AUTH_FAILED,  # Server returned 401 Unauthorized
    _ffmpeg_tag(0xF8, "4", "0", "3"): AUTH_FAILED,  # Server returned 403 Forbidden
    _ffmpeg_tag(0xF8, "4", "0", "4"): NOT_FOUND,  # Server returned 404 Not Found
    _ffmpeg_tag(0xF8, "D", "E", "C"): CODEC_UNSUPPORTED,  # Decoder not found
    _ffmpeg_tag("I", "N", "D", "A"): CODEC_UNSUPPORTED,  # Invalid data found when processing input
    _ffmpeg_tag("E", "X", "I", "T"): TIMEOUT,  # Immediate exit requested: PyAV's timeout
    errno.ENOENT: NOT_FOUND,
    errno.ETIMEDOUT: TIMEOUT,
    errno.ECONNREFUSED: CONNECTION_FAILED,
}
# FFmpeg's TLS layer (GnuTLS or OpenSSL) says which TLS failure it was only in its log, as a
# line of its "tls" component: (words in that line, lower case) -> (code, what people read),
# the first that matches; a line that matches none is a failed handshake. FFmpeg's error
# itself says only "Input/output error". GnuTLS: "Peer certificate failed verification",
# "The certificate's owner does not match hostname ..."; OpenSSL: "certificate verify failed".
TLS_LOG = "tls"
TLS_SAID = (("does not match hostname", TLS_CERTIFICATE, "TLS: certificate for another host"),
            ("certificate", TLS_CERTIFICATE, "TLS: certificate not trusted"))
TLS_FAILED = (TLS_HANDSHAKE, "TLS handshake failed")


@dataclass(frozen=True)
class SourceError:
    """Why a source is not delivering: ``text`` for people (``last_error``), ``code`` one of
    ``CODES`` for programs (``error_code``), or None where the reason is the server's own
    (its memory budget, an internal error), not the source's."""

    text: str
    code: str | None

    def __post_init__(self):
        if self.code is not None and self.code not in CODES:  # the set programs are written against
            raise ValueError(f"{self.code!r} is not a stream error code ({', '.join(CODES)})")


def classify(exc: BaseException, *, timed_out: bool = False, opening: bool = True) -> tuple[str, str]:
    """(code, FFmpeg's words for it) for what PyAV raised. ``timed_out``: the call it was
    raised from outlasted the source's timeout (an open that heard nothing is cut there,
    whatever FFmpeg then says); ``opening``: raised by the open, where TLS is negotiated (a TLS
    line in the log later is a connection lost, not a handshake). The words are FFmpeg's
    error text, never the URL (it may hold a password) nor what the other end sent."""
    words = getattr(exc, "strerror", None) or type(exc).__name__
    if timed_out:
        return TIMEOUT, words
    number = getattr(exc, "errno", None)
    if number in BY_ERRNO:
        return BY_ERRNO[number], words
    log = getattr(exc, "log", None)  # (level, component, message): FFmpeg's last error line
    if opening and number == errno.EIO and log and log[1] == TLS_LOG:
        said = log[2].lower()
        return next(((code, ours) for part, code, ours in TLS_SAID if part in said), TLS_FAILED)
    return CONNECTION_FAILED, words
