"""Traced steps kept on disk (`jax.export`), so a warm start skips tracing them again.

JAX's persistent compilation cache (engine/compile_cache.py) skips XLA's compile, but its key is the
lowered module, so every process still traces each step in Python first. Tracing grows with the
model's depth: on GPT-2-small shapes the gradient pass took 0.9-1.2 s and each suffix evaluation
about 0.3 s, 5.3 s over the 15 steps of a warm start. `ExportedJit` is `jax.jit` that serializes the
traced step (StableHLO) the first time any process builds it; later processes deserialize it (a few
ms) and lower that instead of tracing. The module then compiles through the persistent cache as
before, and runs exactly what the process that saved it ran (a test checks bitwise equality).

An entry's name is a hash of everything that decides the trace: the step's name and static values,
its arguments' tree, shapes, dtypes and shardings, the devices, the jax and jaxlib versions, and
epo-tui's engine source (so any change to the code invalidates every entry). Entries live in
`exported/` inside the compilation cache's folder, and only while that cache is on: `EPO_TUI_JAX_CACHE=off`
turns both off. A step whose static values have no stable text (an object printed with its address)
is never saved; it is traced, as plain `jax.jit` does.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
from pathlib import Path

import jax

from epo_tui.atomic import write_bytes_atomic

SUBFOLDER = "exported"
KEPT_SIGNATURES = 64  # per step: argument signatures whose loaded executables stay in memory
KEPT_ENTRIES = 1000  # files on disk (each 0.1-1 MB); past it, the least recently written go
FORMAT = 2  # of the files (jax.export's own serialization): bumped when what is written changes


@functools.cache
def _engine_source_hash() -> str:
    engine = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(engine.rglob("*.py")):
        digest.update(path.relative_to(engine).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _folder() -> Path | None:
    """`exported/` in the compilation cache's folder, while that cache is on (else None)."""
    cache = jax.config.values.get("jax_compilation_cache_dir")
    return Path(cache) / SUBFOLDER if cache else None


def _devices_text() -> str:
    import jaxlib

    devices = [(d.id, d.platform, d.device_kind, d.process_index) for d in jax.devices()]
    return f"jax {jax.__version__} jaxlib {jaxlib.__version__} {devices}"


class ExportedJit:
    """`jax.jit(fun, static_argnames=...)` whose traces persist across processes.

    `name` names the step in the cache key; `key` adds what `fun` closes over that decides its trace
    (a `functools.partial`'s statics, the mesh). Calls take the same arguments as the jitted `fun`;
    `lower` is jit's (cost analysis). Raises what `fun` raises.
    """

    def __init__(self, fun, name: str, key: tuple = (), static_argnames: tuple[str, ...] = ()):
        self.fun, self.name, self.key = fun, name, key
        self.static_argnames = tuple(static_argnames)
        self.jitted = jax.jit(fun, static_argnames=self.static_argnames)
        self._loaded: collections.OrderedDict = collections.OrderedDict()  # signature -> jitted call, or None

    def lower(self, *args, **static):
        return self.jitted.lower(*args, **static)

    def cache_size(self) -> int:
        """Argument signatures built in this process, through the cache or plain jit."""
        return len(self._loaded) + self.jitted._cache_size()

    def __call__(self, *args, **static):
        folder = _folder()
        # several hosts: each traces (their steps must agree); a keyword that is not static: jit's business
        if folder is None or jax.process_count() > 1 or not set(static) <= set(self.static_argnames):
            return self.jitted(*args, **static)
        leaves, in_tree = jax.tree.flatten(args)
        signature = (in_tree, tuple(static.items()),
                     tuple((jax.typeof(leaf), getattr(leaf, "sharding", None)) for leaf in leaves))
        if signature not in self._loaded:  # once per signature, even when it is not exportable (None)
            entry = self._load_or_export(folder, leaves, in_tree, static)
            self._loaded[signature] = entry
            if len(self._loaded) > KEPT_SIGNATURES:
                self._loaded.popitem(last=False)
        else:
            entry = self._loaded[signature]
            self._loaded.move_to_end(signature)
        if entry is None:  # not exportable: plain jit
            return self.jitted(*args, **static)
        return entry(*leaves)

    def _entry_path(self, folder: Path, leaves: list, in_tree, static: dict) -> Path | None:
        text = repr((FORMAT, self.name, self.key, sorted(static.items()), str(in_tree),
                     [(str(jax.typeof(leaf)), repr(getattr(leaf, "sharding", None))) for leaf in leaves],
                     _devices_text(), _engine_source_hash()))
        if " at 0x" in text:  # an address: a different text in every process, so no entry could be found
            return None
        return folder / f"{self.name.replace('/', '-')}-{hashlib.sha256(text.encode()).hexdigest()[:32]}.bin"

    def _load_or_export(self, folder: Path, leaves: list, in_tree, static: dict):
        """The jitted call of the exported step (None: not exportable, so plain jit)."""
        path = self._entry_path(folder, leaves, in_tree, static)
        if path is None:
            return None
        try:
            exported = jax.export.deserialize(bytearray(path.read_bytes()))
        except Exception:  # noqa: BLE001 - missing, cut short or from another version: export it afresh
            try:
                exported = self._export(leaves, in_tree, static)
            except Exception:  # noqa: BLE001 - not exportable: plain jit, which raises any real error itself
                return None
            # an entry that cannot be written (no flatbuffers, an output type without a serialization, a
            # full disk) only means the next process traces again
            with contextlib.suppress(Exception):
                write_bytes_atomic(path, bytes(exported.serialize()))
                _drop_oldest(folder)
        return jax.jit(exported.call)

    def _export(self, leaves: list, in_tree, static: dict):
        """The step exported over its arguments' leaves (jax.export serializes no custom input tree); its
        outputs keep their tree, which needs each node type registered (`register_dataclass_output`)."""

        def over_leaves(*flat_args):
            return self.fun(*jax.tree.unflatten(in_tree, flat_args), **static)

        return jax.export.export(jax.jit(over_leaves))(*leaves)


def register_dataclass_output(cls):
    """Class decorator: lets jax.export serialize a `jax.tree_util.register_dataclass` type without
    static fields when a step returns it (its node data is the empty tuple)."""
    jax.export.register_pytree_node_serialization(
        cls, serialized_name=f"{cls.__module__}.{cls.__qualname__}",
        serialize_auxdata=lambda aux: b"", deserialize_auxdata=lambda data: ())
    return cls


def _drop_oldest(folder: Path) -> None:
    entries = sorted(folder.glob("*.bin"), key=lambda p: p.stat().st_mtime)
    for path in entries[:max(0, len(entries) - KEPT_ENTRIES)]:
        path.unlink(missing_ok=True)


def exported_jit(static_argnames: tuple[str, ...] = ()):
    """Decorator: `ExportedJit` of a module-level function, named after it."""

    def wrap(fun):
        return functools.wraps(fun)(ExportedJit(fun, f"{fun.__module__}.{fun.__qualname__}",
                                                static_argnames=static_argnames))

    return wrap
