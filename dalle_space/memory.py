"""Memory: what a request will need, what the machine has free, and what a call really added.

The estimate is arithmetic on the shapes, cheap enough to run before every request: the KV caches of every
decoder row dominate sampling (mini, parallel: 48 MiB per image), the VQGAN's full-resolution feature maps
dominate decoding. It is checked against XLA's own buffer assignment in the tests.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
from typing import Any, Callable

import jax

from .config import DalleBartConfig, VQGANConfig

LOGIT_COPIES = 6  # logits, guided, warped, and top-k / top-p's sorted values and indices, per row, float32
VQGAN_LIVE_MAPS = 4  # full-resolution activations alive at once in the last up block (measured: see tests)


def sampler_bytes(config: DalleBartConfig, n_prompts: int, n_images: int, mode: str, itemsize: int) -> int:
    """Buffers one sampling batch allocates besides the weights: KV caches of every decoder row, the
    cross-attention contexts, the encoder's activations while it reads the prompts, and the per-step logits."""
    rows = n_images * (1 if mode == "conditional" else 2)
    prompts = {"parallel": 2 * n_prompts, "serial": n_prompts + 1, "conditional": n_prompts}[mode]
    per_token = config.decoder_layers * 2 * config.d_model * itemsize  # a key and a value in every layer
    # one encoder layer's widest moment, float32: the two GLU halves, a residual pair and the attention scores
    encoding = (2 * config.encoder_ffn_dim + 2 * config.d_model
                + config.encoder_attention_heads * config.max_text_length) * 4
    return (rows * config.image_length * per_token + prompts * config.max_text_length * (per_token + encoding)
            + rows * config.decoder_vocab_size * 4 * LOGIT_COPIES)


def vqgan_bytes(config: VQGANConfig, n_images: int, itemsize: int) -> int:
    """Activations of decoding a batch: a few maps of the widest full-resolution layer (group norms in float32)."""
    widest = config.resolution ** 2 * config.ch * config.ch_mult[0]
    return n_images * widest * max(itemsize, 4) * VQGAN_LIVE_MAPS


# ------------------------------------------------------------------------------------------------
# What the machine has, and what a call adds


def on_accelerator() -> bool:
    return jax.devices()[0].platform != "cpu"


def free_bytes() -> int:
    """Memory a new batch could still take: the device's limit less what is in use, or on the CPU the
    system's available memory."""
    if on_accelerator():
        stats = jax.devices()[0].memory_stats()
        return stats["bytes_limit"] - stats["bytes_in_use"]
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


_LIBC = _glibc()
_MALLINFO2 = getattr(_LIBC, "mallinfo2", None)  # glibc 2.33 and newer
if _MALLINFO2 is not None:
    _MALLINFO2.restype = _MallInfo2


def source() -> str:
    """What :func:`peak_growth` measures on this backend."""
    if on_accelerator():
        return "device peak bytes in use"
    return "process peak heap growth" if _MALLINFO2 else "process peak RSS growth"


def _heap_bytes() -> int:
    """Bytes the process holds from malloc, every arena and mmapped block (XLA's CPU buffers among them); the
    resident size where glibc cannot say. Resident pages are a coarse meter of a call: a call of 1.8 MiB of
    allocations was seen to grow the RSS by 0.5 to 1.9 MiB, as freed pages were reused or not."""
    if _MALLINFO2 is None:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


def _release_free_heap() -> None:
    """Free what earlier calls left for the collector, so the next call's growth is its own; where the meter is
    the resident size, also hand freed heap pages back to the system (the heap meter counts bytes in use, which
    freeing already lowers)."""
    gc.collect()
    if _MALLINFO2 is None and _LIBC is not None:
        _LIBC.malloc_trim(0)


def peak_growth(call: Callable[[], Any], poll_s: float = 0.002) -> tuple[Any, int | None]:
    """``call()``'s result and the peak memory it added, in bytes: on an accelerator the device's peak
    bytes in use over what was in use before (None when an earlier, larger peak hides it: JAX cannot reset
    the peak); on the CPU the process's heap (:func:`_heap_bytes`), polled while the call runs."""
    if on_accelerator():
        device = jax.devices()[0]
        before = device.memory_stats()
        result = call()
        after = device.memory_stats()
        if after["peak_bytes_in_use"] <= before["peak_bytes_in_use"]:
            return result, None
        return result, after["peak_bytes_in_use"] - before["bytes_in_use"]
    _release_free_heap()
    baseline = _heap_bytes()
    peak = baseline
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not done.wait(poll_s):
            peak = max(peak, _heap_bytes())

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        result = call()
    finally:
        done.set()
        watcher.join()
    return result, max(peak, _heap_bytes()) - baseline
