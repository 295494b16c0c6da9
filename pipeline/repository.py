"""The model repository, in NVIDIA Triton's layout: ``<root>/<model>/config.pbtxt`` and
``<root>/<model>/<version>/<model file>``.

config.pbtxt is parsed with protobuf's text format into the ``ModelConfig`` message that
tritonclient ships, and validated: an invalid file is refused with a message naming the file
and the field. Each folder is read on its own, as Triton does: a folder that cannot be read
(or a pipeline whose network cannot) makes only its own model unusable
(``ModelRepository.unusable``), never the repository.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from .errors import ConfigError, InvalidOptionError, NotFoundError

LOG = logging.getLogger(__name__)

# Triton's platform and backend names -> the runtime that runs them (``pipeline.runners``).
RUNTIMES = {"pytorch_libtorch": "torchscript", "pytorch": "torchscript",
            "onnxruntime_onnx": "onnx", "onnxruntime": "onnx", "openvino": "openvino",
            "python": "python"}
DEFAULT_FILENAMES = {"torchscript": "model.pt", "onnx": "model.onnx", "openvino": "model.xml",
                     "python": "model.py"}
SUPPORTED = tuple(RUNTIMES)
DEFAULT_MODEL = "instance_segmentation"  # the pipeline model a request or stream that names none runs
# Triton's model control modes (its repository extension): none loads every model at start,
# for good; explicit loads and unloads them on request (serving/control.py). Here, not there,
# so the server's settings can offer them without importing the engine.
MODEL_CONTROL_MODES = ("none", "explicit")
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")
# A config.pbtxt is a few KiB of text; the parser never sees more than this, so a huge file
# cannot hold a load (and the lock every load and unload takes) for long.
CONFIG_LIMIT_BYTES = 1 << 20
QUOTE_LIMIT = 300  # characters of a file's own text an error may carry to a client


@dataclass(frozen=True)
class ModelEntry:
    """One model's folder and its parsed, validated configuration."""

    name: str
    path: Path
    config: mc.ModelConfig
    versions: tuple[int, ...]  # ascending

    @property
    def config_path(self) -> Path:
        return self.path / "config.pbtxt"

    @property
    def platform(self) -> str:
        return self.config.platform or self.config.backend

    def latest_version(self) -> int:
        if not self.versions:
            raise ConfigError(f"{self.path}: no version folder (e.g. {self.path}/1/)")
        return self.versions[-1]

    def model_file(self, version: int | None = None) -> Path:
        """The model file of a version (the newest by default); ConfigError if missing."""
        version = self.latest_version() if version is None else version
        filename = self.config.default_model_filename or DEFAULT_FILENAMES[runtime_of(self)]
        path = self.path / str(version) / filename
        if not path.is_file():
            hint = " (run `make model` to create the default model's files)" if runtime_of(self) != "python" else ""
            raise ConfigError(f"{path}: model file is missing{hint}")
        return path

    def parameter(self, key: str, default: str | None = None) -> str | None:
        return self.parameters.get(key, default)

    @property
    def parameters(self) -> dict[str, str]:
        """config.pbtxt ``parameters`` as key -> string value."""
        return parameters_of(self.config)

    def label_file(self) -> Path | None:
        """The class names' file: an output's ``label_filename`` (Triton's way), else a
        ``labels.txt`` beside config.pbtxt; one name per line, in class order."""
        for output in self.config.output:
            if output.label_filename and (self.path / output.label_filename).is_file():
                return self.path / output.label_filename
        beside = self.path / "labels.txt"
        return beside if beside.is_file() else None

    def labels(self) -> list[str] | None:
        path = self.label_file()
        if path is None:
            return None
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()] or None

    def queue_size_limit(self) -> int:
        """0 = unbounded (Triton's meaning); we bound it anyway in the batcher."""
        return int(self.config.dynamic_batching.default_queue_policy.max_queue_size)


class ModelRepository:
    """The models under a root folder, each validated on its own: ``models`` the usable ones,
    ``unusable`` the rest (folder name -> the ConfigError naming the file and field)."""

    def __init__(self, root: Path, models: dict[str, ModelEntry], unusable: dict[str, ConfigError]):
        self.root = root
        self.models = models
        self.unusable = unusable

    @classmethod
    def load(cls, root: str | Path) -> ModelRepository:
        """Every ``<model>/config.pbtxt`` under ``root``; ConfigError only if ``root`` is not a
        folder or holds none."""
        root = Path(root)
        if not root.is_dir():
            raise ConfigError(f"model repository {root} is not a folder")
        models, unusable = {}, {}
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            if not (folder / "config.pbtxt").is_file():
                continue
            try:
                models[folder.name] = load_entry(folder)
            except ConfigError as error:  # kept without its traceback: it held the file's text
                unusable[folder.name] = error.with_traceback(None)
        if not models and not unusable:
            raise ConfigError(f"model repository {root} holds no <model>/config.pbtxt")
        repo = cls(root, models, unusable)
        for name, entry in list(models.items()):
            if is_pipeline(entry):
                try:
                    repo.network_of(entry)  # names a usable network of the repository
                except ConfigError as error:
                    del models[name]
                    unusable[name] = error.with_traceback(None)
        return repo

    def get(self, name: str) -> ModelEntry:
        """A usable model; its ConfigError if it is unusable, NotFoundError if there is none."""
        if name in self.unusable:
            raise copy.copy(self.unusable[name])  # a copy: raising one object again grows its traceback
        try:
            return self.models[name]
        except KeyError:
            have = ", ".join(sorted([*self.models, *self.unusable]))
            raise NotFoundError(f"unknown model {clipped(name)!r}; the repository has: {have}") from None

    def network_of(self, entry: ModelEntry) -> ModelEntry:
        """The network ``entry`` runs: a pipeline's ``network`` parameter, or the model itself
        (a network with a YOLO-seg head, served directly). ConfigError, naming the file, for a
        Python-backend model without one or one the repository does not have."""
        if entry.platform != "python":
            return entry
        name = entry.parameter("network")
        if name is None:
            raise ConfigError(f"{entry.config_path}: parameters.network is required")
        if name in self.unusable:
            raise ConfigError(f"{entry.config_path}: parameters.network names {name!r}, which cannot "
                              f"be loaded: {self.unusable[name]}")
        # Folder names: '../..', '' or 'a/b' are never among them, so they are refused here.
        if name not in self.models:
            raise ConfigError(f"{entry.config_path}: parameters.network names {clipped(name)!r}, which "
                              f"is not in the repository (have: {', '.join(sorted(self.models))})")
        network = self.models[name]
        if network.platform == "python":
            raise ConfigError(f"{entry.config_path}: parameters.network names {name!r}, a Python-backend "
                              "model, not a network")
        return network

    def pipelines_running(self, network: str) -> list[str]:
        """The pipeline models whose network is ``network``."""
        return [name for name, entry in self.models.items()
                if is_pipeline(entry) and self.network_of(entry).name == network]


def is_pipeline(entry: ModelEntry) -> bool:
    """A pipeline model: a Python-backend model whose ``network`` parameter names the network
    it runs (pre- and post-processing, the RLE codec around it)."""
    return entry.platform == "python" and entry.parameter("network") is not None


def runtime_of(entry: ModelEntry) -> str:
    """The runtime of a model: torchscript, onnx, openvino or python."""
    return RUNTIMES[entry.platform]


def load_entry(folder: Path) -> ModelEntry:
    """One model's folder, read and validated; ConfigError naming the file (and field) if it
    cannot be used, whatever the file holds: protobuf's parser refuses out-of-range numbers and
    nesting as ParseErrors (ModelConfig has no recursive message, so it never recurses deep)."""
    config_path = folder / "config.pbtxt"
    config = mc.ModelConfig()
    try:
        text_format.Parse(read_config(config_path), config)
    except text_format.ParseError as exc:
        raise ConfigError(f"{config_path}: {clipped(str(exc))}") from None  # it quotes the whole line
    validate(config, folder.name, config_path)
    if not config.name:
        config.name = folder.name
    try:  # isdigit() alone takes '²', which int() does not
        versions = tuple(sorted(int(p.name) for p in folder.iterdir()
                                if p.is_dir() and p.name.isascii() and p.name.isdigit()))
    except OSError as exc:
        raise ConfigError(f"{folder}: cannot be listed: {exc.strerror}") from None
    return ModelEntry(config.name, folder, config, versions)


def read_config(path: Path) -> str:
    """A config.pbtxt's text; ConfigError if it cannot be read, is too large or is not UTF-8."""
    try:
        with path.open("rb") as file:
            data = file.read(CONFIG_LIMIT_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from None
    if len(data) > CONFIG_LIMIT_BYTES:
        raise ConfigError(f"{path}: larger than {CONFIG_LIMIT_BYTES >> 10} KiB; a config.pbtxt is a few "
                          "KiB of text")
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start})") from None


def clipped(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text``, its middle left out past ``limit`` characters: where an error starts (file,
    line) and what it says stay, kilobytes of a hostile file do not."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]} [... {len(text) - 2 * half} characters ...] {text[-half:]}"


def parameters_of(config: mc.ModelConfig) -> dict[str, str]:
    return {key: p.string_value for key, p in config.parameters.items()}


def _fail(path: Path, field: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: field '{field}': {clipped(message)}")


def validate(config: mc.ModelConfig, folder_name: str, path: Path) -> None:
    """Refuse what we (or Triton) could not serve, naming the field."""
    if config.name and config.name != folder_name:
        raise _fail(path, "name", f"{config.name!r} must equal the folder name {folder_name!r}")
    platform = config.platform or config.backend
    if platform not in SUPPORTED:
        raise _fail(path, "platform" if config.platform else "backend",
                    f"{platform!r} is not supported (use one of {', '.join(SUPPORTED)})")
    if config.max_batch_size < 0:
        raise _fail(path, "max_batch_size", f"must be >= 0, got {config.max_batch_size}")
    batching = config.dynamic_batching
    if config.HasField("dynamic_batching"):
        if config.max_batch_size == 0:
            raise _fail(path, "dynamic_batching", "needs max_batch_size > 0")
        for size in batching.preferred_batch_size:
            if not 0 < size <= config.max_batch_size:
                raise _fail(path, "dynamic_batching.preferred_batch_size",
                            f"{size} is not in 1..max_batch_size ({config.max_batch_size})")
    # A network may leave its inputs and outputs out: they are read from its file at load
    # (Triton's auto-complete). A pipeline model declares its own.
    if platform == "python" and not config.input:
        raise _fail(path, "input", "at least one input is required")
    if platform == "python" and not config.output:
        raise _fail(path, "output", "at least one output is required")
    for kind, tensors in (("input", config.input), ("output", config.output)):
        seen = set()
        for i, tensor in enumerate(tensors):
            if not tensor.name:
                raise _fail(path, f"{kind}[{i}].name", "is required")
            if tensor.name in seen:
                raise _fail(path, f"{kind}[{i}].name", f"{tensor.name!r} is repeated")
            seen.add(tensor.name)
            if tensor.data_type == mc.TYPE_INVALID:
                raise _fail(path, f"{kind}[{i}].data_type", f"is missing for {tensor.name!r}")
            if not tensor.dims or any(d == 0 or d < -1 for d in tensor.dims):
                raise _fail(path, f"{kind}[{i}].dims",
                            f"{list(tensor.dims)} must be non-empty, each > 0 or -1")
    pinned_batch_limit(config, path)
    for i, group in enumerate(config.instance_group):
        if group.count < 0:
            raise _fail(path, f"instance_group[{i}].count", f"must be >= 1, got {group.count}")
        if group.kind not in (mc.ModelInstanceGroup.KIND_AUTO, mc.ModelInstanceGroup.KIND_CPU,
                              mc.ModelInstanceGroup.KIND_GPU):
            raise _fail(path, f"instance_group[{i}].kind",
                        f"{mc.ModelInstanceGroup.Kind.Name(group.kind)} is not supported")
    if platform == "python":
        from .postprocess import PostprocessOptions

        try:
            PostprocessOptions.from_params(parameters_of(config))
        except InvalidOptionError as exc:
            raise _fail(path, f"parameters.{exc.key}", str(exc)) from None


def pinned_batch_limit(config: mc.ModelConfig, path: Path) -> int | None:
    """The most images the network is given at once, where config.pbtxt decides it; None
    where it is measured at load (``engine.Pipeline``). Parameter ``batch_limit`` pins it
    (1..max_batch_size); ``calibrate_batch_size: "false"`` takes max_batch_size; a bound of
    1 leaves nothing to measure. ConfigError naming the parameter if unusable."""
    params, bound = parameters_of(config), max(1, config.max_batch_size)
    calibrate = params.get("calibrate_batch_size", "true").lower()
    if calibrate not in TRUE + FALSE:
        raise _fail(path, "parameters.calibrate_batch_size", f"must be true or false, got {calibrate!r}")
    if "batch_limit" in params:
        limit = params["batch_limit"]
        if not limit.isdecimal() or not 1 <= int(limit) <= bound:
            raise _fail(path, "parameters.batch_limit",
                        f"must be a whole number in 1..max_batch_size ({bound}), got {limit!r}")
        if "calibrate_batch_size" in params and calibrate in TRUE:
            raise _fail(path, "parameters.batch_limit", "pins the batch size, and "
                        "calibrate_batch_size asks to measure it: keep one of the two")
        return int(limit)
    return bound if calibrate in FALSE or bound == 1 else None


def instance_count(entry: ModelEntry) -> int:
    return max(1, sum(max(1, g.count) for g in entry.config.instance_group) or 1)
