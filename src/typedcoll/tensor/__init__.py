"""Checked tensor collectives over torch.distributed (``TypedComm.all_gather_tensor`` and its
siblings): ``ops`` holds the collectives and the two paths, ``envelope`` the per-call record and
its readable form, ``device`` the NCCL path's envelope ring."""
