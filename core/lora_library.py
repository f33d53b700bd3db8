"""A model's LoRA library: the *.safetensors files under a folder or fsspec URI, described from their headers.

Listing reads only each file's safetensors header (8-byte length + JSON: tensor names, shapes, metadata), cached
by (path, size, mtime), so a rescan of a large folder is cheap. A name that is not known triggers a rescan (a file
dropped into the folder is usable without a restart); `entries()` rescans too (GET /v1/loras). No torch here.

Per file: the key layout (kohya/A1111 `lora_unet_*.lora_down.weight` or diffusers/PEFT `unet.*.lora_A.weight`,
`*.lora.down.weight`), the base family (metadata, else the key structure, else the cross-attention width), the
rank (largest down-projection), the size, and trigger words from kohya/modelspec metadata when present.
"""
from __future__ import annotations

import json
import logging
import posixpath
import struct
import threading
import time
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
# cross-attention width (the in-features of attn2.to_k) -> family, for files without metadata
CROSS_ATTENTION_FAMILY = {768: "sd15", 1024: "sd21", 2048: "sdxl"}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass
class LoraInfo:
    name: str
    path: str = field(repr=False)
    family: str  # sd15 | sd21 | sdxl | unknown
    rank: int
    size_bytes: int
    layout: str  # kohya | diffusers
    trigger_words: list[str]
    components: list[str]  # unet, text_encoder, text_encoder_2
    mtime: float = field(repr=False, default=0.0)

    def public(self) -> dict:
        out = asdict(self)
        for private in ("path", "mtime"):
            out.pop(private)
        return out


class UnsupportedLora(ValueError):
    """A .safetensors file that is not a LoRA sdserve can apply (its reason is logged, the file is not listed)."""


def read_header(fs, path: str) -> dict:
    with fs.open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > MAX_HEADER_BYTES:
            raise UnsupportedLora(f"header of {length} bytes")
        return json.loads(fh.read(length))


def layout_of(keys: list[str]) -> str:
    if keys and all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora.down." in k or "_lora.down." in k or ".lora_linear_layer.down." in k
           for k in keys):
        return "diffusers"
    raise UnsupportedLora("no LoRA keys (kohya lora_down/lora_up or diffusers/PEFT lora_A/lora_B)")


def is_down(key: str) -> bool:
    return key.endswith(("lora_down.weight", ".lora_A.weight", ".lora.down.weight", "_lora.down.weight",
                         ".lora_A.default.weight", ".lora_linear_layer.down.weight"))


def components_of(keys: list[str], layout: str) -> list[str]:
    found = set()
    for k in keys:
        if layout == "kohya":
            found.add({"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                       "lora_te2": "text_encoder_2"}.get(k.split("_", 2)[0] + "_" + k.split("_", 2)[1], "unet"))
        else:
            head = k.split(".", 1)[0]
            found.add(head if head in ("unet", "text_encoder", "text_encoder_2") else "unet")
    return sorted(found)


def family_of(header: dict, keys: list[str], layout: str) -> str:
    meta = header.get("__metadata__") or {}
    base = str(meta.get("ss_base_model_version", "")).lower()  # kohya: sd_v1, sd_v2_768_v, sdxl_base_v1-0
    arch = str(meta.get("modelspec.architecture", "")).lower()  # stable-diffusion-xl-v1-base/lora, ...
    if "xl" in base or "stable-diffusion-xl" in arch:
        return "sdxl"
    if base.startswith("sd_v2") or str(meta.get("ss_v2", "")).lower() == "true" or "stable-diffusion-v2" in arch:
        return "sd21"
    if base.startswith("sd_v1") or "stable-diffusion-v1" in arch:
        return "sd15"
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys) or (
            layout == "kohya" and any(k.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks"))
                                      for k in keys)):
        return "sdxl"
    for k in keys:
        if is_down(k) and ("attn2_to_k" in k or "attn2.to_k" in k or "attn2.processor.to_k" in k):
            shape = header[k].get("shape", [])
            if len(shape) >= 2:
                return CROSS_ATTENTION_FAMILY.get(int(shape[1]), "unknown")
    return "unknown"


def trigger_words_of(header: dict, limit: int = 10) -> list[str]:
    meta = header.get("__metadata__") or {}
    phrase = meta.get("modelspec.trigger_phrase") or meta.get("ss_trigger_words") or ""
    words = [w.strip() for w in str(phrase).split(",") if w.strip()]
    try:
        freq = json.loads(meta.get("ss_tag_frequency") or "{}")
    except ValueError:
        freq = {}
    counts: dict[str, int] = {}
    for tags in freq.values() if isinstance(freq, dict) else ():
        for tag, n in (tags.items() if isinstance(tags, dict) else ()):
            counts[tag.strip()] = counts.get(tag.strip(), 0) + int(n)
    words += [t for t, _ in sorted(counts.items(), key=lambda kv: -kv[1]) if t and t not in words]
    return words[:limit]


def describe(fs, path: str, name: str, size: int, mtime: float) -> LoraInfo:
    header = read_header(fs, path)
    keys = [k for k in header if k != "__metadata__"]
    layout = layout_of(keys)
    ranks = [int(header[k]["shape"][0]) for k in keys if is_down(k) and header[k].get("shape")]
    if not ranks:
        raise UnsupportedLora("no down-projection weights")
    return LoraInfo(name=name, path=path, family=family_of(header, keys, layout), rank=max(ranks),
                    size_bytes=size, layout=layout, trigger_words=trigger_words_of(header),
                    components=components_of(keys, layout), mtime=mtime)


def _mtime(st: dict) -> float:
    """Modification time from an fsspec info dict (local: float `mtime`; object stores: datetime)."""
    value = st.get("mtime", st.get("LastModified", st.get("updated", 0)))
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    try:
        return float(value or 0)
    except (TypeError, ValueError):
        return 0.0


class LoraLibrary:
    """The LoRAs under `uri`, rescanned on a missed name and on every listing."""

    def __init__(self, uri: str):
        from fsspec.core import url_to_fs

        self.uri = uri
        self.fs, self.root = url_to_fs(uri)
        self._lock = threading.Lock()
        self._entries: dict[str, LoraInfo] = {}
        self._described: dict[tuple[str, int, float], LoraInfo | None] = {}
        self.scanned_at = 0.0

    def scan(self) -> dict[str, LoraInfo]:
        """Re-list the folder; headers are read again only for new or changed files."""
        with self._lock:
            entries: dict[str, LoraInfo] = {}
            try:
                found = self.fs.find(self.root, detail=True) if self.fs.exists(self.root) else {}
            except (FileNotFoundError, NotADirectoryError):
                found = {}
            for path, st in sorted(found.items()):
                if not path.endswith(SUFFIX) or st.get("type", "file") != "file":
                    continue
                rel = posixpath.relpath(path, self.root.rstrip("/") or "/")
                name = rel[:-len(SUFFIX)]
                size = int(st.get("size") or 0)
                mtime = _mtime(st)
                key = (path, size, mtime)
                if key not in self._described:
                    try:
                        self._described[key] = describe(self.fs, path, name, size, mtime)
                    except (UnsupportedLora, ValueError, KeyError, OSError, struct.error) as err:
                        log.warning("LoRA library %s: skipping %s: %s", self.uri, rel, err)
                        self._described[key] = None
                info = self._described[key]
                if info is not None:
                    entries[name] = info
            self._entries = entries
            self.scanned_at = time.monotonic()
            return dict(entries)

    def entries(self) -> list[LoraInfo]:
        return sorted(self.scan().values(), key=lambda i: i.name)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> LoraInfo | None:
        """The entry for `name`; a miss rescans once (new files are found without a restart), and so does an
        entry whose file changed or vanished (checked when it is loaded: core/lora_cache.py)."""
        info = self._entries.get(name)
        if info is None:
            info = self.scan().get(name)
        return info

    def read(self, info: LoraInfo) -> tuple[dict, dict]:
        """(tensors on the CPU, metadata) of one file: read whole, off the GPU thread (core/lora_cache.py)."""
        from safetensors.torch import load

        with self.fs.open(info.path, "rb") as fh:
            data = fh.read()
        tensors = load(data)
        (length,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8:8 + length]).get("__metadata__") or {}
        return tensors, meta
