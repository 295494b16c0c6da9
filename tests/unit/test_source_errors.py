"""``pipeline.cameras.source_errors.classify`` over the errors PyAV raised here against real
servers (tests/integration/test_stream_errors.py produces each): their classes, numbers, words
and FFmpeg's last error line, exactly as observed."""

from __future__ import annotations

import av.error
import pytest

from pipeline.cameras.source_errors import (
    AUTH_FAILED,
    BY_ERRNO,
    CODEC_UNSUPPORTED,
    CODES,
    CONNECTION_FAILED,
    NOT_FOUND,
    TIMEOUT,
    TLS_CERTIFICATE,
    TLS_HANDSHAKE,
    SourceError,
    classify,
)

URL = "rtsps://admin:s3cret@127.0.0.1:8554/cam"
# (what was done, the error PyAV raised, timed out, the code and the words expected)
OBSERVED = [
    ("RTSP, a wrong password", av.error.HTTPUnauthorizedError(
        825242872, "Server returned 401 Unauthorized (authorization failed)", URL,
        (16, "rtsp", "method DESCRIBE failed: 401 (Unauthorized)\n")),
     False, AUTH_FAILED, "Server returned 401 Unauthorized (authorization failed)"),
    ("HTTP 403", av.error.HTTPForbiddenError(858797304, "Server returned 403 Forbidden (access denied)", URL),
     False, AUTH_FAILED, "Server returned 403 Forbidden (access denied)"),
    ("HLS, a playlist that is not there", av.error.HTTPNotFoundError(875574520, "Server returned 404 Not Found", URL),
     False, NOT_FOUND, "Server returned 404 Not Found"),
    ("a closed port", av.error.ConnectionRefusedError(111, "Connection refused", URL),
     False, CONNECTION_FAILED, "Connection refused"),
    ("a file that is not there", av.error.FileNotFoundError(2, "No such file or directory", "/clips/absent.mp4"),
     False, NOT_FOUND, "No such file or directory"),
    ("a codec without a decoder", av.error.DecoderNotFoundError(1128613112, "Decoder not found", "a64.mkv"),
     False, CODEC_UNSUPPORTED, "Decoder not found"),
    ("a text file named .mp4", av.error.InvalidDataError(
        1094995529, "Invalid data found when processing input", "notes.mp4"),
     False, CODEC_UNSUPPORTED, "Invalid data found when processing input"),
    ("HTTP, a server that accepts and says nothing", av.error.ExitError(1414092869, "Immediate exit requested", URL),
     False, TIMEOUT, "Immediate exit requested"),
    ("RTSP, a server that accepts and says nothing: cut at the timeout", av.error.InvalidDataError(
        1094995529, "Invalid data found when processing input", URL),
     True, TIMEOUT, "Invalid data found when processing input"),
    ("HTTPS, a self-signed certificate", av.error.OSError(
        5, "Input/output error", URL, (16, "tls", "Peer certificate failed verification\n")),
     False, TLS_CERTIFICATE, "TLS: certificate not trusted"),
    ("HTTPS, a certificate for another host", av.error.OSError(
        5, "Input/output error", URL, (16, "tls", "The certificate's owner does not match hostname localhost\n")),
     False, TLS_CERTIFICATE, "TLS: certificate for another host"),
    ("OpenSSL's words for an untrusted certificate", av.error.OSError(
        5, "Input/output error", URL, (16, "tls", "error:0A000086:SSL routines::certificate verify failed\n")),
     False, TLS_CERTIFICATE, "TLS: certificate not trusted"),
    ("RTSPS, a server that answers the ClientHello with no TLS", av.error.OSError(
        5, "Input/output error", URL, (16, "tls", "An unexpected TLS packet was received.\n")),
     False, TLS_HANDSHAKE, "TLS handshake failed"),
    ("HTTP, a server that answers with garbage: an EIO, not TLS", av.error.OSError(
        5, "Input/output error", URL, (16, "http", "Stream ends prematurely at 421, should be 18446744073709551615\n")),
     False, CONNECTION_FAILED, "Input/output error"),
    ("an EIO without a log line", av.error.OSError(5, "Input/output error", URL),
     False, CONNECTION_FAILED, "Input/output error"),
    ("HTTP 500", av.error.HTTPServerError(1482175992, "Server returned 5XX Server Error reply", URL),
     False, CONNECTION_FAILED, "Server returned 5XX Server Error reply"),
]


@pytest.mark.parametrize(("exc", "timed_out", "code", "words"), [case[1:] for case in OBSERVED],
                         ids=[case[0] for case in OBSERVED])
def test_each_error_observed_has_its_code_and_words_without_the_url(exc, timed_out, code, words):
    assert classify(exc, timed_out=timed_out) == (code, words)
    assert "s3cret" not in words and code in CODES


def test_a_tls_line_after_the_open_is_a_connection_lost_not_a_handshake():
    lost = av.error.OSError(5, "Input/output error", URL, (16, "tls", "The TLS connection was non-properly terminated.\n"))
    assert classify(lost) == (TLS_HANDSHAKE, "TLS handshake failed")
    assert classify(lost, opening=False) == (CONNECTION_FAILED, "Input/output error")


def test_the_ffmpeg_numbers_are_pyavs():
    """The table's FFmpeg tags, written out from FFmpeg's ABI, are the numbers PyAV's classes carry."""
    kinds = {t.name: t.value for t in av.error.ErrorType}
    expected = {kinds["HTTP_UNAUTHORIZED"]: AUTH_FAILED, kinds["HTTP_FORBIDDEN"]: AUTH_FAILED,
                kinds["HTTP_NOT_FOUND"]: NOT_FOUND, kinds["DECODER_NOT_FOUND"]: CODEC_UNSUPPORTED,
                kinds["INVALIDDATA"]: CODEC_UNSUPPORTED, kinds["EXIT"]: TIMEOUT}
    assert {n: c for n, c in BY_ERRNO.items() if n > 200} == expected


def test_a_plain_python_error_is_a_connection_failure_in_its_own_name():
    assert classify(ConnectionResetError(104, "Connection reset by peer")) == (CONNECTION_FAILED, "Connection reset by peer")
    assert classify(RuntimeError("x")) == (CONNECTION_FAILED, "RuntimeError")


def test_a_source_error_has_one_of_the_codes_or_none():
    assert SourceError("the server's own", None).code is None
    with pytest.raises(ValueError, match="not a stream error code"):
        SourceError("cannot open", "STREAM_TIMEOUT")
