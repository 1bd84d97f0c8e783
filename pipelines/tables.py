"""Batches of rows as Beam elements: small helpers shared by the stages.

A batch of examples travels either as a dict of equal-length numpy arrays ("rows") or
as an Arrow table, so a Beam element carries many examples, not one (Beam costs
~100 us per element).
"""
import apache_beam as beam
import numpy as np
import pyarrow as pa

from jest_curate import formats

__all__ = ["take", "concat", "split_by", "sum_arrays", "ConcatTables", "shards_by_id"]


def take(rows: dict, index) -> dict:
    return {k: v[index] for k, v in rows.items()}


def concat(parts) -> dict:
    parts = list(parts)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def split_by(table: pa.Table, column: str):
    """(key, rows of `table` with that key) for each value of `column`, keys ascending.

    Sorts once: one pass per key would cost O(rows x keys). `take` copies each piece (a
    slice would pickle the whole table's buffers into the shuffle).
    """
    ids = table.column(column).to_numpy(zero_copy_only=False)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else []
    for start, stop in zip(starts, list(starts[1:]) + [len(ids)]):
        key = ids[start]
        yield (key.item() if isinstance(key, np.generic) else key), \
            table.take(pa.array(order[start:stop]))


def sum_arrays(arrays):
    total = None
    for a in arrays:
        total = a.copy() if total is None else total + a
    return total


class ConcatTables(beam.CombineFn):
    """Tables of one key as a list, concatenated per bundle before the shuffle.

    When every producer sends a small piece to most keys, a plain GroupByKey would
    shuffle (producers x keys) small tables, a count that grows with the square of the
    data; lifted before the shuffle, this sends one table per key per bundle.
    """

    def create_accumulator(self):
        return []

    def add_input(self, tables, table):
        tables.append(table)
        return tables

    def merge_accumulators(self, accumulators):
        return [t for tables in accumulators for t in tables]

    def compact(self, tables):
        # One contiguous table: pickling a table of many chunks is far slower.
        return [pa.concat_tables(tables).combine_chunks()] if len(tables) > 1 else tables

    def extract_output(self, tables):
        return tables


def shards_by_id(handle, root: str) -> formats.ShardsById:
    """The shards of the dataset at `root`, read from its index once per worker process
    (`handle`: the DoFn's `apache_beam.utils.shared.Shared`)."""
    return handle.acquire(lambda: formats.ShardsById(root), tag=f"shards:{root}")
