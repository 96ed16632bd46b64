"""Everything that knows about processes: dist.py (the world, the mesh and its groups, rank 0's decisions),
sharding.py (the sequence shard), usp.py (Ulysses / ring / hybrid attention, the video->audio merge), plan.py
(the one plan object family code calls). Nothing outside this folder touches a process group."""
