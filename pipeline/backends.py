"""The loader's two backends: each turns chunks of samples into two augmented views, and nothing else (the
batching, seeds, skip counts and resume state around them are pipeline.batching's).

  - OpenCVViews: OpenCV (and PIL's resize) in worker processes, the DALI graph's views (augment_cv.py); a bad
    image is found by its worker and reported with its reason.
  - DaliViews: DALI decodes and augments (GPU when there is one, CPU otherwise), fed by external_source. DALI
    fails a whole batch on one bad image, so images are checked before they reach it (unless the shards are
    trusted); a bad one that slips through fails its run, whose samples are counted as `decoder_error`, and
    the pipeline is rebuilt.
Both are used as: `checked(stream)` -> Batcher.chunks -> `views(chunks)` -> Batcher.batches(..., `collate`),
then `close()`.
"""
from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .batching import Chunk, Views
from .interrupt import Interrupt, Interrupted
from .stream import Item
from .worker_pool import augmentation_pool, run_ahead

log = logging.getLogger("mocostream.pipeline.loader")  # what goes wrong here is reported as the loader's


def unchecked(items: Iterable[Item]) -> Iterator[tuple[Item, None]]:
    return ((item, None) for item in items)


class OpenCVViews:
    whole_batches = False  # a short last chunk is augmented too: its rows may complete a batch

    def __init__(self, recipe: str, image_size: int, workers: int, interrupted: Interrupt = None):
        self.recipe, self.image_size, self.workers = recipe, image_size, workers
        self.interrupted = interrupted  # the consumer's stop request: cuts a wait for a worker short
        self.pool = augmentation_pool(workers) if workers > 0 else None  # ignores Ctrl-C, dies with the trainer

    checked = staticmethod(unchecked)  # the workers find bad images as they decode them

    @staticmethod
    def collate(rows: np.ndarray) -> torch.Tensor:
        from .augment_reference import normalize

        return normalize(rows)

    def views(self, chunks: Iterable[Chunk]) -> Iterator[Views]:
        jobs = ((c, ([it.sample.data for it in c.items], self.recipe, self.image_size, c.seed)) for c in chunks)
        for chunk, (q, k, reasons) in run_ahead(self.pool, augment_chunk, jobs, max(1, 2 * self.workers),
                                                 self.interrupted):
            yield Views(chunk.items, q, k, reasons)

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(wait=False, cancel_futures=True)


def augment_chunk(datas: list[bytes], recipe: str, size: int, seed: int):
    """Decode + two views for a chunk of images (runs in a worker process): uint8 q, k arrays for the
    decodable images and, per input, None or the reason it was skipped."""
    from .augment_cv import augment_images  # here, not at the top: DALI-only processes never load OpenCV

    return augment_images(datas, recipe, size, seed)


class DaliViews:
    whole_batches = True  # one pipeline run is exactly one batch

    def __init__(self, *, batch_size: int, image_size: int, recipe: str, device: str, device_id: int | None,
                 threads: int, seed: int, preflight: bool, lost: Callable[[str, int], None],
                 interrupted: Interrupt = None):
        self.batch_size, self.image_size, self.recipe = batch_size, image_size, recipe
        self.interrupted = interrupted  # a stop request that cut a wait for data short inside a run
        self.device, self.device_id, self.threads, self.seed = device, device_id, threads, seed
        self.lost = lost  # counts samples lost with a failed run
        self.checks = ThreadPoolExecutor(threads, thread_name_prefix="image-check") if preflight else None
        self.chunks: Iterator[Chunk] = iter(())
        self.pending: dict[int, Item] = {}  # sample id -> item, for the samples inside the pipeline
        self.next_id = 0

    def checked(self, items: Iterable[Item]) -> Iterator[tuple[Item, str | None]]:
        """Trusted shards go straight to DALI; others with each item's pre-flight answer."""
        return self._checked(items) if self.checks else unchecked(items)

    def _checked(self, items: Iterable[Item]) -> Iterator[tuple[Item, str | None]]:
        """DALI cannot skip a bad image itself: anything it could choke on is filtered by check_image. The
        checks run up to two batches ahead on their own threads (PIL and nvImageCodec decode without the GIL),
        so they overlap the training step instead of stalling it."""
        from . import image_check

        ahead: deque = deque()  # (item, future reason), in stream order
        for item in items:
            ahead.append((item, self.checks.submit(image_check.check_image, item.sample.data)))
            if len(ahead) > 2 * self.batch_size:
                item, reason = ahead.popleft()
                yield item, reason.result()
        while ahead:
            item, reason = ahead.popleft()
            yield item, reason.result()

    @staticmethod
    def collate(views: torch.Tensor) -> torch.Tensor:
        return views  # DALI's outputs are normalised batches already

    def views(self, chunks: Iterator[Chunk]) -> Iterator[Views]:
        from .augment_dali import dali_outputs_to_torch

        self.chunks = chunks
        pipe = self._build()
        while True:
            try:
                outputs = pipe.run()
            except StopIteration:  # the chunks ran out (only with --epochs)
                return
            except Exception as e:  # a decoder failure: lose only what was inside the pipeline
                if isinstance(e, Interrupted) or (self.interrupted and self.interrupted()):
                    raise Interrupted from e  # raised by the stream inside the run: a stop, not a failure
                self._failed(e)
                del pipe
                pipe = self._build()
                continue
            q, k, ids = dali_outputs_to_torch(outputs, self.device)
            yield Views([self.pending.pop(i) for i in ids.tolist()], q, k)

    def _feed(self):
        """DALI's external_source: one whole chunk per run, with opaque ids that map its outputs back to the
        samples, and the chunk's seed. StopIteration from `chunks` ends the pipeline's epoch."""
        chunk, start = next(self.chunks), self.next_id
        self.pending.update(zip(range(start, start + self.batch_size), chunk.items))
        self.next_id += self.batch_size
        ids = np.arange(start, start + self.batch_size, dtype=np.int64).reshape(self.batch_size, 1)
        return [np.frombuffer(it.sample.data, dtype=np.uint8) for it in chunk.items], ids, chunk.seed

    def _build(self):
        from .augment_dali import build_two_view_pipeline

        pipe = build_two_view_pipeline(
            self._feed, batch_size=self.batch_size, size=self.image_size, recipe=self.recipe, device=self.device,
            num_threads=self.threads, seed=self.seed, device_id=self.device_id)
        pipe.build()
        return pipe

    def _failed(self, error: Exception) -> None:
        self.lost("decoder_error", len(self.pending))
        log.error("DALI pipeline failed, %d in-flight samples skipped, rebuilding: %s", len(self.pending), error)
        self.pending.clear()

    def close(self) -> None:
        if self.checks:
            self.checks.shutdown(wait=False, cancel_futures=True)
