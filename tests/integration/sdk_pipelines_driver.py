"""Runs Roboflow's official inference-sdk (in .venv-sdk) stream-API calls against a server;
prints JSON.

    python sdk_pipelines_driver.py URL API_KEY PLAN

PLAN: a JSON list of [method, kwargs]: a method of ``InferenceHTTPClient`` (kwargs as the SDK
takes them; the string "$pipeline_id" stands for the id the last start answered), or one of
two steps a user's loop would be: ["consume_frames", {"frames": N, "timeout_s": T}] consumes
until N frames came (or T seconds passed) and answers every non-empty result; ["wait_state",
{"state": S, "timeout_s": T, "pipeline": ID}] reads the status (of the last one started, without
"pipeline") until every source is in state S. Prints, per step in order, {"result": ...} or
{"error": {"type", "message", "status_code"}}, as one JSON list. The code below is what a user
of the SDK writes; nothing of this project is imported.
"""

import json
import sys
import time
import warnings

from inference_sdk import InferenceHTTPClient

warnings.simplefilter("ignore")
url, api_key, plan = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
client = InferenceHTTPClient(api_url=url, api_key=api_key)
pipeline_id = None


def filled(kwargs):
    return {k: pipeline_id if v == "$pipeline_id" else v for k, v in kwargs.items()}


def consume_frames(frames, timeout_s):
    results, got, deadline = [], 0, time.monotonic() + timeout_s
    while got < frames and time.monotonic() < deadline:
        result = client.consume_inference_pipeline_result(pipeline_id=pipeline_id)
        if result["outputs"]:
            results.append(result)
            got += len(result["outputs"])
        else:
            time.sleep(0.05)
    return results


def wait_state(state, timeout_s, pipeline=None):
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_inference_pipeline_status(pipeline_id=pipeline or pipeline_id)
        states = [source["state"] for source in status["report"]["sources_metadata"]]
        if all(s == state for s in states) or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


out = []
for method, kwargs in plan:
    try:
        if method == "consume_frames":
            result = consume_frames(**kwargs)
        elif method == "wait_state":
            result = wait_state(**kwargs)
        else:
            result = getattr(client, method)(**filled(kwargs))
            if method == "start_inference_pipeline_with_workflow":
                pipeline_id = result["context"]["pipeline_id"]
        out.append({"result": result})
    except Exception as exc:  # the SDK's own errors, reported for the test to read
        out.append({"error": {"type": type(exc).__name__, "message": str(exc),
                              "status_code": getattr(exc, "status_code", None)}})
print(json.dumps(out))
