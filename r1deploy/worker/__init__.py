"""One rank's side of a step: ModelRunner (KV pool, attention metadata, CUDA graphs, execute, sample), the
ModelInput it is given, and the Executor seam with LocalExecutor. engine/ drives it; distributed/ runs it on
tensor-parallel ranks. Nothing here imports engine/."""
