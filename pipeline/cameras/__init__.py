"""Cameras on the server: streams the server pulls itself (RTSP, HLS, files), batched with
every other request through ``serving``, their results delivered to subscribers and sinks.
Not a protocol: the gRPC and HTTP adapters that add and watch streams are in ``frontends``.

- ``spec``: a stream as asked for (``StreamSpec``, read once from HTTP JSON or gRPC) and the
  server's rules for sources (``SourceRules``);
- ``sources``: decoding a source in a thread of its own (PyAV), sampled to ``max_fps``;
- ``streams``: ``CameraStreams``, the streams running now, each frame through
  ``serving.life.run`` like any request, results in order to subscribers and sinks;
- ``sink_targets``: sink URLs read once (``SinkTarget``), credentials redacted;
- ``transports``: what webhooks, MQTT and Redis Streams each know (connect, send, disconnect);
- ``sinks``: delivery, the same for every kind: bounded, batched, retried and counted.
"""
