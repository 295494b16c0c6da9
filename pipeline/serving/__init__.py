"""The request life every way in shares, whatever its protocol (no gRPC, no HTTP here):

- ``request``: ``InferRequest`` (a request read once from its message), ``Tracking``, ``Answer``;
- ``life``: ``run``, one request through the shared batcher and its stream's tracker, counted
  once in the telemetry ledger;
- ``state``: ``ServingState`` (the loaded pipelines, the per-client limits and bytes budget,
  the live trackers, the drain);
- ``stream_window``: one stream's requests answered in order, at most a window at once;
- ``control``: which models serve (Triton's model control);
- ``shared_memory``: Triton's system shared-memory regions;
- ``url_policy``: where the server itself may connect (images by URL, cameras).

See docs/architecture.md.
"""
