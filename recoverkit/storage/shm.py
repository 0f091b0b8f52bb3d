"""Shared-memory slots: snapshots that outlive the process that wrote them.

Where it sits: the shared-memory tier (``staging/shm_tier``) copies each staged step into a
slot here, and the peer replicator writes the replicas it receives into slots of their own;
a process restarted on the same node (same checkpoint root) finds them again and restores
from them. Layout, under ``RECOVERKIT_SHM_DIR`` (default ``/dev/shm``)::

    <shm_dir>/recoverkit/<node>/<job_key>/      job_key: sha256(abspath(root))[:16]
        job.json                                {"root": ..., "node": ...} (for gc)
        rank-RRRRR/   slot-0.data slot-0.index  rank R's own snapshots
                      slot-1.data slot-1.index
        replica-RRRRR/ ...                      replicas of rank R received from a peer

The slots themselves (writer, views, mappings, pins) are :mod:`recoverkit.storage.shm_slots`
(their raw mappings and pins :mod:`recoverkit.storage.shm_map`); their names are re-exported here. The node is ``RECOVERKIT_NODE`` (default: the host name). Each owner directory holds at most
``slots`` slots (2: double buffering). A slot's data file is reused across steps (mapped
once, grown only within the store's budget, checked before growing); its index
(``format/shm_index``) is written last, by tmp + rename. The writer flow::

    w = slots.begin(step, nbytes)   picks a slot that holds neither the newest complete
                                    snapshot nor one this process has open; deletes its
                                    index first (a torn slot is never listed)
    copy into w.view / w.address    (the copy engine, CRCs on the fly)
    w.commit(index_bytes)           index last, atomically: the snapshot is complete

and the reader's: ``v = slots.open(step)`` (the index validated as hostile input, the data
file a regular file at least ``data_bytes`` long, mapped read-only and pinned against reuse
in this process until ``v.close()``).

Another process may overwrite a slot at any time (a peer's replica, the owner's next step),
so a reader in another process checks every CRC after it copied the bytes out; double
buffering keeps the newest complete snapshot intact while the next one is written.

Example:
    >>> import tempfile
    >>> from recoverkit.format.checksum import crc32c
    >>> from recoverkit.format.manifest import BlobRecord
    >>> from recoverkit.format.shm_index import data_file, make_index
    >>> store = ShmStore(tempfile.mkdtemp(), shm_dir=tempfile.mkdtemp(), node="n0", budget_bytes=1 << 20)
    >>> slots = store.slots(0)
    >>> w = slots.begin(5, 3); w.view[:] = b"abc"
    >>> records = {"rank": 0, "blob": BlobRecord(0, data_file(0), 0, 3, crc32c(b"abc")).to_json(),
    ...            "shards": [], "files": {data_file(0): 3}}
    >>> w.commit(make_index(step=5, run_id="r", world_size=1, rank=0, records=records,
    ...                     shards_meta=(), aliases={}, data_bytes=3))
    >>> slots.steps()
    [5]
    >>> with slots.open(5) as v:
    ...     bytes(v.data)
    b'abc'
    >>> store.remove_job()
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .fs import LocalFS
from .shm_slots import MAX_SLOTS, SlotBusyError, SlotSet, SlotWriter, SnapshotView, _real_dir

__all__ = [
    "ENV_NODE",
    "ENV_SHM_DIR",
    "JobInfo",
    "ShmStore",
    "SlotBusyError",
    "SlotSet",
    "SlotWriter",
    "SnapshotView",
    "job_key",
    "node_name",
    "shm_dir_of",
]

ENV_NODE = "RECOVERKIT_NODE"
ENV_SHM_DIR = "RECOVERKIT_SHM_DIR"
TOP = "recoverkit"
JOB_FILE = "job.json"
MAX_OWNER = (1 << 20) - 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_JOB_KEY = re.compile(r"[0-9a-f]{16}")

def node_name(node: str | None = None) -> str:
    """The node's name: ``node``, else ``RECOVERKIT_NODE``, else the host name; validated
    (letters, digits, ``.``, ``_``, ``-``; at most 64; no path separator).

    Example:
        >>> node_name("node-1")
        'node-1'
    """
    name = node if node is not None else (os.environ.get(ENV_NODE) or socket.gethostname())
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(
            f"node name {name!r} is not 1-64 letters, digits, '.', '_' or '-' starting with a letter "
            f"or digit (set {ENV_NODE})"
        )
    return name


def shm_dir_of(shm_dir: str | None = None) -> str:
    """Where shared memory lives: ``shm_dir``, else ``RECOVERKIT_SHM_DIR``, else /dev/shm."""
    return os.path.abspath(shm_dir or os.environ.get(ENV_SHM_DIR) or "/dev/shm")


def job_key(root: str) -> str:
    """The job directory's name for a checkpoint root: 16 hex digits of its path's SHA-256.

    Example:
        >>> len(job_key("/ckpt/run1")), job_key("/ckpt/run1") == job_key("/ckpt/run1/")
        (16, True)
    """
    return hashlib.sha256(os.path.abspath(os.fspath(root)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class JobInfo:
    """A job directory found by :meth:`ShmStore.jobs` (for ``recoverkit gc``)."""

    node: str
    job_key: str
    path: str
    #: what ``job.json`` records (``root``, ``node``, ``created_unix``); empty if unreadable
    info: dict[str, Any]

    @property
    def root(self) -> str | None:
        root = self.info.get("root")
        return root if isinstance(root, str) else None

    def __iter__(self) -> Iterator[Any]:  # (node, job_key, path, info), as a tuple unpacks
        return iter((self.node, self.job_key, self.path, self.info))

# ------------------------------------------------------------------ the store
class ShmStore:
    """One node's shared memory for one checkpoint root (see the module docstring).

    Args:
        root: the checkpoint root (names the job directory).
        shm_dir: where shared memory lives (default ``RECOVERKIT_SHM_DIR``, else /dev/shm).
        node: this node's name (default ``RECOVERKIT_NODE``, else the host name).
        budget_bytes: the most bytes of slot data files this store may hold, own snapshots
            and replicas together; checked before a data file grows.
        fs: file operations for small files (job.json, indexes).
        slots: slots per owner (2: double buffering).
    """

    def __init__(
        self,
        root: str,
        shm_dir: str | None = None,
        node: str | None = None,
        budget_bytes: int = 4 << 30,
        fs: LocalFS | None = None,
        *,
        slots: int = 2,
    ) -> None:
        if not isinstance(slots, int) or not 2 <= slots <= MAX_SLOTS:
            raise ValueError(f"slots must be an integer in [2, {MAX_SLOTS}], got {slots!r}")
        if not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise ValueError(f"budget_bytes must be an integer >= 0, got {budget_bytes!r}")
        self.root = os.path.abspath(os.fspath(root))
        self.node = node_name(node)
        self.shm_dir = shm_dir_of(shm_dir)
        self.job_key = job_key(self.root)
        self.job_dir = os.path.join(self.shm_dir, TOP, self.node, self.job_key)
        self.budget_bytes = budget_bytes
        self.nslots = slots
        self.fs = fs or LocalFS()
        self._sets: dict[tuple[int, bool], SlotSet] = {}
        self._lock = threading.Lock()
        self._made = False

    def __repr__(self) -> str:
        return f"ShmStore({self.job_dir!r})"

    def make_job_dir(self) -> None:
        """Create the job directory (0700, this user's; ``recoverkit/`` and the node's
        directory above it sticky and shared by every user; no symlink followed inside
        ``shm_dir``) and its ``job.json``, unless they exist (writers call it first)."""
        if self._made and os.path.isdir(self.job_dir):
            return
        os.makedirs(self.shm_dir, 0o700, exist_ok=True)  # the user's: may be a symlink
        for path in (os.path.join(self.shm_dir, TOP), os.path.dirname(self.job_dir)):
            _real_dir(path, create=True, shared=True)  # every user's jobs meet here
        _real_dir(self.job_dir, create=True)
        info = os.path.join(self.job_dir, JOB_FILE)
        if not os.path.lexists(info):
            body = {"root": self.root, "node": self.node, "created_unix": time.time()}
            tmp = f"{info}.tmp-{os.getpid()}-{threading.get_ident()}"
            self.fs.write_file(tmp, json.dumps(body).encode(), new=True)
            os.replace(tmp, info)
        self._made = True

    def slots(self, owner: int, replica: bool = False) -> SlotSet:
        """The slots of ``owner``'s snapshots (``replica``: the replicas of them held here)."""
        if type(owner) is not int or not 0 <= owner <= MAX_OWNER:
            raise ValueError(f"owner must be a rank in [0, {MAX_OWNER}], got {owner!r}")
        key = (owner, bool(replica))
        with self._lock:
            s = self._sets.get(key)
            if s is None:
                name = f"{'replica' if replica else 'rank'}-{owner:05d}"
                s = self._sets[key] = SlotSet(self, owner, bool(replica), os.path.join(self.job_dir, name))
            return s

    def used_bytes(self) -> int:
        """Bytes of the data files of every owner directory this store has handed out."""
        with self._lock:
            sets = list(self._sets.values())
        return sum(s.data_file_bytes() for s in sets)

    def close(self) -> None:
        """Unmap what this store mapped (the shared memory stays)."""
        with self._lock:
            sets = list(self._sets.values())
        for s in sets:
            s.close()

    def handed_out(self) -> list[SlotSet]:
        """The slot sets this store handed out (:meth:`slots`), own and replica."""
        with self._lock:
            return list(self._sets.values())

    def clear(self) -> None:
        """Delete the slots of every owner this store handed out (own snapshots and the
        replicas held), then the job directory if nothing else is left in it."""
        for s in self.handed_out():
            s.clear()
        self.remove_if_empty()

    def remove_if_empty(self) -> None:
        """Delete the job directory (and empty parents) if no owner's slots are left in it
        (another process's owners on this node keep it)."""
        try:
            left = [n for n in os.listdir(self.job_dir) if n != JOB_FILE and not n.startswith(JOB_FILE + ".tmp-")]
        except FileNotFoundError:
            return
        if not left:
            _remove_job_dir(self.job_dir)
            self._made = False

    def remove_job(self) -> None:
        """Delete this job's shared memory on this node (and the node directory if empty)."""
        self.close()
        with self._lock:
            self._sets.clear()
            self._made = False
        _remove_job_dir(self.job_dir)

    @staticmethod
    def jobs(shm_dir: str | None = None) -> list[JobInfo]:
        """Every job directory under ``shm_dir`` (default as for a store), by node and key.

        Names that are not a valid node or job key, anything that is not a real directory,
        and other users' jobs are skipped; ``info`` is the job's ``job.json`` (size-capped, strict
        JSON; empty when missing or unreadable).
        """
        top = os.path.join(shm_dir_of(shm_dir), TOP)
        out: list[JobInfo] = []
        for node in _listdirs(top):
            if not _NAME.fullmatch(node):
                continue
            for key in _listdirs(os.path.join(top, node)):
                path = os.path.join(top, node, key)
                if _JOB_KEY.fullmatch(key) and _mine(path):
                    out.append(JobInfo(node, key, path, _read_job_info(path)))
        return out

    @staticmethod
    def remove(job: JobInfo) -> None:
        """Delete a job directory :meth:`jobs` found (``recoverkit gc``)."""
        _remove_job_dir(job.path)


def _listdirs(path: str) -> list[str]:
    try:
        names = sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for n in names:
        try:
            if stat.S_ISDIR(os.lstat(os.path.join(path, n)).st_mode):
                out.append(n)
        except FileNotFoundError:
            continue
    return out


def _mine(path: str) -> bool:
    try:
        return os.lstat(path).st_uid == os.getuid()
    except OSError:
        return False


def _read_job_info(path: str) -> dict[str, Any]:
    try:
        raw = LocalFS().read_file(os.path.join(path, JOB_FILE), max_bytes=64 << 10)
        body = json.loads(raw)
    except (OSError, ValueError, RecursionError):
        return {}
    return body if isinstance(body, dict) else {}


def _remove_job_dir(path: str) -> None:
    LocalFS().remove_tree(path)
    for parent in (os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        try:
            os.rmdir(parent)  # the node directory, then recoverkit/, when empty
        except OSError:
            break


