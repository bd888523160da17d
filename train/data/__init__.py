"""The training data of data-free QAT: the teacher's own trajectories (online or cached)."""
