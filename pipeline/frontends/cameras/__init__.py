"""Cameras on the server: streams the server pulls itself (RTSP, HLS, files), batched with
every other request, their results delivered to subscribers and sinks.

- ``spec``: a stream as asked for (``StreamSpec``, read once from HTTP JSON or gRPC) and the
  server's rules for sources (``SourceRules``);
- ``sources``: decoding a source in a thread of its own (PyAV), sampled to ``max_fps``;
- ``streams``: ``CameraStreams``, the streams running now, each frame through
  ``inference.run`` like any request, results in order to subscribers and sinks;
- ``sinks``: delivery to webhooks, MQTT and Redis Streams, bounded, retried and counted.
"""
