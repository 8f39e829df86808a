"""typedcoll.demo: the engine model behind ``typedcoll demo``.

A model of an attention-DP serving engine's executor loops (overlap, non-overlap, pipeline
parallel) whose rank-local gates put collectives on some ranks only, driven by a seeded fault
plan and run in three modes that differ only in their collectives (``backends``): raw (mpi4py
pickle, as the engine was), typed (TypedComm: a DesyncError on every rank) and symmetric
(SymmetricFlush: the gated messages posted and drained at a point every rank reaches).

  plan.py      FaultPlan: which rank idles, times out or reports stats, per iteration
  model.py     ExecutorModel: the loops; every collective is issued from one of its lines
  backends.py  the three modes, and the conservation check of the symmetric one
  runner.py    one MPI rank of the demo job: every mode on one plan, raw last
  cost.py      the control plane's cost: the engine's per-channel fix against one flush
  launch.py    finding mpiexec and relaunching a command on N ranks
  demo.py      ``typedcoll demo``: launch, read back, print the side-by-side summary

The model also runs on in-process ranks (``typedcoll.testing.run``) in its typed modes.
"""
