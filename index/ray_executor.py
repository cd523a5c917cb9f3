"""``--executor ray``: the embedding stages of ``index build/add`` on a Ray cluster (Ray Data).

The same three stages as the local executor (:mod:`index.embed`), with the mapper placed on a cluster:

- reader: the driver reads the pending rows from the store (:func:`index.embed.run_image_stages`); they
  become a Ray Dataset of ``(id, path)``, and DICOM decoding and preprocessing run as CPU ``map_batches``
  tasks through the same :func:`index.embed.decode_item` the local DataLoader workers call;
- mapper: a pool of actors, each of which loads the model once (on a GPU when ``gpus_per_worker > 0``,
  else on CPU) and embeds batches with an :class:`~cxr_search.inference.Embedder`;
- writer: vectors and per-file failures stream back to the driver (``iter_batches``), which commits them
  batch by batch through the same writer as the local executor (:func:`index.embed.write_image_batch`),
  so the store stays the single source of truth: a killed driver leaves the unwritten rows ``pending``
  and the next run embeds exactly those.

Ray restarts an actor that dies and retries its batch (Ray Data's actor pools default to
``max_restarts=-1`` and ``max_task_retries=-1``); a file that cannot be decoded is a failure row with
its reason, as with the local executor. The model travels to the workers as the files of a saved model
folder (safetensors and JSON, loaded by the safe loader, never a pickle of objects), so a worker needs no
shared model path: only the image files must be readable at the same paths on every node (an NFS or
object-store mount, as for ``--shard``), and the package installed there.

``ray`` is an optional extra: ``pip install 'cxr-search[ray]'``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from cxr_search.errors import ConfigError
from cxr_search.inference import Embedder
from cxr_search.model import CXRClip
from index.embed import (
    ImageBatches,
    SectionBatches,
    StageTimes,
    decode_item,
    run_image_stages,
    run_section_stages,
)
from index.privacy import IndexSecret
from index.store import Store

logger = logging.getLogger(__name__)

#: Test hook: when this variable names a file that exists on a worker, the first embedding call that
#: sees it deletes it and ends its actor process abruptly (as a crash would); Ray must replace the actor.
KILL_ONCE_ENV = "CXR_SEARCH_TEST_KILL_ACTOR_ONCE"
INSTALL_HINT = "pip install 'cxr-search[ray]'"
_QUIET_LOGGERS = ("ray.data",)


@dataclass
class RayOptions:
    """Where and how wide the Ray executor runs.

    Attributes:
        address: Cluster address (``auto``: the running cluster; ``None``: a local one started for this
            run, unless this process is already connected to one).
        workers: Embedding actors (each holds one model copy).
        gpus_per_worker: GPUs per actor (0: CPU actors; fractions share a GPU).
        cpus_per_worker: CPUs reserved per actor (its torch threads).
        decode_cpus: CPUs reserved per decoding task. Half a core by default: a task waits on file reads
            part of the time, and a share other than the actors' keeps Ray Data from fusing decoding into
            the actors, so decoding spreads over the cluster however few actors (or GPUs) there are.
        batch_size: Images per decoding task, per model call and per store commit.
        text_batch_size: Sections per model call and per store commit.
        precision: Precision of the actors' Embedder (as ``--precision``, resolved on the actor's device).
        num_cpus: CPUs of a local cluster started for this run (``None``: all of this machine's).
        torch_threads: Torch threads of a CPU actor (0: :func:`cpu_threads` decides).
    """

    address: Optional[str] = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    decode_cpus: float = 0.5
    batch_size: int = 32
    text_batch_size: int = 64
    precision: str = "fp32"
    num_cpus: Optional[int] = None
    torch_threads: int = 0


def require_ray() -> Any:
    """The ``ray`` module (with Ray Data), or a ConfigError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data needs the wheel's "data" extra)
    except ImportError:
        raise ConfigError(f"--executor ray needs Ray with Ray Data: {INSTALL_HINT}") from None
    return ray


# ------------------------------------------------------------------------------------ the model
def model_files(model: CXRClip) -> Dict[str, bytes]:
    """The files of ``model`` saved in the project's folder format (weights as safetensors), as bytes."""
    from cxr_search.checkpoints import save_model

    with tempfile.TemporaryDirectory(prefix="cxr-ray-model-") as tmp:
        root = save_model(model, Path(tmp) / "model", provenance=dict(getattr(model, "provenance", None) or {}))
        return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def model_from_files(files: Dict[str, bytes]) -> CXRClip:
    """Load a model from :func:`model_files` output through the safe loader (no unpickling)."""
    from cxr_search.checkpoints import load_model

    tmp = Path(tempfile.mkdtemp(prefix="cxr-ray-model-"))
    try:
        for name, data in files.items():
            (tmp / Path(name).name).write_bytes(data)
        return load_model(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _ModelRef:
    """The model's files in the Ray object store, put there on first use (once per run, shared by the pools)."""

    def __init__(self, model: CXRClip) -> None:
        self.model = model
        self._ref: Any = None

    def get(self) -> Any:
        if self._ref is None:
            self._ref = require_ray().put(model_files(self.model))
        return self._ref


# ------------------------------------------------------------------------------------ stages
def _decode_batch(batch: Dict[str, np.ndarray], preprocess: Any, shape: Tuple[int, ...]) -> Dict[str, np.ndarray]:
    """CPU stage: decode and preprocess each file (:func:`decode_item`); a failure keeps its row, with its reason."""
    pixels = np.zeros((len(batch["id"]),) + tuple(shape), dtype=np.float32)
    errors: List[str] = []
    for i, (image_id, path) in enumerate(zip(batch["id"], batch["path"], strict=True)):
        _, tensor, why = decode_item(int(image_id), str(path), preprocess)
        if tensor is not None:
            pixels[i] = tensor.numpy()
        errors.append(why)
    return {"id": np.asarray(batch["id"], dtype=np.int64), "pixels": pixels, "error": np.asarray(errors, dtype=object)}


def _model_on_worker(files: Any) -> CXRClip:
    # Ray Data passes constructor arguments inside a closure, so an object reference arrives unresolved.
    if not isinstance(files, dict):
        files = require_ray().get(files)
    return model_from_files(files)


def _crash_if_asked() -> None:
    marker = os.environ.get(KILL_ONCE_ENV)
    if not marker:
        return
    try:
        os.remove(marker)  # only one caller can remove it: one crash
    except FileNotFoundError:
        return
    os._exit(1)


def _set_threads(device: str, threads: int) -> None:
    # Ray starts a worker with OMP_NUM_THREADS=1 (one per reserved CPU); a CPU actor that holds a node's model
    # pass uses the cores the driver gives it (see `cpu_threads`), as the local executor's model does.
    if device == "cpu" and threads > 0:
        import torch

        torch.set_num_threads(threads)


class _ImageActor:
    """Embedding actor: loads the model once, then embeds the decoded batches it is given."""

    def __init__(self, files: Any, device: str, precision: str, batch_size: int, threads: int = 0) -> None:
        _set_threads(device, threads)
        self.embedder = Embedder(_model_on_worker(files), device=device, precision=precision, batch_size=batch_size)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        import torch

        _crash_if_asked()
        ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        vectors = np.zeros((len(ok), self.embedder.embed_dim), dtype=np.float32)
        if ok.any():
            vectors[ok] = self.embedder.embed_pixels(torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])))
        return {"id": batch["id"], "vector": vectors, "error": batch["error"]}


class _TextActor:
    """Text embedding actor (report sections)."""

    def __init__(self, files: Any, device: str, precision: str, batch_size: int, threads: int = 0) -> None:
        _set_threads(device, threads)
        self.embedder = Embedder(_model_on_worker(files), device=device, precision=precision,
                                 text_batch_size=batch_size)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        _crash_if_asked()
        return {"id": np.asarray(batch["id"], dtype=np.int64),
                "vector": self.embedder.embed_texts([str(t) for t in batch["text"]])}


def _threads(ray: Any, ray_opts: RayOptions) -> int:
    nodes = [float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return cpu_threads(ray_opts, [c for c in nodes if c > 0])


def _actor_args(ray_opts: RayOptions) -> Dict[str, Any]:
    # Ray Data restarts a dead pool actor and retries its in-flight batch by default (max_restarts=-1,
    # max_task_retries=-1 for actor pools): a lost worker costs time, not rows.
    ray = require_ray()
    args: Dict[str, Any] = {"compute": ray.data.ActorPoolStrategy(size=ray_opts.workers),
                            "num_cpus": ray_opts.cpus_per_worker}
    if ray_opts.gpus_per_worker > 0:
        args["num_gpus"] = ray_opts.gpus_per_worker
    return args


def _device(ray_opts: RayOptions) -> str:
    return "cuda" if ray_opts.gpus_per_worker > 0 else "cpu"


def cpu_threads(ray_opts: RayOptions, node_cpus: Sequence[float]) -> int:
    """Torch threads of each CPU actor: the cluster's CPUs shared by the actors, at most one node's.

    Ray reserves ``cpus_per_worker`` (1) per actor but an actor is the only model pass on its share of the
    cluster; with one thread it would leave the rest of its node to the (lighter) decoding tasks.
    ``ray_opts.torch_threads`` overrides it.
    """
    if ray_opts.torch_threads:
        return ray_opts.torch_threads
    if not node_cpus:
        return 1
    share = sum(node_cpus) / max(1, ray_opts.workers)
    return max(1, int(min(max(node_cpus), round(share))))


# ------------------------------------------------------------------------------------ driver
class RayCluster:
    """Context manager: connect to (or start) a Ray cluster for one run, and disconnect after it.

    A process already connected to Ray (``ray.init`` called by the caller) keeps its connection and its
    cluster; otherwise this connects to ``address`` (or starts a local cluster) and shuts down after.
    """

    def __init__(self, ray_opts: RayOptions) -> None:
        self.opts = ray_opts
        self.ray = require_ray()
        self._started = False
        self._levels: Dict[str, int] = {}

    def __enter__(self) -> "RayCluster":
        if not self.ray.is_initialized():
            kwargs: Dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "configure_logging": False}
            if self.opts.address:
                kwargs["address"] = self.opts.address
            elif self.opts.num_cpus:
                kwargs["num_cpus"] = self.opts.num_cpus
            try:
                self.ray.init(**kwargs)
            except ConnectionError as exc:
                raise ConfigError(f"--ray-address {self.opts.address}: cannot connect to a Ray cluster ({exc}); "
                                  "start one with `ray start --head` or leave --ray-address out for a local one") \
                    from None
            self._started = True
        ctx = self.ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        # Ray Data logs every dataset's start and end at INFO on stderr: the build has its own progress.
        for name in _QUIET_LOGGERS:
            self._levels[name] = logging.getLogger(name).level
            logging.getLogger(name).setLevel(logging.ERROR)
        return self

    def check_room(self) -> None:
        """Refuse a pool the cluster cannot hold next to one decoding task (it would wait forever).

        Raises:
            ConfigError: Fewer CPUs than the actors plus one decoding task need, or fewer GPUs than the actors.
        """
        have = self.ray.cluster_resources()
        o = self.opts
        cpus, need = float(have.get("CPU", 0)), o.workers * o.cpus_per_worker + o.decode_cpus
        if need > cpus:
            raise ConfigError(f"--workers {o.workers}: the embedding actors take {o.workers * o.cpus_per_worker:g} "
                              f"CPUs and decoding at least {o.decode_cpus:g} more, but the Ray cluster has {cpus:g}; "
                              "give fewer --workers or add nodes")
        gpus, need = float(have.get("GPU", 0)), o.workers * o.gpus_per_worker
        if need > gpus:
            raise ConfigError(f"--workers {o.workers} --num-gpus-per-worker {o.gpus_per_worker:g}: the actors need "
                              f"{need:g} GPUs, the Ray cluster has {gpus:g}")

    def __exit__(self, *exc: Any) -> None:
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        if self._started:
            self.ray.shutdown()


def ray_image_batches(model: CXRClip, ray_opts: RayOptions, *, ref: Optional[_ModelRef] = None) -> ImageBatches:
    """The Ray mapper of :func:`index.embed.run_image_stages`: decode tasks, then the actor pool.

    Must be called inside :class:`RayCluster`. ``model_s`` of the timings is the driver's wait for the
    cluster (decode and embed overlap there); ``read_s`` stays 0.
    """
    ray = require_ray()
    from cxr_search.images import image_size_of

    preprocess = model.config.preprocess
    shape = (3,) + tuple(image_size_of(preprocess))
    ref = ref or _ModelRef(model)

    def batches(items: Sequence[Tuple[int, str]], times: StageTimes) -> Iterator[Tuple[List[int], np.ndarray,
                                                                                         List[Tuple[int, str]]]]:
        ds = ray.data.from_items([{"id": int(i), "path": p} for i, p in items])
        ds = ds.map_batches(_decode_batch, batch_size=ray_opts.batch_size, batch_format="numpy",
                            fn_kwargs={"preprocess": preprocess, "shape": shape}, num_cpus=ray_opts.decode_cpus)
        ds = ds.map_batches(_ImageActor, batch_size=ray_opts.batch_size, batch_format="numpy",
                            fn_constructor_args=(ref.get(), _device(ray_opts), ray_opts.precision, ray_opts.batch_size,
                                                 _threads(ray, ray_opts)),
                            **_actor_args(ray_opts))
        t0 = time.perf_counter()
        for batch in ds.iter_batches(batch_size=ray_opts.batch_size, batch_format="numpy"):
            times.model_s += time.perf_counter() - t0
            ok = np.asarray([not e for e in batch["error"]], dtype=bool)
            ids = [int(i) for i in batch["id"][ok]]
            bad = [(int(i), str(e)) for i, e in zip(batch["id"][~ok], batch["error"][~ok], strict=True)]
            yield ids, np.asarray(batch["vector"][ok], dtype=np.float32), bad
            t0 = time.perf_counter()

    return batches


def ray_section_batches(model: CXRClip, ray_opts: RayOptions, *, ref: Optional[_ModelRef] = None) -> SectionBatches:
    """The Ray mapper of :func:`index.embed.run_section_stages`: text actors, written by the driver."""
    ray = require_ray()
    ref = ref or _ModelRef(model)

    def batches(rows: Sequence[Tuple[int, str]], times: StageTimes) -> Iterator[Tuple[List[int], np.ndarray]]:
        ds = ray.data.from_items([{"id": int(i), "text": t} for i, t in rows])
        ds = ds.map_batches(_TextActor, batch_size=ray_opts.text_batch_size, batch_format="numpy",
                            fn_constructor_args=(ref.get(), _device(ray_opts), ray_opts.precision,
                                                 ray_opts.text_batch_size, _threads(ray, ray_opts)),
                            **_actor_args(ray_opts))
        t0 = time.perf_counter()
        for batch in ds.iter_batches(batch_size=ray_opts.text_batch_size, batch_format="numpy"):
            times.model_s += time.perf_counter() - t0
            yield [int(i) for i in batch["id"]], np.asarray(batch["vector"], dtype=np.float32)
            t0 = time.perf_counter()

    return batches


def embed_pending_ray(store: Store, secret: IndexSecret, model: CXRClip, ray_opts: RayOptions, *,
                      progress: bool = False) -> Tuple[StageTimes, StageTimes]:
    """Embed every pending image, then every pending report section, on a Ray cluster.

    The driver (this process) reads the pending rows and writes every result, through the same stage
    functions as the local executor.

    Returns:
        (image timings, section timings).

    Raises:
        ConfigError: Ray is not installed, or the cluster cannot be reached.
    """
    with RayCluster(ray_opts) as cluster:
        cluster.check_room()
        ref = _ModelRef(model)
        images = run_image_stages(store, secret, ray_image_batches(model, ray_opts, ref=ref), progress=progress,
                                  desc="embedding images (ray)")
        sections = run_section_stages(store, ray_section_batches(model, ray_opts, ref=ref), progress=progress,
                                      desc="embedding report sections (ray)")
    return images, sections


__all__ = ["INSTALL_HINT", "KILL_ONCE_ENV", "RayCluster", "RayOptions", "embed_pending_ray", "model_files",
           "model_from_files", "ray_image_batches", "ray_section_batches", "require_ray"]
