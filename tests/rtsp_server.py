"""A real RTSP server for the camera tests: GStreamer's gst-rtsp-server, run by the system
Python (``/usr/bin/python3`` with ``gi``), not the project's venv. ``tests/cameras.py``
(``RtspServer``) starts it; nothing imports it.

    /usr/bin/python3 tests/rtsp_server.py --port 0 [--user NAME:PASSWORD] NAME=CLIP.h264@FPS [NAME=...]

Each mount ``/NAME`` plays its clip, an H.264 Annex-B elementary stream without B-frames, in
a loop forever at ``FPS`` frames a second, without re-encoding: ``multifilesrc loop=true``
reads the file again and again, and ``h264parse`` times every access unit from the frame rate
in the caps, so the timestamps keep rising across loops and the server sends in real time, as
a camera does.
A mount's media is shared: every client watches the same pipeline. With ``--user`` every mount
asks for HTTP Basic credentials (``RTSPAuth``, as a camera with a password does) and answers
``401 Unauthorized`` to a client without them or with others. Once it listens it prints
``listening PORT`` (the port it bound, useful with ``--port 0``) on stdout.
"""

from __future__ import annotations

import argparse
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402 - after require_version


def launch_line(path: str, fps: int) -> str:
    caps = f"video/x-h264,stream-format=byte-stream,framerate={fps}/1"
    return (f'( multifilesrc location="{path}" loop=true caps="{caps}" '
            "! h264parse ! identity name=stamp ! rtph264pay name=pay0 pt=96 config-interval=-1 )")


def presentation_times(_factory, media) -> None:
    """h264parse stamps decoding times only; the clips have no B-frames, so a frame is shown
    when it is decoded: give each its presentation time, which RTP's timestamps are made of."""
    def stamp(_pad, info):
        buffer = info.get_buffer()
        buffer.pts = buffer.dts
        return Gst.PadProbeReturn.OK

    media.get_element().get_by_name("stamp").get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, stamp)


def require_user(server, credentials: str) -> str:
    """Let only ``NAME:PASSWORD`` (HTTP Basic) watch; returns the role the factories admit."""
    user, _, password = credentials.partition(":")
    role = "viewer"
    token = GstRtspServer.RTSPToken()
    token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, role)
    auth = GstRtspServer.RTSPAuth()
    auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), token)
    server.set_auth(auth)
    return role


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1; 0 picks a free one")
    parser.add_argument("--user", help="NAME:PASSWORD a client must give (HTTP Basic); none: anyone")
    parser.add_argument("mounts", nargs="+", help="NAME=CLIP.h264@FPS")
    args = parser.parse_args(argv)
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    role = require_user(server, args.user) if args.user else None
    mounts = server.get_mount_points()
    for mount in args.mounts:
        name, _, rest = mount.partition("=")
        path, _, fps = rest.rpartition("@")
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(launch_line(path, int(fps)))
        factory.set_shared(True)
        factory.connect("media-configure", presentation_times)
        if role is not None:
            factory.add_role_from_structure(Gst.Structure.from_string(
                f"{role}, media.factory.access=(boolean)true, media.factory.construct=(boolean)true")[0])
        mounts.add_factory(f"/{name}", factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
        return 1
    print(f"listening {server.get_bound_port()}", flush=True)
    GLib.MainLoop().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
