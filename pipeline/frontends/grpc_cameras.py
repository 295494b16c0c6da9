"""Cameras on the server over gRPC (``rleserving.v1.CameraStreams``): a thin adapter.

A ``StreamSpec`` message becomes the same dict as HTTP's JSON body (``json_format``), read by
``cameras.spec.StreamSpec.read``; a stream's status dict becomes ``StreamInfo`` the same way,
so both transports say the same things. ``Subscribe`` streams ``FrameResult``s, the typed
video API's results, built by ``grpc_video.result_of``.
"""

from __future__ import annotations

import asyncio
import time

from google.protobuf import json_format

from ..cameras.spec import StreamSpec
from ..cameras.streams import CameraResult, CameraStream, CameraStreams, Subscription
from ..images import encode_jpeg
from ..proto import video_pb2 as vpb
from ..proto import video_pb2_grpc
from .grpc_calls import answer_or_abort
from .grpc_video import answer_of, result_of


def info_of(stream: CameraStream) -> vpb.StreamInfo:
    return json_format.ParseDict(stream.status(), vpb.StreamInfo())


def frame_result(result: CameraResult, subscription: Subscription) -> vpb.FrameResult:
    """A camera's result as the video API's result (in a worker thread: JPEG is CPU work)."""
    if result.dropped:
        return answer_of(result, dropped=True)
    if result.answer is None:
        return answer_of(result, error=result.error)
    arrived = time.monotonic() - (time.time() - result.timestamp)  # when it was decoded
    out = result_of(result, result.answer, arrived)
    if subscription.frames and result.rgb is not None:
        out.frame_jpeg = encode_jpeg(result.rgb)
    return out


class CameraService(video_pb2_grpc.CameraStreamsServicer):
    def __init__(self, streams: CameraStreams):
        self.streams = streams

    async def AddStream(self, request, context):
        async def add():
            body = json_format.MessageToDict(request, preserving_proto_field_name=True)
            return info_of(await self.streams.add(StreamSpec.read(body, self.streams.rules)))

        return await answer_or_abort(context, add)

    async def ListStreams(self, request, context):
        return vpb.StreamList(streams=[info_of(s) for s in self.streams.all()])

    async def GetStream(self, request, context):
        return await answer_or_abort(context, lambda: info_of(self.streams.get(request.stream_id)))

    async def RemoveStream(self, request, context):
        async def remove():
            return info_of(await self.streams.remove(request.stream_id))

        return await answer_or_abort(context, remove)

    async def PauseStream(self, request, context):
        return await self._change(context, request.stream_id, CameraStream.pause)

    async def ResumeStream(self, request, context):
        return await self._change(context, request.stream_id, CameraStream.resume)

    async def _change(self, context, stream_id: str, change) -> vpb.StreamInfo:
        def apply():
            stream = self.streams.get(stream_id)
            change(stream)
            return info_of(stream)

        return await answer_or_abort(context, apply)

    async def Subscribe(self, request, context):
        subscription = await answer_or_abort(
            context, lambda: self.streams.subscribe(request.stream_id, request.frames))
        try:
            async for result in subscription:
                yield await asyncio.to_thread(frame_result, result, subscription)
        finally:
            self.streams.unsubscribe(subscription)
