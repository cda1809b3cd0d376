"""Reading a checkpoint saved by the original NFormer training code (untrusted input).

``torch.load(..., weights_only=True)``: no pickled code runs.  :func:`checkpoint_filter_fn`
adapts the layouts people actually have (``{'state_dict': ...}``, ``{'model': ...}``, a
``module.`` prefix from DataParallel) in one place, and :func:`infer_config` reads the backbone
depth, widths, ``n_layer``, ``n_embd`` and ``num_classes`` from the tensors' shapes.
"""
from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from export.contract.config import MAX_INPUT_SIDE, MIN_INPUT_SIDE, ModelConfig
from export.contract.errors import CheckpointError
from export.reference.model import NFormerModel
from export.reference.resnet import ARCHS

#: heads used only in training; the deployed networks do not contain them
TRAINING_ONLY = ("backbone.classifier.", "nformer.classifier.")
WRAPPERS = ("state_dict", "model", "model_state_dict", "net")
#: how a file written by torch.save starts: a zip archive (the format since PyTorch 1.6) or, in the
#: legacy format, a pickle of protocol 2 or later
CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")

#: the dtypes trained weights are saved in (each loads into the float32 reference model)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: BatchNorm's step counter, the one integer tensor of a real checkpoint (an int64 scalar)
COUNTER = "num_batches_tracked"

#: upper bounds on what the shapes say: far beyond any trained NFormer (the original: stage widths
#: 64..512, stem 64, 256-d embeddings, 4 layers, 751 classes), and they keep a hostile file's shapes
#: from sizing the model that is built
MAX_WIDTH = 4096
MAX_EMBD = 4096
MAX_N_LAYER = 128
MAX_CLASSES = 1_000_000

_BN = r"(weight|bias|running_mean|running_var)"
#: the rank of every tensor of the layout, by key (keys of no rule are left to the layout check)
RANKS = tuple((re.compile(pattern), rank, what) for pattern, rank, what in (
    (rf"(backbone|nformer)\..*\.{COUNTER}$", 0, "a BatchNorm step counter, an integer scalar"),
    (r"backbone\.base\.(conv1|layer[1-4]\.\d+\.(conv[1-3]|downsample\.0))\.weight$", 4,
     "a convolution weight [out, in, kh, kw]"),
    (r"backbone\.base\.(bn1|layer[1-4]\.\d+\.(bn[1-3]|downsample\.1))\." + _BN + "$", 1,
     "a BatchNorm vector [channels]"),
    (r"(backbone|nformer)\.bottleneck\." + _BN + "$", 1, "a BatchNorm vector [channels]"),
    (r"(backbone\.(projection|classifier)|nformer\.classifier)\.weight$", 2, "a linear weight [out, in]"),
    (r"backbone\.projection\.bias$", 1, "a bias vector [out]"),
    (r"nformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.w$", 2, "a Conv1D weight [in, out]"),
    (r"nformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.b$", 1, "a bias vector [out]"),
    (r"nformer\.h\.\d+\.ln_[12]\.[gb]$", 1, "a LayerNorm vector [n_embd]"),
))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load ``path`` safely and return the raw mapping it holds."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} (expected a .pth file saved by the NFormer "
                              "training code; check the path)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    not_a_checkpoint = (f"{path} is not a PyTorch checkpoint ({{}}); expected a file written by "
                        "torch.save(model.state_dict())")
    inflated = _zip_inflation(path)
    if inflated:
        raise CheckpointError(not_a_checkpoint.format(inflated))
    try:
        with warnings.catch_warnings():   # torch warns about the odd "protocol" of bytes that are no pickle
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror}; check its permissions") from None
    except pickle.UnpicklingError as err:
        text = str(err)
        # bytes that are neither a zip archive nor a pickle are no checkpoint, not a refused object
        garbage = _not_a_pickle(path)
        if garbage:
            raise CheckpointError(not_a_checkpoint.format(garbage)) from None
        if "Weights only load failed" in text or "weights_only" in text:
            raise CheckpointError(
                f"refused to load {path}: it contains pickled objects or code beyond tensors and plain "
                "containers, which weights_only loading does not run (a checkpoint is untrusted input). "
                "Re-save it as torch.save(model.state_dict()) from a trusted environment") from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({text.splitlines()[0]}); expected a "
                              "file written by torch.save(model.state_dict())") from None
    except Exception as err:  # noqa: BLE001
        # what the weights-only unpickler and the zip reader raise on bytes that are not a checkpoint
        # (RuntimeError, EOFError, ValueError, KeyError, struct.error, ... : the list is torch's, not ours)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({first}); expected a file written "
                              "by torch.save(model.state_dict())") from None
    return data


#: how much a zip checkpoint's entries may inflate relative to the file (torch.save stores them
#: uncompressed: ~1x; a re-zipped file compresses float weights to no less than about half)
MAX_ZIP_INFLATION = 16


def _zip_inflation(path: Path) -> str | None:
    """Why a zip archive at ``path`` is a decompression bomb rather than a checkpoint, else None:
    ``torch.load`` inflates compressed entries in memory (a 195 KB file held a 200 MB tensor)."""
    import zipfile

    try:
        with open(path, "rb") as f:
            if not f.read(4).startswith(CHECKPOINT_MAGIC[0]):
                return None
        size = path.stat().st_size
        with zipfile.ZipFile(path) as z:
            total = sum(max(0, i.file_size) for i in z.infolist())
    except OSError:
        return None                      # torch.load says what is wrong with it
    except (zipfile.BadZipFile, ValueError, EOFError, NotImplementedError) as err:
        # torch.save writes zips Python reads; one it cannot read could still be inflated by torch's reader
        return f"its zip archive is malformed ({str(err).splitlines()[0][:120] if str(err) else type(err).__name__})"
    if total > MAX_ZIP_INFLATION * size + (1 << 20):
        return (f"its zip entries inflate to {total:,} bytes from a {size:,}-byte file; torch.save stores them "
                "uncompressed, so this is a decompression bomb")
    return None


def _not_a_pickle(path: Path) -> str | None:
    """Why ``path`` cannot be a checkpoint when it is neither a zip archive nor a well-formed pickle
    stream, else None.  ``pickletools.genops`` only reads opcodes: nothing is run.  Beyond what
    genops checks: the protocol must be one Python writes (2..5), and a frame must fit in the file
    (random bytes behind a 0x80 otherwise parse as a short "pickle" now and then)."""
    import pickletools

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
            if head.startswith(CHECKPOINT_MAGIC[0]):
                return None
            if not head.startswith(CHECKPOINT_MAGIC[1]):
                return f"it starts with bytes {head.hex(' ')}, neither a zip archive nor a pickle"
            f.seek(0)
            for opcode, arg, pos in pickletools.genops(f):
                if opcode.name == "PROTO" and not 2 <= arg <= pickle.HIGHEST_PROTOCOL:
                    return f"pickle protocol {arg} at byte {pos}: Python writes 2..{pickle.HIGHEST_PROTOCOL}"
                if opcode.name == "FRAME" and arg > size - pos:
                    return f"a frame of {arg} bytes at byte {pos} runs past the end of the file ({size} bytes)"
    except OSError:
        return None
    except Exception as err:  # noqa: BLE001 - any parse failure: the bytes are not a pickle
        return f"the bytes are not a pickle: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    return None


def _normalised(data) -> dict[str, torch.Tensor]:
    """Unwrap a loaded checkpoint and drop a ``module.`` prefix (training heads kept)."""
    if isinstance(data, dict):
        for key in WRAPPERS:
            if key in data and isinstance(data[key], dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(
            f"expected a state_dict (a mapping of parameter names to tensors), found {type(data).__name__}"
            f"{' with keys ' + ', '.join(map(str, list(data)[:5])) if isinstance(data, dict) else ''}; "
            "save the model with torch.save(model.state_dict())")
    out = {}
    for key, value in data.items():
        key = str(key)
        if key.startswith("module."):
            key = key[len("module."):]
        out[key] = value
    return out


def checkpoint_filter_fn(data) -> dict[str, torch.Tensor]:
    """Unwrap and normalise a loaded checkpoint into the original's key layout."""
    return {k: v for k, v in _normalised(data).items() if not k.startswith(TRAINING_ONLY)}


def _tensor_problem(key: str, value: torch.Tensor) -> str | None:
    """What makes ``value`` impossible as the checkpoint's ``key``, else None.  Reads metadata only."""
    shape, name = tuple(value.shape), _short(key)
    if value.layout != torch.strided or value.device.type != "cpu":
        return f"{name} is a {value.layout} tensor on {value.device.type}, not a dense CPU tensor"
    if key.endswith(COUNTER):
        ok = value.dtype in FLOAT_DTYPES or not (value.dtype.is_floating_point or value.dtype.is_complex
                                                  or value.dtype == torch.bool)
        if not ok:
            return f"{name} is {value.dtype}, expected an integer (int64 as torch saves it)"
    elif value.dtype not in FLOAT_DTYPES:
        return (f"{name} is {value.dtype}, expected real floating-point weights (float32, float16, bfloat16 "
                "or float64)")
    rule = next(((rank, what) for pattern, rank, what in RANKS if pattern.match(key)), None)
    if rule is not None and value.dim() != rule[0]:
        return f"{name} has {value.dim()} dimension(s) {shape}, expected {rule[0]} ({rule[1]})"
    if 0 in shape:
        return f"{name} has shape {shape} with a zero-sized dimension (a trained weight has none)"
    if value.numel() * value.element_size() > value.untyped_storage().nbytes():
        return (f"{name} has shape {shape} but only {value.untyped_storage().nbytes()} bytes of data (an "
                "expanded view)")
    return None


def check_tensors(state: dict[str, torch.Tensor]) -> None:
    """Refuse tensors no trained NFormer holds -- another dtype (complex, integer, bool), another
    rank, a zero-sized dimension, views wider than their data -- naming each, before any shape is
    used to size a model."""
    problems = [p for k, v in state.items() if (p := _tensor_problem(k, v))]
    if not problems:
        problems = _overlaps(state)
    if problems:
        raise CheckpointError(
            "the checkpoint's tensors cannot be NFormer weights: "
            f"{'; '.join(problems[:5])}{f' (+{len(problems) - 5} more)' if len(problems) > 5 else ''}. "
            "The file is damaged or not a checkpoint of the original training code: export one saved by "
            "torch.save(model.state_dict())")


def _overlaps(state: dict[str, torch.Tensor]) -> list[str]:
    """Tensors that view one storage and claim more bytes than it holds: a small file whose
    tensors all view one block would size a model many times its own size (a trained model's
    tensors each have their own data; views of one flat buffer are fine while they fit in it)."""
    groups: dict[int, list[str]] = {}
    for key, value in state.items():
        groups.setdefault(value.untyped_storage().data_ptr(), []).append(key)
    problems = []
    for keys in groups.values():
        claimed = sum(state[k].numel() * state[k].element_size() for k in keys)
        held = state[keys[0]].untyped_storage().nbytes()
        if len(keys) > 1 and claimed > held:
            names = ", ".join(_short(k) for k in sorted(keys)[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
            problems.append(f"{names} share one block of {held} bytes but claim {claimed} bytes (overlapping views)")
    return problems


def _count(state, pattern: str) -> int:
    """How many consecutive indices 0, 1, 2, ... the keys matching ``pattern`` (group 1: the index)
    hold.  Keys past a gap (``h.99999999``) are not counted: the layout check reports them."""
    found = {m.group(1) for key in state if (m := re.match(pattern, key))}
    n = 0
    while str(n) in found:
        n += 1
    return n


def infer_config(state: dict[str, torch.Tensor], **options) -> ModelConfig:
    """Read the architecture from the tensors' shapes; ``options`` set what shapes cannot say.

    The tensors are checked first (:func:`check_tensors`) and every size read is bounded (``MAX_*``),
    so that what is built from the result is never sized by a damaged or hostile file."""
    check_tensors(state)
    try:
        blocks = [0, 0, 0, 0]
        for key in state:
            m = re.match(r"backbone\.base\.layer([1-4])\.(\d{1,9})\.conv1\.weight$", key)
            if m:
                stage, index = int(m.group(1)) - 1, int(m.group(2))
                blocks[stage] = max(blocks[stage], index + 1)
        kind = "bottleneck" if "backbone.base.layer1.0.conv3.weight" in state else "basic"
        arch = next((name for name, (k, layers) in ARCHS.items() if k == kind and tuple(blocks) == layers), None)
        if arch is None:
            raise CheckpointError(
                f"the checkpoint's backbone is not a supported ResNet: found {kind} blocks per stage "
                f"{tuple(blocks)}; supported: " + ", ".join(f"{n} {l}" for n, (_, l) in ARCHS.items()))
        widths = tuple(int(state[f"backbone.base.layer{i}.0.conv1.weight"].shape[0]) for i in range(1, 5))
        stem_width = int(state["backbone.base.conv1.weight"].shape[0])
        feature_dim = int(state["backbone.projection.weight"].shape[0])
        n_embd = int(state["nformer.h.0.attn.c_attn.w"].shape[0])
        n_layer = _count(state, r"nformer\.h\.(\d+)\.")
    except (KeyError, ValueError) as err:
        raise CheckpointError(
            f"the checkpoint is not an NFormer model: no {err} (expected backbone.base.* ResNet weights, "
            "backbone.projection, backbone.bottleneck and nformer.h.* blocks as saved by the original "
            "training code)") from None
    sizes = [("stem width", "backbone.base.conv1.weight", stem_width, MAX_WIDTH)]
    sizes += [(f"layer{i} width", f"backbone.base.layer{i}.0.conv1.weight", w, MAX_WIDTH)
              for i, w in enumerate(widths, 1)]
    sizes += [("embedding size", "backbone.projection.weight", feature_dim, MAX_EMBD),
              ("n_embd", "nformer.h.0.attn.c_attn.w", n_embd, MAX_EMBD),
              ("n_layer", "nformer.h.*", n_layer, MAX_N_LAYER)]
    _check_sizes(sizes)
    config = ModelConfig(arch=arch, widths=widths, stem_width=stem_width, feature_dim=feature_dim,
                         n_layer=n_layer, n_embd=n_embd, num_classes=options.pop("num_classes", 751))
    return replace(config, **{k: v for k, v in options.items() if v is not None})


def _check_sizes(sizes) -> None:
    """``sizes``: (name, key, value, limit); refuse the values above their limit in one message."""
    over = [f"{name} {value} (from {key}; at most {limit})" for name, key, value, limit in sizes if value > limit]
    if over:
        raise CheckpointError(
            f"the checkpoint's shapes give {', '.join(over)}: beyond any trained NFormer (the original: widths "
            "64..512, 256-d embeddings, 4 layers, 751 classes). The file is damaged or not a checkpoint of the "
            "original training code")


def _short(key: str, limit: int = 120) -> str:
    """``key`` for a message: a hostile file's keys can be megabytes long."""
    return key if len(key) <= limit else f"{key[:limit - 30]}...{key[-20:]} ({len(key)} characters)"


def _key_report(model: NFormerModel, state: dict[str, torch.Tensor]) -> str:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(_short(k) for k in set(state) - set(expected))
    misshaped = sorted(f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
                       for k in set(expected) & set(state) if expected[k].shape != state[k].shape)

    def head(items):
        return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
    parts = [f"{name} ({len(items)}): {head(items)}" for name, items in
             (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if items]
    layers = sorted({m.group(1) for k in state if (m := re.match(r"nformer\.h\.(\d+)\.", k))},
                    key=lambda i: (len(i), i))
    n_layer = model.config.n_layer
    if layers != [str(i) for i in range(n_layer)]:
        parts.append(f"the nformer.h.* layers must be numbered 0..n-1, found {', '.join(map(_short, layers[:8]))}"
                     f"{' ...' if len(layers) > 8 else ''} (read as {n_layer} layer(s))")
    return "; ".join(parts)


def load_checkpoint(path: str | Path, *, n_head: int = 2, topk: int = 20, landmarks: int = 5,
                    last_stride: int = 1, input_size_hw: tuple[int, int] | None = None) -> NFormerModel:
    """Build the eval-mode reference model from a checkpoint of the original training code."""
    raw = read_state_dict(path)
    tensors = _normalised(raw)
    heads = {k: v for k, v in tensors.items() if k.startswith(TRAINING_ONLY)}
    state = {k: v for k, v in tensors.items() if not k.startswith(TRAINING_ONLY)}
    check_tensors(heads)
    num_classes = None
    if "backbone.classifier.weight" in heads:
        num_classes = int(heads["backbone.classifier.weight"].shape[0])
        _check_sizes([("num_classes", "backbone.classifier.weight", num_classes, MAX_CLASSES)])
    if n_head < 1 or topk < 1 or landmarks < 1 or last_stride not in (1, 2):
        raise CheckpointError(f"invalid options: n_head={n_head}, topk={topk}, landmarks={landmarks} must be "
                              f">= 1 and last_stride={last_stride} must be 1 or 2")
    if input_size_hw is not None and (len(input_size_hw) != 2 or not all(
            MIN_INPUT_SIDE <= side <= MAX_INPUT_SIDE for side in input_size_hw)):
        raise CheckpointError(f"invalid input size {input_size_hw}: expected (height, width), each "
                              f"{MIN_INPUT_SIDE}..{MAX_INPUT_SIDE}")
    config = infer_config(state, n_head=n_head, topk=topk, landmarks=landmarks, last_stride=last_stride,
                          num_classes=num_classes if num_classes is not None else 751,
                          input_size_hw=tuple(input_size_hw) if input_size_hw else None)
    if config.n_embd % config.n_head:
        raise CheckpointError(f"n_embd {config.n_embd} is not divisible by --n-head {config.n_head}")
    if config.feature_dim != config.n_embd:
        raise CheckpointError(f"the encoder's embeddings are {config.feature_dim} wide but the refinement takes "
                              f"{config.n_embd}: this checkpoint's two halves do not belong together")
    # the layout is compared on a model without storage ("meta"): only a checkpoint that fits
    # exactly sizes the model that is allocated
    with torch.device("meta"):
        skeleton = NFormerModel(config)
    report = _key_report(skeleton, state)
    if report:
        raise CheckpointError(f"{path} does not fit the NFormer {config.arch} layout: {report}. Is it a "
                              "checkpoint of another architecture?")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path} holds NaN or infinite values in {len(bad)} tensor(s): "
                              f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; the training diverged or "
                              "the file is damaged: export a checkpoint saved before that")
    model = NFormerModel(config)
    model.load_state_dict(state, strict=True)
    return model.eval()
