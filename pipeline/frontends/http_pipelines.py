"""Roboflow's stream API, ``/inference_pipelines`` (an aiohttp sub-app), as the official
``inference-sdk`` calls it (``start_inference_pipeline_with_workflow``,
``list_inference_pipelines``, ``get_inference_pipeline_status``,
``consume_inference_pipeline_result``, ``pause_/resume_/terminate_inference_pipeline``): a
thin adapter over ``cameras.pipelines`` (a pipeline is camera streams with memory sinks).

``POST /initialise`` (Roboflow's ``InitialisePipelinePayload``) -> ``{"status": "success",
"context": {"request_id", "pipeline_id"}}``; ``GET /list`` adds ``pipelines`` (ids);
``GET /{id}/status`` adds ``report``; ``GET /{id}/consume`` (body ``{"excluded_fields"}``)
adds ``outputs`` and ``frames_metadata``; ``POST /{id}/pause``, ``/resume``, ``/terminate``.
The SDK sends its ``api_key`` in the JSON body, GET requests included; it is the server's
``--token`` (the header or the query carry it too). Errors: ``{"message": ...}``.

``video_configuration``: ``video_reference`` a file in ``--stream-source-dir``, an rtsp(s):// or
http(s):// URL (``--allow-stream-urls``), or a list of them (one stream each, ``source_id``
its index); ``max_fps``; buffer strategies, as ``BUFFER_STRATEGIES`` says; nothing else
(``video_source_properties`` and ``batch_collection_timeout`` are 400: there are no local
cameras to set, and sources are never batched together). ``processing_configuration``: a
``workflow_specification`` as ``roboflow_workflows`` reads it (a named workflow of Roboflow's
platform is 400: this server fetches nothing); its thread-pool and video-metadata settings
mean nothing here and are ignored. ``sink_configuration.results_buffer_size``: each source's
memory sink. ``consumption_timeout``: seconds a pipeline may go unconsumed.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import uuid
from collections.abc import Mapping
from dataclasses import replace

from aiohttp import web

from ..cameras.pipelines import Pipeline, Pipelines
from ..cameras.spec import SourceRules, StreamSpec
from ..cameras.streams import CameraStream
from ..errors import BadInputError
from ..serving.state import ServingState
from .auth import Token
from .http_app import BODY_KEY_PATHS, BODY_PREFIX, ERROR_FIELD, body_key_ok, parse_json
from .roboflow_workflows import Workflow

PREFIX = "/inference_pipelines"
MAX_RESULTS_BUFFER = 1024  # results kept per source: each is a frame's masks, up to megabytes
# (filling, consumption) -> realtime, per kind of source. A camera is live: the newest frame
# (DROP_OLDEST + EAGER). A file plays in real time the same way, or, WAIT + LAZY, every frame
# in order as fast as the model and the consumer take them (nothing dropped: it waits).
BUFFER_STRATEGIES = {"network": {("DROP_OLDEST", "EAGER"): True},
                     "file": {("DROP_OLDEST", "EAGER"): True, ("WAIT", "LAZY"): False}}
PARTNER = {"DROP_OLDEST": "EAGER", "WAIT": "LAZY", "EAGER": "DROP_OLDEST", "LAZY": "WAIT"}
# Our stream states as Roboflow's StreamState names them (a paused pipeline is "muted" there).
STATES = {"starting": "INITIALISING", "running": "RUNNING", "reconnecting": "RESTARTING",
          "paused": "MUTED", "stopped": "ENDED", "failed": "ERROR"}
INFO, ERROR = 20, 40  # Roboflow's UpdateSeverity values (the logging levels)


def app(pipelines: Pipelines, state: ServingState, token: Token | None) -> web.Application:
    """The routes, to be mounted at ``PREFIX``."""
    api = web.Application()
    api[ERROR_FIELD] = "message"  # Roboflow's error document
    handlers = _Handlers(pipelines, state)
    routes = {"/initialise": ("POST", handlers.initialise), "/list": ("GET", handlers.listing),
              "/{pipeline_id}/status": ("GET", handlers.status),
              "/{pipeline_id}/consume": ("GET", handlers.consume),
              "/{pipeline_id}/pause": ("POST", handlers.pause),
              "/{pipeline_id}/resume": ("POST", handlers.resume),
              "/{pipeline_id}/terminate": ("POST", handlers.terminate)}
    api[BODY_KEY_PATHS] = frozenset(PREFIX + path for path in routes)  # the SDK's GETs carry a body
    for path, (method, handle) in routes.items():
        api.router.add_route(method, path, _answered(handle, token))

    async def stop_timers(_: web.Application) -> None:
        pipelines.close()

    api.on_cleanup.append(stop_timers)
    return api


def _answered(handle, token: Token | None):
    """``handle(request, body) -> (pipeline id, fields)`` as Roboflow's ``CommandResponse``."""
    async def handler(request: web.Request) -> web.Response:
        data = request.get(BODY_PREFIX, b"") + await request.read()
        body = parse_json(data) if data.strip() else {}  # a GET may have none
        if not isinstance(body, dict):
            raise BadInputError("the body must be a JSON object")
        body_key_ok(request, token, body)
        pipeline_id, fields = await handle(request, body)
        context = {"request_id": str(uuid.uuid4()), "pipeline_id": pipeline_id}
        return web.json_response({"status": "success", "context": context, **fields})
    return handler


class _Handlers:
    def __init__(self, pipelines: Pipelines, state: ServingState):
        self.pipelines = pipelines
        self.state = state

    def _pipeline(self, request: web.Request) -> Pipeline:
        return self.pipelines.get(request.match_info["pipeline_id"])

    async def initialise(self, request: web.Request, body: dict) -> tuple[str, dict]:
        video = _section(body, "video_configuration", "VideoConfiguration")
        processing = _section(body, "processing_configuration", "WorkflowConfiguration")
        sink = _section(body, "sink_configuration", "MemorySinkConfiguration", required=False)
        if processing.get("workflow_specification") is None:
            raise BadInputError("give the workflow as workflow_specification: this server fetches no "
                                "workflow from Roboflow's platform (workspace_name, workflow_id)")
        values = processing.get("workflows_parameters") or {}
        if not isinstance(values, Mapping):
            raise BadInputError("workflows_parameters must be an object")
        workflow = Workflow.read(processing["workflow_specification"], self.state,
                                 image_input=processing.get("image_input_name") or "image", values=values)
        specs = _specs(video, workflow, self.pipelines.streams.rules)
        buffer = _number(sink, "results_buffer_size", 64, 1, MAX_RESULTS_BUFFER, whole=True)
        timeout = _number(body, "consumption_timeout", None, 0, None)
        pipeline = await self.pipelines.start(specs, buffer=int(buffer), reader=workflow,
                                              consumption_timeout_s=timeout)
        return pipeline.id, {}

    async def listing(self, request: web.Request, body: dict) -> tuple[None, dict]:
        return None, {"pipelines": [p.id for p in self.pipelines.all()]}

    async def status(self, request: web.Request, body: dict) -> tuple[str, dict]:
        pipeline = self._pipeline(request)
        return pipeline.id, {"report": report(pipeline)}

    async def consume(self, request: web.Request, body: dict) -> tuple[str, dict]:
        pipeline = self._pipeline(request)
        excluded = body.get("excluded_fields") or []
        if not isinstance(excluded, list) or not all(isinstance(f, str) for f in excluded):
            raise BadInputError("excluded_fields must be a list of output names")
        workflow: Workflow = pipeline.reader
        messages = pipeline.consume()
        outputs = await asyncio.to_thread(  # polygons are traced: CPU work, off the event loop
            lambda: [None if m is None else workflow.outputs_of(m, frozenset(excluded)) for m in messages])
        frames = [None if m is None else _frame_metadata(m, i) for i, m in enumerate(messages)]
        return pipeline.id, {"outputs": outputs, "frames_metadata": frames}

    async def pause(self, request: web.Request, body: dict) -> tuple[str, dict]:
        pipeline = self._pipeline(request)
        pipeline.pause()
        return pipeline.id, {}

    async def resume(self, request: web.Request, body: dict) -> tuple[str, dict]:
        pipeline = self._pipeline(request)
        pipeline.resume()
        return pipeline.id, {}

    async def terminate(self, request: web.Request, body: dict) -> tuple[str, dict]:
        return (await self.pipelines.terminate(request.match_info["pipeline_id"])).id, {}


def _section(body: dict, key: str, kind: str, required: bool = True) -> dict:
    section = body.get(key)
    if section is None and not required:
        return {}
    if not isinstance(section, dict) or section.get("type", kind) != kind:
        raise BadInputError(f"{key} must be an object of type {kind!r}")
    return section


def _number(section: Mapping, key: str, default: float | None, low: float, high: float | None,
            whole: bool = False) -> float | None:
    """``section[key]``: a number above ``low`` (at least it, for ``whole`` numbers) and at
    most ``high``, or ``default`` when absent or null."""
    value = section.get(key)
    if value is None:
        return default
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not value == value
            or (whole and not float(value).is_integer()) or (value < low if whole else value <= low)
            or (high is not None and value > high)):
        what = "a whole number" if whole else "a number"
        bounds = f"from {low:g}" if whole else f"above {low:g}"
        raise BadInputError(f"{key} must be {what} {bounds}{'' if high is None else f' to {high:g}'}, "
                            f"got {value!r}")
    return float(value)


def _specs(video: dict, workflow: Workflow, rules: SourceRules) -> list[StreamSpec]:
    """One stream per source of ``video_reference``, read as ``/v1/streams`` reads a source."""
    references = video.get("video_reference")
    references = references if isinstance(references, list) else [references]
    if not references or not all(isinstance(r, str) for r in references):
        raise BadInputError("video_reference must be a file in the stream source directory, an rtsp(s):// "
                            "or http(s):// URL, or a list of them (this server has no local cameras: "
                            "no camera indexes)")
    for key in ("video_source_properties", "batch_collection_timeout"):
        if video.get(key):
            raise BadInputError(f"{key} is not supported: this server has no local cameras to set, and "
                                "plays each source as its own stream")
    max_fps = video.get("max_fps")
    specs = []
    for reference in references:
        spec = StreamSpec.read({"source": reference, "model": workflow.model, "max_fps": max_fps,
                                "parameters": dict(workflow.parameters)}, rules)
        specs.append(replace(spec, realtime=_realtime(video, "network" if spec.network else "file")))
    return specs


def _realtime(video: dict, kind: str) -> bool:
    """Whether the source plays live, from Roboflow's buffer strategies (``BUFFER_STRATEGIES``;
    a strategy left out is its partner's, both left out are Roboflow's defaults for the kind)."""
    filling = video.get("source_buffer_filling_strategy")
    consumption = video.get("source_buffer_consumption_strategy")
    if filling is None and consumption is None:
        filling, consumption = ("DROP_OLDEST", "EAGER") if kind == "network" else ("WAIT", "LAZY")
    filling, consumption = filling or PARTNER.get(consumption), consumption or PARTNER.get(filling)
    strategies = BUFFER_STRATEGIES[kind]
    if (filling, consumption) not in strategies:
        supported = " or ".join(f"{f} + {c}" for f, c in strategies)
        raise BadInputError(f"source_buffer_filling_strategy {filling!r} with source_buffer_consumption_"
                            f"strategy {consumption!r} is not supported for a {kind} source: use {supported}")
    return strategies[filling, consumption]


def _frame_metadata(message: bytes, source_id: int) -> dict:
    """Roboflow's ``FrameMetadata`` of a stream's message (its ``frame_index`` counts from 0,
    Roboflow's ``frame_id`` from 1)."""
    head = json.loads(message)
    when = datetime.datetime.fromtimestamp(head["timestamp"], datetime.timezone.utc)
    return {"frame_timestamp": when.isoformat(), "frame_id": head["frame_index"] + 1, "source_id": source_id}


def _iso(epoch_s: float) -> str:
    return datetime.datetime.fromtimestamp(epoch_s, datetime.timezone.utc).isoformat()


def report(pipeline: Pipeline) -> dict:
    """Roboflow's ``PipelineStateReport`` of a pipeline."""
    updates = []
    for source_id, stream in enumerate(pipeline.streams):
        previous = None
        for change in stream.changes:
            new = STATES.get(change.state, change.state.upper())
            updates.append({"timestamp": _iso(change.timestamp), "severity": INFO, "event_type": "SOURCE_STATE_UPDATE",
                            "payload": {"previous_state": previous, "new_state": new, "source_id": source_id},
                            "context": "video_source"})
            if change.error:
                updates.append({"timestamp": _iso(change.timestamp), "severity": ERROR, "event_type": "SOURCE_ERROR",
                                "payload": {"source_id": source_id, "error_message": change.error,
                                            "error_code": change.code},
                                "context": "video_source"})
            previous = new
    updates.sort(key=lambda update: update["timestamp"])
    return {"video_source_status_updates": updates,
            "latency_reports": [_latency(stream, i) for i, stream in enumerate(pipeline.streams)],
            "inference_throughput": round(sum(stream.rate_out.rate() for stream in pipeline.streams), 2),
            "sources_metadata": [_source(stream, i) for i, stream in enumerate(pipeline.streams)]}


def _latency(stream: CameraStream, source_id: int) -> dict:
    """Roboflow's ``LatencyMonitorReport``: means over the stream's latest answered frames of
    the seconds from decoding to the batcher, in it, and from decoding to the answer."""
    times = list(stream.times)

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    return {"source_id": source_id,
            "frame_decoding_latency": mean([t.started - t.decoded for t in times]),
            "inference_latency": mean([t.answered - t.started for t in times]),
            "e2e_latency": mean([t.answered - t.decoded for t in times])}


def _source(stream: CameraStream, source_id: int) -> dict:
    """Roboflow's ``SourceMetadata``, with the stream's id (``/v1/streams``)."""
    status = stream.status()
    props = stream.source.properties
    network = stream.spec.network
    properties = None if props is None else {
        "width": props.width, "height": props.height, "total_frames": props.total_frames,
        "is_file": not network, "fps": props.fps, "is_reconnectable": network}
    return {"source_properties": properties, "source_reference": stream.spec.display,
            "buffer_size": stream.queue.size, "state": STATES.get(status["state"], status["state"].upper()),
            "buffer_filling_strategy": "DROP_OLDEST" if stream.live else "WAIT",
            "buffer_consumption_strategy": "EAGER" if stream.live else "LAZY",
            "source_id": source_id, "stream_id": stream.id, "last_error": status["last_error"],
            "error_code": status["error_code"]}
