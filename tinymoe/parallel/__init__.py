"""Training on P processes with MPI: data parallelism and expert parallelism.

Run under ``mpiexec -n P``; every rank executes the same program (SPMD). The design (how
the batch, the gradients and the experts are split, and why it is the same training as one
process) is told in the docstrings of the modules below and in docs/parallel.md.

Modules, lowest first (each imports only those above it):

    comm.py      ``Comm``: the mpi4py communicator wrapper (host staging, byte and time
                 counts), ``mpi_world_size``, ``ParallelError``; mpi4py is imported only
                 when a ``Comm`` is made
    exchange.py  the two Alltoall exchanges of expert parallelism as autograd Functions
                 (``ToOwners`` / ``ToSources``, ``exchange_to_owners`` / ``exchange_to_sources``)
    layer.py     ``ExpertParallelMoE`` (the MoE layer with sharded experts), ``shard_experts``,
                 ``is_expert_param``
    hooks.py     what the training loop calls: ``Parallel`` (batch slicing, gradient
                 all-reduce, clipping norm, gathered checkpoints, ``agree``, ``log_fields``),
                 ``setup``, ``run_train``, ``call_on_every_rank``, the test fault hook
    cost.py      the cost model: ``alltoall_bytes``, ``exchange_bytes_per_step``,
                 ``project_step``

Every public name is re-exported here, so ``from tinymoe.parallel import X`` works as before.
"""
from __future__ import annotations

# the names beyond __all__ are re-exported too (tinymoe.parallel.X, as before the split)
from tinymoe.parallel.comm import Comm, ParallelError, mpi_world_size  # noqa: F401
from tinymoe.parallel.cost import (alltoall_bytes, exchange_bytes_per_step,  # noqa: F401
                                   project_step)
from tinymoe.parallel.exchange import (ToOwners, ToSources, exchange_to_owners,  # noqa: F401
                                       exchange_to_sources)
from tinymoe.parallel.hooks import (FAULT_ENV, MODES, Parallel, call_on_every_rank,  # noqa: F401
                                    run_train, setup)
from tinymoe.parallel.layer import ExpertParallelMoE, is_expert_param, shard_experts

__all__ = ["MODES", "Comm", "Parallel", "ExpertParallelMoE", "exchange_to_owners",
           "exchange_to_sources", "shard_experts", "is_expert_param", "setup", "alltoall_bytes"]
