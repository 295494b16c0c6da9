"""NVIDIA Triton Python-backend entry for the pipeline model: the same engine our own server
runs (pre-processing, the network named by the "network" parameter, NMS, box-aware masks, the
RLE codec), so Triton answers with the same bytes.

Triton's dynamic batcher groups requests; every image of every request in ``execute`` goes
through the network in batches of one input shape, at most the measured best batch size
(``Pipeline.batches``), and each request gets its own response. The environment needs
numpy < 2 (see docker/triton/requirements-models.txt).
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from pipeline.engine import Pipeline
from pipeline.errors import BadInputError, PipelineError
from pipeline.postprocess import PostprocessOptions
from pipeline.repository import ModelRepository
from pipeline.schema import OUTPUTS, output_arrays


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"])
        repository = ModelRepository.load(folder.parent)
        entry = repository.get(config["name"])
        network = repository.network_of(entry)
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args.get('model_instance_device_id', '0')}"
        self.pipe = Pipeline(repository, entry, network, device)
        self.outputs = [o["name"] for o in config["output"] if o["name"] in OUTPUTS]

    def execute(self, requests):
        pipe = self.pipe
        accepted, owners, failures, options = [], [], {}, {}
        for r, request in enumerate(requests):
            try:
                params = json.loads(request.parameters() or "{}")
                options[r] = PostprocessOptions.from_params(params, pipe.defaults)
                images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
                for image in images.reshape(-1):
                    accepted.append(pipe.accept(bytes(image), options[r]))
                    owners.append(r)
            except PipelineError as exc:
                failures[r] = exc
        found = {}
        for chunk in pipe.batches(accepted):  # one input shape each, the measured best size
            try:
                found.update(pipe.run_batch([(i, accepted[i]) for i in chunk]))
            except PipelineError as exc:
                for i in chunk:
                    failures.setdefault(owners[i], exc)
        results = {r: [] for r in range(len(requests))}
        for i in sorted(found):  # each request's images in their order
            if isinstance(found[i], PipelineError):  # this image failed to decode
                failures.setdefault(owners[i], found[i])
            else:
                results[owners[i]].append(found[i])
        responses = []
        for r in range(len(requests)):
            if r in failures:
                responses.append(pb_utils.InferenceResponse(error=_error(failures[r])))
                continue
            arrays = output_arrays(results[r], self.outputs, pipe.class_names,
                                   options[r].mask_format)
            tensors = [pb_utils.Tensor(name, arrays[name]) for name in self.outputs]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses


def _error(exc):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    if isinstance(exc, BadInputError) and code is not None:
        return pb_utils.TritonError(str(exc), code)
    return pb_utils.TritonError(str(exc))
