"""Where real task data comes from: local exports (``data.path``) or the published hub datasets.

The Flower Datasets way, for both: one ``datasets.Dataset`` (loaded from local parquet /
arrow / json / csv files by :func:`load_local`, the one local reader of the project, also
behind Stack Overflow and Reddit; or from the hub by ``flwr_datasets.FederatedDataset``) and a
``NaturalIdPartitioner`` over it that makes one partition per writer / identity.
Without ``data.path`` the hub is tried; on an offline machine that fails, and the
error says to set ``data.path``.

:class:`LazyTaskList` keeps a loader's tasks unbuilt until one is first indexed, so a
Flower client decodes only its own task's images (once per worker process).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from fedtask.data.base import TaskData

# file suffix -> datasets packaged builder, in order of preference when a folder mixes them
BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}
_KINDS = "parquet, arrow, json, jsonl or csv"


class LazyTaskList(Sequence):
    """A read-only list of tasks, each built on first access and then kept.

    ``builders[i]()`` returns task ``i``. ``+`` (as in ``in_tasks + out_tasks``) builds
    both operands and returns a plain list.
    """

    def __init__(self, builders: Sequence[Callable[[], TaskData]]):
        self._builders = list(builders)
        self._built: dict[int, TaskData] = {}

    def __len__(self) -> int:
        return len(self._builders)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"task index {index} out of range ({len(self)} tasks)")
        if index not in self._built:
            self._built[index] = self._builders[index]()
        return self._built[index]

    def __add__(self, other):
        return list(self) + list(other)

    def __radd__(self, other):
        return list(other) + list(self)

    @property
    def num_built(self) -> int:
        """How many tasks have been materialised in this process (for tests and logs)."""
        return len(self._built)

    def __repr__(self) -> str:
        return f"LazyTaskList({len(self)} tasks, {self.num_built} built)"


def load_dataset_source(path: str, hub_dataset: str, partition_by: str, hub_subset: str | None = None,
                        required_columns: Sequence[str] = (), image_column: str | None = None):
    """The train split as a ``datasets.Dataset``, a ``NaturalIdPartitioner`` over it, and a
    description of where it came from (for messages).

    ``path`` set: local files (see :func:`load_local`); empty: ``FederatedDataset`` on the
    hub dataset, partitioned by ``partition_by`` (its "train" split). Raises
    FileNotFoundError / ValueError with a one-line message naming ``data.path`` or the file.
    """
    from flwr_datasets.partitioner import NaturalIdPartitioner

    if path:
        dataset, where = load_local(Path(path)), path
        _check_columns(dataset, (partition_by, *required_columns), where, hub_dataset)
        if image_column:
            dataset = _ensure_image_feature(dataset, image_column, where)
        partitioner = NaturalIdPartitioner(partition_by=partition_by)
        partitioner.dataset = dataset
    else:
        dataset, partitioner = _load_hub(hub_dataset, hub_subset, partition_by)
        where = f"hub dataset {hub_dataset}"
        _check_columns(dataset, (partition_by, *required_columns), where, hub_dataset)
    return dataset, partitioner, where


def _check_columns(dataset, columns, where: str, hub_dataset: str) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{where}: no column {missing[0]!r} (columns: {', '.join(dataset.column_names)}); "
                         f"expected an export of {hub_dataset}")


def _ensure_image_feature(dataset, column: str, where: str):
    """Exports without datasets' feature metadata keep images as {bytes, path} structs or
    file paths: cast those to ``datasets.Image`` (pixel arrays are left for the decoder)."""
    import datasets

    feature = dataset.features[column]
    if isinstance(feature, datasets.Image):
        return dataset
    is_struct = isinstance(feature, dict) and "bytes" in feature
    is_scalar = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "binary",
                                                                          "large_binary")
    if not (is_struct or is_scalar):
        return dataset
    try:
        return dataset.cast_column(column, datasets.Image())
    except Exception as err:
        raise ValueError(f"{where}: column {column!r} cannot be read as images ({_reason(err)})") from None


def _load_hub(hub_dataset: str, hub_subset: str | None, partition_by: str):
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import NaturalIdPartitioner

    try:
        # shuffle=False: keep the published row order so tasks match a local export of the same files
        fds = FederatedDataset(dataset=hub_dataset, subset=hub_subset, shuffle=False,
                               partitioners={"train": NaturalIdPartitioner(partition_by=partition_by)})
        dataset = fds.load_split("train")
    except Exception as err:  # offline, gated, renamed...: whatever it is, the fix is data.path
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise FileNotFoundError(
            f"data.path is not set and the hub dataset {hub_dataset} could not be loaded "
            f"({type(err).__name__}{': ' + reason if reason else ''}); set data.path to a local export "
            "(parquet / arrow / json / csv files, or a save_to_disk folder)") from None
    partitioner = fds.partitioners["train"]
    if not partitioner.is_dataset_assigned():
        partitioner.dataset = dataset
    return dataset, partitioner


def local_files(path: Path) -> tuple[str, list[Path]]:
    """The ``datasets`` builder and the files :func:`load_local` reads for ``path`` (a file, or a
    folder that is not a ``save_to_disk`` folder), in the order their rows are read.

    The rules: a file must have one of the :data:`BUILDERS` suffixes. A folder is searched
    recursively, skipping hidden files and folders (``.cache``, ``.git`` ...); the files are
    taken in sorted path order. When a folder mixes kinds, only the most preferred kind is
    read (parquet, then arrow, then json / jsonl, then csv; the others are ignored). Among
    those, files named ``train*`` or lying in a folder named ``train`` form the train split
    when there are any (the hub layout ``train-00000-of-00019.parquet``); else all are read.
    """
    if path.is_file():
        if path.suffix not in BUILDERS:
            raise ValueError(f"{path}: not a {_KINDS} file (suffix {path.suffix or 'none'!r})")
        return BUILDERS[path.suffix], [path]
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise FileNotFoundError(f"{path}: no {', '.join(BUILDERS)} files found")
    builder = min({BUILDERS[f.suffix] for f in files}, key=list(dict.fromkeys(BUILDERS.values())).index)
    files = [f for f in files if BUILDERS[f.suffix] == builder]
    train = [f for f in files if f.name.startswith("train") or f.parent.name == "train"]
    return builder, train or files


def load_local(path: Path):
    """Load local exports as one ``datasets.Dataset`` (the train split when there are several).

    Accepts a ``save_to_disk`` folder, a single parquet / arrow / json / jsonl / csv file, or a
    folder of them (which files, and in which order: :func:`local_files`). Rows come in file
    order, then row order within a file. JSON files may hold JSON lines or one JSON array of
    objects (starting at the file's first byte). Errors are one line naming the file at fault
    (or ``path`` when no single file is): FileNotFoundError or ValueError.
    """
    import datasets

    path = Path(path)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:
            raise ValueError(f"{path}: cannot be read by datasets.load_from_disk ({_reason(err)})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if "train" in loaded:
                return loaded["train"]
            if len(loaded) == 1:
                return next(iter(loaded.values()))
            raise ValueError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(loaded)})")
        return loaded

    builder, files = local_files(path)
    if builder == "parquet":  # a cheap check that names the broken file before anything is read
        import pyarrow.parquet as pq

        for file in files:
            try:
                pq.read_schema(file)
            except Exception as err:
                raise ValueError(f"{file}: not a readable parquet file ({_reason(err)})") from None
    try:
        return _load_files(builder, files)
    except Exception as err:
        if len(files) == 1:
            raise ValueError(f"{files[0]}: cannot be read as {builder} "
                             f"({_file_reason(files[0], builder, err)})") from None
        for file in files:  # which one is at fault? (only on this error path)
            try:
                _load_files(builder, [file])
            except Exception as file_err:
                raise ValueError(f"{file}: cannot be read as {builder} "
                                 f"({_file_reason(file, builder, file_err)})") from None
        raise ValueError(f"{path}: its {len(files)} {builder} files cannot be read as one table, "
                         f"although each can; do they have the same columns and types? ({_reason(err)})") from None


def _load_files(builder: str, files: Sequence[Path]):
    import datasets

    return datasets.load_dataset(builder, data_files={"train": [str(f) for f in files]}, split="train")


def _file_reason(file: Path, builder: str, err: BaseException) -> str:
    """Why ``file`` failed, with a hint for a JSON array that does not start at the first byte
    (datasets' json reader takes such a file for JSON lines and fails cryptically)."""
    if builder == "json":
        try:
            with open(file, "rb") as handle:
                head = handle.read(1 << 12)
        except OSError:
            head = b""
        if not head.startswith(b"[") and head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"["):
            return ("a JSON array must start at the file's first byte; remove the leading whitespace or "
                    "byte-order mark, or write JSON lines")
    return _reason(err)


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    cause = err.__cause__ or err.__context__
    if cause is not None and str(cause).strip():  # datasets wraps the real error (DatasetGenerationError)
        text = str(cause).strip()
    first = text.splitlines()[0][:200] if text else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def column_numpy(dataset, name: str) -> np.ndarray:
    """One column as a numpy array, read through Arrow (fast, no image decoding)."""
    table = dataset.select_columns([name]).with_format("arrow")[:]
    return table.column(name).to_numpy(zero_copy_only=False)


def partition_sizes(partitioner, dataset, partition_by: str) -> np.ndarray:
    """Rows per partition id, in the partitioner's order (sorted natural ids)."""
    ids = column_numpy(dataset, partition_by)
    natural, counts = np.unique(ids, return_counts=True)
    mapping = partitioner.partition_id_to_natural_id
    if not mapping:
        _ = partitioner.num_partitions  # builds the mapping from the dataset
        mapping = partitioner.partition_id_to_natural_id
    if len(mapping) != len(natural) or any(mapping[i] != natural[i] for i in (0, len(natural) - 1)):
        raise ValueError(f"{partition_by}: natural ids disagree with the partitioner's order")
    return counts


def choose_in_out(eligible: np.ndarray, num_in: int, num_out: int, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A seeded draw of disjoint IN and OUT tasks from the eligible ones."""
    if len(eligible) < num_in + num_out:
        raise ValueError(f"data.num_in_tasks + data.num_out_tasks = {num_in + num_out}, but only "
                         f"{len(eligible)} {what}")
    order = np.random.default_rng(seed).permutation(eligible)
    return order[:num_in], order[num_in:num_in + num_out]


def natural_id_task_builders(partitioner, sizes: np.ndarray, data: dict, seed: int, what: str,
                             to_task: Callable[[str, object, object], TaskData]):
    """Seeded IN / OUT choice among natural-id partitions with enough rows, and one lazy
    builder per chosen task that splits its partition into train / held-out rows.

    ``to_task(name, train_rows, holdout_rows)`` turns two ``datasets.Dataset`` slices into a
    TaskData. A partition needs data.train_samples_per_task + data.holdout_samples_per_task
    rows; exactly that many are used (a seeded subset when it has more).
    """
    n_train, n_hold = data.train_samples_per_task, data.holdout_samples_per_task
    need = n_train + n_hold
    eligible = np.flatnonzero(sizes >= need)
    in_ids, out_ids = choose_in_out(eligible, data.num_in_tasks, data.num_out_tasks, seed,
                                    f"{what} have at least {need} samples (data.train_samples_per_task + "
                                    "data.holdout_samples_per_task)")

    def builder(partition_id: int) -> Callable[[], TaskData]:
        def build() -> TaskData:
            part = partitioner.load_partition(partition_id)
            order = np.random.default_rng([seed, partition_id]).permutation(len(part))
            name = str(partitioner.partition_id_to_natural_id[partition_id])
            return to_task(name, part.select(np.sort(order[:n_train])), part.select(np.sort(order[n_train:need])))

        return build

    return ([builder(int(pid)) for pid in in_ids], [builder(int(pid)) for pid in out_ids])
