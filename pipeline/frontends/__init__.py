"""The frontends: the server process and the protocols it speaks (gRPC KServe v2, the gRPC
video and camera APIs, HTTP: Roboflow's API, KServe v2 REST and ``/v1/streams``, Prometheus
metrics), thin adapters over the one request life in ``pipeline.serving``. See
docs/architecture.md."""
