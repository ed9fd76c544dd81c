"""Spawn gloo ranks on CPU for the data-parallel tests and bring back what each rank found.

``spawn_ranks(tmp_path, body, *args)`` starts ``world`` processes; rank ``r`` joins a process group
(``gloo``, a file rendezvous in ``tmp_path``), runs ``body(r, world, *args)`` (a module-level function
of the test module, so the spawned process can import it) and writes the plain-JSON dict it returns to
``tmp_path/rank{r}.json``; a rank that raised writes its traceback instead, and the parent fails with
every rank's traceback. Every rank leaves its process group, whatever happened.
"""
from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, world: int, init: str, out: str, body: Callable, args: tuple) -> None:
    result: dict = {}
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        result = body(rank, world, *args)
    except Exception:  # noqa: BLE001 - reported to the parent
        result = {"error": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)


def spawn_ranks(tmp_path: Path, body: Callable, *args, world: int = 2) -> list[dict]:
    """Every rank's dict (rank order), after all of them ran ``body``; fails with a rank's traceback."""
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_rank, args=(world, init, str(tmp_path), body, args), nprocs=world, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    errors = [f"rank {r}:\n{res['error']}" for r, res in enumerate(results) if "error" in res]
    assert not errors, "\n".join(errors)  # every rank's: one rank's failure often breaks the others'
    return results
