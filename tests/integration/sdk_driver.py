"""Runs Roboflow's official inference-sdk (in .venv-sdk) against a server; prints JSON.

    python sdk_driver.py URL JOB [JOB ...]     JOB: MODE,MASK_FORMAT,IMAGE[,IMAGE ...]

MODE: v0 (legacy routes) or v1 (the SDK's default); MASK_FORMAT: rle or default (the SDK
sends none). Prints, per job in order, {"results": [...]} or {"error": {"type", "message"}},
as one JSON list (one process for every job: the SDK takes a second to import).
The code below is what a user of the SDK writes; nothing of this project is imported.
"""

import json
import sys
import warnings

from inference_sdk import InferenceConfiguration, InferenceHTTPClient

warnings.simplefilter("ignore")
url, *jobs = sys.argv[1:]
out = []
for job in jobs:
    mode, mask_format, *images = job.split(",")
    client = InferenceHTTPClient(api_url=url, api_key="XXX")
    if mask_format == "rle":
        client = client.configure(InferenceConfiguration(response_mask_format="rle"))
    try:
        if mode == "v0":
            with client.use_api_v0():
                results = [client.infer(image, model_id="instance_segmentation/1") for image in images]
        else:
            results = [client.infer(image, model_id="instance_segmentation/1") for image in images]
        out.append({"results": results})
    except Exception as exc:  # the SDK's own errors, reported for the test to read
        out.append({"error": {"type": type(exc).__name__, "message": str(exc)}})
print(json.dumps(out))
