"""Would DALI's image decoder accept these bytes? Asked of nvImageCodec, the library `fn.decoders.image` runs.

PIL is lenient where DALI is not: it resyncs past a broken JPEG marker segment, skips unknown critical PNG
chunks, ignores IDAT checksums, a missing IEND or an APNG `acTL` with zero frames; nvImageCodec's parsers
and its libjpeg-turbo / libpng decoders reject all of these, and one such file fails a whole DALI batch.
So a file is kept byte-for-byte only if nvImageCodec (installed with DALI, same version, CPU backend)
decodes it too; otherwise it is re-encoded (or rejected under --reencode never).

Cost: JPEG is decoded as an 8x8 region (all headers parsed, the decoder set up, the first MCU row
decoded: ~60 us for a 500x375 photo); the full entropy-coded stream is already checked by PIL, which
is the stricter of the two there (it fails on corrupt scan data that libjpeg-turbo only warns about).
PNG and WebP are decoded in full (libpng checks every chunk CRC as it reads). DALI's GPU decoder
(nvJPEG) falls back to this host decoder for images it cannot handle, so CPU-decodable is the bar.
Without nvImageCodec (no DALI installed) `dali_problem` answers None and only the structural checks
remain. Two users: the shard tool (shards/validate.py: re-encode or reject) and the loader's pre-flight
check (pipeline/image_check.py: skip the sample before it can fail a DALI batch).
"""
from __future__ import annotations

import os
import threading

_ROI = 8  # px: the smallest region that still makes libjpeg-turbo set up and decode one MCU row
_state = threading.local()


def _decoder():
    """One CPU-only, single-threaded decoder per process and thread (a forked worker makes its own; the
    loader may check images from several threads)."""
    if getattr(_state, "pid", None) != os.getpid():
        _state.pid, _state.decoder, _state.nv = os.getpid(), None, None
        try:
            from nvidia import nvimgcodec as nv
            _state.decoder = nv.Decoder(device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY, max_num_cpu_threads=1,
                                        backends=[nv.Backend(nv.BackendKind.CPU_ONLY)])
            _state.nv = nv
        except Exception:  # not installed, or no wheel for this platform: structural checks only
            pass
    return _state.nv, _state.decoder


def checker() -> str:
    """What the check runs on, for the run report."""
    nv, _ = _decoder()
    return f"nvimgcodec {nv.__version__}" if nv is not None else "none (nvImageCodec not installed)"


def dali_problem(data: bytes, fmt: str) -> str | None:
    """None when DALI's decoder decodes `data` (a `fmt` = JPEG | MPO | PNG | WEBP file PIL already decoded);
    else why not, in a few words. Never raises."""
    nv, decoder = _decoder()
    if decoder is None:
        return None
    try:
        stream = nv.CodeStream(data)
        if fmt in ("JPEG", "MPO"):
            stream = stream.get_sub_code_stream(region=nv.Region(0, 0, min(_ROI, stream.height),
                                                                 min(_ROI, stream.width)))
        if decoder.decode(stream) is None:
            return "DALI's decoder (nvImageCodec) fails on it"
    except Exception as exc:  # the parser refuses it ("Failed to get image info")
        return f"DALI's decoder (nvImageCodec) cannot parse it: {str(exc)[:80]}"
    return None
