"""ds-distil: DistilBERT-style knowledge distillation on DeepSpeed.

Architecture, one module per concern:

- ``surgery``     student built from its teacher (layer map, weight copy, embedding fold)
- ``data``        corpus preparation into a memory-mapped Arrow dataset
- ``batching``    length-grouped, world-size-independent distributed batches
- ``masking``     dynamic MLM masking, deterministic per (seed, epoch, sample)
- ``losses``      the triple loss (L_ce, L_mlm, L_cos), computed in fp32
- ``config``      the typed run config and its cross-checks with the DeepSpeed JSON
- ``distributed`` rank discovery (deepspeed launcher, mpirun, srun) and collectives
- ``trainer``     the DeepSpeed engine, the co-located teacher and the step loop
- ``checkpoint``  atomic save / resume / export
- ``metrics``     console line, TensorBoard, throughput and MFU
- ``cli``         the ``ds-distil`` command

Modules keep heavy imports (torch, deepspeed, transformers) inside functions where the
CLI imports them, so ``ds-distil --help`` stays instant.
"""

__version__ = "0.1.0"
