"""The frontends: the server process and the protocols it speaks (gRPC KServe v2, the gRPC
video API, HTTP: Roboflow's API and KServe v2 REST, Prometheus metrics), over one shared
request life (``inference``). See docs/architecture.md."""
